//! The job manager: one task that owns the lifecycle of fine-tuning jobs. It validates and
//! tokenizes training files, queues jobs, hands them to the engine, and turns what the
//! engine reports into durable state (events, checkpoints, models, result files) and served
//! adapters. Handlers send it commands; reads go straight to the store.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::dataset::{parse_training_file, DatasetOptions, TrainingExample};
use super::job_object::{
    resolve_hyperparameters, FineTuningJob, JobError, JobStatus, Method, RequestedHyperparameters,
    SupervisedMethod,
};
use super::persist::{load_checkpoint, results_csv, save_checkpoint};
use crate::engine::hybrid::FinetuneMode;
use crate::engine::job::{Checkpoint, JobEvent, StepMetrics, TrainHyper, TrainJobSpec};
use crate::engine::EngineHandle;
use crate::lora::{load_peft, save_peft, AdapterRegistry, LoraConfig};
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::config::LlamaConfig;
use crate::model::tokenizer::Tokenizer;
use crate::store::{CheckpointRow, EventRow, JobRow, ModelRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{message}")]
    Invalid { param: Option<String>, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the job manager has stopped")]
    Stopped,
}

impl ManagerError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ManagerError::Invalid { param: Some(param.into()), message: message.into() }
    }
}

type Reply<T> = oneshot::Sender<Result<T, ManagerError>>;

/// A validated job request.
#[derive(Debug, Clone)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<i64>,
    pub metadata: Option<Value>,
    pub hyperparameters: RequestedHyperparameters,
    pub lora: LoraConfig,
}

enum Command {
    Create(Box<CreateJob>, Reply<FineTuningJob>),
    Cancel(String, Reply<FineTuningJob>),
    Pause(String, Reply<FineTuningJob>),
    Resume(String, Reply<FineTuningJob>),
    DeleteModel(String, Reply<()>),
    Shutdown(oneshot::Sender<()>),
    /// Internal: a training (and validation) file was read.
    Validated(String, Result<Datasets, Vec<String>>),
    /// Internal: something the engine reported about a job.
    Engine(String, JobEvent),
}

#[derive(Clone)]
struct Datasets {
    train: Arc<Vec<TrainingExample>>,
    validation: Arc<Vec<TrainingExample>>,
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub checkpoint_every: u64,
    pub max_concurrent_jobs: usize,
    pub mode: FinetuneMode,
    /// Longest training example, in tokens.
    pub max_len: usize,
}

/// What the manager works with.
pub struct ManagerDeps {
    pub store: Arc<Store>,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub base_model: String,
    pub model_config: LlamaConfig,
    pub adapters: Arc<AdapterRegistry>,
    pub metrics: Arc<Metrics>,
}

/// Cloneable handle to the manager task.
#[derive(Clone)]
pub struct JobManager {
    tx: mpsc::UnboundedSender<Command>,
}

impl JobManager {
    /// Loads served models, re-queues unfinished jobs and starts the manager task.
    pub async fn start(deps: ManagerDeps, cfg: ManagerConfig) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut m = Manager {
            deps,
            cfg,
            tx: tx.clone(),
            datasets: HashMap::new(),
            running: HashMap::new(),
            queue: VecDeque::new(),
            shutdown: None,
        };
        m.recover().await?;
        tokio::spawn(m.run(rx));
        Ok(Self { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ManagerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| ManagerError::Stopped)?;
        rx.await.map_err(|_| ManagerError::Stopped)?
    }

    pub async fn create(&self, req: CreateJob) -> Result<FineTuningJob, ManagerError> {
        self.ask(|r| Command::Create(Box::new(req), r)).await
    }

    pub async fn cancel(&self, id: &str) -> Result<FineTuningJob, ManagerError> {
        self.ask(|r| Command::Cancel(id.into(), r)).await
    }

    pub async fn pause(&self, id: &str) -> Result<FineTuningJob, ManagerError> {
        self.ask(|r| Command::Pause(id.into(), r)).await
    }

    pub async fn resume(&self, id: &str) -> Result<FineTuningJob, ManagerError> {
        self.ask(|r| Command::Resume(id.into(), r)).await
    }

    pub async fn delete_model(&self, id: &str) -> Result<(), ManagerError> {
        self.ask(|r| Command::DeleteModel(id.into(), r)).await
    }

    /// Call before stopping the engine: running jobs are checkpointed as the engine stops them;
    /// resolves once every one is saved.
    pub fn begin_shutdown(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Shutdown(tx));
        rx
    }
}

/// Why a job in the engine is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Train,
    Pause,
    /// Paused, and resumed before the engine confirmed the pause.
    PauseThenResume,
    Cancel,
    Shutdown,
}

struct Running {
    intent: Intent,
    started: Instant,
    steps_done_here: u64,
}

struct Manager {
    deps: ManagerDeps,
    cfg: ManagerConfig,
    tx: mpsc::UnboundedSender<Command>,
    datasets: HashMap<String, Datasets>,
    running: HashMap<String, Running>,
    queue: VecDeque<String>,
    shutdown: Option<oneshot::Sender<()>>,
}

fn now() -> i64 {
    crate::api::unix_now() as i64
}

fn new_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..24])
}

impl Manager {
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.deps.store.call(f).await
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            if let Err(e) = self.handle(cmd).await {
                tracing::error!(error = %e, "fine-tuning job manager");
            }
            if self.shutdown.is_some() && self.running.is_empty() {
                if let Some(done) = self.shutdown.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    async fn handle(&mut self, cmd: Command) -> Result<(), StoreError> {
        match cmd {
            Command::Create(req, reply) => {
                let r = self.create(*req).await;
                let _ = reply.send(r);
            }
            Command::Cancel(id, reply) => {
                let r = self.cancel(&id).await;
                let _ = reply.send(r);
            }
            Command::Pause(id, reply) => {
                let r = self.pause(&id).await;
                let _ = reply.send(r);
            }
            Command::Resume(id, reply) => {
                let r = self.resume(&id).await;
                let _ = reply.send(r);
            }
            Command::DeleteModel(id, reply) => {
                let r = self.delete_model(&id).await;
                let _ = reply.send(r);
            }
            Command::Shutdown(done) => {
                self.shutdown = Some(done);
                for r in self.running.values_mut() {
                    if r.intent == Intent::Train {
                        r.intent = Intent::Shutdown;
                    }
                }
            }
            Command::Validated(id, result) => self.validated(&id, result).await?,
            Command::Engine(id, ev) => self.engine_event(&id, ev).await?,
        }
        Ok(())
    }

    // ---- state and events ----

    async fn job(&self, id: &str) -> Result<FineTuningJob, ManagerError> {
        let id = id.to_string();
        let row = self.store(move |s| s.get_job(&id)).await?;
        serde_json::from_value(row.body).map_err(|e| {
            ManagerError::Store(StoreError::Json { column: "fine_tuning_jobs.body", source: e })
        })
    }

    async fn save(&self, job: &FineTuningJob) -> Result<(), StoreError> {
        let (id, status) = (job.id.clone(), job.status.as_str());
        let body = serde_json::to_value(job)
            .map_err(|e| StoreError::Json { column: "fine_tuning_jobs.body", source: e })?;
        self.store(move |s| s.update_job(&id, status, &body)).await?;
        self.publish_counts().await
    }

    async fn publish_counts(&self) -> Result<(), StoreError> {
        let statuses: Vec<&'static str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        let rows = self.store(move |s| s.jobs_with_status(&statuses)).await?;
        for st in JobStatus::ALL {
            let n = rows.iter().filter(|r| r.status == st.as_str()).count();
            self.deps.metrics.finetune_jobs.with_label_values(&[st.as_str()]).set(n as i64);
        }
        Ok(())
    }

    async fn event(&self, job: &str, level: &str, message: String, data: Option<Value>) {
        let row = EventRow {
            id: new_id("ftevent"),
            job_id: job.to_string(),
            created_at: now(),
            level: level.into(),
            message,
            data,
        };
        if let Err(e) = self.store(move |s| s.append_event(&row)).await {
            tracing::error!(error = %e, job, "could not record a job event");
        }
    }

    async fn set_status(
        &self,
        job: &mut FineTuningJob,
        status: JobStatus,
    ) -> Result<(), StoreError> {
        job.status = status;
        if status.is_final() {
            job.finished_at = Some(now());
            job.estimated_finish = None;
        }
        self.save(job).await
    }

    // ---- commands ----

    async fn create(&mut self, req: CreateJob) -> Result<FineTuningJob, ManagerError> {
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
    fn validate(&self, job: &FineTuningJob) {
        let (store, tx, id) = (self.deps.store.clone(), self.tx.clone(), job.id.clone());
        let (tok, tpl) = (self.deps.tokenizer.clone(), self.deps.chat_template.clone());
        let opts = DatasetOptions { max_len: self.cfg.max_len, truncate: false };
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

    async fn validated(
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
    async fn start_queued(&mut self) -> Result<(), StoreError> {
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

    async fn latest_checkpoint(&self, id: &str) -> Result<Option<CheckpointRow>, StoreError> {
        let id = id.to_string();
        let page = self.store(move |s| s.list_checkpoints(&id, None, 1)).await?;
        Ok(page.data.into_iter().next())
    }

    async fn cancel(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
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

    async fn pause(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
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

    async fn resume(&mut self, id: &str) -> Result<FineTuningJob, ManagerError> {
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

    async fn delete_model(&mut self, id: &str) -> Result<(), ManagerError> {
        let mid = id.to_string();
        let row = self.store(move |s| s.delete_model(&mid)).await?;
        // In-flight requests keep their lease; new ones no longer find the model.
        self.deps.adapters.remove(id);
        let dir = self.deps.store.blob_path(&row.adapter_path);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        Ok(())
    }

    // ---- engine events ----

    async fn engine_event(&mut self, id: &str, ev: JobEvent) -> Result<(), StoreError> {
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

    async fn step(&mut self, id: &str, m: StepMetrics) -> Result<(), StoreError> {
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

    fn model_id(&self, job: &FineTuningJob) -> String {
        let short = job.id.trim_start_matches("ftjob-");
        let short = &short[..short.len().min(8)];
        let suffix = job.user_provided_suffix.as_deref().unwrap_or("");
        format!("ft:{}:coserve:{suffix}:{short}", self.deps.base_model)
    }

    /// Saves a checkpoint, lists it, and serves it as `<model>:ckpt-step-N`.
    async fn checkpoint(&self, id: &str, c: &Checkpoint) -> Result<CheckpointRow, StoreError> {
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

    async fn succeeded(&mut self, id: &str, c: &Checkpoint) -> Result<(), StoreError> {
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

    // ---- start-up ----

    /// Serves every saved model and checkpoint and requeues unfinished jobs.
    async fn recover(&mut self) -> Result<(), StoreError> {
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

    async fn load_adapter(&self, id: &str, rel: &str, created: i64) {
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
