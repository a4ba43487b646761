//! Llama-family forward pass over a flattened batch and the paged KV cache.
//!
//! One call runs every token of an iteration (decodes and prefill chunks of many sequences)
//! through all layers. Each token's result depends only on its own sequence: projections are
//! row-wise, attention reads only the sequence's own blocks.

use std::ops::Range;

use rayon::prelude::*;

use super::activations::{save_rows, Capture};
use super::attention_train::BatchAttention;
use super::backward::{BackwardWeights, Frozen};
use super::config::LlamaConfig;
use super::lora_apply::{group_slices, lora_expand, lora_shrink, LoraGroup, LoraSlice};
use super::weights::WeightMatrix;
use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cpu::gemm::MatRef;
use crate::backend::cpu::paged_attention::{AttnSeq, AttnShape};
use crate::kv::KvCache;
use crate::lora::TargetModule;

pub struct LlamaLayer {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: rows `[q (nh*hd), k (nkv*hd), v (nkv*hd)]`, HF rotary layout.
    pub wqkv: WeightMatrix,
    pub qkv_bias: Option<Vec<f32>>,
    pub wo: WeightMatrix,
    pub ffn_norm: Vec<f32>,
    /// gate and up projections stacked: rows `[gate (I), up (I)]`.
    pub w_gate_up: WeightMatrix,
    pub w_down: WeightMatrix,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed: WeightMatrix,
    pub layers: Vec<LlamaLayer>,
    pub norm: Vec<f32>,
    /// `None`: tied to the embedding.
    pub lm_head: Option<WeightMatrix>,
    inv_freq: Vec<f32>,
}

/// The tokens of one iteration, flattened across sequences.
pub struct ForwardBatch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [usize],
    /// Cache slot where each token's K and V are written.
    pub slot_mapping: &'a [usize],
    pub seqs: &'a [AttnSeq<'a>],
    /// Token rows whose logits are wanted, in output order.
    pub logits_rows: &'a [usize],
}

/// Rows below this are processed on the calling thread: spawning costs more than it saves.
const PAR_MIN_ROWS: usize = 8;

impl Llama {
    pub fn new(
        config: LlamaConfig,
        embed: WeightMatrix,
        layers: Vec<LlamaLayer>,
        norm: Vec<f32>,
        lm_head: Option<WeightMatrix>,
        rope_freq_factors: Option<Vec<f32>>,
    ) -> Self {
        let mut inv_freq = config.rope_inv_freq();
        if let Some(f) = rope_freq_factors {
            for (v, f) in inv_freq.iter_mut().zip(f) {
                *v /= f;
            }
        }
        Self { config, embed, layers, norm, lm_head, inv_freq }
    }

    /// RoPE inverse frequencies, one per pair of dimensions (scaling and the file's frequency
    /// factors applied).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn lm_head(&self) -> &WeightMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights read by one decode step.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.wqkv.size_bytes()
                    + l.wo.size_bytes()
                    + l.w_gate_up.size_bytes()
                    + l.w_down.size_bytes()
            })
            .sum();
        layers + self.lm_head().size_bytes()
    }

    /// Runs the batch on the base model; returns logits `[logits_rows.len(), vocab]`.
    pub fn forward(&self, batch: &ForwardBatch<'_>, kv: &mut KvCache) -> Vec<f32> {
        self.forward_with(batch, kv, &[], &mut [], None)
    }

    /// Runs the batch with `lora` rows through their adapters, saving what the backward needs
    /// for the training rows of each capture; returns logits `[logits_rows.len(), vocab]`.
    /// With `train` weights in bf16 (`--train-dtype bf16`), the captures' rows take their
    /// frozen products from them; every other row is computed as without them.
    pub fn forward_with(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache,
        lora: &[LoraSlice<'_>],
        captures: &mut [Capture<'_>],
        train: Option<&BackwardWeights>,
    ) -> Vec<f32> {
        let c = &self.config;
        let t = batch.tokens.len();
        let (hs, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let inter = c.intermediate_size;
        let eps = c.rms_norm_eps as f32;

        let mut h = vec![0f32; t * hs];
        for (row, &tok) in h.chunks_exact_mut(hs).zip(batch.tokens) {
            self.embed.row_into(tok as usize, row);
        }
        let (cos, sin) = self.rope_tables(batch.positions);
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: kv.block_size(),
            scale: 1.0 / (hd as f32).sqrt(),
        };

        let mut x = vec![0f32; t * hs];
        let mut qkv = vec![0f32; t * qkv_dim];
        let mut q = vec![0f32; t * q_dim];
        let mut k = vec![0f32; t * kv_dim];
        let mut v = vec![0f32; t * kv_dim];
        let mut attn = vec![0f32; t * q_dim];
        let mut proj = vec![0f32; t * hs];
        let mut gate_up = vec![0f32; t * 2 * inter];
        let mut act = vec![0f32; t * inter];
        let groups = group_slices(lora);
        let train = train.filter(|bw| bw.dtype() != TrainDtype::F32 && !captures.is_empty());
        let mut train_rows: Vec<Range<usize>> = match train {
            Some(_) => captures.iter().map(|c| c.rows.clone()).collect(),
            None => Vec::new(),
        };
        train_rows.sort_by_key(|r| r.start);
        // `Y = X · Wᵀ` for frozen weight `which` of layer `li`, `x` `[t, in]`, `y` `[t, out]`.
        let project = |li: usize, which: Frozen, w: &WeightMatrix, x: &[f32], y: &mut [f32]| {
            let Some(fw) = train.and_then(|bw| bw.forward_weight(li, which)) else {
                return w.forward(x, t, y);
            };
            let (k, n) = (w.cols, w.rows);
            // Rows outside the captures go through the model's kernels, which give a row
            // the same bits in any batch.
            let mut at = 0;
            for r in train_rows.iter().chain(std::iter::once(&(t..t))) {
                if r.start > at {
                    w.forward(&x[at * k..r.start * k], r.start - at, &mut y[at * n..r.start * n]);
                }
                if !r.is_empty() {
                    let xr = MatRef::new(&x[r.start * k..r.end * k], r.len(), k);
                    fw.product(xr, false, &mut y[r.start * n..r.end * n], n);
                }
                at = at.max(r.end);
            }
        };
        let attention = BatchAttention::new(batch.seqs, captures);
        let adapt = |li: usize,
                     m: TargetModule,
                     x: &[f32],
                     out: &mut [f32],
                     ld: usize,
                     col0: usize,
                     captures: &mut [Capture<'_>]| {
            if groups.is_empty() {
                return;
            }
            let in_dim = m.shape(c).1;
            let us = lora_shrink(&groups, li, m, x, in_dim);
            lora_expand(&groups, &us, li, m, out, ld, col0);
            save_lora_u(&groups, &us, li, m, captures);
        };

        for (li, layer) in self.layers.iter().enumerate() {
            for cap in captures.iter_mut() {
                save_rows(&h, hs, &cap.rows, cap.first_pos, &mut cap.acts.layers[li].h_in);
            }
            rms_norm(&h, &layer.attn_norm, eps, &mut x);
            project(li, Frozen::Qkv, &layer.wqkv, &x, &mut qkv);
            adapt(li, TargetModule::QProj, &x, &mut qkv, qkv_dim, 0, captures);
            adapt(li, TargetModule::KProj, &x, &mut qkv, qkv_dim, q_dim, captures);
            adapt(li, TargetModule::VProj, &x, &mut qkv, qkv_dim, q_dim + kv_dim, captures);
            for (i, row) in qkv.chunks_exact_mut(qkv_dim).enumerate() {
                if let Some(b) = &layer.qkv_bias {
                    row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
                }
                let (cs, sn) =
                    (&cos[i * hd / 2..(i + 1) * hd / 2], &sin[i * hd / 2..(i + 1) * hd / 2]);
                for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
                    apply_rope(head, cs, sn);
                }
                q[i * q_dim..(i + 1) * q_dim].copy_from_slice(&row[..q_dim]);
                k[i * kv_dim..(i + 1) * kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
                v[i * kv_dim..(i + 1) * kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
            }
            kv.write(li, &k, &v, batch.slot_mapping);
            attention.attend(kv.layer(li), &q, &shape, &mut attn);
            for cap in captures.iter_mut() {
                let acts = &mut cap.acts.layers[li];
                save_rows(&q, q_dim, &cap.rows, cap.first_pos, &mut acts.q);
                save_rows(&attn, q_dim, &cap.rows, cap.first_pos, &mut acts.attn);
            }
            project(li, Frozen::O, &layer.wo, &attn, &mut proj);
            adapt(li, TargetModule::OProj, &attn, &mut proj, hs, 0, captures);
            add_assign(&mut h, &proj);

            for cap in captures.iter_mut() {
                save_rows(&h, hs, &cap.rows, cap.first_pos, &mut cap.acts.layers[li].h_mid);
            }
            rms_norm(&h, &layer.ffn_norm, eps, &mut x);
            project(li, Frozen::GateUp, &layer.w_gate_up, &x, &mut gate_up);
            adapt(li, TargetModule::GateProj, &x, &mut gate_up, 2 * inter, 0, captures);
            adapt(li, TargetModule::UpProj, &x, &mut gate_up, 2 * inter, inter, captures);
            for cap in captures.iter_mut() {
                let acts = &mut cap.acts.layers[li];
                save_rows(&gate_up, 2 * inter, &cap.rows, cap.first_pos, &mut acts.gate_up);
            }
            silu_mul(&gate_up, inter, &mut act);
            project(li, Frozen::Down, &layer.w_down, &act, &mut proj);
            adapt(li, TargetModule::DownProj, &act, &mut proj, hs, 0, captures);
            add_assign(&mut h, &proj);
        }
        for cap in captures.iter_mut() {
            save_rows(&h, hs, &cap.rows, cap.first_pos, &mut cap.acts.h_final);
        }

        let n = batch.logits_rows.len();
        let mut last = vec![0f32; n * hs];
        for (dst, &r) in last.chunks_exact_mut(hs).zip(batch.logits_rows) {
            dst.copy_from_slice(&h[r * hs..(r + 1) * hs]);
        }
        let mut normed = vec![0f32; n * hs];
        rms_norm(&last, &self.norm, eps, &mut normed);
        let head = self.lm_head();
        let mut logits = vec![0f32; n * head.rows];
        head.forward(&normed, n, &mut logits);
        logits
    }

    /// cos and sin of `position * inv_freq`, `[tokens, head_dim / 2]` each.
    pub(crate) fn rope_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        rope_tables(&self.inv_freq, positions)
    }
}

/// cos and sin of `position * inv_freq`, `[positions, inv_freq.len()]` each: the one table
/// both the CPU model and the device decoder rotate with.
pub fn rope_tables(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &p in positions {
        for &f in inv_freq {
            // f64 keeps large positions accurate; the reference computes these in f32 from an
            // f32 product, so round the angle to f32 first to match it.
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Copies each capture's rows of the low-rank activations into its sample buffers.
fn save_lora_u(
    groups: &[LoraGroup<'_>],
    us: &[Vec<f32>],
    li: usize,
    m: TargetModule,
    captures: &mut [Capture<'_>],
) {
    for cap in captures.iter_mut() {
        let dst = &mut cap.acts.layers[li].lora_u[m.index()];
        if dst.is_empty() {
            continue;
        }
        let r = dst.len() / cap.acts.len.max(1);
        for (g, u) in groups.iter().zip(us) {
            if u.is_empty() {
                continue;
            }
            for (i, &row) in g.rows.iter().enumerate() {
                if cap.rows.contains(&row) {
                    let pos = cap.first_pos + row - cap.rows.start;
                    dst[pos * r..(pos + 1) * r].copy_from_slice(&u[i * r..(i + 1) * r]);
                }
            }
        }
    }
}

/// Rotates one head in the HF ("neox") layout: dimension i pairs with i + head_dim / 2.
pub(crate) fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let f = |(xi, oi): (&[f32], &mut [f32])| {
        let ss: f32 = xi.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, v), wv) in oi.iter_mut().zip(xi).zip(w) {
            *o = wv * (v * r);
        }
    };
    if x.len() / d >= PAR_MIN_ROWS {
        x.par_chunks_exact(d).zip(out.par_chunks_exact_mut(d)).for_each(f);
    } else {
        x.chunks_exact(d).zip(out.chunks_exact_mut(d)).for_each(f);
    }
}

pub(crate) fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    let f = |(gu, o): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(inter);
        crate::backend::cpu::activation::silu_mul(g, u, o);
    };
    if out.len() / inter >= PAR_MIN_ROWS {
        gate_up.par_chunks_exact(2 * inter).zip(out.par_chunks_exact_mut(inter)).for_each(f);
    } else {
        gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)).for_each(f);
    }
}

fn add_assign(h: &mut [f32], d: &[f32]) {
    h.iter_mut().zip(d).for_each(|(a, b)| *a += b);
}
