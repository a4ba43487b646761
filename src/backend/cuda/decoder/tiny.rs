//! A tiny random model for the decoder's unit tests.

use super::{fill_uniform_host, DecoderShape, DecoderWeights};
use crate::model::config::LlamaConfig;

/// A tiny random Llama on the twins: vocabulary 200, hidden 64, 3 layers, heads 2/1 of 32,
/// blocks of 16.
pub(crate) fn tiny_decoder() -> (LlamaConfig, DecoderShape, DecoderWeights<Vec<f32>>) {
    let c = LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 200,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: false,
    };
    let s = DecoderShape::new(&c, 16).expect("a valid shape");
    let tensors = DecoderWeights::<()>::layout(&s)
        .into_iter()
        .enumerate()
        .map(|(i, (n, sc, off))| fill_uniform_host(n, i as u64, sc, off))
        .collect();
    let w = DecoderWeights::from_tensors(&s, tensors).expect("the layout's tensors");
    (c, s, w)
}
