//! `--dummy-weights`: a model of a real model's shape filled with random weights, for
//! benchmarks at real sizes without downloading the real weights.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::model::config::LlamaConfig;
use crate::model::llama::{Llama, LlamaLayer};
use crate::model::weights::{WeightMatrix, WeightsDtype};

/// The shapes on offer, each as its config.json on the Hugging Face hub gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DummyModel {
    #[value(name = "llama-3-8b")]
    Llama3_8b,
    #[value(name = "llama-2-7b")]
    Llama2_7b,
    #[value(name = "qwen2.5-14b")]
    Qwen2_5_14b,
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

impl std::fmt::Display for DummyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Llama3_8b => "llama-3-8b",
            Self::Llama2_7b => "llama-2-7b",
            Self::Qwen2_5_14b => "qwen2.5-14b",
            Self::Smollm2_135m => "smollm2-135m",
        })
    }
}

impl DummyModel {
    pub fn config(self) -> LlamaConfig {
        let base = LlamaConfig {
            architecture: "llama".into(),
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            attention_bias: false,
        };
        match self {
            Self::Llama3_8b => LlamaConfig {
                vocab_size: 128_256,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                rope_theta: 500_000.0,
                max_position_embeddings: 8192,
                ..base
            },
            Self::Llama2_7b => LlamaConfig {
                vocab_size: 32_000,
                hidden_size: 4096,
                intermediate_size: 11_008,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 32,
                ..base
            },
            Self::Qwen2_5_14b => LlamaConfig {
                architecture: "qwen2".into(),
                vocab_size: 152_064,
                hidden_size: 5120,
                intermediate_size: 13_824,
                num_layers: 48,
                num_heads: 40,
                num_kv_heads: 8,
                rms_norm_eps: 1e-5,
                rope_theta: 1_000_000.0,
                max_position_embeddings: 32_768,
                attention_bias: true,
                ..base
            },
            Self::Smollm2_135m => LlamaConfig {
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                ..base
            },
        }
    }

    /// Parameters of the real model (embeddings counted once when tied).
    pub fn num_params(self) -> usize {
        let c = self.config();
        let (hs, hd) = (c.hidden_size, c.head_dim);
        let attn = hs * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * hs;
        let bias = if c.attention_bias { (c.num_heads + 2 * c.num_kv_heads) * hd } else { 0 };
        let layer = attn + bias + 3 * hs * c.intermediate_size + 2 * hs;
        let embed = c.vocab_size * hs * if c.tie_word_embeddings { 1 } else { 2 };
        c.num_layers * layer + embed + hs
    }

    /// The model with weights drawn from N(0, 0.02²)-like uniform noise (std 0.02, as HF's
    /// initializer) and norm weights of 1, stored as `dtype`. Reproducible from `seed`.
    pub fn build(self, dtype: WeightsDtype, seed: u64) -> Llama {
        let c = self.config();
        let (hs, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let mut stream = 0u64;
        let mut matrix = |rows: usize, cols: usize| {
            stream += 1;
            let data = random_values(rows * cols, seed, stream);
            // ok: the data has rows * cols values by construction.
            WeightMatrix::from_f32_as(data, rows, cols, dtype).expect("sized by construction")
        };
        let embed = matrix(c.vocab_size, hs);
        let layers = (0..c.num_layers)
            .map(|_| LlamaLayer {
                attn_norm: vec![1.0; hs],
                wqkv: matrix(qkv_rows, hs),
                qkv_bias: c.attention_bias.then(|| vec![0.0; qkv_rows]),
                wo: matrix(hs, c.num_heads * hd),
                ffn_norm: vec![1.0; hs],
                w_gate_up: matrix(2 * inter, hs),
                w_down: matrix(hs, inter),
            })
            .collect();
        let lm_head = (!c.tie_word_embeddings).then(|| matrix(c.vocab_size, hs));
        Llama::new(c, embed, layers, vec![1.0; hs], lm_head, None)
    }
}

/// `n` values uniform in ±0.02·√3 (standard deviation 0.02), generated in parallel chunks,
/// each from its own seeded stream so the result does not depend on the thread count.
fn random_values(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let bound = 0.02 * 3f32.sqrt();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        rng.set_word_pos((i * CHUNK) as u128);
        chunk.iter_mut().for_each(|v| *v = rng.random_range(-bound..bound));
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_real_parameter_counts() {
        // Published sizes: 8.03B, 6.74B, 14.77B, 134.5M.
        let billions = |m: DummyModel| m.num_params() as f64 / 1e9;
        assert!((billions(DummyModel::Llama3_8b) - 8.03).abs() < 0.01);
        assert!((billions(DummyModel::Llama2_7b) - 6.74).abs() < 0.01);
        assert!((billions(DummyModel::Qwen2_5_14b) - 14.77).abs() < 0.01);
        assert!((billions(DummyModel::Smollm2_135m) - 0.1345).abs() < 0.001);
    }

    #[test]
    fn random_values_are_reproducible_and_spread() {
        let a = random_values(200_000, 7, 3);
        assert_eq!(a, random_values(200_000, 7, 3));
        assert_ne!(a, random_values(200_000, 7, 4));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 1e-3, "{mean} {var}");
    }
}
