//! A sample's backward on a device, layer by layer from the activations its forward saved:
//! frozen projections' input gradients, LoRA gradients (low-rank activations and dropout masks
//! recomputed), attention with its softmax recomputed, RMSNorm, SiLU and RoPE.

use super::{finish_forward, forward_chunk, TrainAdapter, TrainOps, TrainSample, TrainScratch};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims};
use crate::backend::cuda::decoder::{DecoderShape, DecoderWeights};
use crate::backend::cuda::CudaError;
use crate::lora::TargetModule;
use crate::model::loss::LossStats;

type R = Result<(), CudaError>;

/// Runs up to `max_layers` layers of the sample's backward, top down, adding LoRA gradients
/// to `adapter`'s; returns how many ran.
#[allow(clippy::too_many_arguments)]
pub fn backward_layers<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    adapter: &mut TrainAdapter<O::Logits>,
    sc: &mut TrainScratch<O>,
    max_layers: usize,
) -> Result<usize, CudaError> {
    let left = sc.backward_remaining();
    let n = max_layers.min(left);
    if n == 0 {
        return Ok(0);
    }
    sc.prepare_tables(ops, adapter)?;
    for li in (left - n..left).rev() {
        let cache = caches
            .get_mut(li)
            .ok_or_else(|| CudaError::Shape(format!("no cache for layer {li}")))?;
        backward_layer(ops, s, w, cache, adapter, li, sc)?;
        sc.backward = Some(li);
    }
    Ok(n)
}

/// Forward, loss and whole backward of one sample in forwards of its own.
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
    sc.begin(sample.clone())?;
    forward_chunk(ops, s, w, inv_freq, caches, adapter, sc, sample.len())?;
    let stats = finish_forward(ops, s, w, inv_freq, sc, grad_scale)?;
    backward_layers(ops, s, w, caches, adapter, sc, w.layers.len())?;
    Ok(stats)
}

/// Backward of layer `l`: `dh` holds the gradient w.r.t. the layer's output on entry and
/// w.r.t. its input on return.
fn backward_layer<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    cache: &mut O::Cache,
    adapter: &mut TrainAdapter<O::Logits>,
    l: usize,
    sc: &mut TrainScratch<O>,
) -> R {
    use TargetModule::*;
    let dropout = sc.dropout();
    let TrainScratch {
        sample,
        saved,
        h,
        act,
        k,
        v,
        u,
        dh,
        dx,
        d_act,
        d_gu,
        d_attn,
        d_qkv,
        dy_bf16: dy,
        step,
        tables,
        dropped,
        ..
    } = sc;
    let (Some(sample), Some(step), Some((_, lora))) = (sample.as_ref(), step.as_ref(), tables)
    else {
        return Err(CudaError::Shape("a backward before its loss".into()));
    };
    let t = sample.len();
    let (hid, qd, inter) = (s.hidden, s.q_dim(), s.inter);
    let (lw, sv) = (&w.layers[l], &saved[l]);
    let (scale, rank) = (adapter.scale, adapter.rank);
    // One adapted projection: its low-rank activation recomputed from its input, then dA, dB
    // and its part of dx.
    let mut grad = |ops: &mut O, m: TargetModule, x: &O::Act, dy: &O::Act, dx: &mut O::Logits| {
        let (Some(p), Some((table, d))) =
            (adapter.layers[l][m.index()].as_mut(), lora.table(s, l, m))
        else {
            return Ok(());
        };
        ops.mark("bwd lora")?;
        debug_assert_eq!(d, LoraDims::of(s, m, rank));
        let (Some(dropout), Some((xd, gx))) = (dropout, dropped.as_mut()) else {
            ops.lora_shrink(step, x, table, u, d)?;
            return ops.lora_backward(x, dy, u, p.grad(scale), d, dx, t);
        };
        // The input as the forward dropped it; the gradient through it dropped alike.
        let site = DropoutSite { dropout, layer: l, module: m };
        ops.lora_dropout(step, x, xd, 0..t, d.in_dim, site)?;
        ops.lora_shrink(step, xd, table, u, d)?;
        ops.zero(gx, t * d.in_dim)?;
        ops.lora_backward(xd, dy, u, p.grad(scale), d, gx, t)?;
        ops.lora_dropout_add(step, gx, dx, d.in_dim, site)
    };

    // MLP: out = mid + down(silu(g) ⊙ u), [g, u] = gate_up(norm(mid)). Each gradient a
    // frozen projection and its adapters read is rounded to bf16 once for all of them.
    ops.mark("bwd silu_mul")?;
    ops.silu_mul(&sv.gate_up, act, t, inter)?;
    ops.mark("bwd grad to bf16")?;
    ops.grad_bf16(dh, dy, t * hid)?;
    ops.mark("bwd down dx gemm")?;
    ops.matmul_dx(dy, &lw.down, d_act, (t, hid, inter))?;
    grad(ops, DownProj, act, dy, d_act)?;
    ops.mark("bwd silu_mul")?;
    ops.silu_mul_backward(&sv.gate_up, d_act, d_gu, t, inter)?;
    ops.mark("bwd norms")?;
    ops.rms_norm(&sv.h_mid, &lw.mlp_norm, h, t, s)?;
    ops.mark("bwd grad to bf16")?;
    ops.grad_bf16(d_gu, dy, t * 2 * inter)?;
    ops.mark("bwd gate_up dx gemm")?;
    ops.matmul_dx(dy, &lw.gate_up, dx, (t, 2 * inter, hid))?;
    grad(ops, GateProj, h, dy, dx)?;
    grad(ops, UpProj, h, dy, dx)?;
    ops.mark("bwd norms")?;
    ops.rms_norm_backward(&sv.h_mid, &lw.mlp_norm, dx, dh, t, s)?;

    // Attention: mid = in + o(attn(rope(q), rope(k), v)), [q, k, v] = qkv(norm(in)).
    ops.mark("bwd grad to bf16")?;
    ops.grad_bf16(dh, dy, t * hid)?;
    ops.mark("bwd o dx gemm")?;
    ops.matmul_dx(dy, &lw.o, d_attn, (t, hid, qd))?;
    grad(ops, OProj, &sv.attn, dy, d_attn)?;
    ops.mark("bwd kv gather")?;
    ops.gather_kv(step, cache, k, v, s)?;
    ops.mark("bwd attention")?;
    ops.attention_backward(&sv.q, k, v, &sv.attn, d_attn, d_qkv, t, s)?;
    ops.mark("bwd rope")?;
    ops.rope_backward(step, d_qkv, s)?;
    ops.mark("bwd norms")?;
    ops.rms_norm(&sv.h_in, &lw.attn_norm, h, t, s)?;
    ops.mark("bwd grad to bf16")?;
    ops.grad_bf16(d_qkv, dy, t * s.qkv_rows())?;
    ops.mark("bwd qkv dx gemm")?;
    ops.matmul_dx(dy, &lw.qkv, dx, (t, s.qkv_rows(), hid))?;
    for m in [QProj, KProj, VProj] {
        grad(ops, m, h, dy, dx)?;
    }
    ops.mark("bwd norms")?;
    ops.rms_norm_backward(&sv.h_in, &lw.attn_norm, dx, dh, t, s)
}
