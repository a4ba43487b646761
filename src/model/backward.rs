//! The token-level backward: one decoder layer at a time over a whole training sample, from
//! the activations its chunked forward saved, accumulating LoRA gradients and carrying the
//! gradient w.r.t. the layer input to the next (lower) layer.
//!
//! Base weights are frozen, so a frozen projection only propagates `dX = dY · W`; adapted ones
//! also produce `dA`, `dB`. The forward is `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`.

use rayon::prelude::*;

use super::activations::SavedActivations;
use super::attention_backward::{attention_backward_into, AttnBackwardInput};
use super::llama::{apply_rope, rms_norm, silu_mul, Llama};
use super::lora_backward::{lora_backward, Adapted};
use super::weights::WeightMatrix;
use crate::backend::cpu::activation::silu_mul_grad;
use crate::backend::cpu::frozen::{FrozenWeight, TrainDtype};
use crate::backend::cpu::gemm::MatRef;
use crate::kv::KvCache;
use crate::lora::{LoraPair, LoraWeights, TargetModule};

/// The frozen weights as training's products read them, packed once (whatever format the
/// forward reads) when training first needs them: in their Linear layout `[out, in]` for the
/// backward's `dX = dY · W`, and in bf16 training (`--train-dtype bf16`) also transposed for
/// the training rows' forward products `Y = X · Wᵀ` and the loss's logits.
pub struct BackwardWeights {
    dtype: TrainDtype,
    layers: Vec<LayerW>,
    /// `[vocab, hidden]`.
    pub head: FrozenWeight,
    /// `[hidden, vocab]`, in bf16 training.
    head_t: Option<FrozenWeight>,
}

/// One layer's four products; `fwd` holds the transposed weights of a bf16 forward.
struct LayerW {
    bwd: [FrozenWeight; 4],
    fwd: Option<[FrozenWeight; 4]>,
}

/// A decoder layer's frozen projections, in the order [`LayerW`] keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frozen {
    Qkv = 0,
    O = 1,
    GateUp = 2,
    Down = 3,
}

/// `w` as a dense row-major `[rows, cols]` matrix.
fn dense(w: &WeightMatrix) -> Vec<f32> {
    let mut out = vec![0f32; w.rows * w.cols];
    for (r, row) in out.chunks_exact_mut(w.cols.max(1)).enumerate() {
        w.row_into(r, row);
    }
    out
}

/// `W` (`[out, in]`) for `dX = dY · W` in `dtype`.
pub fn backward_weight(w: &WeightMatrix, dtype: TrainDtype) -> FrozenWeight {
    FrozenWeight::new(&MatRef::new(&dense(w), w.rows, w.cols), dtype)
}

/// `Wᵀ` for `Y = X · Wᵀ` in `dtype` (a training row's forward product in bf16 training).
pub fn forward_weight(w: &WeightMatrix, dtype: TrainDtype) -> FrozenWeight {
    FrozenWeight::new(&MatRef::new(&dense(w), w.rows, w.cols).t(), dtype)
}

/// `W` (`[out, in]`) for `dX = dY · W`, and `Wᵀ` for `Y = X · Wᵀ` when `forward`.
fn pack(
    w: &WeightMatrix,
    dtype: TrainDtype,
    forward: bool,
) -> (FrozenWeight, Option<FrozenWeight>) {
    let d = dense(w);
    let m = MatRef::new(&d, w.rows, w.cols);
    (FrozenWeight::new(&m, dtype), forward.then(|| FrozenWeight::new(&m.t(), dtype)))
}

impl BackwardWeights {
    /// The `f32` products: the forward reads the model's own weights.
    pub fn new(model: &Llama) -> Self {
        Self::with_dtype(model, TrainDtype::F32)
    }

    pub fn with_dtype(model: &Llama, dtype: TrainDtype) -> Self {
        let forward = dtype != TrainDtype::F32;
        let layers = model
            .layers
            .par_iter()
            .map(|l| {
                let [q, o, gu, d] =
                    [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down].map(|w| pack(w, dtype, forward));
                // ok: `pack` returns the transposed weight exactly when `forward`.
                let fwd = forward.then(|| [q.1, o.1, gu.1, d.1].map(|w| w.expect("packed")));
                LayerW { bwd: [q.0, o.0, gu.0, d.0], fwd }
            })
            .collect();
        let (head, head_t) = pack(model.lm_head(), dtype, forward);
        if dtype == TrainDtype::Bf16 && !head.on_amx() {
            tracing::warn!(
                "--train-dtype bf16 without AMX-BF16 on this CPU: the rounded products run \
                 through the f32 kernels, no faster than --train-dtype f32"
            );
        }
        Self { dtype, layers, head, head_t }
    }

    pub fn dtype(&self) -> TrainDtype {
        self.dtype
    }

    /// Layer `li`'s transposed weight for the training rows' forward, in bf16 training.
    pub fn forward_weight(&self, li: usize, w: Frozen) -> Option<&FrozenWeight> {
        self.layers.get(li)?.fwd.as_ref().map(|f| &f[w as usize])
    }

    /// The head's transposed weight for the loss's logits, in bf16 training.
    pub fn head_forward(&self) -> Option<&FrozenWeight> {
        self.head_t.as_ref()
    }

    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                let f = l.fwd.iter().flatten().map(FrozenWeight::bytes).sum::<usize>();
                l.bwd.iter().map(FrozenWeight::bytes).sum::<usize>() + f
            })
            .sum();
        l + self.head.bytes() + self.head_t.as_ref().map_or(0, FrozenWeight::bytes)
    }
}

/// `dx = dy · W` for `dy [t, out]` and `W [out, in]` (overwrites `dx`).
fn propagate(
    dy: &[f32],
    w: &FrozenWeight,
    t: usize,
    out_dim: usize,
    in_dim: usize,
    dx: &mut [f32],
) {
    w.product(MatRef::new(dy, t, out_dim), false, dx, in_dim);
}

/// Buffers one sample's backward reuses from layer to layer, and its RoPE tables. Every
/// value of a buffer is written before it is read, so reuse needs no zeroing (fresh zeroed
/// buffers per layer cost page faults and memsets).
#[derive(Default)]
pub struct BackwardScratch {
    act: Vec<f32>,
    d_act: Vec<f32>,
    d_gu: Vec<f32>,
    x: Vec<f32>,
    dx: Vec<f32>,
    d_attn: Vec<f32>,
    d_qkv: Vec<f32>,
    /// cos and −sin of each position's angles (the inverse rotation).
    rope: Option<(Vec<f32>, Vec<f32>)>,
}

/// `v` as a buffer of `n` values (contents unspecified).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// Gradient of RMSNorm `y = w ⊙ x / rms(x)`: `dx = r (w⊙dy) − x r³/d Σ(w⊙dy⊙x)`, added to `dx`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let d = w.len();
    x.par_chunks_exact(d).zip(dy.par_chunks_exact(d)).zip(dx.par_chunks_exact_mut(d)).for_each(
        |((xi, dyi), dxi)| {
            let ss: f32 = xi.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ss + eps).sqrt();
            let dot: f32 = xi.iter().zip(dyi).zip(w).map(|((x, g), w)| x * g * w).sum();
            let c = r * r * r * dot / d as f32;
            for ((o, (xv, g)), wv) in dxi.iter_mut().zip(xi.iter().zip(dyi)).zip(w) {
                *o += r * wv * g - c * xv;
            }
        },
    );
}

/// Gradient of `act = silu(g) ⊙ u` over fused `[g | u]` rows: writes `d_gate_up`
/// (`[rows, 2 inter]`) from `d_act` (`[rows, inter]`).
pub fn silu_mul_backward(gate_up: &[f32], d_act: &[f32], inter: usize, d_gate_up: &mut [f32]) {
    gate_up
        .par_chunks_exact(2 * inter)
        .zip(d_act.par_chunks_exact(inter))
        .zip(d_gate_up.par_chunks_exact_mut(2 * inter))
        .for_each(|((gu, da), dgu)| {
            let (g, u) = gu.split_at(inter);
            let (dg, du) = dgu.split_at_mut(inter);
            silu_mul_grad(g, u, da, dg, du);
        });
}

/// The sample's K and V of one layer, positions `0..len`, read through its cache slots.
fn gather_kv(kv: &KvCache, layer: usize, slots: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let row = kv.num_kv_heads() * kv.head_dim();
    let mut k = Vec::with_capacity(slots.len() * row);
    let mut v = Vec::with_capacity(slots.len() * row);
    kv.layer(layer).gather(slots, row, &mut k, &mut v);
    (k, v)
}

/// What one layer's backward reads besides the model.
pub struct LayerBackward<'a> {
    pub acts: &'a SavedActivations,
    pub adapter: &'a LoraWeights,
    pub kv: &'a KvCache,
    /// Cache slot of each position of the sample.
    pub slots: &'a [usize],
    pub dropout_seed: u64,
}

/// Backward of layer `li`: `dh` holds the gradient w.r.t. the layer's output on entry and
/// w.r.t. its input on return; LoRA gradients are added to `grads`.
pub fn backward_layer(
    model: &Llama,
    bw: &BackwardWeights,
    li: usize,
    lb: &LayerBackward<'_>,
    grads: &mut LoraWeights,
    dh: &mut [f32],
    sc: &mut BackwardScratch,
) {
    let c = &model.config;
    let t = lb.acts.len;
    let (hs, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let (q_dim, kv_dim, inter) = (nh * hd, nkv * hd, c.intermediate_size);
    let qkv_dim = q_dim + 2 * kv_dim;
    let eps = c.rms_norm_eps as f32;
    let layer = &model.layers[li];
    let wt = &bw.layers[li];
    let acts = &lb.acts.layers[li];
    let scale = lb.adapter.scale();
    let p = lb.adapter.config.dropout;
    let dropout = (p > 0.0).then_some((p, lb.dropout_seed, li));
    let layer_grads = grads.layers.get_mut(li);
    let mut grads_of: Vec<Option<&mut LoraPair>> = match layer_grads {
        Some(l) => l.iter_mut().map(Option::as_mut).collect(),
        None => Vec::new(),
    };
    // The adapted ones of `modules` (each with its first column in `dy`), which read `x`.
    let mut adapted =
        |modules: &[(TargetModule, usize)], x: &[f32], dy: &[f32], dy_ld: usize, dx: &mut [f32]| {
            let mut group = Vec::new();
            for &(m, c0) in modules {
                let pair = lb.adapter.pair(li, m);
                let grad = grads_of.get_mut(m.index()).and_then(Option::take);
                if let (Some(pair), Some(grad)) = (pair, grad) {
                    let dy = MatRef::columns(dy, t, dy_ld, c0, pair.out_dim);
                    let u = &acts.lora_u[m.index()];
                    group.push(Adapted { pair, grad, module: m.index(), dy, u });
                }
            }
            lora_backward(&mut group, scale, dropout, x, t, dx);
        };

    // MLP: h_out = h_mid + down(silu(g) ⊙ u), [g, u] = gate_up(norm(h_mid)).
    let act = sized(&mut sc.act, t * inter);
    silu_mul(&acts.gate_up, inter, act);
    let d_act = sized(&mut sc.d_act, t * inter);
    propagate(dh, &wt.bwd[Frozen::Down as usize], t, hs, inter, d_act);
    adapted(&[(TargetModule::DownProj, 0)], act, dh, hs, d_act);
    let d_gu = sized(&mut sc.d_gu, t * 2 * inter);
    silu_mul_backward(&acts.gate_up, d_act, inter, d_gu);

    let x2 = sized(&mut sc.x, t * hs);
    rms_norm(&acts.h_mid, &layer.ffn_norm, eps, x2);
    let dx2 = sized(&mut sc.dx, t * hs);
    propagate(d_gu, &wt.bwd[Frozen::GateUp as usize], t, 2 * inter, hs, dx2);
    let gate_up = [(TargetModule::GateProj, 0), (TargetModule::UpProj, inter)];
    adapted(&gate_up, x2, d_gu, 2 * inter, dx2);
    rms_norm_backward(&acts.h_mid, &layer.ffn_norm, eps, dx2, dh);

    // Attention: h_mid = h_in + o(attn(rope(q), rope(k), v)), [q, k, v] = qkv(norm(h_in)).
    let d_attn = sized(&mut sc.d_attn, t * q_dim);
    propagate(dh, &wt.bwd[Frozen::O as usize], t, hs, q_dim, d_attn);
    adapted(&[(TargetModule::OProj, 0)], &acts.attn, dh, hs, d_attn);
    let (k, v) = gather_kv(lb.kv, li, lb.slots);
    let d_qkv = sized(&mut sc.d_qkv, t * qkv_dim);
    let input = AttnBackwardInput {
        q: &acts.q,
        k: &k,
        v: &v,
        o: &acts.attn,
        d_o: d_attn,
        len: t,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    attention_backward_into(&input, d_qkv);

    // RoPE is a rotation: its backward rotates by the opposite angle.
    let (cos, neg_sin) = sc.rope.get_or_insert_with(|| {
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = model.rope_tables(&positions);
        (cos, sin.iter().map(|s| -s).collect())
    });
    for (i, row) in d_qkv.chunks_exact_mut(qkv_dim).take(t).enumerate() {
        let (cs, sn) = (&cos[i * hd / 2..(i + 1) * hd / 2], &neg_sin[i * hd / 2..(i + 1) * hd / 2]);
        for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
            apply_rope(head, cs, sn);
        }
    }

    let x1 = sized(&mut sc.x, t * hs);
    rms_norm(&acts.h_in, &layer.attn_norm, eps, x1);
    let dx1 = sized(&mut sc.dx, t * hs);
    propagate(d_qkv, &wt.bwd[Frozen::Qkv as usize], t, qkv_dim, hs, dx1);
    let qkv = [
        (TargetModule::QProj, 0),
        (TargetModule::KProj, q_dim),
        (TargetModule::VProj, q_dim + kv_dim),
    ];
    adapted(&qkv, x1, d_qkv, qkv_dim, dx1);
    rms_norm_backward(&acts.h_in, &layer.attn_norm, eps, dx1, dh);
}
