//! The device training step (`decoder::train`) through the kernels' CPU twins (`HostOps`, with
//! the device's bf16 roundings) against candle autograd in f32: the same loss and LoRA
//! gradients up to bf16 error (with LoRA dropout too, its masks the CPU's), and AdamW on the
//! device as the CPU optimizer.

use crate::common;

use common::dense_lora::{oracle, random_adapter, worst_relative};
use common::tiny_model::{write_hf_dir, TinyShape};
use common::token_level::{Cut, Sample};
use coserve::backend::cuda::decoder::from_model::from_llama;
use coserve::backend::cuda::decoder::host::HostOps;
use coserve::backend::cuda::decoder::train::{
    train_sample, TrainAdapter, TrainSample, TrainScratch,
};
use coserve::backend::cuda::decoder::DecoderOps;
use coserve::backend::cuda::twins::without_rounding;
use coserve::bench_finetune::synthetic_tokens;
use coserve::lora::optim::{clip_grad_norm, AdamW, AdamWConfig};
use coserve::lora::{LoraConfig, LoraWeights, TargetModule};
use coserve::model::llama::Llama;
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;

/// The step's arithmetic with the twins' roundings off: as exact as the CPU path's own check
/// against autograd (`training_gradients.rs`).
const EXACT_TOL: f32 = 1e-4;

struct Setup {
    shape: TinyShape,
    model: Llama,
    adapter: LoraWeights,
    tokens: Vec<u32>,
    trained: Vec<bool>,
    /// The sample's dropout seed (used when the adapter has dropout).
    seed: u64,
    _dir: tempfile::TempDir,
}

fn setup(shape: TinyShape, config: LoraConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = write_hf_dir(dir.path(), &shape);
    let model = load_model(&path, WeightsDtype::F32).unwrap().model;
    let adapter = random_adapter(&model, config.validated().unwrap(), 11);
    let n = 29;
    let tokens = synthetic_tokens(shape.vocab(), n, shape.seed);
    let trained: Vec<bool> = (0..n).map(|i| (9..26).contains(&i)).collect();
    Setup { shape, model, adapter, tokens, trained, seed: 1234, _dir: dir }
}

/// One sample's loss and gradients on the twins, its blocks scattered over the cache.
fn device_step(su: &Setup, adam: AdamWConfig) -> (HostOps, TrainAdapter<Vec<f32>>, f64, usize) {
    let block = 4;
    let h = from_llama(&su.model, block).unwrap();
    let mut ops = HostOps;
    let blocks = 12;
    let mut caches: Vec<_> =
        (0..h.shape.layers).map(|_| ops.cache(&h.shape, blocks).unwrap()).collect();
    let mut ad = TrainAdapter::new(&mut ops, &h.shape, &su.adapter, adam).unwrap();
    let mut sc = TrainScratch::new(&mut ops, &h.shape, &ad, 32).unwrap();
    let table = vec![7, 2, 11, 0, 5, 9, 1, 3];
    let sample = TrainSample::new(su.tokens.clone(), &su.trained, table).with_dropout_seed(su.seed);
    let count = su.trained.iter().skip(1).filter(|t| **t).count();
    let (s, w, f) = (&h.shape, &h.weights, &h.inv_freq);
    let stats =
        train_sample(&mut ops, s, w, f, &mut caches, &sample, &mut ad, 1.0 / count as f32, &mut sc)
            .unwrap();
    assert_eq!(stats.count, count);
    (ops, ad, stats.mean_loss(), count)
}

/// The twins without their roundings equal autograd to f32 precision; with them (as the device
/// runs), the loss stays within bf16 error of it and every gradient tensor points the same way.
fn check(shape: TinyShape, config: LoraConfig) {
    let su = setup(TinyShape { bf16_weights: true, ..shape }, config);
    let want = oracle(&su.shape, &su.adapter, &su.tokens, &su.trained, su.seed);

    let (mut ops, ad, loss, _) = without_rounding(|| device_step(&su, AdamWConfig::default()));
    let rel = ((loss - want.loss) / want.loss).abs();
    assert!(rel < EXACT_TOL as f64, "exact: loss {loss} vs {}", want.loss);
    let (err, at) = worst_relative(&ad.grads(&mut ops).unwrap(), &want.grads);
    assert!(err <= EXACT_TOL, "exact: {at}: relative error {err:e}");

    let (mut ops, ad, loss, _) = device_step(&su, AdamWConfig::default());
    let rel = ((loss - want.loss) / want.loss).abs();
    let (err, at) = worst_relative(&ad.grads(&mut ops).unwrap(), &want.grads);
    assert!(rel < 1e-2, "bf16: loss {loss} vs {}", want.loss);
    // bf16 activations of a small, sharp random model move single tensors by a few percent
    // (measured: at most 5.4%): a sanity bound on direction, not the check of the arithmetic.
    assert!(err <= 0.125, "bf16: {at}: relative error {err:e}");
}

/// The sample on the twins, cut as `cut` (`common::token_level`).
fn token_level(su: &Setup, cut: Cut) -> (f64, LoraWeights) {
    let h = from_llama(&su.model, 4).unwrap();
    let sample = Sample { tokens: &su.tokens, trained: &su.trained, seed: su.seed };
    let model = (&h.shape, &h.weights, h.inv_freq.as_slice());
    common::token_level::token_level(&mut HostOps, model, &su.adapter, &sample, cut)
}

/// Token-level: chunked forwards (alone or among served rows), a loss and a backward spread
/// over calls give the whole-sample gradients, exactly with the twins' roundings off, with and without
/// LoRA dropout (drawn for the sample's rows only, whatever rows share their forward).
#[test]
fn twin_token_level_training_matches_autograd() {
    let shape = TinyShape {
        hidden: 128,
        intermediate: 256,
        tied: false,
        bf16_weights: true,
        ..TinyShape::default()
    };
    for dropout in [0.0, 0.2] {
        let su = setup(shape, LoraConfig { r: 4, alpha: 8.0, dropout, ..LoraConfig::default() });
        let want = oracle(&su.shape, &su.adapter, &su.tokens, &su.trained, su.seed);
        let cases =
            [(1, 1, 1, false), (3, 5, 2, true), (7, usize::MAX, 1, true), (29, 4, 2, false)];
        for (chunk, rows, bwd, serving) in cases {
            let what = format!(
                "dropout {dropout}, chunks of {chunk}, loss {rows} rows and {bwd} layers per call, \
                 serving rows: {serving}"
            );
            let cut = Cut { chunk, loss: rows, bwd, serving };
            let (loss, grads) = without_rounding(|| token_level(&su, cut));
            let rel = ((loss - want.loss) / want.loss).abs();
            assert!(rel < EXACT_TOL as f64, "{what}: loss {loss} vs {}", want.loss);
            let (err, at) = worst_relative(&grads, &want.grads);
            assert!(err <= EXACT_TOL, "{what}: {at}: relative error {err:e}");
        }
    }
}

#[test]
fn twin_training_step_matches_autograd_gqa_all_projections() {
    let shape = TinyShape { hidden: 128, intermediate: 256, tied: false, ..TinyShape::default() };
    check(shape, LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() });
}

#[test]
fn twin_training_step_matches_autograd_tied_some_projections() {
    let shape = TinyShape {
        layers: 3,
        hidden: 128,
        heads: 4,
        kv_heads: 1,
        intermediate: 192,
        seed: 3,
        ..TinyShape::default()
    };
    use TargetModule::*;
    let config = LoraConfig {
        r: 8,
        alpha: 16.0,
        target_modules: vec![KProj, OProj, UpProj],
        ..LoraConfig::default()
    };
    check(shape, config);
}

/// Clipping and AdamW on the device equal the CPU optimizer on the same gradients.
#[test]
fn twin_optimizer_step_matches_the_cpu_adamw() {
    let shape = TinyShape { hidden: 128, intermediate: 256, ..TinyShape::default() };
    let su = setup(shape, LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() });
    let cfg = AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() };
    let (mut ops, mut ad, _, _) = device_step(&su, cfg);
    let mut grads = ad.grads(&mut ops).unwrap();
    let (lr, max_norm) = (1e-3, 0.05);
    let norm = ad.clip_and_step(&mut ops, lr, Some(max_norm)).unwrap();

    let want_norm = clip_grad_norm(&mut grads, max_norm);
    assert!(want_norm > max_norm as f64, "the gradients are clipped: norm {want_norm}");
    assert!(((norm - want_norm) / want_norm).abs() < 1e-6, "norm {norm} vs {want_norm}");
    let mut params = su.adapter.clone();
    let mut opt = AdamW::new(&params, cfg);
    opt.step(&mut params, &grads, lr);
    let got = ad.weights(&mut ops).unwrap();
    for (g, w) in got.tensors().zip(params.tensors()) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
    }
    assert!(ad.grads(&mut ops).unwrap().l2_norm() == 0.0, "gradients zeroed after the step");
    assert_eq!(ad.step, 1);
}

/// LoRA dropout on the device: the CPU's masks, so the step equals autograd's with them.
#[test]
fn twin_training_step_with_dropout_matches_autograd() {
    let shape = TinyShape { hidden: 128, intermediate: 256, seed: 5, ..TinyShape::default() };
    use TargetModule::*;
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec![QProj, VProj, OProj, UpProj, DownProj],
    };
    check(shape, config);
}
