//! Loading: GGUF and HF directories give the same model; the forward pass equals an
//! independent dense implementation; malformed files give errors naming file and problem.

use crate::common;

use std::path::Path;

use coserve::backend::cpu::paged_attention::AttnSeq;
use coserve::kv::KvCache;
use coserve::model::llama::{ForwardBatch, Llama};
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;

use common::dense_llama::dense_logits;
use common::tiny_model::{write_gguf, write_hf_dir, TinyShape};

/// All-position logits of one sequence, fed in chunks of `chunk` tokens through the cache.
fn paged_logits(model: &Llama, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let c = &model.config;
    let block_size = 4;
    let blocks = tokens.len().div_ceil(block_size);
    let mut kv = KvCache::new(c.num_layers, blocks + 3, block_size, c.num_kv_heads, c.head_dim);
    // A scrambled block table, so reads really go through it.
    let table: Vec<u32> = (0..blocks as u32).map(|b| (b * 7 + 3) % (blocks as u32 + 3)).collect();
    let mut uniq = table.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), table.len(), "block table must not repeat blocks");
    let mut out = Vec::new();
    let mut start = 0;
    while start < tokens.len() {
        let len = chunk.min(tokens.len() - start);
        let positions: Vec<usize> = (start..start + len).collect();
        let slots: Vec<usize> = positions
            .iter()
            .map(|&p| table[p / block_size] as usize * block_size + p % block_size)
            .collect();
        let seqs =
            [AttnSeq { q_start: 0, q_len: len, context_len: start + len, block_table: &table }];
        let rows: Vec<usize> = (0..len).collect();
        let batch = ForwardBatch {
            tokens: &tokens[start..start + len],
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_rows: &rows,
        };
        out.extend(model.forward(&batch, &mut kv));
        start += len;
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn gguf_and_hf_load_the_same_model_and_match_dense_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shape in [
        TinyShape::default(),
        TinyShape { tied: false, heads: 4, kv_heads: 4, seed: 11, ..TinyShape::default() },
    ] {
        let sub = dir.path().join(format!("m{}", shape.seed));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let gguf = load_model(&write_gguf(&sub, &shape), WeightsDtype::F32).expect("gguf loads");
        let hf = load_model(&write_hf_dir(&sub, &shape), WeightsDtype::F32).expect("hf loads");
        assert_eq!(gguf.model.config.tie_word_embeddings, shape.tied);
        let tokens: Vec<u32> = (0..23).map(|i| (i * 37 % 256) as u32).collect();
        let reference = dense_logits(&shape, &tokens);
        let whole = paged_logits(&gguf.model, &tokens, tokens.len());
        assert!(
            max_diff(&whole, &reference) < 1e-4,
            "paged vs dense: {}",
            max_diff(&whole, &reference)
        );
        for chunk in [1, 3, 7] {
            let chunked = paged_logits(&hf.model, &tokens, chunk);
            assert_eq!(chunked, whole, "chunks of {chunk} must give bit-identical logits");
        }
        assert_eq!(gguf.eos_token_ids, vec![258]);
        assert_eq!(hf.eos_token_ids, vec![258]);
    }
}

fn err_of(path: &Path) -> String {
    match load_model(path, WeightsDtype::F32) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_models_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = TinyShape::default();
    let gguf = write_gguf(dir.path(), &shape);
    let bytes = std::fs::read(&gguf).expect("read");

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let e = err_of(&truncated);
    assert!(e.contains("truncated.gguf"), "{e}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").expect("write");
    let e = err_of(&garbage);
    assert!(e.contains("garbage.gguf") && e.contains("GGUF"), "{e}");

    let missing = dir.path().join("nope.gguf");
    assert!(err_of(&missing).contains("nope.gguf"));

    let hf = write_hf_dir(dir.path(), &shape);
    std::fs::write(hf.join("config.json"), "{ not json").expect("write");
    let e = err_of(&hf);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    let cfg = serde_json::json!({"model_type": "gpt_neox", "hidden_size": 64});
    std::fs::write(hf.join("config.json"), cfg.to_string()).expect("write");
    let e = err_of(&hf);
    assert!(e.contains("unsupported") && e.contains("gpt_neox"), "{e}");

    let hf2 = write_hf_dir(&dir.path().join("second"), &shape);
    let st = hf2.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).expect("load");
    let kept: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().filter(|(k, _)| k != "model.layers.1.mlp.up_proj.weight").collect();
    candle_core::safetensors::save(&kept, &st).expect("save");
    let e = err_of(&hf2);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}
