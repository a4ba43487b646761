//! `coserve bench-decode --device cuda`: decode steps of a model in bf16 on the GPU (random
//! weights of a real shape made on the device, or a loaded model's weights copied there), next to the memory-bandwidth floor (weights and cached K/V read once per step, at
//! the measured device-to-device copy bandwidth).

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::decoder::cuda::{CudaCache, CudaOps};
use super::decoder::from_model::HostModel;
use super::decoder::{
    forward, forward_on_device, rope_tables, DecoderOps, DecoderShape, DecoderWeights, Scratch,
    SeqRows, StepBatch,
};
use super::gpu::Gpu;
use super::{CudaError, DeviceSpec};
use crate::bench_decode::{BenchDecodeResult, DecodeStep};
use crate::model::loader::dummy::DummyModel;

pub const BLOCK_SIZE: usize = 16;

/// The model a GPU benchmark runs.
pub enum GpuModel {
    /// Random weights of a real shape, made on the device.
    Dummy(DummyModel),
    /// A loaded model's weights, copied to the device.
    Host { name: String, model: Box<HostModel> },
}

pub fn run(
    spec: DeviceSpec,
    home: &Path,
    source: GpuModel,
    batches: &[usize],
    context: usize,
    steps: usize,
) -> Result<BenchDecodeResult, CudaError> {
    let gpu = Gpu::open(spec, home, "bench-decode on a GPU")?;
    let device = gpu.device.to_string();
    let mut ops = CudaOps::new(gpu)?;
    let (name, s, weights, inv_freq, max_positions) = match source {
        GpuModel::Dummy(model) => {
            let config = model.config();
            let s = DecoderShape::new(&config, BLOCK_SIZE)?;
            let weights = ops.dummy_weights(&s, 1)?;
            let max = config.max_position_embeddings;
            (format!("dummy {model}"), s, weights, config.rope_inv_freq(), max)
        }
        GpuModel::Host { name, model } => {
            let weights = ops.upload_weights(&model.shape, &model.weights)?;
            let HostModel { shape, inv_freq, max_positions, .. } = *model;
            (name, shape, weights, inv_freq, max_positions)
        }
    };
    if context + 1 > max_positions {
        return Err(CudaError::Shape(format!(
            "--context {context} leaves no room for a decode in {name}'s {max_positions} positions"
        )));
    }
    let bandwidth = ops.copy_bandwidth()?;
    let bytes: usize = DecoderWeights::<()>::layout(&s).iter().map(|t| 2 * t.0).sum();
    let model = OnDevice { s: &s, weights: &weights, inv_freq: &inv_freq, bytes, bandwidth };
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for &batch in batches {
        // A failed batch is reported with the others' numbers; the next one still runs (a
        // batch too large for the device's memory fails alone).
        match decode_batch(&mut ops, &model, batch, context, steps) {
            Ok(step) => {
                // On stderr as soon as measured: a later failure or time limit keeps it.
                eprintln!("{}", step.summary());
                out.push(step);
            }
            Err(e) => {
                eprintln!("batch {batch}: failed: {e}");
                errors.push(format!("batch {batch}: {e}"));
            }
        }
    }
    Ok(BenchDecodeResult {
        model: name,
        device,
        weights_dtype: "bf16".into(),
        kv_cache_dtype: "bf16".into(),
        threads: 0,
        context,
        weight_bytes: bytes,
        read_bandwidth_bytes_per_s: bandwidth,
        steps: out,
        errors,
    })
}

/// The model a decode benchmark runs, and what its floor is computed from.
struct OnDevice<'a> {
    s: &'a DecoderShape,
    weights: &'a DecoderWeights<cudarc::driver::CudaSlice<u16>>,
    inv_freq: &'a [f32],
    /// Bytes of all the weights.
    bytes: usize,
    /// Device-to-device copy rate, bytes read plus written a second.
    bandwidth: f64,
}

/// Decode steps of `batch` sequences whose caches hold `context` random rows: eager, as a
/// CUDA graph, profiled, and with tuned products.
fn decode_batch(
    ops: &mut CudaOps,
    m: &OnDevice,
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<DecodeStep, CudaError> {
    let OnDevice { s, weights, inv_freq, bytes, bandwidth } = *m;
    let embed_bytes = 2 * s.vocab * s.hidden;
    let blocks_per_seq = (context + 1).div_ceil(BLOCK_SIZE);
    let blocks = batch * blocks_per_seq;
    let mut caches = Vec::with_capacity(s.layers);
    for l in 0..s.layers {
        let mut c = ops.cache(s, blocks)?;
        ops.fill(&mut c.k, 1000 + 2 * l as u64, 1.0, 0.0)?;
        ops.fill(&mut c.v, 1001 + 2 * l as u64, 1.0, 0.0)?;
        caches.push(c);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(batch as u64);
    let seqs = (0..batch)
        .map(|i| SeqRows {
            adapter: None,
            tokens: vec![rng.random_range(0..s.vocab as u32)],
            start: context,
            block_table: ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect(),
        })
        .collect();
    let step_batch = StepBatch::new(seqs, BLOCK_SIZE)?;
    let kv_bytes = batch * (context + 1) * s.layers * 2 * s.kv_dim() * 2;
    // Each row reads one embedding row, not the table.
    let bytes_read = bytes - embed_bytes + batch * s.hidden * 2 + kv_bytes;
    let floor_s = bytes_read as f64 / bandwidth;
    let mut scratch = Scratch::new(ops, s, batch)?;
    // A whole step: batch upload, forward, greedy ids back on the host.
    let one = |o: &mut CudaOps, c: &mut [CudaCache], sc: &mut Scratch<CudaOps>| {
        forward(o, s, weights, inv_freq, c, &step_batch, sc)
    };
    // The same step replayed as one CUDA graph: the batch copied into fixed buffers, every
    // launch of the forward recorded once. A failure here is reported with the batch's other
    // numbers (and fails the command at the end), not instead of them.
    let graph_of = |o: &mut CudaOps, c: &mut [CudaCache], sc: &mut Scratch<CudaOps>| {
        graph_step(o, s, weights, inv_freq, c, &step_batch, sc, steps)
    };
    // Untimed: plans the products and warms the caches.
    for _ in 0..2 {
        one(ops, &mut caches, &mut scratch)?;
    }
    let step = median_s(steps, || one(ops, &mut caches, &mut scratch))?;
    let graph = graph_of(ops, &mut caches, &mut scratch);
    ops.gpu.sync()?;
    ops.start_profile();
    let profiled = one(ops, &mut caches, &mut scratch);
    let by_op = ops.finish_profile();
    profiled?;
    let by_op = by_op?;
    // Both paged kernel variants on this batch's attention, one layer (reported likewise).
    let attention = ops.time_decode_attention(s, batch, context);
    // Last, as tuning keeps its choices: the step with its products' algorithms chosen by
    // timing them (as a server's recorded decode steps get), eagerly and as a graph.
    ops.tune_products(true);
    let tuning = one(ops, &mut caches, &mut scratch);
    ops.tune_products(false);
    let tuned = tuning.and_then(|_| {
        let step = median_s(steps, || one(ops, &mut caches, &mut scratch))?;
        let graph = graph_of(ops, &mut caches, &mut scratch);
        Ok(TunedStep {
            step_ms: step * 1e3,
            fraction_of_floor: floor_s / step,
            cuda_graph_step_ms: graph.as_ref().ok().copied(),
            cuda_graph_fraction_of_floor: graph.ok().map(|ms| floor_s / (ms / 1e3)),
            products: ops.tuned_products().iter().filter(|t| t.m == batch).cloned().collect(),
        })
    });
    drop(caches);
    ops.gpu.sync()?;
    Ok(DecodeStep {
        gpu_ms_by_op: Some(by_op),
        cuda_graph_step_ms: graph.as_ref().ok().copied(),
        cuda_graph_fraction_of_floor: graph.as_ref().ok().map(|ms| floor_s / (ms / 1e3)),
        cuda_graph_error: graph.err().map(|e| e.to_string()),
        attention_on_device_error: attention.as_ref().err().map(|e| e.to_string()),
        attention_on_device: attention.ok(),
        tuned_products_error: tuned.as_ref().err().map(|e| e.to_string()),
        tuned_products: tuned.ok(),
        ..DecodeStep::new(batch, step, bytes_read, bandwidth)
    })
}

/// Median seconds of `steps` runs of `f`.
fn median_s<T>(
    steps: usize,
    mut f: impl FnMut() -> Result<T, CudaError>,
) -> Result<f64, CudaError> {
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A decode step once its products' algorithms were chosen by timing them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TunedStep {
    /// Median of the timed steps, as `step_ms`.
    pub step_ms: f64,
    pub fraction_of_floor: f64,
    /// As `cuda_graph_step_ms` (`None`: the replay failed, as reported there).
    pub cuda_graph_step_ms: Option<f64>,
    pub cuda_graph_fraction_of_floor: Option<f64>,
    /// What timing found for each of the step's product shapes.
    pub products: Vec<crate::backend::cuda::gemm_tuning::Tuned>,
}

/// Median milliseconds of `steps` decode steps replayed as a CUDA graph: batch upload into
/// fixed buffers, graph launch, greedy ids back on the host.
#[allow(clippy::too_many_arguments)]
fn graph_step(
    ops: &mut CudaOps,
    s: &DecoderShape,
    weights: &DecoderWeights<cudarc::driver::CudaSlice<u16>>,
    inv_freq: &[f32],
    caches: &mut [CudaCache],
    batch: &StepBatch,
    scratch: &mut Scratch<CudaOps>,
    steps: usize,
) -> Result<f64, CudaError> {
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    let mut step = ops.upload(batch, &cos, &sin)?;
    forward_on_device(ops, s, weights, caches, &step, scratch)?;
    ops.gpu.sync()?;
    let graph = ops.capture(|o| forward_on_device(o, s, weights, caches, &step, scratch))?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps + 2 {
        let t = Instant::now();
        let (cos, sin) = rope_tables(inv_freq, &batch.positions);
        ops.upload_into(&mut step, batch, &cos, &sin)?;
        graph.launch()?;
        std::hint::black_box(ops.read_ids(&scratch.ids, batch.rows())?);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2] * 1e3)
}
