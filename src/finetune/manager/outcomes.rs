//! What the engine reports about a job, made durable: step events, checkpoints, the final
//! model and its result file.

use serde_json::json;

use super::*;

impl Manager {
    pub(super) async fn engine_event(&mut self, id: &str, ev: JobEvent) -> Result<(), StoreError> {
        match ev {
            JobEvent::Started { total_steps } => {
                tracing::info!(job = id, total_steps, "fine-tuning job training");
            }
            JobEvent::Step(m) => self.step(id, m).await?,
            JobEvent::Validation { step, epoch, valid_loss, valid_accuracy } => {
                let data = json!({"step": step, "epoch": epoch, "valid_loss": valid_loss,
                                  "valid_mean_token_accuracy": valid_accuracy});
                let msg = format!(
                    "Epoch {epoch}: validation loss={valid_loss:.4}, accuracy={valid_accuracy:.3}"
                );
                self.event(id, "info", msg, Some(data)).await;
            }
            JobEvent::Checkpoint(c) => {
                self.checkpoint(id, &c).await?;
            }
            JobEvent::Succeeded(c) => self.succeeded(id, &c).await?,
            JobEvent::Stopped(c) => {
                let intent = self.running.remove(id).map(|r| r.intent);
                match intent {
                    Some(Intent::Cancel) | None => {}
                    Some(Intent::PauseThenResume) => {
                        self.checkpoint(id, &c).await?;
                        self.queue.push_back(id.to_string());
                    }
                    Some(Intent::Pause | Intent::Shutdown | Intent::Train) => {
                        self.checkpoint(id, &c).await?;
                    }
                }
                self.start_queued().await?;
            }
            JobEvent::Failed(message) => {
                self.running.remove(id);
                if let Ok(mut job) = self.job(id).await {
                    job.error = Some(JobError {
                        code: "training_failed".into(),
                        message: message.clone(),
                        param: None,
                    });
                    self.event(id, "error", format!("Fine-tuning job failed: {message}"), None)
                        .await;
                    self.set_status(&mut job, JobStatus::Failed).await?;
                }
                self.start_queued().await?;
            }
        }
        Ok(())
    }

    pub(super) async fn step(&mut self, id: &str, m: StepMetrics) -> Result<(), StoreError> {
        let metrics = &self.deps.metrics;
        metrics.finetune_tokens_total.with_label_values(&[id]).inc_by(m.tokens);
        metrics.finetune_loss.with_label_values(&[id]).set(m.train_loss);
        metrics.finetune_step_seconds.observe(m.step_seconds);
        let data = json!({
            "step": m.step, "total_steps": m.total_steps, "epoch": m.epoch,
            "train_loss": m.train_loss, "train_mean_token_accuracy": m.train_accuracy,
            "learning_rate": m.learning_rate, "grad_norm": m.grad_norm,
            "tokens": m.tokens, "trained_tokens": m.trained_tokens,
            "step_seconds": m.step_seconds, "tokens_per_second": m.tokens_per_second,
        });
        let msg = format!(
            "Step {}/{}: training loss={:.4}, token accuracy={:.3}, {:.0} tokens/s",
            m.step, m.total_steps, m.train_loss, m.train_accuracy, m.tokens_per_second
        );
        self.event(id, "info", msg, Some(data)).await;
        let Ok(mut job) = self.job(id).await else { return Ok(()) };
        job.trained_tokens = Some(m.trained_tokens as i64);
        if let Some(r) = self.running.get_mut(id) {
            r.steps_done_here += 1;
            let per_step = r.started.elapsed().as_secs_f64() / r.steps_done_here as f64;
            let left = m.total_steps.saturating_sub(m.step) as f64 * per_step;
            job.estimated_finish = Some(now() + left.ceil() as i64);
        }
        if job.status == JobStatus::Running {
            self.save(&job).await?;
        }
        Ok(())
    }

    pub(super) fn model_id(&self, job: &FineTuningJob) -> String {
        let short = job.id.trim_start_matches("ftjob-");
        let short = &short[..short.len().min(8)];
        let suffix = job.user_provided_suffix.as_deref().unwrap_or("");
        format!("ft:{}:coserve:{suffix}:{short}", self.deps.base_model)
    }

    /// Saves a checkpoint, lists it, and serves it as `<model>:ckpt-step-N`.
    pub(super) async fn checkpoint(
        &self,
        id: &str,
        c: &Checkpoint,
    ) -> Result<CheckpointRow, StoreError> {
        let job = self.job(id).await.map_err(|e| match e {
            ManagerError::Store(s) => s,
            other => StoreError::io("checkpoint", std::io::Error::other(other.to_string())),
        })?;
        let step = c.resume.step;
        let rel = format!("blobs/checkpoints/{id}/step-{step}");
        let dir = self.deps.store.blob_path(&rel);
        let (resume, base) = (c.resume.clone(), self.deps.base_model.clone());
        tokio::task::spawn_blocking(move || save_checkpoint(&dir, &resume, &base))
            .await
            .map_err(|_| StoreError::Interrupted)?
            .map_err(|e| StoreError::io("save checkpoint", std::io::Error::other(e.to_string())))?;
        let model = format!("{}:ckpt-step-{step}", self.model_id(&job));
        let metrics = c.metrics.as_ref().map_or(json!({"step": step}), |m| {
            json!({"step": m.step, "train_loss": m.train_loss,
                   "train_mean_token_accuracy": m.train_accuracy})
        });
        let row = CheckpointRow {
            id: new_id("ftckpt"),
            job_id: id.to_string(),
            step: step as i64,
            created_at: now(),
            metrics,
            path: rel,
            fine_tuned_model_checkpoint: model.clone(),
        };
        let r = row.clone();
        self.store(move |s| s.insert_checkpoint(&r)).await?;
        self.deps.adapters.insert(model, c.resume.adapter.clone());
        Ok(row)
    }

    pub(super) async fn succeeded(&mut self, id: &str, c: &Checkpoint) -> Result<(), StoreError> {
        self.running.remove(id);
        self.datasets.remove(id);
        let Ok(mut job) = self.job(id).await else { return Ok(()) };
        self.checkpoint(id, c).await?;
        if job.status != JobStatus::Running {
            // Cancelled or paused as the last step finished: a resume completes it.
            return self.start_queued().await;
        }
        let model = self.model_id(&job);
        let rel = format!("blobs/models/{}", model.replace([':', '/'], "_"));
        let dir = self.deps.store.blob_path(&rel);
        let (adapter, base) = (c.resume.adapter.clone(), self.deps.base_model.clone());
        tokio::task::spawn_blocking(move || save_peft(&dir, &adapter, &base))
            .await
            .map_err(|_| StoreError::Interrupted)?
            .map_err(|e| StoreError::io("save adapter", std::io::Error::other(e.to_string())))?;
        let row = ModelRow {
            id: model.clone(),
            parent: self.deps.base_model.clone(),
            created_at: now(),
            owned_by: "coserve".into(),
            job_id: Some(id.to_string()),
            adapter_path: rel,
        };
        self.store(move |s| s.insert_model(&row)).await?;
        self.deps.adapters.insert(model.clone(), c.resume.adapter.clone());
        let jid = id.to_string();
        let events = self.store(move |s| s.all_events(&jid)).await?;
        let csv = results_csv(&events);
        let file = self
            .store(move |s| s.save_file("step_metrics.csv", "fine-tune-results", csv.as_bytes()))
            .await?;
        job.result_files = vec![file.id];
        job.fine_tuned_model = Some(model.clone());
        job.trained_tokens = Some(c.resume.trained_tokens as i64);
        job.error = None;
        // Events first: a client that sees the final status also sees why.
        self.event(id, "info", format!("New fine-tuned model created: {model}"), None).await;
        self.event(id, "info", "The job has successfully completed".into(), None).await;
        self.set_status(&mut job, JobStatus::Succeeded).await?;
        self.start_queued().await
    }
}
