//! One training sample's forward, loss and backward, written once against [`TrainOps`].
//!
//! Graph pruning as on the CPU (`model::activations`): per layer the forward keeps the two
//! RMSNorm inputs, the rotated queries, the attention output, the gate/up pre-activations and
//! each adapted projection's low-rank activation; keys and values stay in the sample's cache
//! blocks, normalised inputs, SiLU and softmax are recomputed in the backward.

use super::{TrainAdapter, TrainOps};
use crate::backend::cuda::decoder::lora::{LoraDims, LoraSet};
use crate::backend::cuda::decoder::{
    rope_tables, DecoderShape, DecoderWeights, SeqRows, StepBatch,
};
use crate::backend::cuda::CudaError;
use crate::lora::TargetModule;
use crate::model::loss::LossStats;

/// Rows of logits the loss computes at once: bounds its buffer to `LOSS_ROWS x vocab` floats.
pub const LOSS_ROWS: usize = 256;

/// A sample: its tokens, the target each position predicts (`None`: no loss there) and the
/// cache blocks its keys and values go to.
#[derive(Debug, Clone)]
pub struct TrainSample {
    pub tokens: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub block_table: Vec<u32>,
}

impl TrainSample {
    /// Position `i` predicts token `i + 1` where that token is trained (`trained[i + 1]`), as
    /// the CPU's `TrainingSample`.
    pub fn new(tokens: Vec<u32>, trained: &[bool], block_table: Vec<u32>) -> Self {
        let targets = (0..tokens.len())
            .map(|i| {
                let next = i + 1;
                (next < tokens.len() && trained.get(next).copied().unwrap_or(false))
                    .then(|| tokens[next])
            })
            .collect();
        Self { tokens, targets, block_table }
    }
}

/// What the forward keeps of one layer for the backward.
struct SavedLayer<O: TrainOps> {
    h_in: O::Act,
    h_mid: O::Act,
    q: O::Act,
    attn: O::Act,
    gate_up: O::Act,
    /// Each adapted projection's `x Aᵀ`, `[T, rank]`.
    u: [Option<O::Logits>; 7],
}

/// Buffers of a training step over samples of up to `len` tokens: the saved activations and
/// the backward's gradients.
pub struct TrainScratch<O: TrainOps> {
    pub len: usize,
    saved: Vec<SavedLayer<O>>,
    x: O::Act,
    h: O::Act,
    qkv: O::Act,
    o: O::Act,
    act: O::Act,
    down: O::Act,
    k: O::Act,
    v: O::Act,
    dh: O::Logits,
    dx: O::Logits,
    d_act: O::Logits,
    d_gu: O::Logits,
    d_attn: O::Logits,
    d_qkv: O::Logits,
    logits: O::Logits,
}

impl<O: TrainOps> TrainScratch<O> {
    pub fn new(
        ops: &mut O,
        s: &DecoderShape,
        adapter: &TrainAdapter<O::Logits>,
        len: usize,
    ) -> Result<Self, CudaError> {
        let (hid, qd, kvd, i) = (s.hidden, s.q_dim(), s.kv_dim(), s.inter);
        let mut saved = Vec::with_capacity(s.layers);
        for pairs in &adapter.layers {
            let mut u: [Option<O::Logits>; 7] = Default::default();
            for (slot, p) in u.iter_mut().zip(pairs) {
                if p.is_some() {
                    *slot = Some(ops.logits(len * adapter.rank)?);
                }
            }
            saved.push(SavedLayer {
                h_in: ops.act(len * hid)?,
                h_mid: ops.act(len * hid)?,
                q: ops.act(len * qd)?,
                attn: ops.act(len * qd)?,
                gate_up: ops.act(len * 2 * i)?,
                u,
            });
        }
        Ok(Self {
            len,
            saved,
            x: ops.act(len * hid)?,
            h: ops.act(len * hid)?,
            qkv: ops.act(len * s.qkv_rows())?,
            o: ops.act(len * hid)?,
            act: ops.act(len * i)?,
            down: ops.act(len * hid)?,
            k: ops.act(len * kvd)?,
            v: ops.act(len * kvd)?,
            dh: ops.logits(len * hid)?,
            dx: ops.logits(len * hid)?,
            d_act: ops.logits(len * i)?,
            d_gu: ops.logits(len * 2 * i)?,
            d_attn: ops.logits(len * qd)?,
            d_qkv: ops.logits(len * s.qkv_rows())?,
            logits: ops.logits(LOSS_ROWS.min(len.max(1)) * s.vocab)?,
        })
    }
}

/// Forward, loss and backward of one sample: its K and V go to `caches` at its blocks, the
/// LoRA gradients of its loss (each target's loss weighted by `grad_scale`) are added to
/// `adapter`'s. Returns the sample's loss statistics.
#[allow(clippy::too_many_arguments)]
pub fn train_sample<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    sample: &TrainSample,
    adapter: &mut TrainAdapter<O::Logits>,
    grad_scale: f32,
    sc: &mut TrainScratch<O>,
) -> Result<LossStats, CudaError> {
    s.check()?;
    let t = sample.tokens.len();
    if t == 0 || t > sc.len || sample.targets.len() != t {
        return Err(CudaError::Shape(format!(
            "a sample of {t} tokens ({} targets) for scratch of {}",
            sample.targets.len(),
            sc.len
        )));
    }
    if caches.len() != w.layers.len() || sc.saved.len() != w.layers.len() {
        return Err(CudaError::Shape("caches, scratch and layers differ in number".into()));
    }
    if inv_freq.len() != s.head_dim / 2 {
        return Err(CudaError::Shape(format!("{} RoPE frequencies", inv_freq.len())));
    }
    let rows = SeqRows {
        tokens: sample.tokens.clone(),
        start: 0,
        block_table: sample.block_table.clone(),
        adapter: Some(0),
    };
    let batch = StepBatch::new(vec![rows], s.block_size)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    let step = ops.upload(&batch, &cos, &sin)?;
    let lora = adapter.tables(ops)?;
    forward(ops, s, w, caches, &step, &lora, sc, t)?;
    let stats = loss(ops, s, w, sample, grad_scale, sc)?;
    for l in (0..w.layers.len()).rev() {
        backward_layer(ops, s, w, &mut caches[l], &step, adapter, l, sc, t)?;
    }
    Ok(stats)
}

/// `y += B(A x)` of projection `m`, keeping `A x` in `u`.
#[allow(clippy::too_many_arguments)]
fn adapt<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    step: &O::Step,
    lora: &LoraSet<O::LoraTable>,
    l: usize,
    m: TargetModule,
    x: &O::Act,
    u: &mut [Option<O::Logits>; 7],
    y: &mut O::Act,
) -> Result<(), CudaError> {
    if let (Some((table, d)), Some(u)) = (lora.table(s, l, m), u[m.index()].as_mut()) {
        ops.lora_shrink(step, x, table, u, d)?;
        ops.lora_expand(step, u, table, y, d)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn forward<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    lora: &LoraSet<O::LoraTable>,
    sc: &mut TrainScratch<O>,
    t: usize,
) -> Result<(), CudaError> {
    use TargetModule::*;
    let (hid, qd) = (s.hidden, s.q_dim());
    ops.embedding(step, &w.embed, &mut sc.x, s)?;
    for (l, (lw, cache)) in w.layers.iter().zip(caches.iter_mut()).enumerate() {
        let sv = &mut sc.saved[l];
        if l == 0 {
            ops.rms_norm(&sc.x, &lw.attn_norm, &mut sc.h, t, s)?;
        } else {
            ops.add_rms_norm(&mut sc.x, &sc.down, &lw.attn_norm, &mut sc.h, t, s)?;
        }
        ops.copy_act(&sc.x, &mut sv.h_in, t * hid)?;
        ops.matmul(&sc.h, &lw.qkv, 0, &mut sc.qkv, (t, s.qkv_rows(), hid))?;
        for m in [QProj, KProj, VProj] {
            adapt(ops, s, step, lora, l, m, &sc.h, &mut sv.u, &mut sc.qkv)?;
        }
        ops.rope_kv_write(step, &sc.qkv, lw.qkv_bias.as_ref(), &mut sv.q, cache, s)?;
        ops.attention(step, &sv.q, cache, &mut sv.attn, s)?;
        ops.matmul(&sv.attn, &lw.o, 0, &mut sc.o, (t, hid, qd))?;
        adapt(ops, s, step, lora, l, OProj, &sv.attn, &mut sv.u, &mut sc.o)?;
        ops.add_rms_norm(&mut sc.x, &sc.o, &lw.mlp_norm, &mut sc.h, t, s)?;
        ops.copy_act(&sc.x, &mut sv.h_mid, t * hid)?;
        ops.matmul(&sc.h, &lw.gate_up, 0, &mut sv.gate_up, (t, 2 * s.inter, hid))?;
        for m in [GateProj, UpProj] {
            adapt(ops, s, step, lora, l, m, &sc.h, &mut sv.u, &mut sv.gate_up)?;
        }
        ops.silu_mul(&sv.gate_up, &mut sc.act, t, s.inter)?;
        ops.matmul(&sc.act, &lw.down, 0, &mut sc.down, (t, hid, s.inter))?;
        adapt(ops, s, step, lora, l, DownProj, &sc.act, &mut sv.u, &mut sc.down)?;
    }
    // The final norm: `x` keeps its input (the backward's), `h` its output.
    if w.layers.is_empty() {
        ops.rms_norm(&sc.x, &w.norm, &mut sc.h, t, s)
    } else {
        ops.add_rms_norm(&mut sc.x, &sc.down, &w.norm, &mut sc.h, t, s)
    }
}

/// The loss over the sample's targets, chunk by chunk, and its gradient w.r.t. the final
/// residual stream into `dh`.
fn loss<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    sample: &TrainSample,
    grad_scale: f32,
    sc: &mut TrainScratch<O>,
) -> Result<LossStats, CudaError> {
    let t = sample.tokens.len();
    ops.zero(&mut sc.dx, t * s.hidden)?;
    ops.zero(&mut sc.dh, t * s.hidden)?;
    let mut stats = LossStats::default();
    let chunk = LOSS_ROWS.min(sc.len.max(1));
    for r0 in (0..t).step_by(chunk) {
        let r1 = (r0 + chunk).min(t);
        let want = &sample.targets[r0..r1];
        if want.iter().all(Option::is_none) {
            continue;
        }
        let targets: Vec<i32> =
            want.iter().map(|t| t.and_then(|v| i32::try_from(v).ok()).unwrap_or(-1)).collect();
        let scales: Vec<f32> =
            want.iter().map(|t| if t.is_some() { grad_scale } else { 0.0 }).collect();
        let got = ops.loss_rows(
            &sc.h,
            &w.lm_head,
            r0..r1,
            &targets,
            &scales,
            &mut sc.logits,
            &mut sc.dx,
            s,
        )?;
        for ((loss, id), target) in got.into_iter().zip(want) {
            if let Some(target) = target {
                stats.loss_sum += f64::from(loss);
                stats.correct += usize::from(id == *target);
                stats.count += 1;
            }
        }
    }
    ops.rms_norm_backward(&sc.x, &w.norm, &sc.dx, &mut sc.dh, t, s)?;
    Ok(stats)
}

/// Backward of layer `l`: `sc.dh` holds the gradient w.r.t. the layer's output on entry and
/// w.r.t. its input on return; LoRA gradients are added to `adapter`'s.
#[allow(clippy::too_many_arguments)]
fn backward_layer<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    cache: &mut O::Cache,
    step: &O::Step,
    adapter: &mut TrainAdapter<O::Logits>,
    l: usize,
    sc: &mut TrainScratch<O>,
    t: usize,
) -> Result<(), CudaError> {
    use TargetModule::*;
    let (hid, qd, inter) = (s.hidden, s.q_dim(), s.inter);
    let lw = &w.layers[l];
    let sv = &sc.saved[l];
    let scale = adapter.scale;
    let rank = adapter.rank;
    let mut grad =
        |ops: &mut O, m: TargetModule, x: &O::Act, dy: &O::Logits, dx: &mut O::Logits| {
            let (Some(p), Some(u)) =
                (adapter.layers[l][m.index()].as_mut(), sv.u[m.index()].as_ref())
            else {
                return Ok(());
            };
            ops.lora_backward(x, dy, u, p.grad(scale), LoraDims::of(s, m, rank), dx, t)
        };

    // MLP: out = mid + down(silu(g) ⊙ u), [g, u] = gate_up(norm(mid)).
    ops.silu_mul(&sv.gate_up, &mut sc.act, t, inter)?;
    ops.matmul_dx(&sc.dh, &lw.down, &mut sc.d_act, (t, hid, inter))?;
    grad(ops, DownProj, &sc.act, &sc.dh, &mut sc.d_act)?;
    ops.silu_mul_backward(&sv.gate_up, &sc.d_act, &mut sc.d_gu, t, inter)?;
    ops.rms_norm(&sv.h_mid, &lw.mlp_norm, &mut sc.h, t, s)?;
    ops.matmul_dx(&sc.d_gu, &lw.gate_up, &mut sc.dx, (t, 2 * inter, hid))?;
    grad(ops, GateProj, &sc.h, &sc.d_gu, &mut sc.dx)?;
    grad(ops, UpProj, &sc.h, &sc.d_gu, &mut sc.dx)?;
    ops.rms_norm_backward(&sv.h_mid, &lw.mlp_norm, &sc.dx, &mut sc.dh, t, s)?;

    // Attention: mid = in + o(attn(rope(q), rope(k), v)), [q, k, v] = qkv(norm(in)).
    ops.matmul_dx(&sc.dh, &lw.o, &mut sc.d_attn, (t, hid, qd))?;
    grad(ops, OProj, &sv.attn, &sc.dh, &mut sc.d_attn)?;
    ops.gather_kv(step, cache, &mut sc.k, &mut sc.v, s)?;
    ops.attention_backward(&sv.q, &sc.k, &sc.v, &sv.attn, &sc.d_attn, &mut sc.d_qkv, t, s)?;
    ops.rope_backward(step, &mut sc.d_qkv, s)?;
    ops.rms_norm(&sv.h_in, &lw.attn_norm, &mut sc.h, t, s)?;
    ops.matmul_dx(&sc.d_qkv, &lw.qkv, &mut sc.dx, (t, s.qkv_rows(), hid))?;
    for m in [QProj, KProj, VProj] {
        grad(ops, m, &sc.h, &sc.d_qkv, &mut sc.dx)?;
    }
    ops.rms_norm_backward(&sv.h_in, &lw.attn_norm, &sc.dx, &mut sc.dh, t, s)
}
