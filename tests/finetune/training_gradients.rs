//! Token-level training against candle autograd: the chunked forward (chunks of 1, 3, 7 and
//! the whole sample) followed by the layer-by-layer backward gives the same loss and LoRA
//! gradients as differentiating the whole sequence at once; the loss spread over iterations a
//! few rows at a time gives the same bits as the loss at once.

use crate::common;

use common::dense_lora::{oracle, random_adapter};
use common::tiny_model::{write_gguf, write_hf_dir, TinyShape};
use coserve::backend::cpu::frozen::TrainDtype;
use coserve::bench_finetune::synthetic_tokens as sample_tokens;
use coserve::engine::training::{forward_chunk_alone, TrainingSample};
use coserve::kv::{BlockAllocator, KvCache};
use coserve::lora::{LoraConfig, LoraWeights, TargetModule};
use coserve::model::backward::BackwardWeights;
use coserve::model::llama::Llama;
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;

const TOL: f32 = 1e-4;

struct Ours {
    loss: f64,
    grads: LoraWeights,
}

struct Case {
    tokens: Vec<u32>,
    trained: Vec<bool>,
    dropout_seed: u64,
}

fn token_level(
    model: &Llama,
    bw: &BackwardWeights,
    adapter: &LoraWeights,
    case: &Case,
    chunk: usize,
    loss_rows: Option<usize>,
    bwd_layers: usize,
) -> Ours {
    let Case { tokens, trained, dropout_seed } = case;
    let c = &model.config;
    let block_size = 4;
    let blocks = 64;
    let alloc = BlockAllocator::new(blocks, block_size);
    let mut kv = KvCache::new(c.num_layers, blocks, block_size, c.num_kv_heads, c.head_dim);
    // Occupy a block first so the sample's blocks are not simply 0, 1, 2 ...
    let mut hole = coserve::kv::BlockTable::new(alloc.clone());
    hole.reserve(1).unwrap();
    let mut sample = TrainingSample::new(
        tokens.to_vec(),
        trained.to_vec(),
        &alloc,
        model,
        adapter,
        *dropout_seed,
    )
    .unwrap();
    while sample.forward_remaining() > 0 {
        forward_chunk_alone(model, bw, &mut kv, adapter, &mut sample, chunk);
    }
    let count = trained.iter().skip(1).filter(|t| **t).count();
    let scale = 1.0 / count as f32;
    let stats = match loss_rows {
        None => sample.finish_forward(model, bw, scale),
        Some(rows) => loop {
            let before = sample.loss_remaining();
            let (ran, ended) = sample.run_loss(model, bw, scale, rows);
            assert_eq!(ran, rows.min(before));
            assert_eq!(sample.loss_remaining(), before - ran);
            if let Some(stats) = ended {
                break stats;
            }
            assert_eq!(sample.backward_remaining(), 0, "the backward waits for the loss");
        },
    };
    assert_eq!(stats.count, count);
    assert_eq!(sample.loss_remaining(), 0);
    let mut grads = adapter.clone();
    grads.fill_zero();
    while !sample.is_done() {
        let ran = sample.backward_layers(model, bw, &kv, adapter, &mut grads, bwd_layers);
        assert!(ran > 0);
    }
    Ours { loss: stats.mean_loss(), grads }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn assert_close(ours: &LoraWeights, want: &LoraWeights, what: &str) {
    assert_within(ours, want, what, TOL);
}

/// Every gradient within `tol` of the largest of its tensor in the oracle.
fn assert_within(ours: &LoraWeights, want: &LoraWeights, what: &str, tol: f32) {
    let mut checked = 0;
    for (l, (lo, lw)) in ours.layers.iter().zip(&want.layers).enumerate() {
        for m in TargetModule::ALL {
            let (Some(o), Some(w)) = (&lo[m.index()], &lw[m.index()]) else { continue };
            for (name, a, b) in [("A", &o.a, &w.a), ("B", &o.b, &w.b)] {
                let scale = max_abs(b);
                assert!(scale > 0.0, "{what}: layer {l} {} {name}: zero oracle gradient", m.name());
                let err = a.iter().zip(b.iter()).fold(0f32, |e, (x, y)| e.max((x - y).abs()));
                assert!(
                    err <= tol * scale,
                    "{what}: layer {l} {} d{name}: max error {err:e} vs max |grad| {scale:e}",
                    m.name()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
}

fn check(shape: TinyShape, gguf: bool, config: LoraConfig, dropout_seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = if gguf { write_gguf(dir.path(), &shape) } else { write_hf_dir(dir.path(), &shape) };
    let model = load_model(&path, WeightsDtype::F32).unwrap().model;
    let bw = BackwardWeights::new(&model);
    let adapter = random_adapter(&model, config.validated().unwrap(), 11);
    let n = 29;
    let tokens = sample_tokens(shape.vocab(), n, shape.seed);
    // A prompt part without loss, then trained tokens, then a few untrained again.
    let trained: Vec<bool> = (0..n).map(|i| (9..26).contains(&i)).collect();
    let want = oracle(&shape, &adapter, &tokens, &trained, dropout_seed);
    let case = Case { tokens, trained, dropout_seed };
    for chunk in [1, 3, 7, n] {
        for bwd_layers in [1, shape.layers] {
            let what = format!("{shape:?} chunk {chunk}, {bwd_layers} layers per backward step");
            let ours = token_level(&model, &bw, &adapter, &case, chunk, None, bwd_layers);
            let rel = ((ours.loss - want.loss) / want.loss).abs();
            assert!(rel < TOL as f64, "{what}: loss {} vs {}", ours.loss, want.loss);
            assert_close(&ours.grads, &want.grads, &what);
        }
    }
}

#[test]
fn tied_gqa_two_layers_all_projections() {
    check(TinyShape::default(), true, LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }, 0);
}

/// Three layers, eight query heads on two kv heads, an untied head.
fn untied_three_layers() -> TinyShape {
    TinyShape { layers: 3, heads: 8, kv_heads: 2, tied: false, seed: 3, ..TinyShape::default() }
}

#[test]
fn untied_three_layers_all_projections() {
    let shape = untied_three_layers();
    check(shape, false, LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() }, 0);
}

#[test]
fn some_projections_with_dropout() {
    let shape = TinyShape { layers: 4, tied: false, seed: 5, ..TinyShape::default() };
    let config = LoraConfig {
        r: 4,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: vec![TargetModule::VProj, TargetModule::OProj, TargetModule::DownProj],
    };
    check(shape, true, config, 1234);
}

/// Bit-for-bit: the loss run a few rows per call equals the loss run at once, loss and every
/// gradient (rows are independent, and their losses add in row order).
#[test]
fn loss_in_pieces_has_the_same_bits() {
    let shape = TinyShape { layers: 2, tied: false, seed: 7, ..TinyShape::default() };
    let dir = tempfile::tempdir().unwrap();
    let path = write_hf_dir(dir.path(), &shape);
    let model = load_model(&path, WeightsDtype::F32).unwrap().model;
    let bw = BackwardWeights::new(&model);
    let config = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..LoraConfig::default() };
    let adapter = random_adapter(&model, config.validated().unwrap(), 13);
    let n = 41;
    let tokens = sample_tokens(shape.vocab(), n, shape.seed);
    let trained: Vec<bool> = (0..n).map(|i| i >= 6 && i % 9 != 0).collect();
    let case = Case { tokens, trained, dropout_seed: 99 };
    let whole = token_level(&model, &bw, &adapter, &case, 7, None, 1);
    for rows in [1, 5, 13, 200] {
        let ours = token_level(&model, &bw, &adapter, &case, 7, Some(rows), 1);
        assert_eq!(ours.loss.to_bits(), whole.loss.to_bits(), "{rows} rows at a time");
        for (lo, lw) in ours.grads.layers.iter().zip(&whole.grads.layers) {
            for (o, w) in lo.iter().zip(lw).filter_map(|(o, w)| o.as_ref().zip(w.as_ref())) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o.a), bits(&w.a), "{rows} rows at a time: dA");
                assert_eq!(bits(&o.b), bits(&w.b), "{rows} rows at a time: dB");
            }
        }
    }
}

/// bf16 products (`--train-dtype bf16`) round every operand of a frozen product to 8
/// significant bits (relative error up to 2^-9) and keep f32 sums. Against f32 autograd the
/// loss then moves by about 1e-4 relative on these shapes, and a LoRA gradient by 0.6-3.2% of
/// its tensor's largest value (about the same in every layer, and with the head kept in f32
/// too: the rounded activations set it). A wrong product (a transposed weight, a row out of
/// place) moves them by the whole gradient.
const BF16_TOL: f32 = 5e-2;

#[test]
fn bf16_products_stay_within_rounding_of_autograd() {
    for (shape, gguf) in [(TinyShape::default(), true), (untied_three_layers(), false)] {
        let dir = tempfile::tempdir().unwrap();
        let path =
            if gguf { write_gguf(dir.path(), &shape) } else { write_hf_dir(dir.path(), &shape) };
        let model = load_model(&path, WeightsDtype::F32).unwrap().model;
        let bf16 = BackwardWeights::with_dtype(&model, TrainDtype::Bf16);
        let exact = BackwardWeights::new(&model);
        let config = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
        let adapter = random_adapter(&model, config.validated().unwrap(), 11);
        let n = 29;
        let tokens = sample_tokens(shape.vocab(), n, shape.seed);
        let trained: Vec<bool> = (0..n).map(|i| (9..26).contains(&i)).collect();
        let want = oracle(&shape, &adapter, &tokens, &trained, 0);
        let case = Case { tokens, trained, dropout_seed: 0 };
        let whole = token_level(&model, &bf16, &adapter, &case, n, None, shape.layers);
        let f32_loss = token_level(&model, &exact, &adapter, &case, n, None, shape.layers).loss;
        assert_ne!(whole.loss, f32_loss, "{shape:?}: the bf16 products were not used");
        for chunk in [1, 7] {
            let what = format!("{shape:?} bf16, chunk {chunk}");
            let ours = token_level(&model, &bf16, &adapter, &case, chunk, Some(5), 1);
            // A row's products do not depend on the rows beside it.
            assert_eq!(ours.loss.to_bits(), whole.loss.to_bits(), "{what}");
            assert_eq!(ours.grads, whole.grads, "{what}");
            let rel = ((ours.loss - want.loss) / want.loss).abs();
            assert!(rel < 1e-3, "{what}: loss {} vs {}", ours.loss, want.loss);
            assert_within(&ours.grads, &want.grads, &what, BF16_TOL);
        }
    }
}
