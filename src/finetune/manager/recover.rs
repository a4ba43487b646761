//! Start-up: serve every saved model and checkpoint, requeue unfinished jobs.

use super::*;

impl Manager {
    /// Serves every saved model and checkpoint and requeues unfinished jobs.
    pub(super) async fn recover(&mut self) -> Result<(), StoreError> {
        let models = self.store(|s| s.list_models()).await?;
        for m in models {
            self.load_adapter(&m.id, &m.adapter_path, m.created_at).await;
        }
        let all: Vec<&'static str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        let mut jobs = self.store(move |s| s.jobs_with_status(&all)).await?;
        jobs.sort_by_key(|j| j.created_at);
        for j in &jobs {
            let jid = j.id.clone();
            let cks = self.store(move |s| s.list_checkpoints(&jid, None, 10_000)).await?;
            for ck in cks.data {
                self.load_adapter(&ck.fine_tuned_model_checkpoint, &ck.path, ck.created_at).await;
            }
        }
        for j in jobs {
            let Ok(mut job) = serde_json::from_value::<FineTuningJob>(j.body) else { continue };
            match job.status {
                JobStatus::ValidatingFiles => self.validate(&job),
                JobStatus::Queued | JobStatus::Running => {
                    if job.status == JobStatus::Running {
                        // Interrupted: continue from its last checkpoint.
                        self.set_status(&mut job, JobStatus::Queued).await?;
                        self.event(
                            &job.id,
                            "info",
                            "Server restarted; resuming the job".into(),
                            None,
                        )
                        .await;
                    }
                    self.queue.push_back(job.id.clone());
                    self.validate(&job);
                }
                _ => {}
            }
        }
        // Validation re-queues these once their files are tokenized.
        self.queue.clear();
        self.publish_counts().await
    }

    pub(super) async fn load_adapter(&self, id: &str, rel: &str, created: i64) {
        let dir = self.deps.store.blob_path(rel);
        let cfg = self.deps.model_config.clone();
        match tokio::task::spawn_blocking(move || load_peft(&dir, &cfg)).await {
            Ok(Ok(w)) => {
                self.deps.adapters.insert_created(id.to_string(), w, created.max(0) as u64);
            }
            Ok(Err(e)) => tracing::error!(model = id, error = %e, "cannot load a saved adapter"),
            Err(_) => {}
        }
    }
}
