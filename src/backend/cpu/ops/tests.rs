//! The forward written once over the seam, run on [`CpuOps`], gives the CPU model's
//! `Llama::forward_with` bit for bit: every weight format, both cache types, biases, tied
//! heads, adapters on scattered rows, prefill chunks with decodes over a filled cache.

use super::*;
use crate::backend::cuda::decoder::lora::LoraSet;
use crate::backend::cuda::decoder::{
    fill_uniform_host, forward_rows, DecoderWeights, RowsOut, Scratch, SeqRows, Want,
};
use crate::lora::{LoraConfig, LoraWeights, TargetModule};
use crate::model::config::LlamaConfig;
use crate::model::llama::{ForwardBatch, Llama, LlamaLayer};
use crate::model::lora_apply::LoraSlice;
use crate::model::weights::{WeightMatrix, WeightsDtype};

const BLOCK: usize = 16;
const BLOCKS: usize = 8;

fn config(attention_bias: bool, tied: bool) -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        // Below the CUDA kernels' 32: the CPU takes any even head size.
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        attention_bias,
    }
}

/// A random model of `config` with its matrices stored as `dtype`.
fn llama(config: &LlamaConfig, dtype: WeightsDtype) -> Llama {
    let s = DecoderShape::new(config, BLOCK).unwrap();
    let tensors: Vec<Vec<f32>> = DecoderWeights::<()>::layout(&s)
        .into_iter()
        .enumerate()
        .map(|(i, (n, scale, offset))| fill_uniform_host(n, i as u64, scale, offset))
        .collect();
    let w = DecoderWeights::from_tensors(&s, tensors).unwrap();
    let m = |t: &Vec<f32>, rows: usize| {
        WeightMatrix::from_f32_as(t.clone(), rows, t.len() / rows, dtype).unwrap()
    };
    let layers = w
        .layers
        .iter()
        .map(|l| LlamaLayer {
            attn_norm: l.attn_norm.clone(),
            wqkv: m(&l.qkv, s.qkv_rows()),
            qkv_bias: l.qkv_bias.clone(),
            wo: m(&l.o, s.hidden),
            ffn_norm: l.mlp_norm.clone(),
            w_gate_up: m(&l.gate_up, 2 * s.inter),
            w_down: m(&l.down, s.hidden),
        })
        .collect();
    let head = (!config.tie_word_embeddings).then(|| m(&w.lm_head, s.vocab));
    Llama::new(config.clone(), m(&w.embed, s.vocab), layers, w.norm.clone(), head, None)
}

fn adapter(config: &LlamaConfig, r: usize, targets: &[TargetModule], seed: u64) -> LoraWeights {
    let lc =
        LoraConfig { r, alpha: 2.0 * r as f32, dropout: 0.0, target_modules: targets.to_vec() };
    let mut w = LoraWeights::zeros(&lc, config);
    for (i, p) in w.pairs_mut().enumerate() {
        let sa = 1.0 / (p.in_dim as f32).sqrt();
        p.a = fill_uniform_host(p.a.len(), seed + 2 * i as u64, sa, 0.0);
        p.b = fill_uniform_host(p.b.len(), seed + 2 * i as u64 + 1, 0.05, 0.0);
    }
    w
}

fn seq(tokens: usize, start: usize, first: u32, blocks: &[u32], adapter: Option<u32>) -> SeqRows {
    SeqRows {
        tokens: (0..tokens as u32).map(|i| (first + 7 * i) % 300).collect(),
        start,
        block_table: blocks.to_vec(),
        adapter,
    }
}

/// Runs both forwards over the same steps and compares every row's logits bit for bit.
fn seam_matches_the_cpu_model(config: &LlamaConfig, dtype: WeightsDtype, kv: KvDtype, lora: bool) {
    let reference = llama(config, dtype);
    let model = from_llama(llama(config, dtype), BLOCK).unwrap();
    let s = &model.shape;
    let ads = lora.then(|| {
        use TargetModule::*;
        [
            adapter(config, 4, &TargetModule::ALL, 100),
            adapter(config, 8, &[QProj, VProj, DownProj], 200),
        ]
    });
    let slot = |i: u32| ads.as_ref().map(|_| i);
    // A 37-token prompt and a 5-token one; then a decode of the first, 3 more tokens of the
    // second and a new 20-token prompt, which shares the first's adapter (its rows are not
    // one run).
    let steps = [
        vec![seq(37, 0, 1, &[3, 0, 5], slot(1)), seq(5, 0, 2, &[1], slot(0))],
        vec![
            seq(1, 37, 3, &[3, 0, 5], slot(1)),
            seq(3, 5, 4, &[1], slot(0)),
            seq(20, 0, 5, &[2, 7], slot(1)),
        ],
    ];
    let mut ops = CpuOps::new(kv, TrainDtype::F32);
    let mut caches: Vec<KvCache> = (0..s.layers).map(|_| ops.cache(s, BLOCKS).unwrap()).collect();
    let mut sc = Scratch::new(&mut ops, s, 64).unwrap();
    let set = ads.as_ref().map(|a| LoraSet::new(&mut ops, s, &[&a[0], &a[1]]).unwrap());
    let mut kv_cache = KvCache::with_dtype(s.layers, BLOCKS, BLOCK, s.kv_heads, s.head_dim, kv);
    for (i, seqs) in steps.into_iter().enumerate() {
        let batch = StepBatch::new(seqs, BLOCK).unwrap();
        let rows: Vec<u32> = (0..batch.rows() as u32).collect();
        let out = forward_rows(
            &mut ops,
            s,
            &model.weights,
            &model.inv_freq,
            &mut caches,
            &batch,
            &mut sc,
            &rows,
            Want::Logits,
            set.as_ref(),
        );
        let Ok(RowsOut::Logits(got)) = out else { panic!("logits, got {out:?}") };

        let tables: Vec<&[u32]> = batch.seqs.iter().map(|q| q.block_table.as_slice()).collect();
        let (mut attn, mut slices, mut q0) = (Vec::new(), Vec::new(), 0);
        for (q, table) in batch.seqs.iter().zip(&tables) {
            let n = q.tokens.len();
            attn.push(AttnSeq {
                q_start: q0,
                q_len: n,
                context_len: q.start + n,
                block_table: table,
            });
            if let (Some(a), Some(slot)) = (&ads, q.adapter) {
                slices.push(LoraSlice {
                    rows: q0..q0 + n,
                    adapter: &a[slot as usize],
                    train: None,
                });
            }
            q0 += n;
        }
        let slot_mapping: Vec<usize> = batch.slots.iter().map(|&v| v as usize).collect();
        let all: Vec<usize> = (0..batch.rows()).collect();
        let fb = ForwardBatch {
            tokens: &batch.tokens,
            positions: &batch.positions,
            slot_mapping: &slot_mapping,
            seqs: &attn,
            logits_rows: &all,
        };
        let want = reference.forward_with(&fb, &mut kv_cache, &slices, &mut [], None);
        assert_eq!(got.len(), want.len());
        let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(
            differ,
            0,
            "step {i}: {differ} of {} logits differ ({dtype:?}, {kv})",
            want.len()
        );
        assert!(want.iter().any(|v| v.abs() > 0.5), "degenerate logits");
    }
}

#[test]
fn seam_on_the_cpu_gives_the_cpu_models_bits_in_every_weight_format() {
    for dtype in [WeightsDtype::F32, WeightsDtype::Bf16, WeightsDtype::Q8_0] {
        seam_matches_the_cpu_model(&config(false, false), dtype, KvDtype::F32, false);
    }
}

#[test]
fn seam_on_the_cpu_gives_the_cpu_models_bits_with_f16_cache_biases_and_tied_head() {
    seam_matches_the_cpu_model(&config(true, true), WeightsDtype::F32, KvDtype::F16, false);
    seam_matches_the_cpu_model(&config(true, false), WeightsDtype::Q8_0, KvDtype::F16, false);
}

#[test]
fn seam_on_the_cpu_gives_the_cpu_models_bits_with_adapters() {
    seam_matches_the_cpu_model(&config(false, false), WeightsDtype::F32, KvDtype::F32, true);
    seam_matches_the_cpu_model(&config(true, true), WeightsDtype::Bf16, KvDtype::F16, true);
}

/// What a CUDA kernel refuses, the CPU runs; what no forward can run, it refuses.
#[test]
fn shapes_the_cpu_takes_and_refuses() {
    let c = config(false, false);
    let s = DecoderShape::new(&c, BLOCK).unwrap();
    let ops = CpuOps::new(KvDtype::F32, TrainDtype::F32);
    assert!(ops.check_shape(&s).is_ok());
    assert!(s.check_kernels().is_err(), "head_dim 16 is below the CUDA kernels' limit");
    let odd = DecoderShape { head_dim: 15, ..s.clone() };
    assert!(ops.check_shape(&odd).is_err());
    let uneven = DecoderShape { kv_heads: 3, ..s.clone() };
    assert!(ops.check_shape(&uneven).is_err());
}

/// Bad input through the seam is an error, not a panic: a token past the vocabulary, a
/// sequence past the cache.
#[test]
fn out_of_range_tokens_and_blocks_are_errors() {
    let c = config(false, false);
    let model = from_llama(llama(&c, WeightsDtype::F32), BLOCK).unwrap();
    let s = &model.shape;
    let mut ops = CpuOps::new(KvDtype::F32, TrainDtype::F32);
    let mut caches: Vec<KvCache> = (0..s.layers).map(|_| ops.cache(s, 2).unwrap()).collect();
    let mut sc = Scratch::new(&mut ops, s, 8).unwrap();
    let mut run = |seqs: Vec<SeqRows>| {
        let batch = StepBatch::new(seqs, BLOCK).unwrap();
        let (w, f) = (&model.weights, &model.inv_freq);
        forward_rows(&mut ops, s, w, f, &mut caches, &batch, &mut sc, &[0], Want::Logits, None)
    };
    let mut token = seq(1, 0, 0, &[0], None);
    token.tokens[0] = 300;
    assert!(run(vec![token]).is_err());
    assert!(run(vec![seq(1, 0, 0, &[5], None)]).is_err());
    assert!(
        matches!(run(vec![seq(2, 0, 0, &[1], None)]), Ok(RowsOut::Logits(l)) if l.len() == 300)
    );
}
