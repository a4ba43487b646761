//! What the training forward keeps for the backward, indexed by token depth in the sample.
//!
//! Graph pruning: base weights are frozen, so no input of a frozen projection is kept for a
//! weight gradient. Kept per layer: the two RMSNorm inputs (the normalised values are
//! recomputed), rotated queries (keys and values stay in the sample's paged KV blocks and
//! softmax is recomputed), the attention output (o_proj's input and the softmax-backward row
//! term), the gate/up pre-activations (SiLU backward and down_proj's input are recomputed from
//! them), and each adapted projection's low-rank activation. Nothing of size `tokens²`.

use crate::lora::{LoraWeights, TargetModule};
use crate::model::config::LlamaConfig;

#[derive(Debug, Clone, Default)]
pub struct LayerActivations {
    /// `[T, hidden]` input of the attention RMSNorm (the residual stream).
    pub h_in: Vec<f32>,
    /// `[T, hidden]` input of the MLP RMSNorm.
    pub h_mid: Vec<f32>,
    /// `[T, heads * head_dim]` queries after RoPE.
    pub q: Vec<f32>,
    /// `[T, heads * head_dim]` attention output.
    pub attn: Vec<f32>,
    /// `[T, 2 * intermediate]` gate then up projections.
    pub gate_up: Vec<f32>,
    /// `[T, r]` per adapted projection (`TargetModule::index`); empty where not adapted.
    pub lora_u: [Vec<f32>; 7],
}

/// Activations of one training sample of `len` tokens.
#[derive(Debug, Clone)]
pub struct SavedActivations {
    pub len: usize,
    pub layers: Vec<LayerActivations>,
    /// `[T, hidden]` input of the final RMSNorm.
    pub h_final: Vec<f32>,
}

impl SavedActivations {
    pub fn new(c: &LlamaConfig, adapter: &LoraWeights, len: usize) -> Self {
        let (hs, q, i) = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size);
        let r = adapter.config.r;
        let layers = (0..c.num_layers)
            .map(|_| LayerActivations {
                h_in: vec![0.0; len * hs],
                h_mid: vec![0.0; len * hs],
                q: vec![0.0; len * q],
                attn: vec![0.0; len * q],
                gate_up: vec![0.0; len * 2 * i],
                lora_u: TargetModule::ALL.map(|m| {
                    if adapter.config.targets(m) {
                        vec![0.0; len * r]
                    } else {
                        vec![]
                    }
                }),
            })
            .collect();
        Self { len, layers, h_final: vec![0.0; len * hs] }
    }

    /// As [`SavedActivations::new`], in `spare`'s buffers when given (a finished sample's):
    /// values are left as they were, since the forward writes every saved value before the
    /// backward reads it, and reuse spares the page faults and zeroing of fresh buffers.
    pub fn reuse(spare: Option<Self>, c: &LlamaConfig, adapter: &LoraWeights, len: usize) -> Self {
        let Some(mut a) = spare.filter(|a| a.layers.len() == c.num_layers) else {
            return Self::new(c, adapter, len);
        };
        let (hs, q, i) = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size);
        let r = adapter.config.r;
        for l in &mut a.layers {
            l.h_in.resize(len * hs, 0.0);
            l.h_mid.resize(len * hs, 0.0);
            l.q.resize(len * q, 0.0);
            l.attn.resize(len * q, 0.0);
            l.gate_up.resize(len * 2 * i, 0.0);
            for (u, m) in l.lora_u.iter_mut().zip(TargetModule::ALL) {
                u.resize(if adapter.config.targets(m) { len * r } else { 0 }, 0.0);
            }
        }
        a.h_final.resize(len * hs, 0.0);
        a.len = len;
        a
    }

    /// Bytes held, for the activation-memory benchmark and accounting.
    pub fn bytes(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                l.h_in.len()
                    + l.h_mid.len()
                    + l.q.len()
                    + l.attn.len()
                    + l.gate_up.len()
                    + l.lora_u.iter().map(Vec::len).sum::<usize>()
            })
            .sum();
        (per_layer + self.h_final.len()) * std::mem::size_of::<f32>()
    }
}

/// Rows `rows` of a batch are tokens `first_pos..` of the sample whose activations are `acts`.
pub struct Capture<'a> {
    pub rows: std::ops::Range<usize>,
    pub first_pos: usize,
    pub acts: &'a mut SavedActivations,
    /// The sample's KV-cache slot of each position (its attention reads its keys there).
    pub slots: &'a [usize],
}

/// Copies batch rows `rows` of a `[batch, dim]` buffer to sample rows `first_pos..` of a
/// `[T, dim]` buffer.
pub fn save_rows(
    src: &[f32],
    dim: usize,
    rows: &std::ops::Range<usize>,
    first_pos: usize,
    dst: &mut [f32],
) {
    let d0 = first_pos * dim;
    dst[d0..d0 + rows.len() * dim].copy_from_slice(&src[rows.start * dim..rows.end * dim]);
}
