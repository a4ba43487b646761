//! The training step on the device (forward with saved activations, chunked loss, backward,
//! clipping and AdamW) on a small random model, against the same step through the CPU twins.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::{failed, random_adapter, small_model, small_shape};
use super::{compare, Check};
use crate::backend::cuda::decoder::cuda::CudaOps;
use crate::backend::cuda::decoder::host::HostOps;
use crate::backend::cuda::decoder::train::{
    train_sample, TrainAdapter, TrainOps, TrainSample, TrainScratch,
};
use crate::backend::cuda::decoder::{DecoderShape, DecoderWeights};
use crate::backend::cuda::CudaError;
use crate::lora::optim::AdamWConfig;
use crate::lora::LoraWeights;

/// Gradients pass every layer's bf16 activations twice (forward and backward): twice the
/// decoder check's tolerance on the logits.
const GRAD_RTOL: f64 = 1.0 / 16.0;
const GRAD_ATOL: f64 = 1.0 / 32.0;

struct Run {
    mean_loss: f64,
    grads: LoraWeights,
    norm: f64,
    stepped: LoraWeights,
}

#[allow(clippy::too_many_arguments)]
fn run<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    adapter: &LoraWeights,
    sample: &TrainSample,
    grad_scale: f32,
    lr: f32,
) -> Result<Run, CudaError> {
    let blocks = sample.block_table.iter().max().map_or(0, |&b| b as usize + 1);
    let mut caches = (0..s.layers).map(|_| ops.cache(s, blocks)).collect::<Result<Vec<_>, _>>()?;
    let mut ad = TrainAdapter::new(ops, s, adapter, AdamWConfig::default())?;
    let mut sc = TrainScratch::new(ops, s, &ad, sample.tokens.len())?;
    let stats =
        train_sample(ops, s, w, inv_freq, &mut caches, sample, &mut ad, grad_scale, &mut sc)?;
    let grads = ad.grads(ops)?;
    let norm = ad.clip_and_step(ops, lr, Some(1.0))?;
    let stepped = ad.weights(ops)?;
    Ok(Run { mean_loss: stats.mean_loss(), grads, norm, stepped })
}

/// A 300-token sample (two loss chunks) over shuffled blocks, loss on tokens 40..290, and a
/// random rank-8 adapter on every projection with LoRA dropout 0.1 (the masks are the same
/// bits on both sides, so the comparison's tolerances do not change).
fn case(s: &DecoderShape) -> (TrainSample, LoraWeights) {
    let mut rng = StdRng::seed_from_u64(31);
    let n: usize = 300;
    let mut blocks: Vec<u32> = (0..20).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.random_range(0..=i));
    }
    let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..s.vocab as u32)).collect();
    let trained: Vec<bool> = (0..n).map(|i| (40..290).contains(&i)).collect();
    let table = blocks[..n.div_ceil(s.block_size)].to_vec();
    let mut adapter = random_adapter(s, 8, &mut rng);
    adapter.config.dropout = 0.1;
    (TrainSample::new(tokens, &trained, table).with_dropout_seed(77), adapter)
}

pub(super) fn check_training_step(
    ops: &mut CudaOps,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let s = small_shape(false);
    let (weights, host_weights, inv_freq) = small_model(ops, &s, 9)?;

    let (sample, adapter) = case(&s);
    let (n, count) = (sample.len(), sample.targets.iter().flatten().count());
    let lr = 1e-3;
    let scale = 1.0 / count as f32;

    let got = match run(ops, &s, &weights, &inv_freq, &adapter, &sample, scale, lr) {
        Ok(r) => r,
        Err(e) => {
            checks.push(failed("training_step", e));
            return Ok(());
        }
    };
    let want = run(&mut HostOps, &s, &host_weights, &inv_freq, &adapter, &sample, scale, lr)?;
    let shape =
        format!("{n} tokens, {count} targets, 2 layers hidden 256 heads 4/2, r=8 all, dropout 0.1");
    let one = |v: f64| vec![v as f32];
    compare(
        checks,
        "training_step (loss)",
        shape.clone(),
        &one(got.mean_loss),
        &one(want.mean_loss),
        1e-2,
        0.0,
    );
    for l in 0..s.layers {
        for (which, pick) in [("dA", 0), ("dB", 1)] {
            let flat = |w: &LoraWeights| -> Vec<f32> {
                w.layers[l]
                    .iter()
                    .flatten()
                    .flat_map(|p| if pick == 0 { p.a.clone() } else { p.b.clone() })
                    .collect()
            };
            compare(
                checks,
                &format!("training_step (layer {l} LoRA {which})"),
                shape.clone(),
                &flat(&got.grads),
                &flat(&want.grads),
                GRAD_RTOL,
                GRAD_ATOL,
            );
        }
    }
    compare(
        checks,
        "training_step (gradient norm)",
        shape.clone(),
        &one(got.norm),
        &one(want.norm),
        1e-2,
        0.0,
    );
    // AdamW's first step moves each weight by about ±lr whatever its gradient's size, so a
    // tiny gradient of the other sign may move it the other way: 2.5 lr apart at most.
    let flat = |w: &LoraWeights| -> Vec<f32> { w.tensors().flatten().copied().collect() };
    let (g, w) = (flat(&got.stepped), flat(&want.stepped));
    let wscale = w.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
    let atol = 2.5 * lr as f64 / wscale.max(1e-30);
    compare(checks, "training_step (weights after AdamW)", shape, &g, &w, 0.0, atol);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::model::rope_inv_freq;
    use super::*;
    use crate::backend::cuda::decoder::fill_uniform_host;

    /// The selftest's step through the twins alone: it runs to the end, with a loss near
    /// ln(vocab) for a random model and non-zero gradients.
    #[test]
    fn selftest_step_runs_on_the_twins() {
        let s = small_shape(false);
        let tensors = DecoderWeights::<()>::layout(&s)
            .into_iter()
            .enumerate()
            .map(|(i, (n, sc, off))| fill_uniform_host(n, 9 + i as u64, sc, off))
            .collect();
        let w = DecoderWeights::from_tensors(&s, tensors).unwrap();
        let inv_freq = rope_inv_freq(&s);
        let (sample, adapter) = case(&s);
        let scale = 1.0 / sample.targets.iter().flatten().count() as f32;
        let r = run(&mut HostOps, &s, &w, &inv_freq, &adapter, &sample, scale, 1e-3).unwrap();
        assert!((r.mean_loss - (1000f64).ln()).abs() < 2.0, "loss {}", r.mean_loss);
        assert!(r.norm > 0.0 && r.norm.is_finite(), "norm {}", r.norm);
        assert!(r.grads.l2_norm() > 0.0);
    }
}
