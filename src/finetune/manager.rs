//! The job manager: one task that owns the lifecycle of fine-tuning jobs. It validates and
//! tokenizes training files, queues jobs, hands them to the engine, and turns what the
//! engine reports into durable state (events, checkpoints, models, result files) and served
//! adapters. Handlers send it commands; reads go straight to the store.

mod commands;
mod outcomes;
mod recover;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
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
    /// Cut over-long examples at the context length instead of rejecting them.
    pub truncate: bool,
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
}
