//! The engine thread: owns model, KV cache and scheduler; runs one forward per iteration.

pub mod compute;
pub mod core;
mod core_jobs;
pub mod cost_model;
pub mod handle;
pub mod hybrid;
pub mod job;
mod job_device;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod training;

use std::sync::Arc;
use std::thread::JoinHandle;

pub use handle::{EngineCommand, EngineHandle, RequestStream, SubmitError};
pub use request::{EngineEvent, FinishReason, GenerateRequest, SamplingParams, TokenLogprob};

use crate::backend::cuda::decoder::runner::DeviceModel;
use crate::kv::block_allocator::BlockAllocator;
use crate::kv::{KvCache, KvDtype};
use crate::metrics::Metrics;
use crate::model::llama::Llama;
use scheduler::{Scheduler, SchedulerConfig};

/// What a device model must hold: the engine's KV blocks, and forwards of up to `max_rows`
/// rows (the iteration's token budget).
#[derive(Debug, Clone, Copy)]
pub struct CacheGeometry {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_rows: usize,
}

/// Builds a device model from the loaded model.
pub type DeviceBuilder =
    Box<dyn FnOnce(Llama, CacheGeometry) -> Result<Box<dyn DeviceModel>, String> + Send>;

/// Where the engine computes.
pub enum Backend {
    /// The CPU: inference, adapters and fine-tuning.
    Cpu,
    /// A device, for inference (base model and adapters). `build` runs on the engine thread, the one
    /// that uses the device; `kv_bytes_per_element` sizes its cache from `--kv-cache-memory`.
    Device { name: String, kv_bytes_per_element: usize, build: DeviceBuilder },
}

/// Which forward and backward the CPU runs: the CPU model's own (`model`), or the decoder
/// written once over the backend seam on the CPU's kernels (`seam`), the one a GPU runs. Both
/// give the same inference bits; `seam` is on its way to replacing `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuForward {
    #[default]
    Model,
    Seam,
}

impl CpuForward {
    /// `COSERVE_CPU_FORWARD` (`model` or `seam`), else `model`: how a test suite runs on
    /// either path without changing its configs.
    pub fn from_env() -> Self {
        match std::env::var("COSERVE_CPU_FORWARD").as_deref() {
            Ok("seam") => Self::Seam,
            _ => Self::Model,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    pub kv_cache_bytes: usize,
    /// What the CPU cache stores (`None`: f32); a device keeps its own cache type.
    pub kv_cache_dtype: Option<KvDtype>,
    pub block_size: usize,
    /// Compute threads (0: one per core).
    pub threads: usize,
    pub training: hybrid::TrainingConfig,
    /// The CPU's forward and backward (a device runs the seam's).
    pub cpu_forward: CpuForward,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            max_waiting: 256,
            kv_cache_bytes: 2 << 30,
            kv_cache_dtype: None,
            block_size: 16,
            threads: 0,
            training: hybrid::TrainingConfig::default(),
            cpu_forward: CpuForward::from_env(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error("--kv-cache-memory of {bytes} bytes holds no KV block ({per_block} bytes each)")]
    CacheTooSmall { bytes: usize, per_block: usize },
    #[error("--kv-cache-dtype {0} is for the CPU; {1} keeps its KV cache in bf16 (use auto)")]
    KvDtypeOnDevice(KvDtype, String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("could not start compute threads: {0}")]
    Threads(String),
    #[error("could not start the engine thread: {0}")]
    Spawn(std::io::Error),
    #[error("could not set up the model on {device}: {message}")]
    Device { device: String, message: String },
}

/// A started engine.
pub struct Engine {
    pub handle: EngineHandle,
    pub thread: JoinHandle<()>,
    /// Longest sequence (prompt + generated) the engine accepts.
    pub max_model_len: usize,
    pub num_blocks: usize,
    /// Why fine-tuning is unavailable on this backend (`None`: available).
    pub no_training_reason: Option<String>,
}

/// Starts the engine thread around a loaded model, computing on the CPU.
pub fn start(
    model: Llama,
    eos_token_ids: Vec<u32>,
    cfg: &EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<Engine, EngineStartError> {
    start_on(model, eos_token_ids, cfg, metrics, Backend::Cpu)
}

/// Starts the engine thread around a loaded model, computing on `backend`.
pub fn start_on(
    model: Llama,
    eos_token_ids: Vec<u32>,
    cfg: &EngineConfig,
    metrics: Arc<Metrics>,
    backend: Backend,
) -> Result<Engine, EngineStartError> {
    for (v, name) in [
        (cfg.max_num_batched_tokens, "--max-num-batched-tokens"),
        (cfg.max_num_seqs, "--max-num-seqs"),
        (cfg.block_size, "the block size"),
    ] {
        if v == 0 {
            return Err(EngineStartError::Zero(name));
        }
    }
    let c = &model.config;
    let f32_block =
        KvCache::bytes_per_block(c.num_layers, cfg.block_size, c.num_kv_heads, c.head_dim);
    let kv_dtype = cfg.kv_cache_dtype.unwrap_or_default();
    let bytes_per_element = match &backend {
        Backend::Cpu => kv_dtype.size(),
        Backend::Device { name, kv_bytes_per_element, .. } => {
            if let Some(d) = cfg.kv_cache_dtype {
                return Err(EngineStartError::KvDtypeOnDevice(d, name.clone()));
            }
            *kv_bytes_per_element
        }
    };
    let per_block = f32_block / std::mem::size_of::<f32>() * bytes_per_element;
    let num_blocks = cfg.kv_cache_bytes / per_block.max(1);
    if num_blocks == 0 {
        return Err(EngineStartError::CacheTooSmall { bytes: cfg.kv_cache_bytes, per_block });
    }
    let max_model_len = c.max_position_embeddings.min(num_blocks * cfg.block_size);
    let (vocab_size, logits_width) = (c.vocab_size, model.lm_head().rows);
    let (num_layers, block_size, kv_heads, head_dim) =
        (c.num_layers, cfg.block_size, c.num_kv_heads, c.head_dim);
    // A device forward may carry a training chunk after the iteration's budget of rows.
    let max_rows = cfg.max_num_batched_tokens + cfg.training.max_train_tokens_per_iter;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .thread_name(|i| format!("coserve-compute-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| EngineStartError::Threads(e.to_string()))?;
    let (tx, rx) = flume::unbounded();
    let counters = Arc::new(handle::SharedCounters::default());
    let handle = EngineHandle::new(tx, counters.clone(), cfg.max_waiting);
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            max_num_seqs: cfg.max_num_seqs,
        },
        BlockAllocator::new(num_blocks, cfg.block_size),
    );
    let training = cfg.training.clone();
    let cpu_forward = cfg.cpu_forward;
    // The compute is set up on the engine thread; its outcome comes back before `start` returns.
    let (ready_tx, ready_rx) = flume::bounded::<Result<Option<String>, EngineStartError>>(1);
    let run = move || {
        let compute = match backend {
            Backend::Cpu if cpu_forward == CpuForward::Seam => {
                let config = model.config.clone();
                let geometry = CacheGeometry { block_size, num_blocks, max_rows };
                let dtypes = (kv_dtype, training.train_dtype);
                match compute::cpu_decoder(model, geometry, dtypes, pool.clone()) {
                    Ok(model) => core::Compute::Device { model, name: "cpu".into(), config },
                    Err(message) => {
                        let device = "cpu".into();
                        let _ = ready_tx.send(Err(EngineStartError::Device { device, message }));
                        return;
                    }
                }
            }
            Backend::Cpu => core::Compute::Host {
                model,
                kv: KvCache::with_dtype(
                    num_layers, num_blocks, block_size, kv_heads, head_dim, kv_dtype,
                ),
            },
            Backend::Device { name, build, .. } => {
                let config = model.config.clone();
                match build(model, CacheGeometry { block_size, num_blocks, max_rows }) {
                    Ok(model) => core::Compute::Device { model, name, config },
                    Err(message) => {
                        let _ =
                            ready_tx.send(Err(EngineStartError::Device { device: name, message }));
                        return;
                    }
                }
            }
        };
        let _ = ready_tx.send(Ok(compute.no_training_reason()));
        let core = core::EngineCore {
            compute,
            vocab_size,
            logits_width,
            scheduler,
            eos_token_ids,
            max_model_len,
            metrics,
            counters,
            rx,
            pool,
            deferred: Default::default(),
            training,
            jobs: Vec::new(),
            job_turn: 0,
            backward_weights: None,
            cost: cost_model::CostModel::new(),
            stop_reason: None,
            next_job_key: 0,
        };
        core.run();
    };
    let thread = std::thread::Builder::new()
        .name("coserve-engine".into())
        .spawn(run)
        .map_err(EngineStartError::Spawn)?;
    let no_training_reason = match ready_rx.recv() {
        Ok(Ok(reason)) => reason,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(EngineStartError::Spawn(std::io::Error::other(
                "the engine thread ended while starting",
            )));
        }
    };
    Ok(Engine { handle, thread, max_model_len, num_blocks, no_training_reason })
}
