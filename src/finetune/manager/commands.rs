//! What clients ask of the manager (create, cancel, pause, resume, delete a model), and
//! validating files and handing queued jobs to the engine.

use super::*;

impl Manager {
    pub(super) async fn create(&mut self, req: CreateJob) -> Result<FineTuningJob, ManagerError> {
        if req.model != self.deps.base_model {
            return Err(ManagerError::invalid(
                "model",
                format!(
                    "Model {} cannot be fine-tuned here; this server fine-tunes {}.",
                    req.model, self.deps.base_model
                ),
            ));
        }
        if let Some(s) = &req.suffix {
            if s.len() > 64 || s.contains(':') {
                return Err(ManagerError::invalid(
                    "suffix",
                    "suffix must be at most 64 characters and contain no ':'.",
                ));
            }
        }
        for (param, file) in [
            ("training_file", Some(&req.training_file)),
            ("validation_file", req.validation_file.as_ref()),
        ] {
            let Some(file) = file.cloned() else { continue };
            let f = match self.store(move |s| s.get_file(&file)).await {
                Ok(f) => f,
                Err(StoreError::NotFound { id, .. }) => {
                    return Err(ManagerError::invalid(param, format!("File {id} does not exist.")))
                }
                Err(e) => return Err(e.into()),
            };
            if f.purpose != "fine-tune" {
                return Err(ManagerError::invalid(
                    param,
                    format!("File {} has purpose {}, not fine-tune.", f.id, f.purpose),
                ));
            }
        }
        let id = new_id("ftjob");
        let seed =
            req.seed.unwrap_or_else(|| (uuid::Uuid::new_v4().as_u128() % 2_147_483_647) as i64);
        let job = FineTuningJob {
            id: id.clone(),
            object: "fine_tuning.job".into(),
            created_at: now(),
            error: None,
            fine_tuned_model: None,
            finished_at: None,
            hyperparameters: req.hyperparameters.clone(),
            model: req.model,
            organization_id: "org-coserve".into(),
            result_files: vec![],
            seed,
            status: JobStatus::ValidatingFiles,
            trained_tokens: None,
            training_file: req.training_file,
            validation_file: req.validation_file,
            integrations: None,
            estimated_finish: None,
            metadata: req.metadata,
            method: Method {
                kind: "supervised".into(),
                supervised: SupervisedMethod {
                    hyperparameters: req.hyperparameters,
                    lora: req.lora,
                    truncate: req.truncate,
                },
            },
            user_provided_suffix: req.suffix,
        };
        let row = JobRow {
            id: id.clone(),
            created_at: job.created_at,
            status: job.status.as_str().into(),
            body: serde_json::to_value(&job)
                .map_err(|e| StoreError::Json { column: "fine_tuning_jobs.body", source: e })?,
        };
        self.store(move |s| s.insert_job(&row)).await?;
        self.publish_counts().await?;
        self.event(&id, "info", format!("Created fine-tuning job: {id}"), None).await;
        self.event(&id, "info", "Validating training file".into(), None).await;
        self.validate(&job);
        Ok(job)
    }

    /// Reads and tokenizes the job's files off the runtime; the result comes back as a command.
    pub(super) fn validate(&self, job: &FineTuningJob) {
        let (store, tx, id) = (self.deps.store.clone(), self.tx.clone(), job.id.clone());
        let (tok, tpl) = (self.deps.tokenizer.clone(), self.deps.chat_template.clone());
        let truncate = job.method.supervised.truncate;
        let opts = DatasetOptions { max_len: self.cfg.max_len, truncate };
        let files = (job.training_file.clone(), job.validation_file.clone());
        tokio::task::spawn_blocking(move || {
            let read = |file: &str, what: &str| -> Result<Arc<Vec<TrainingExample>>, Vec<String>> {
                let bytes =
                    store.read_file_content(file).map_err(|e| vec![format!("{what}: {e}")])?;
                parse_training_file(&bytes, &tok, tpl.as_deref(), &opts)
                    .map(Arc::new)
                    .map_err(|e| e.errors.iter().map(|l| format!("{what} {file}, {l}")).collect())
            };
            let result = read(&files.0, "training file").and_then(|train| {
                let validation = match &files.1 {
                    Some(f) => read(f, "validation file")?,
                    None => Arc::new(Vec::new()),
                };
                Ok(Datasets { train, validation })
            });
            let _ = tx.send(Command::Validated(id, result));
        });
    }

    pub(super) async fn validated(
        &mut self,
        id: &str,
        result: Result<Datasets, Vec<String>>,
    ) -> Result<(), StoreError> {
        let Ok(mut job) = self.job(id).await else { return Ok(()) };
        if job.status != JobStatus::ValidatingFiles && job.status != JobStatus::Queued {
            return Ok(());
        }
        match result {
            Err(errors) => {
                for e in &errors {
                    self.event(id, "error", e.clone(), None).await;
                }
                let shown: Vec<&str> = errors.iter().take(3).map(String::as_str).collect();
                let more = errors.len().saturating_sub(3);
                let mut message = format!("The training data is invalid: {}", shown.join("; "));
                if more > 0 {
                    message.push_str(&format!(" (and {more} more; see the job's events)"));
                }
                job.error = Some(JobError {
                    code: "invalid_training_file".into(),
                    message: message.clone(),
                    param: Some("training_file".into()),
                });
                self.event(id, "error", message, None).await;
                self.set_status(&mut job, JobStatus::Failed).await?;
            }
            Ok(data) => {
                let n = data.train.len();
                let h = match resolve_hyperparameters(&job.method.supervised.hyperparameters, n) {
                    Ok(h) => h,
                    Err((param, message)) => {
                        job.error = Some(JobError {
                            code: "invalid_hyperparameters".into(),
                            message,
                            param: Some(param.into()),
                        });
                        return self.set_status(&mut job, JobStatus::Failed).await;
                    }
                };
                job.hyperparameters = h.into();
                job.method.supervised.hyperparameters = h.into();
                let tokens: usize = data.train.iter().map(|e| e.tokens.len()).sum();
                self.datasets.insert(id.to_string(), data);
                if job.status == JobStatus::ValidatingFiles {
                    self.set_status(&mut job, JobStatus::Queued).await?;
                    self.event(
                        id,
                        "info",
                        format!("Files validated ({n} examples, {tokens} tokens), moving job to queued state"),
                        None,
                    )
                    .await;
                } else {
                    self.save(&job).await?;
                }
                if !self.queue.iter().any(|q| q == id) && !self.running.contains_key(id) {
                    self.queue.push_back(id.to_string());
                }
                self.start_queued().await?;
            }
        }
        Ok(())
    }

    /// Hands queued jobs to the engine while there is room.
    pub(super) async fn start_queued(&mut self) -> Result<(), StoreError> {
        if self.cfg.mode == FinetuneMode::InferenceOnly || self.shutdown.is_some() {
            return Ok(());
        }
        while self.running.len() < self.cfg.max_concurrent_jobs.max(1) {
            let Some(id) = self.queue.pop_front() else { break };
            let Some(data) = self.datasets.get(&id).cloned() else {
                // Not tokenized yet (e.g. after a restart): validation re-queues it.
                continue;
            };
            let Ok(mut job) = self.job(&id).await else { continue };
            let Some(h) = job.hyperparameters.resolved() else { continue };
            let latest = self.latest_checkpoint(&id).await?;
            let resume = match latest {
                Some(ck) => {
                    let dir = self.deps.store.blob_path(&ck.path);
                    let cfg = self.deps.model_config.clone();
                    match tokio::task::spawn_blocking(move || load_checkpoint(&dir, &cfg)).await {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) => {
                            job.error = Some(JobError {
                                code: "checkpoint_unreadable".into(),
                                message: format!("Could not resume from checkpoint: {e}"),
                                param: None,
                            });
                            self.set_status(&mut job, JobStatus::Failed).await?;
                            continue;
                        }
                        Err(_) => None,
                    }
                }
                None => None,
            };
            let resumed_at = resume.as_ref().map(|r| r.step);
            let (tx, rx) = flume::unbounded();
            let spec = TrainJobSpec {
                id: id.clone(),
                train: data.train,
                validation: data.validation,
                lora: job.method.supervised.lora.clone(),
                hyper: TrainHyper {
                    n_epochs: h.n_epochs,
                    batch_size: h.batch_size,
                    learning_rate: h.learning_rate(),
                    seed: job.seed as u64,
                    checkpoint_every: self.cfg.checkpoint_every,
                },
                resume,
                events: tx,
            };
            if self.deps.engine.start_job(spec).is_err() {
                self.queue.push_front(id);
                break;
            }
            let forward = self.tx.clone();
            let job_id = id.clone();
            tokio::spawn(async move {
                while let Ok(ev) = rx.recv_async().await {
                    if forward.send(Command::Engine(job_id.clone(), ev)).is_err() {
                        break;
                    }
                }
            });
            self.running.insert(
                id.clone(),
                Running { intent: Intent::Train, started: Instant::now(), steps_done_here: 0 },
            );
            self.set_status(&mut job, JobStatus::Running).await?;
            let msg = match resumed_at {
                Some(s) => format!("Fine-tuning job resumed from the checkpoint at step {s}"),
                None => "Fine-tuning job started".to_string(),
            };
            self.event(&id, "info", msg, None).await;
        }
        Ok(())
    }

    pub(super) async fn latest_checkpoint(
        &self,
        id: &str,
    ) -> Result<Option<CheckpointRow>, StoreError> {
        let id = id.to_string();
        let page = self.store(move |s| s.list_checkpoints(&id, None, 1)).await?;
        Ok(page.data.into_iter().next())
    }

    pub(super) async fn cancel(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
        let mut job = self.job(id).await?;
        if job.status.is_final() {
            return Err(ManagerError::invalid(
                "fine_tuning_job_id",
                format!("Job {id} has already {}; it cannot be cancelled.", job.status.as_str()),
            ));
        }
        self.queue.retain(|q| q != id);
        self.datasets.remove(id);
        if let Some(r) = self.running.get_mut(id) {
            r.intent = Intent::Cancel;
            self.deps.engine.stop_job(id);
        }
        self.event(id, "info", "Fine-tuning job cancelled".into(), None).await;
        self.set_status(&mut job, JobStatus::Cancelled).await?;
        self.start_queued().await?;
        Ok(job)
    }

    pub(super) async fn pause(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
        let mut job = self.job(id).await?;
        if !matches!(job.status, JobStatus::Queued | JobStatus::Running) {
            return Err(ManagerError::invalid(
                "fine_tuning_job_id",
                format!(
                    "Only queued or running jobs can be paused; job {id} is {}.",
                    job.status.as_str()
                ),
            ));
        }
        self.queue.retain(|q| q != id);
        if let Some(r) = self.running.get_mut(id) {
            r.intent = Intent::Pause;
            self.deps.engine.stop_job(id);
        }
        self.event(id, "info", "Fine-tuning job paused".into(), None).await;
        self.set_status(&mut job, JobStatus::Paused).await?;
        Ok(job)
    }

    pub(super) async fn resume(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
        let mut job = self.job(id).await?;
        if job.status != JobStatus::Paused {
            return Err(ManagerError::invalid(
                "fine_tuning_job_id",
                format!("Only paused jobs can be resumed; job {id} is {}.", job.status.as_str()),
            ));
        }
        self.set_status(&mut job, JobStatus::Queued).await?;
        self.event(id, "info", "Fine-tuning job resumed, moving job to queued state".into(), None)
            .await;
        match self.running.get_mut(id) {
            // The engine has not confirmed the pause yet: queue it once it has.
            Some(r) => r.intent = Intent::PauseThenResume,
            None if self.datasets.contains_key(id) => {
                self.queue.push_back(id.to_string());
                self.start_queued().await?;
            }
            None => self.validate(&job),
        }
        Ok(job)
    }

    pub(super) async fn delete_model(&mut self, id: &str) -> Result<(), ManagerError> {
        let mid = id.to_string();
        let row = self.store(move |s| s.delete_model(&mid)).await?;
        // In-flight requests keep their lease; new ones no longer find the model.
        self.deps.adapters.remove(id);
        let dir = self.deps.store.blob_path(&row.adapter_path);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        Ok(())
    }
}
