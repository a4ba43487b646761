//! The engine thread: owns model, KV cache and scheduler; runs one forward per iteration.

pub mod core;
pub mod cost_model;
pub mod handle;
pub mod hybrid;
pub mod job;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod training;

use std::sync::Arc;
use std::thread::JoinHandle;

pub use handle::{EngineCommand, EngineHandle, RequestStream, SubmitError};
pub use request::{EngineEvent, FinishReason, GenerateRequest, SamplingParams, TokenLogprob};

use crate::kv::block_allocator::BlockAllocator;
use crate::kv::KvCache;
use crate::metrics::Metrics;
use crate::model::llama::Llama;
use scheduler::{Scheduler, SchedulerConfig};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    pub kv_cache_bytes: usize,
    pub block_size: usize,
    /// Compute threads (0: one per core).
    pub threads: usize,
    pub training: hybrid::TrainingConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            max_waiting: 256,
            kv_cache_bytes: 2 << 30,
            block_size: 16,
            threads: 0,
            training: hybrid::TrainingConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error("--kv-cache-memory of {bytes} bytes holds no KV block ({per_block} bytes each)")]
    CacheTooSmall { bytes: usize, per_block: usize },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("could not start compute threads: {0}")]
    Threads(String),
    #[error("could not start the engine thread: {0}")]
    Spawn(std::io::Error),
}

/// A started engine.
pub struct Engine {
    pub handle: EngineHandle,
    pub thread: JoinHandle<()>,
    /// Longest sequence (prompt + generated) the engine accepts.
    pub max_model_len: usize,
    pub num_blocks: usize,
}

/// Starts the engine thread around a loaded model.
pub fn start(
    model: Llama,
    eos_token_ids: Vec<u32>,
    cfg: &EngineConfig,
    metrics: Arc<Metrics>,
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
    let per_block =
        KvCache::bytes_per_block(c.num_layers, cfg.block_size, c.num_kv_heads, c.head_dim);
    let num_blocks = cfg.kv_cache_bytes / per_block.max(1);
    if num_blocks == 0 {
        return Err(EngineStartError::CacheTooSmall { bytes: cfg.kv_cache_bytes, per_block });
    }
    let max_model_len = c.max_position_embeddings.min(num_blocks * cfg.block_size);
    let kv = KvCache::new(c.num_layers, num_blocks, cfg.block_size, c.num_kv_heads, c.head_dim);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .thread_name(|i| format!("coserve-compute-{i}"))
        .build()
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
    let core = core::EngineCore {
        model,
        kv,
        scheduler,
        eos_token_ids,
        max_model_len,
        metrics,
        counters,
        rx,
        pool,
        deferred: Default::default(),
        training: cfg.training.clone(),
        jobs: Vec::new(),
        job_turn: 0,
        backward_weights: None,
        cost: cost_model::CostModel::new(),
    };
    let thread = std::thread::Builder::new()
        .name("coserve-engine".into())
        .spawn(move || core.run())
        .map_err(EngineStartError::Spawn)?;
    Ok(Engine { handle, thread, max_model_len, num_blocks })
}
