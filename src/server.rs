//! Puts the pieces together: load the model, start the engine thread, serve HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::api::{router, AppState};
use crate::backend::cuda::decoder::runner::{open_cuda, DeviceModel};
use crate::backend::cuda::ResolvedDevice;
use crate::config::ServerConfig;
use crate::engine::hybrid::FinetuneMode;
use crate::engine::{self, Backend, EngineHandle};
use crate::finetune::manager::{JobManager, ManagerConfig, ManagerDeps};
use crate::lora::{load_peft, AdapterRegistry};
use crate::metrics::Metrics;
use crate::model::fetch::{coserve_home, ensure_default_model, DEFAULT_MODEL_NAME};
use crate::model::loader::load_model;
use crate::model::ModelInfo;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Fetch(#[from] crate::model::fetch::FetchError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineStartError),
    #[error(transparent)]
    Device(#[from] crate::backend::cuda::CudaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot open the data directory {dir}: {source}")]
    Store { dir: String, source: crate::store::StoreError },
    #[error("model loading was interrupted")]
    Interrupted,
    #[error("cannot serve the LoRA adapter {name} from {dir}: {message}")]
    LoraModule { name: String, dir: String, message: String },
}

/// The engine's backend for `device`: a CUDA device gets the model as a bf16 decoder, set up on
/// the engine thread, replaying decode steps as CUDA graphs unless `eager`.
fn backend_for(device: &ResolvedDevice, eager: bool) -> Backend {
    match device {
        ResolvedDevice::Cpu => Backend::Cpu,
        ResolvedDevice::Cuda { ordinal, name, .. } => {
            let ordinal = *ordinal;
            let home = coserve_home();
            Backend::Device {
                name: format!("cuda:{ordinal} ({name})"),
                kv_bytes_per_element: std::mem::size_of::<u16>(),
                build: Box::new(move |model, cache| {
                    let (b, n, r) = (cache.block_size, cache.num_blocks, cache.max_rows);
                    let mut d =
                        open_cuda(ordinal, &home, &model, b, n, r).map_err(|e| e.to_string())?;
                    d.replay_decodes(!eager);
                    Ok(Box::new(d) as Box<dyn DeviceModel>)
                }),
            }
        }
    }
}

/// How long shutdown waits for running jobs to be checkpointed (SIGTERM must exit in 30 s).
const JOB_SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A server listening on its address until `shutdown` (or drop of the process).
pub struct RunningServer {
    addr: SocketAddr,
    model_id: String,
    engine: EngineHandle,
    jobs: JobManager,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Stops accepting connections, lets open ones finish, and stops the engine.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // Running jobs are checkpointed as the engine stops them; wait for those saves.
        let saved = self.jobs.begin_shutdown();
        self.engine.shutdown();
        if tokio::time::timeout(JOB_SAVE_TIMEOUT, saved).await.is_err() {
            tracing::warn!("running fine-tuning jobs were not all checkpointed in time");
        }
        if let Some(t) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Serves until the process receives Ctrl-C or SIGTERM.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// The model path to load: `--model`, or the embedded default (downloaded on first use).
pub fn resolve_model_path(cfg: &ServerConfig) -> Result<PathBuf, ServerError> {
    match &cfg.model {
        Some(p) => Ok(p.clone()),
        None => Ok(ensure_default_model(&coserve_home())?),
    }
}

/// Opens the durable store in the configured data dir (created if missing).
async fn open_store(cfg: &ServerConfig) -> Result<Arc<Store>, ServerError> {
    let dir = cfg.resolved_data_dir();
    tracing::info!(data_dir = %dir.display(), "opening the store");
    let shown = dir.display().to_string();
    let opened = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|_| ServerError::Interrupted)?;
    opened.map(Arc::new).map_err(|source| ServerError::Store { dir: shown, source })
}

pub async fn start(cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    start_on(cfg, None).await
}

/// As [`start`], computing on `backend` instead of the one `--device` names (`None`: that one).
pub async fn start_on(
    cfg: ServerConfig,
    backend: Option<Backend>,
) -> Result<RunningServer, ServerError> {
    // Before the model: a bad data dir or device should fail fast, not after a long load.
    let store = open_store(&cfg).await?;
    let backend = match backend {
        Some(b) => b,
        None => backend_for(&cfg.device.resolve()?, cfg.enforce_eager),
    };
    let device = match &backend {
        Backend::Cpu => "cpu".to_string(),
        Backend::Device { name, .. } => name.clone(),
    };
    let path = resolve_model_path(&cfg)?;
    tracing::info!(model = %path.display(), "loading model");
    let dtype = cfg.weights_dtype;
    let loaded = tokio::task::spawn_blocking(move || load_model(&path, dtype))
        .await
        .map_err(|_| ServerError::Interrupted)??;
    let model_id = cfg.served_model_name.clone().unwrap_or_else(|| {
        if cfg.model.is_none() {
            DEFAULT_MODEL_NAME.to_string()
        } else {
            loaded.default_name.clone()
        }
    });
    let metrics = Arc::new(Metrics::new(&model_id));
    let model_config = loaded.model.config.clone();
    // Read the adapters before the engine starts: a bad one should fail fast.
    let mut modules = Vec::new();
    for (name, dir) in &cfg.lora_modules {
        let fail = |message: String| ServerError::LoraModule {
            name: name.clone(),
            dir: dir.display().to_string(),
            message,
        };
        if *name == model_id || modules.iter().any(|(n, _)| n == name) {
            return Err(fail("the name is already served".into()));
        }
        let weights = load_peft(dir, &model_config).map_err(|e| fail(e.to_string()))?;
        modules.push((name.clone(), weights));
    }
    let engine_cfg = cfg.engine_config();
    let started = engine::start_on(
        loaded.model,
        loaded.eos_token_ids,
        &engine_cfg,
        metrics.clone(),
        backend,
    )?;
    if let Some(why) = &started.no_training_reason {
        tracing::warn!("{why}");
    }
    tracing::info!(
        model = %model_id,
        device = %device,
        max_model_len = started.max_model_len,
        kv_blocks = started.num_blocks,
        "engine started"
    );
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let tokenizer = Arc::new(loaded.tokenizer);
    let chat_template = loaded.chat_template.map(Arc::new);
    let adapters = Arc::new(AdapterRegistry::new());
    for (name, weights) in modules {
        tracing::info!(adapter = %name, "serving LoRA adapter");
        adapters.insert(name, weights);
    }
    let jobs = JobManager::start(
        ManagerDeps {
            store: store.clone(),
            engine: started.handle.clone(),
            tokenizer: tokenizer.clone(),
            chat_template: chat_template.clone(),
            base_model: model_id.clone(),
            model_config,
            adapters: adapters.clone(),
            metrics: metrics.clone(),
        },
        ManagerConfig {
            checkpoint_every: cfg.checkpoint_every,
            max_concurrent_jobs: cfg.max_concurrent_jobs,
            // Without training on this backend, jobs already queued stay queued.
            mode: if started.no_training_reason.is_some() {
                FinetuneMode::InferenceOnly
            } else {
                cfg.finetune_mode
            },
            max_len: started.max_model_len,
        },
    )
    .await
    .map_err(|source| ServerError::Store {
        dir: cfg.resolved_data_dir().display().to_string(),
        source,
    })?;
    let state = Arc::new(AppState {
        engine: started.handle.clone(),
        tokenizer,
        chat_template,
        model: ModelInfo {
            id: model_id.clone(),
            created,
            max_model_len: started.max_model_len,
            owned_by: "coserve".into(),
        },
        metrics,
        max_body_bytes: cfg.max_request_bytes,
        adapters,
        jobs: jobs.clone(),
        store,
        max_upload_bytes: cfg.max_upload_bytes,
        no_training_reason: started.no_training_reason.clone(),
    });
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
    let (tx, rx) = oneshot::channel::<()>();
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(addr = %local, "listening");
    Ok(RunningServer {
        addr: local,
        model_id,
        engine: started.handle,
        jobs,
        shutdown: Some(tx),
        task,
        engine_thread: Some(started.thread),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
