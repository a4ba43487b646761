//! The training step written once over the backend seam (`decoder::train`), run on the CPU's
//! own kernels (`CpuOps`): the loss and LoRA gradients of candle's autograd to f32 precision,
//! and token-level (chunked forwards riding with served rows, the loss and the backward spread
//! over calls) the whole sample's bits.

use crate::common;

use common::dense_lora::{oracle, random_adapter, worst_relative};
use common::tiny_model::{write_hf_dir, TinyShape};
use common::token_level::{Cut, Sample};
use coserve::backend::cpu::frozen::TrainDtype;
use coserve::backend::cpu::ops::{from_llama, CpuModel, CpuOps};
use coserve::bench_finetune::synthetic_tokens;
use coserve::kv::KvDtype;
use coserve::lora::{LoraConfig, LoraWeights, TargetModule};
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;

/// As the CPU path's own check against autograd (`training_gradients.rs`).
const TOL: f32 = 1e-4;

struct Setup {
    shape: TinyShape,
    model: CpuModel,
    adapter: LoraWeights,
    tokens: Vec<u32>,
    trained: Vec<bool>,
    seed: u64,
}

const BLOCK: usize = 4;

fn setup(shape: TinyShape, config: LoraConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = write_hf_dir(dir.path(), &shape);
    let llama = load_model(&path, WeightsDtype::F32).unwrap().model;
    let adapter = random_adapter(&llama, config.validated().unwrap(), 11);
    let model = from_llama(llama, BLOCK).unwrap();
    let n = 29;
    let tokens = synthetic_tokens(shape.vocab(), n, shape.seed);
    let trained: Vec<bool> = (0..n).map(|i| (9..26).contains(&i)).collect();
    Setup { shape, model, adapter, tokens, trained, seed: 1234 }
}

/// The sample on `CpuOps`, cut as `cut`.
fn token_level(su: &Setup, cut: Cut) -> (f64, LoraWeights) {
    let mut ops = CpuOps::new(KvDtype::F32, TrainDtype::F32);
    let m = &su.model;
    let sample = Sample { tokens: &su.tokens, trained: &su.trained, seed: su.seed };
    common::token_level::token_level(
        &mut ops,
        (&m.shape, &m.weights, &m.inv_freq),
        &su.adapter,
        &sample,
        cut,
    )
}

fn check(shape: TinyShape, config: LoraConfig) {
    let su = setup(shape, config);
    let want = oracle(&su.shape, &su.adapter, &su.tokens, &su.trained, su.seed);
    let (loss, grads) = token_level(&su, Cut::WHOLE);
    let rel = ((loss - want.loss) / want.loss).abs();
    assert!(rel < f64::from(TOL), "loss {loss} vs autograd's {}", want.loss);
    let (err, at) = worst_relative(&grads, &want.grads);
    assert!(err <= TOL, "{at}: relative error {err:e}");
}

#[test]
fn seam_training_on_the_cpu_matches_autograd_gqa_all_projections() {
    let shape = TinyShape { hidden: 128, intermediate: 256, tied: false, ..TinyShape::default() };
    check(shape, LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() });
}

#[test]
fn seam_training_on_the_cpu_matches_autograd_tied_some_projections() {
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
    let targets = vec![KProj, OProj, UpProj];
    check(
        shape,
        LoraConfig { r: 8, alpha: 16.0, target_modules: targets, ..LoraConfig::default() },
    );
}

#[test]
fn seam_training_on_the_cpu_with_dropout_matches_autograd() {
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

/// However the sample's work is cut and whatever rows share its forwards, every row runs the
/// same arithmetic: the gradients are the whole sample's, bit for bit.
#[test]
fn seam_training_on_the_cpu_token_level_gives_the_whole_samples_bits() {
    let shape = TinyShape { hidden: 128, intermediate: 256, tied: false, ..TinyShape::default() };
    for dropout in [0.0, 0.2] {
        let su = setup(shape, LoraConfig { r: 4, alpha: 8.0, dropout, ..LoraConfig::default() });
        let (loss, whole) = token_level(&su, Cut::WHOLE);
        for (chunk, rows, bwd, serving) in [(1, 1, 1, false), (3, 5, 2, true), (7, 100, 1, true)] {
            let what = format!(
                "dropout {dropout}, chunks {chunk}, loss {rows}, bwd {bwd}, serving {serving}"
            );
            let (l, g) = token_level(&su, Cut { chunk, loss: rows, bwd, serving });
            assert_eq!(l.to_bits(), loss.to_bits(), "{what}: loss {l} vs {loss}");
            let same = g
                .tensors()
                .zip(whole.tensors())
                .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(same, "{what}: gradients differ from the whole sample's");
        }
    }
}

/// A fine-tuning job in the engine on the seam trains as on the CPU model: the same steps,
/// each step's loss within f32 noise of the CPU model engine's (the two sum the same products
/// in different orders), and the loss falls.
#[test]
fn a_job_on_the_seam_engine_trains_as_on_the_cpu_model_engine() {
    job_on_both_engines(TrainDtype::F32);
}

/// With `--train-dtype bf16` the training rows' frozen products run in bf16 on both paths.
#[test]
fn a_bf16_job_on_the_seam_engine_trains_as_on_the_cpu_model_engine() {
    job_on_both_engines(TrainDtype::Bf16);
}

fn job_on_both_engines(train_dtype: TrainDtype) {
    use coserve::engine::hybrid::{FinetuneMode, TrainingConfig};
    use coserve::engine::job::{TrainHyper, TrainJobSpec};
    use coserve::engine::{CpuForward, EngineConfig};

    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model::write_gguf(dir.path(), &TinyShape::default());
    let run = |forward: CpuForward| {
        let cfg = EngineConfig {
            max_num_batched_tokens: 64,
            kv_cache_bytes: 8 << 20,
            threads: 2,
            cpu_forward: forward,
            training: TrainingConfig {
                mode: FinetuneMode::Coserve,
                max_train_tokens_per_iter: 7,
                max_bwd_layers_per_iter: 1,
                train_dtype,
                ..TrainingConfig::default()
            },
            ..EngineConfig::default()
        };
        let e = common::engine::TestEngine::start(&path, cfg);
        let (tx, rx) = flume::unbounded();
        let spec = TrainJobSpec {
            id: "ftjob-seam".into(),
            train: std::sync::Arc::new(common::finetune::examples(6, 24)),
            validation: std::sync::Arc::new(common::finetune::examples(2, 16)),
            lora: LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..LoraConfig::default() },
            hyper: TrainHyper {
                n_epochs: 4,
                batch_size: 4,
                learning_rate: 1e-2,
                seed: 42,
                checkpoint_every: 0,
            },
            resume: None,
            events: tx,
        };
        e.handle.start_job(spec).unwrap();
        common::finetune::drain(&rx, None)
    };
    let (model, seam) = (run(CpuForward::Model), run(CpuForward::Seam));
    assert_eq!(seam.steps.len(), 8);
    assert_eq!(model.steps.len(), seam.steps.len());
    for (m, s) in model.steps.iter().zip(&seam.steps) {
        let rel = ((m.train_loss - s.train_loss) / m.train_loss).abs();
        assert!(
            rel < 1e-4,
            "{train_dtype} step {}: loss {} on the seam, {} on the model",
            s.step,
            s.train_loss,
            m.train_loss
        );
        assert_eq!((m.tokens, m.trained_tokens), (s.tokens, s.trained_tokens));
    }
    let worst = model
        .steps
        .iter()
        .zip(&seam.steps)
        .map(|(m, s)| ((m.train_loss - s.train_loss) / m.train_loss).abs())
        .fold(0f64, f64::max);
    eprintln!("{train_dtype}: worst relative step loss difference {worst:e}");
    let (first, last) = (seam.steps[0].train_loss, seam.steps[7].train_loss);
    assert!(last < 0.7 * first, "loss {first} -> {last}");
}
