//! ServerConfig from flags and COSERVE_* environment variables.

use std::path::PathBuf;

use clap::Args;

use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cuda::DeviceSpec;
use crate::engine::hybrid::{FinetuneMode, TrainingConfig};
use crate::engine::{CpuForward, EngineConfig};
use crate::kv::KvDtype;
use crate::model::fetch::coserve_home;
use crate::model::weights::WeightsDtype;

/// Options of `coserve serve`. Every flag can also be set with the environment variable named
/// in its help; the flag wins.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// GGUF file or Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct,
    /// downloaded to $COSERVE_HOME on first use).
    #[arg(long, env = "COSERVE_MODEL")]
    pub model: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "COSERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "COSERVE_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Directory for durable state: the SQLite database coserve.db and blobs/ (uploaded files,
    /// adapters, checkpoints). Default: $COSERVE_HOME/data.
    #[arg(long, env = "COSERVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Model id clients use in `model` (default: the model's own name).
    #[arg(long, env = "COSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Where to compute: cpu, cuda, cuda:N, or auto (CUDA when a driver and a GPU are
    /// present, else the CPU). On a GPU the server runs inference (the base model and fine-tuned
    /// adapters) in bf16, and fine-tuning jobs with fp32 LoRA weights and AdamW state.
    #[arg(long, env = "COSERVE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// On a GPU, launch every decode step's kernels one by one instead of replaying the step
    /// as a CUDA graph recorded per batch size and context length (graphs spare the launches;
    /// this spares the first step of each size its recording).
    #[arg(long, env = "COSERVE_ENFORCE_EAGER")]
    pub enforce_eager: bool,

    /// LoRA adapters in the PEFT layout (adapter_config.json and adapter_model.safetensors) to
    /// serve from the start, as NAME=DIR, comma-separated; clients send NAME as `model`.
    #[arg(long = "lora-modules", env = "COSERVE_LORA_MODULES", value_delimiter = ',', value_parser = parse_lora_module)]
    pub lora_modules: Vec<(String, PathBuf)>,

    /// Token budget of one iteration (decode tokens plus prefill chunks).
    #[arg(long, env = "COSERVE_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,

    /// Sequences running at once.
    #[arg(long, env = "COSERVE_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,

    /// Requests allowed to wait for a slot; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "COSERVE_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,

    /// Memory for the paged KV cache, e.g. 512MiB or 2GiB.
    #[arg(long, env = "COSERVE_KV_CACHE_MEMORY", default_value = "2GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: usize,

    /// What the KV cache stores: auto (f32 on the CPU, bf16 on a GPU), f32, or f16 (CPU only:
    /// half the memory and half the bytes attention reads per step, K and V rounded to f16).
    #[arg(long, env = "COSERVE_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,

    /// Tokens per KV-cache block.
    #[arg(long, env = "COSERVE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// Compute threads (0: one per core).
    #[arg(long, env = "COSERVE_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Largest accepted request body, e.g. 16MiB.
    #[arg(long, env = "COSERVE_MAX_REQUEST_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_request_bytes: usize,

    /// Largest file accepted by POST /v1/files, e.g. 512MiB; larger uploads get 413.
    #[arg(long, env = "COSERVE_MAX_UPLOAD_BYTES", default_value = "512MiB", value_parser = parse_bytes)]
    pub max_upload_bytes: usize,

    /// Storage of linear weights: f32 (reference precision), bf16, q8_0, or gguf (keep a GGUF
    /// file's own quantization; q8_0 for Hugging Face directories). Smaller formats read fewer
    /// bytes per decode step.
    #[arg(long, env = "COSERVE_WEIGHTS_DTYPE", value_enum, default_value_t = WeightsDtype::F32)]
    pub weights_dtype: WeightsDtype,

    /// When fine-tuning jobs train: coserve (inside every iteration, within --tpot-slo-ms),
    /// temporal (only when no inference is pending) or inference-only (jobs stay queued).
    #[arg(long, env = "COSERVE_FINETUNE_MODE", value_enum, default_value_t = FinetuneMode::Coserve)]
    pub finetune_mode: FinetuneMode,

    /// Inference latency target per output token, in milliseconds: co-served training fills
    /// each iteration only up to the time this leaves.
    #[arg(long, env = "COSERVE_TPOT_SLO_MS", default_value_t = 150)]
    pub tpot_slo_ms: u64,

    /// Fine-tuning forward tokens per iteration at most.
    #[arg(long, env = "COSERVE_MAX_TRAIN_TOKENS_PER_ITER", default_value_t = 128)]
    pub max_train_tokens_per_iter: usize,

    /// Backward layers per iteration at most.
    #[arg(long, env = "COSERVE_MAX_BWD_LAYERS_PER_ITER", default_value_t = 8)]
    pub max_bwd_layers_per_iter: usize,

    /// Precision of fine-tuning's products with the frozen weights on the CPU: f32, or bf16
    /// (weights and activations rounded to bf16, f32 sums; LoRA weights, attention and the
    /// optimizer stay f32): several times faster on CPUs with AMX. A GPU trains in bf16.
    #[arg(long, env = "COSERVE_TRAIN_DTYPE", value_enum, default_value_t = TrainDtype::F32)]
    pub train_dtype: TrainDtype,

    /// Fraction (0..=1) of those caps given to fine-tuning in every iteration, even when
    /// inference alone fills the latency target (keeps training alive under saturation).
    #[arg(long, env = "COSERVE_MIN_FINETUNE_SHARE", default_value_t = 0.0)]
    pub min_finetune_share: f32,

    /// Optimizer steps between checkpoints (0: only the final one).
    #[arg(long, env = "COSERVE_CHECKPOINT_EVERY", default_value_t = 50)]
    pub checkpoint_every: u64,

    /// Fine-tuning jobs trained at the same time; the rest wait queued.
    #[arg(long, env = "COSERVE_MAX_CONCURRENT_JOBS", default_value_t = 1)]
    pub max_concurrent_jobs: usize,

    /// The CPU's forward and backward: the CPU model's own, or the decoder written once over
    /// the backend seam (the GPU's) on the CPU's kernels. Hidden while the two coexist.
    #[arg(long, env = "COSERVE_CPU_FORWARD", value_enum, default_value_t = CpuForward::Model, hide = true)]
    pub cpu_forward: CpuForward,
}

impl ServerConfig {
    /// Defaults as the CLI has them, for tests and embedding.
    pub fn for_model(model: Option<PathBuf>) -> Self {
        Self {
            model,
            host: "127.0.0.1".into(),
            port: 8000,
            data_dir: None,
            served_model_name: None,
            device: DeviceSpec::Cpu,
            enforce_eager: false,
            lora_modules: Vec::new(),
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            max_waiting: 256,
            kv_cache_memory: 2 << 30,
            kv_cache_dtype: KvCacheDtype::Auto,
            block_size: 16,
            threads: 0,
            max_request_bytes: 16 << 20,
            max_upload_bytes: 512 << 20,
            weights_dtype: WeightsDtype::F32,
            finetune_mode: FinetuneMode::Coserve,
            tpot_slo_ms: 150,
            max_train_tokens_per_iter: 128,
            max_bwd_layers_per_iter: 8,
            min_finetune_share: 0.0,
            train_dtype: TrainDtype::F32,
            checkpoint_every: 50,
            max_concurrent_jobs: 1,
            cpu_forward: CpuForward::from_env(),
        }
    }

    /// `--data-dir`, or `$COSERVE_HOME/data`.
    pub fn resolved_data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| coserve_home().join("data"))
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            kv_cache_bytes: self.kv_cache_memory,
            kv_cache_dtype: self.kv_cache_dtype.resolve(),
            block_size: self.block_size,
            threads: self.threads,
            training: TrainingConfig {
                mode: self.finetune_mode,
                tpot_slo: std::time::Duration::from_millis(self.tpot_slo_ms),
                max_train_tokens_per_iter: self.max_train_tokens_per_iter,
                max_bwd_layers_per_iter: self.max_bwd_layers_per_iter,
                min_train_share: self.min_finetune_share.clamp(0.0, 1.0),
                train_dtype: self.train_dtype,
            },
            cpu_forward: self.cpu_forward,
        }
    }
}

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheDtype {
    Auto,
    F32,
    F16,
}

impl KvCacheDtype {
    /// The element type asked for (`None`: the backend's own).
    pub fn resolve(self) -> Option<KvDtype> {
        match self {
            KvCacheDtype::Auto => None,
            KvCacheDtype::F32 => Some(KvDtype::F32),
            KvCacheDtype::F16 => Some(KvDtype::F16),
        }
    }
}

fn parse_lora_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.trim().is_empty() && !dir.trim().is_empty() => {
            Ok((name.trim().to_string(), PathBuf::from(dir.trim())))
        }
        _ => Err(format!("`{s}` is not NAME=DIR")),
    }
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: crate::backend::cuda::CudaError| e.to_string())
}

/// Parses sizes such as `2GiB`, `512MiB`, `1.5GB`, `4096` (bytes).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a size like 2GiB or 512MiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > usize::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
