//! `coserve bench-finetune`: fine-tuning throughput of the real engine path, standalone.
//!
//! It loads a model as `serve` does, starts the engine with fine-tuning in `temporal` mode and
//! caps large enough that one iteration forwards a whole sample and one runs its whole
//! backward, submits a LoRA job over synthetic examples, and times the optimizer steps from
//! the job's `Step` events. It also reports the activation memory a trained token costs
//! against what keeping every intermediate (as a naive autograd does) would cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cuda::{DeviceSpec, ResolvedDevice};
use crate::engine::hybrid::{FinetuneMode, TrainingConfig};
use crate::engine::job::{JobEvent, TrainHyper, TrainJobSpec};
use crate::engine::{EngineConfig, EngineStartError};
use crate::finetune::TrainingExample;
use crate::kv::KvCache;
use crate::lora::{LoraConfig, LoraConfigError, LoraWeights, TargetModule};
use crate::metrics::Metrics;
use crate::model::activations::SavedActivations;
use crate::model::config::LlamaConfig;
use crate::model::fetch::{coserve_home, ensure_default_model, FetchError};
use crate::model::loader::dummy::DummyModel;
use crate::model::loader::load_model;
use crate::model::weights::WeightsDtype;
use crate::model::ModelError;

#[derive(Debug, Clone, Args)]
pub struct BenchFinetuneArgs {
    /// GGUF file or Hugging Face model directory (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Storage of linear weights (the forward of training rows reads them in f32 training).
    #[arg(long, value_enum, default_value_t = WeightsDtype::F32)]
    pub weights_dtype: WeightsDtype,
    /// Precision of training's products with frozen weights on the CPU (as the server's
    /// `--train-dtype`).
    #[arg(long, value_enum, default_value_t = TrainDtype::F32)]
    pub train_dtype: TrainDtype,
    /// Tokens per training example (every one forwarded, every one after the first trained).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Examples per optimizer step (gradient accumulation over samples).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first (the first also builds the transposed weights).
    #[arg(long, default_value_t = 1)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f32,
    /// Adapted projections, comma separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    /// down_proj).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, cuda:N or auto. On a GPU the model runs in bf16 with fp32 LoRA weights and
    /// optimizer state (`--weights-dtype` is for the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A model of this real shape with random weights made on the GPU instead of a file.
    #[arg(long, value_enum, conflicts_with = "model")]
    pub dummy_weights: Option<DummyModel>,
    /// On a GPU, then co-serve: decode this many sequences every iteration with the training
    /// sample's chunks in the same forward (0: skip), against the same decode batch alone.
    #[arg(long, default_value_t = 0)]
    pub coserve_decode_batch: usize,
    /// Tokens already in each co-served decode sequence's cache.
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// Training tokens forwarded per co-serving iteration.
    #[arg(long, default_value_t = 128)]
    pub train_tokens_per_iter: usize,
    /// Backward layers run per co-serving iteration.
    #[arg(long, default_value_t = 4)]
    pub bwd_layers_per_iter: usize,
    /// Training samples timed while co-serving (after one untimed).
    #[arg(long, default_value_t = 2)]
    pub coserve_samples: usize,
    /// Then co-serve again with each iteration's training sized as the engine sizes it (its
    /// planner and cost model), aiming at this ratio of the decode batch's step alone (0:
    /// skip). `--train-tokens-per-iter` and `--bwd-layers-per-iter` size the first run only.
    #[arg(long, default_value_t = 1.2)]
    pub coserve_step_target: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchFinetuneError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineStartError),
    #[error("invalid LoRA settings: {0}")]
    Lora(#[from] LoraConfigError),
    #[error("unknown target module `{0}` (use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")]
    UnknownModule(String),
    #[error("{0} must be at least {1}")]
    TooSmall(&'static str, usize),
    #[error("--seq-len {seq_len} exceeds the model's context of {max} tokens")]
    TooLong { seq_len: usize, max: usize },
    #[error("the fine-tuning job failed: {0}")]
    JobFailed(String),
    #[error("the engine stopped before the job finished")]
    EngineGone,
    #[error("--coserve-step-target {0} must be 0 (skip) or at least 1")]
    StepTarget(f64),
    #[error("--dummy-weights are made on a GPU: add --device cuda")]
    DummyOnCpu,
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
}

#[derive(Debug, Serialize)]
pub struct BenchFinetuneResult {
    pub model: String,
    pub weights_dtype: String,
    pub train_dtype: String,
    pub threads: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
    pub timed_steps: usize,
    /// Forwarded tokens per second, median over the timed steps.
    pub tokens_per_s: f64,
    pub step_seconds_median: f64,
    pub step_seconds: Vec<f64>,
    pub final_loss: f64,
    pub peak_rss_mib: Option<f64>,
    pub activations: ActivationMemory,
    /// On a GPU with `--coserve-decode-batch`: the co-serving measurements (fixed work per
    /// iteration, then sized to the step target), each with the share of the standalone
    /// training throughput it keeps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub coserve_on_device: Vec<Coserved>,
    /// On a GPU: one sample's attention backward (one layer's), tiled and direct kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_backward_on_device:
        Option<crate::backend::cuda::decoder::cuda::AttentionBackwardTimes>,
    /// On a GPU: one sample's forward attention (one layer's), tiled and paged kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_attention_on_device: Option<crate::backend::cuda::decoder::cuda::ChunkAttentionTimes>,
    /// On a GPU: milliseconds of one more training step by kind of operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_ms_by_op: Option<Vec<(String, f64)>>,
    /// What failed after the standalone steps were measured ("what: error"); the command
    /// then exits non-zero after printing the rest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// One co-serving measurement and the share of standalone training throughput it keeps.
#[derive(Debug, Serialize)]
pub struct Coserved {
    #[serde(flatten)]
    pub measured: crate::backend::cuda::bench_coserve::CoserveOnDevice,
    pub kept_fraction: f64,
}

/// Activation memory of one training sample, per token.
#[derive(Debug, Serialize)]
pub struct ActivationMemory {
    /// What the token-level forward saves (`SavedActivations::bytes() / tokens`).
    pub saved_bytes_per_token: f64,
    /// Every intermediate a naive autograd keeps (see [`naive_activation_floats`]).
    pub naive_bytes_per_token: f64,
    pub ratio: f64,
}

/// f32 values per token that keeping every intermediate of a sample of `seq_len` tokens costs,
/// as an eager autograd (e.g. HF transformers with eager attention) saves them. Per layer:
/// - attention RMSNorm input and output (2 · hidden), MLP RMSNorm input and output (2 · hidden);
/// - q, k, v projection outputs before RoPE, and q, k after RoPE;
/// - attention probabilities: a full row of `seq_len` per head (the causal mask still stores
///   the masked entries), plus the attention output (o_proj's input);
/// - o_proj, gate_proj, up_proj and down_proj outputs, the SiLU output and SiLU · up;
/// - per adapted projection the low-rank activation `x Aᵀ` (r) and the LoRA branch output
///   `(x Aᵀ) Bᵀ` (out_features) before it is scaled and added.
///
/// Outside the layers: the embedding output, the final RMSNorm input and output, and the logits
/// row (vocab).
pub fn naive_activation_floats(c: &LlamaConfig, lora: &LoraConfig, seq_len: usize) -> usize {
    let (hs, q, kv, i) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let norms = 4 * hs;
    let qkv = (q + 2 * kv) + (q + kv);
    let attention = c.num_heads * seq_len + q;
    let projections = hs + 2 * i + hs + 2 * i;
    let lora_parts: usize =
        TargetModule::ALL.iter().filter(|m| lora.targets(**m)).map(|m| lora.r + m.shape(c).0).sum();
    let per_layer = norms + qkv + attention + projections + lora_parts;
    c.num_layers * per_layer + 3 * hs + c.vocab_size
}

/// The activation figure of a `seq_len`-token sample under `lora`.
pub fn activation_memory(c: &LlamaConfig, lora: &LoraConfig, seq_len: usize) -> ActivationMemory {
    let adapter = LoraWeights::init(lora, c, 0);
    let saved = SavedActivations::new(c, &adapter, seq_len).bytes() as f64 / seq_len as f64;
    let naive = (naive_activation_floats(c, lora, seq_len) * std::mem::size_of::<f32>()) as f64;
    ActivationMemory {
        saved_bytes_per_token: saved,
        naive_bytes_per_token: naive,
        ratio: naive / saved,
    }
}

/// Pseudo-random token ids below `vocab`: the same generator as the HF baseline script
/// (`benches/hf_peft_finetune.py`), so both train on identical inputs.
pub fn synthetic_tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// The same measurement on a GPU: the device training step, one sample at a time, an AdamW
/// step on the device after each `batch_size` samples.
fn run_on_device(
    args: &BenchFinetuneArgs,
    spec: DeviceSpec,
    lora: &LoraConfig,
) -> Result<BenchFinetuneResult, BenchFinetuneError> {
    use crate::backend::cuda::bench::{GpuModel, BLOCK_SIZE};
    use crate::backend::cuda::bench_coserve::{CoserveSetup, Sizing};
    let target = args.coserve_step_target;
    let home = coserve_home();
    let (source, config) = match args.dummy_weights {
        Some(d) => (GpuModel::Dummy(d), d.config()),
        None => {
            let path = match &args.model {
                Some(p) => p.clone(),
                None => ensure_default_model(&home)?,
            };
            let loaded = load_model(&path, WeightsDtype::F32)?;
            let host =
                crate::backend::cuda::decoder::from_model::from_llama(&loaded.model, BLOCK_SIZE)?;
            let model = GpuModel::Host { name: loaded.default_name, model: Box::new(host) };
            (model, loaded.model.config.clone())
        }
    };
    let naive = (naive_activation_floats(&config, lora, args.seq_len) * 4) as f64;
    let run = crate::backend::cuda::bench_train::run(
        spec,
        &home,
        source,
        &config,
        lora,
        args.seq_len,
        args.batch_size,
        args.steps,
        args.warmup_steps,
        (args.coserve_decode_batch > 0).then(|| CoserveSetup {
            decode_batch: args.coserve_decode_batch,
            context: args.context,
            seq_len: args.seq_len,
            sizings: std::iter::once(Sizing::Fixed {
                tokens: args.train_tokens_per_iter.max(1),
                layers: args.bwd_layers_per_iter.max(1),
            })
            .chain((target > 0.0).then_some(Sizing::StepTarget { ratio: target }))
            .collect(),
            samples: args.coserve_samples.max(1),
            time_limit: std::time::Duration::from_secs(30),
        }),
    )?;
    let step = median(&run.step_seconds);
    let tokens_per_s = (args.seq_len * args.batch_size) as f64 / step;
    Ok(BenchFinetuneResult {
        model: format!("{} on {}", run.model, run.device),
        weights_dtype: "bf16".into(),
        train_dtype: "bf16".into(),
        threads: 0,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        rank: lora.r,
        alpha: lora.alpha,
        target_modules: lora.target_modules.iter().map(|m| m.name().to_string()).collect(),
        timed_steps: run.step_seconds.len(),
        tokens_per_s,
        step_seconds_median: step,
        step_seconds: run.step_seconds,
        coserve_on_device: run
            .coserve
            .into_iter()
            .map(|c| Coserved {
                kept_fraction: c.coserved_train_tokens_per_s / tokens_per_s,
                measured: c,
            })
            .collect(),
        attention_backward_on_device: run.attention_backward,
        chunk_attention_on_device: run.chunk_attention,
        gpu_ms_by_op: run.gpu_ms_by_op,
        errors: run.errors,
        final_loss: run.final_loss,
        peak_rss_mib: None,
        activations: ActivationMemory {
            saved_bytes_per_token: run.saved_bytes_per_token,
            // The naive figure counts f32 values; a bf16 autograd keeps half the bytes.
            naive_bytes_per_token: naive / 2.0,
            ratio: naive / 2.0 / run.saved_bytes_per_token,
        },
    })
}

/// The median of `v` (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

fn lora_config(args: &BenchFinetuneArgs) -> Result<LoraConfig, BenchFinetuneError> {
    let target_modules = args
        .target_modules
        .iter()
        .map(|s| {
            TargetModule::from_name(s.trim())
                .ok_or_else(|| BenchFinetuneError::UnknownModule(s.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoraConfig { r: args.rank, alpha: args.alpha, dropout: 0.0, target_modules }.validated()?)
}

pub fn run(args: &BenchFinetuneArgs) -> Result<BenchFinetuneResult, BenchFinetuneError> {
    for (v, name, min) in [
        (args.seq_len, "--seq-len", 2),
        (args.batch_size, "--batch-size", 1),
        (args.steps, "--steps", 1),
    ] {
        if v < min {
            return Err(BenchFinetuneError::TooSmall(name, min));
        }
    }
    let target = args.coserve_step_target;
    if !(target == 0.0 || target >= 1.0) {
        return Err(BenchFinetuneError::StepTarget(target));
    }
    let lora = lora_config(args)?;
    let spec: DeviceSpec = args.device.parse()?;
    if let ResolvedDevice::Cuda { .. } = spec.resolve()? {
        return run_on_device(args, spec, &lora);
    }
    if args.dummy_weights.is_some() {
        return Err(BenchFinetuneError::DummyOnCpu);
    }
    let path = match &args.model {
        Some(p) => p.clone(),
        None => ensure_default_model(&coserve_home())?,
    };
    let loaded = load_model(&path, args.weights_dtype)?;
    let c = loaded.model.config.clone();
    if args.seq_len > c.max_position_embeddings {
        return Err(BenchFinetuneError::TooLong {
            seq_len: args.seq_len,
            max: c.max_position_embeddings,
        });
    }
    let activations = activation_memory(&c, &lora, args.seq_len);

    // The KV cache holds one sample at a time (training forwards one sample per job), with
    // a block of slack; more would only be untouched pages.
    let block_size = 16;
    let per_block = KvCache::bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim);
    let kv_cache_bytes = (args.seq_len.div_ceil(block_size) + 1) * per_block;
    let cfg = EngineConfig {
        kv_cache_bytes,
        block_size,
        max_num_batched_tokens: args.seq_len,
        threads: args.threads,
        training: TrainingConfig {
            mode: FinetuneMode::Temporal,
            max_train_tokens_per_iter: args.seq_len,
            max_bwd_layers_per_iter: c.num_layers,
            train_dtype: args.train_dtype,
            ..TrainingConfig::default()
        },
        ..EngineConfig::default()
    };
    let name = args
        .model
        .as_ref()
        .map_or_else(|| loaded.default_name.clone(), |p| p.display().to_string());
    let engine = crate::engine::start(
        loaded.model,
        loaded.eos_token_ids,
        &cfg,
        Arc::new(Metrics::new(&name)),
    )?;

    let total_steps = args.warmup_steps + args.steps;
    let train: Vec<TrainingExample> = (0..total_steps * args.batch_size)
        .map(|i| {
            let tokens = synthetic_tokens(c.vocab_size, args.seq_len, i as u64 + 1);
            // Causal-LM loss on every position, as the HF baseline (labels = input ids).
            let trained = (0..args.seq_len).map(|p| p > 0).collect();
            TrainingExample { tokens, trained, line: i + 1 }
        })
        .collect();
    let (tx, rx) = flume::unbounded();
    let spec = TrainJobSpec {
        id: "bench-finetune".into(),
        train: Arc::new(train),
        validation: Arc::new(Vec::new()),
        lora: lora.clone(),
        hyper: TrainHyper {
            n_epochs: 1,
            batch_size: args.batch_size,
            learning_rate: 1e-4,
            seed: 0,
            checkpoint_every: 0,
        },
        resume: None,
        events: tx,
    };
    let outcome = drive(&engine.handle, spec, &rx);
    engine.handle.shutdown();
    let _ = engine.thread.join();
    let steps = outcome?;

    let timed: Vec<_> = steps.iter().skip(args.warmup_steps).collect();
    let step_seconds: Vec<f64> = timed.iter().map(|s| s.1).collect();
    let tok_s: Vec<f64> = timed.iter().map(|s| s.0 as f64 / s.1.max(1e-9)).collect();
    Ok(BenchFinetuneResult {
        model: name,
        weights_dtype: args.weights_dtype.to_string(),
        train_dtype: args.train_dtype.to_string(),
        threads: args.threads,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        rank: lora.r,
        alpha: lora.alpha,
        target_modules: lora.target_modules.iter().map(|m| m.name().to_string()).collect(),
        timed_steps: timed.len(),
        tokens_per_s: median(&tok_s),
        step_seconds_median: median(&step_seconds),
        step_seconds,
        final_loss: steps.last().map_or(f64::NAN, |s| s.2),
        peak_rss_mib: crate::bench::peak_rss_mib(None),
        activations,
        coserve_on_device: Vec::new(),
        attention_backward_on_device: None,
        chunk_attention_on_device: None,
        gpu_ms_by_op: None,
        errors: Vec::new(),
    })
}

/// Runs the job to its end: (tokens, seconds, loss) of every step.
fn drive(
    handle: &crate::engine::EngineHandle,
    spec: TrainJobSpec,
    rx: &flume::Receiver<JobEvent>,
) -> Result<Vec<(u64, f64, f64)>, BenchFinetuneError> {
    handle.start_job(spec).map_err(|_| BenchFinetuneError::EngineGone)?;
    let mut steps = Vec::new();
    loop {
        // Generous: one step of a large model on two cores can take minutes.
        match rx.recv_timeout(Duration::from_secs(3600)) {
            Ok(JobEvent::Step(m)) => {
                tracing::info!(
                    step = m.step,
                    seconds = m.step_seconds,
                    tokens_per_s = m.tokens_per_second,
                    loss = m.train_loss,
                    "step"
                );
                steps.push((m.tokens, m.step_seconds, m.train_loss));
            }
            Ok(JobEvent::Succeeded(_)) => return Ok(steps),
            Ok(JobEvent::Failed(e)) => return Err(BenchFinetuneError::JobFailed(e)),
            Ok(JobEvent::Stopped(_)) | Err(_) => return Err(BenchFinetuneError::EngineGone),
            Ok(_) => {}
        }
    }
}

impl BenchFinetuneResult {
    pub fn print_text(&self) {
        println!(
            "model {} ({}, training in {}), {} threads, {} x {} tokens per step, r={} alpha={}, {}",
            self.model,
            self.weights_dtype,
            self.train_dtype,
            self.threads,
            self.batch_size,
            self.seq_len,
            self.rank,
            self.alpha,
            self.target_modules.join(",")
        );
        let steps: Vec<String> = self.step_seconds.iter().map(|s| format!("{s:.2}")).collect();
        println!("step seconds:   {} (median {:.3})", steps.join(" "), self.step_seconds_median);
        println!(
            "tokens/s:       {:.1} (median over {} steps)",
            self.tokens_per_s, self.timed_steps
        );
        println!("final loss:     {:.4}", self.final_loss);
        match self.peak_rss_mib {
            Some(m) => println!("peak RSS:       {m:.0} MiB"),
            None => println!("peak RSS:       unknown"),
        }
        let a = &self.activations;
        println!(
            "activations:    {:.0} bytes/token saved vs {:.0} naive ({:.1}x less)",
            a.saved_bytes_per_token, a.naive_bytes_per_token, a.ratio
        );
        for Coserved { measured: c, kept_fraction } in &self.coserve_on_device {
            let sized = match c.step_target_ratio {
                Some(r) => format!("training sized to {r}x the step alone"),
                None => format!(
                    "{} training tokens and {} backward layers per iteration",
                    c.train_tokens_per_iter, c.bwd_layers_per_iter
                ),
            };
            println!(
                "co-serving:     decode batch {} at context {}, {sized}",
                c.decode_batch, c.context
            );
            println!(
                "                step {:.2} ms median, {:.2} mean, {:.2} p90 vs {:.2} ms alone \
                 ({:.2}x, {:.2}x, {:.2}x)",
                c.coserved_step_ms,
                c.coserved_step_mean_ms,
                c.coserved_step_p90_ms,
                c.inference_only_step_ms,
                c.step_ratio,
                c.step_ratio_mean,
                c.step_ratio_p90
            );
            println!(
                "                training {:.1} tokens/s ({:.0}% of standalone) over {} samples",
                c.coserved_train_tokens_per_s,
                100.0 * kept_fraction,
                c.samples
            );
        }
        if let Some(by_op) = &self.gpu_ms_by_op {
            println!("one step on the GPU by kind of operation:");
            for (op, ms) in by_op {
                println!("                {op:<28} {ms:>9.3} ms");
            }
        }
        for e in &self.errors {
            println!("failed:         {e}");
        }
    }
}
