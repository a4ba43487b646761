//! `coserve bench-finetune --device cuda`: LoRA fine-tuning steps on the GPU (the device
//! training step of `decoder::train`), on random weights of a real shape made on the device or
//! on a loaded model's weights copied there.

use std::path::Path;
use std::time::Instant;

use super::bench::{GpuModel, BLOCK_SIZE};
use super::bench_coserve::{CoserveOnDevice, CoserveSetup};
use super::decoder::cuda::{AttentionBackwardTimes, ChunkAttentionTimes, CudaOps};
use super::decoder::from_model::HostModel;
use super::decoder::train::{train_sample, TrainAdapter, TrainSample, TrainScratch};
use super::decoder::{DecoderOps, DecoderShape};
use super::gpu::Gpu;
use super::{CudaError, DeviceSpec};
use crate::bench_finetune::synthetic_tokens;
use crate::lora::optim::AdamWConfig;
use crate::lora::{LoraConfig, LoraWeights};
use crate::model::config::LlamaConfig;

/// The learning rate of the timed steps (2e-4, the API's default) and the clipping norm.
const LR: f32 = 2e-4;
const MAX_GRAD_NORM: f32 = 1.0;

pub struct GpuTrainRun {
    pub model: String,
    pub device: String,
    pub step_seconds: Vec<f64>,
    pub final_loss: f64,
    /// Bytes the forward saves per token (activations kept for the backward), on the device.
    pub saved_bytes_per_token: f64,
    pub coserve: Vec<CoserveOnDevice>,
    /// One sample's attention backward alone, per layer.
    pub attention_backward: Option<AttentionBackwardTimes>,
    /// One sample's forward attention alone (the whole sample as one chunk), per layer.
    pub chunk_attention: Option<ChunkAttentionTimes>,
    /// GPU milliseconds of one more training step (a sample and the optimizer step) by kind
    /// of operation, events between the launches.
    pub gpu_ms_by_op: Option<Vec<(String, f64)>>,
    /// What failed once the standalone steps were measured, as "what: error"; the
    /// measurements after a failure may be missing.
    pub errors: Vec<String>,
}

/// Bytes per token of what the training forward keeps (`decoder::train::step`): per layer the
/// two norm inputs, rotated queries and attention output, gate/up (bf16), and per adapted
/// projection its rank-wide low-rank activation (fp32).
pub fn saved_bytes_per_token(s: &DecoderShape, lora: &LoraConfig) -> f64 {
    let bf16 = 2 * (2 * s.hidden + 2 * s.q_dim() + 2 * s.inter);
    let u = 4 * lora.r * lora.target_modules.len();
    (s.layers * (bf16 + u)) as f64
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    spec: DeviceSpec,
    home: &Path,
    source: GpuModel,
    config: &LlamaConfig,
    lora: &LoraConfig,
    seq_len: usize,
    batch_size: usize,
    steps: usize,
    warmup: usize,
    coserve: Option<CoserveSetup>,
) -> Result<GpuTrainRun, CudaError> {
    let gpu = Gpu::open(spec, home, "bench-finetune on a GPU")?;
    let device = gpu.device.to_string();
    let mut ops = CudaOps::new(gpu)?;
    let (name, s, weights, inv_freq) = match source {
        GpuModel::Dummy(model) => {
            let s = DecoderShape::new(config, BLOCK_SIZE)?;
            let weights = ops.dummy_weights(&s, 1)?;
            (format!("dummy {model}"), s, weights, config.rope_inv_freq())
        }
        GpuModel::Host { name, model } => {
            let weights = ops.upload_weights(&model.shape, &model.weights)?;
            let HostModel { shape, inv_freq, .. } = *model;
            (name, shape, weights, inv_freq)
        }
    };
    if seq_len > config.max_position_embeddings {
        return Err(CudaError::Shape(format!(
            "--seq-len {seq_len} is past the model's {} positions",
            config.max_position_embeddings
        )));
    }
    if coserve.is_some() && batch_size != 1 {
        return Err(CudaError::Shape(
            "the co-serving measurement trains one sample a step: --batch-size 1".into(),
        ));
    }
    let adapter = LoraWeights::init(lora, config, 0);
    let mut ad = TrainAdapter::new(&mut ops, &s, &adapter, AdamWConfig::default())?;
    let mut sc = TrainScratch::new(&mut ops, &s, &ad, seq_len)?;
    let blocks = seq_len.div_ceil(BLOCK_SIZE);
    let mut caches = (0..s.layers).map(|_| ops.cache(&s, blocks)).collect::<Result<Vec<_>, _>>()?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    // Every token forwarded, every one after the first a target, as the CPU benchmark.
    let trained = vec![true; seq_len];
    let grad_scale = 1.0 / ((seq_len - 1) * batch_size) as f32;
    // One step: `batch_size` samples, then the optimizer; the mean loss.
    let mut train_step = |ops: &mut CudaOps, caches: &mut [_], step: usize| {
        let mut loss = 0.0;
        for b in 0..batch_size {
            let seed = (step * batch_size + b) as u64;
            let tokens = synthetic_tokens(s.vocab, seq_len, seed);
            let sample = TrainSample::new(tokens, &trained, table.clone());
            let (w, f) = (&weights, &inv_freq);
            let st = train_sample(ops, &s, w, f, caches, &sample, &mut ad, grad_scale, &mut sc)?;
            loss += st.mean_loss() / batch_size as f64;
        }
        ops.mark("adamw")?;
        ad.clip_and_step(ops, LR, Some(MAX_GRAD_NORM))?;
        Ok::<_, CudaError>(loss)
    };
    let (mut times, mut final_loss) = (Vec::with_capacity(steps), f64::NAN);
    for step in 0..warmup + steps {
        let t = Instant::now();
        final_loss = train_step(&mut ops, &mut caches, step)?;
        ops.sync()?;
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    if !times.is_empty() {
        // On stderr as soon as measured: a later failure or a time limit keeps this line. The
        // same median as the JSON's.
        let median = crate::bench_finetune::median(&times);
        let tokens = (seq_len * batch_size) as f64;
        eprintln!("fine-tuning alone: step {median:.3} s, {:.0} tokens/s", tokens / median);
    }

    // What follows is measured for reading the numbers above; a failure is reported with
    // them, not instead of them. (A failed profiled step may leave part of a sample's
    // gradients in the adapter for the co-serving measurement's first optimizer step; its
    // timings do not depend on their values.)
    let mut errors = Vec::new();
    let mut keep = |what: &str, e: CudaError| errors.push(format!("{what}: {e}"));
    ops.start_profile();
    let profiled = train_step(&mut ops, &mut caches, warmup + steps)
        .and_then(|_| ops.mark("end"))
        .and_then(|_| ops.sync());
    let gpu_ms_by_op = match profiled.and_then(|_| ops.finish_profile()) {
        Ok(by_op) => Some(by_op),
        Err(e) => {
            ops.finish_profile().ok();
            keep("profiled training step", e);
            None
        }
    };
    drop(caches);
    let attention_backward =
        ops.time_attention_backward(&s, seq_len).map_err(|e| keep("attention backward", e)).ok();
    let chunk_attention =
        ops.time_chunk_attention(&s, seq_len, seq_len).map_err(|e| keep("chunk attention", e)).ok();
    let mut coserved = Vec::new();
    if let Some(setup) = coserve {
        let measured = |c: CoserveOnDevice| {
            eprintln!(
                "co-serving ({}): {:.0} training tokens/s, step {:.2} ms = {:.2}x the batch of \
                 {} alone",
                c.sizing,
                c.coserved_train_tokens_per_s,
                c.coserved_step_ms,
                c.step_ratio,
                c.decode_batch
            );
            coserved.push(c);
        };
        let (w, f) = (&weights, &inv_freq);
        let run = super::bench_coserve::run(
            &mut ops,
            &s,
            w,
            f,
            &mut ad,
            &mut sc,
            LR,
            MAX_GRAD_NORM,
            &setup,
            measured,
        );
        if let Err(e) = run {
            keep("co-serving", e);
        }
    }
    Ok(GpuTrainRun {
        model: name,
        device,
        step_seconds: times,
        final_loss,
        saved_bytes_per_token: saved_bytes_per_token(&s, lora),
        coserve: coserved,
        attention_backward,
        chunk_attention,
        gpu_ms_by_op,
        errors,
    })
}
