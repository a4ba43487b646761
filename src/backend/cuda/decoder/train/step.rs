//! One training sample's token-level life on a device, written once against [`TrainOps`]: its
//! forward in chunks (alone, or as rows of a serving forward), then its loss, then its
//! backward a few layers at a time, as the CPU engine's `TrainingSample` does.
//!
//! Graph pruning as on the CPU (`model::activations`): per layer the forward keeps the two
//! RMSNorm inputs, the rotated queries, the attention output and the gate/up pre-activations;
//! keys and values stay in the sample's cache blocks; normalised inputs, SiLU, softmax, the
//! LoRA low-rank activations and LoRA dropout's masks are recomputed in the backward.

use std::ops::Range;

use super::{TrainAdapter, TrainOps};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims, LoraSet};
use crate::backend::cuda::decoder::{
    forward_rows_capturing, rope_tables, Capture, DecoderShape, DecoderWeights, SavePoint, Scratch,
    SeqRows, StepBatch, Want,
};
use crate::backend::cuda::CudaError;
use crate::lora::dropout::SampleDropout;
use crate::lora::TargetModule;
use crate::model::loss::LossStats;

type R = Result<(), CudaError>;

/// Rows of logits the loss computes at once: bounds its buffer to `LOSS_ROWS x vocab` floats.
pub const LOSS_ROWS: usize = 256;

/// A sample: its tokens, the target each position predicts (`None`: no loss there), the
/// cache blocks its keys and values go to, and the seed of its LoRA dropout masks (`None`: no
/// dropout, as for a validation sample).
#[derive(Debug, Clone)]
pub struct TrainSample {
    pub tokens: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub block_table: Vec<u32>,
    pub dropout_seed: Option<u64>,
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
        Self { tokens, targets, block_table, dropout_seed: None }
    }

    /// The sample with the adapter's dropout, its masks drawn from `seed` (as the CPU's
    /// `TrainingSample` with that seed draws them).
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What the forward keeps of one layer for the backward, `[len, width]` each.
struct SavedLayer<O: TrainOps> {
    h_in: O::Act,
    h_mid: O::Act,
    q: O::Act,
    attn: O::Act,
    gate_up: O::Act,
}

/// One sample in flight (up to `len` tokens) with the buffers of its forward and backward.
pub struct TrainScratch<O: TrainOps> {
    pub len: usize,
    /// The adapter's LoRA dropout probability (0: none).
    dropout_p: f32,
    sample: Option<TrainSample>,
    forwarded: usize,
    /// Rows of the loss scored, once it has started.
    loss_done: Option<usize>,
    /// Layers of backward left, once the loss has run.
    backward: Option<usize>,
    saved: Vec<SavedLayer<O>>,
    h_final: O::Act,
    /// A forward of the sample's chunks alone (no logits).
    fwd: Scratch<O>,
    h: O::Act,
    act: O::Act,
    k: O::Act,
    v: O::Act,
    u: O::Logits,
    dh: O::Logits,
    dx: O::Logits,
    d_act: O::Logits,
    d_gu: O::Logits,
    d_attn: O::Logits,
    d_qkv: O::Logits,
    logits: O::Logits,
    /// With dropout: a projection's dropped input and the gradient w.r.t. it, `[len, widest]`.
    dropped: Option<(O::Act, O::Logits)>,
    /// The sample's rows made ready, for the backward's K/V gather and RoPE.
    step: Option<O::Step>,
    /// The adapter's tables and the optimizer step they were made at.
    tables: Option<(u64, LoraSet<O::LoraTable>)>,
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
        for _ in 0..s.layers {
            saved.push(SavedLayer {
                h_in: ops.act(len * hid)?,
                h_mid: ops.act(len * hid)?,
                q: ops.act(len * qd)?,
                attn: ops.act(len * qd)?,
                gate_up: ops.act(len * 2 * i)?,
            });
        }
        let p = adapter.config.dropout;
        let widest = hid.max(qd).max(i);
        let dropped =
            if p > 0.0 { Some((ops.act(len * widest)?, ops.logits(len * widest)?)) } else { None };
        Ok(Self {
            len,
            dropout_p: p,
            sample: None,
            forwarded: 0,
            loss_done: None,
            backward: None,
            saved,
            h_final: ops.act(len * hid)?,
            fwd: Scratch::with_logits_rows(ops, s, len, 0)?,
            h: ops.act(len * hid)?,
            act: ops.act(len * i)?,
            k: ops.act(len * kvd)?,
            v: ops.act(len * kvd)?,
            u: ops.logits(len * adapter.rank.max(1))?,
            dh: ops.logits(len * hid)?,
            dx: ops.logits(len * hid)?,
            d_act: ops.logits(len * i)?,
            d_gu: ops.logits(len * 2 * i)?,
            d_attn: ops.logits(len * qd)?,
            d_qkv: ops.logits(len * s.qkv_rows())?,
            logits: ops.logits(LOSS_ROWS.min(len.max(1)) * s.vocab)?,
            dropped,
            step: None,
            tables: None,
        })
    }

    /// Starts `sample` (the one before, if any, is dropped wherever it was).
    pub fn begin(&mut self, sample: TrainSample) -> R {
        if sample.is_empty() || sample.len() > self.len || sample.targets.len() != sample.len() {
            return Err(CudaError::Shape(format!(
                "a sample of {} tokens ({} targets) for scratch of {}",
                sample.len(),
                sample.targets.len(),
                self.len
            )));
        }
        self.sample = Some(sample);
        self.forwarded = 0;
        self.loss_done = None;
        self.backward = None;
        self.step = None;
        Ok(())
    }

    pub fn forward_remaining(&self) -> usize {
        self.sample.as_ref().map_or(0, |s| s.len() - self.forwarded)
    }

    /// Rows of the loss left to score (0 until the forward is complete, and once the loss has
    /// run).
    pub fn loss_remaining(&self) -> usize {
        match &self.sample {
            Some(x) if self.forwarded == x.len() && self.backward.is_none() => {
                x.len() - self.loss_done.unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Layers of backward left (0 before the loss has run and after the backward).
    pub fn backward_remaining(&self) -> usize {
        self.backward.unwrap_or(0)
    }

    /// The sample's forward, loss and backward have all run.
    pub fn is_done(&self) -> bool {
        self.sample.is_some() && self.forward_remaining() == 0 && self.backward == Some(0)
    }

    /// The next `n` tokens of the sample (fewer at its end) as a sequence of a batch, with
    /// the training adapter in LoRA slot `slot`.
    pub fn next_chunk(&self, n: usize, slot: u32) -> Option<SeqRows> {
        let s = self.sample.as_ref()?;
        let end = (self.forwarded + n).min(s.len());
        (end > self.forwarded).then(|| SeqRows {
            tokens: s.tokens[self.forwarded..end].to_vec(),
            start: self.forwarded,
            block_table: s.block_table.clone(),
            adapter: Some(slot),
        })
    }

    /// Makes the adapter's tables current (after an optimizer step a host copy is stale).
    pub fn prepare_tables(&mut self, ops: &mut O, adapter: &TrainAdapter<O::Logits>) -> R {
        if self.tables.as_ref().is_none_or(|(at, _)| *at != adapter.step) {
            self.tables = Some((adapter.step, adapter.tables(ops)?));
        }
        Ok(())
    }

    /// The adapter's tables as of the last [`prepare_tables`](Self::prepare_tables), and the
    /// optimizer step they were made at.
    pub fn tables(&self) -> Option<(u64, &LoraSet<O::LoraTable>)> {
        self.tables.as_ref().map(|(step, t)| (*step, t))
    }

    /// The adapter's tables (as of the last [`prepare_tables`](Self::prepare_tables)) and a
    /// capture of the next chunk for a forward in which batch rows `rows` are that chunk.
    /// Call [`advance`](Self::advance) once the forward has run.
    pub fn chunk_forward(
        &mut self,
        s: &DecoderShape,
        rows: Range<usize>,
    ) -> Result<(&LoraSet<O::LoraTable>, SampleCapture<'_, O>), CudaError> {
        let dropout = self.dropout();
        let Self { tables, saved, h_final, forwarded, sample, .. } = self;
        let tables = tables
            .as_ref()
            .map(|t| &t.1)
            .ok_or_else(|| CudaError::Shape("the adapter's tables were not prepared".into()))?;
        let cap = capture(s, rows, dropout, saved, h_final, *forwarded, sample.as_ref())?;
        Ok((tables, cap))
    }

    /// A capture of the next chunk for a forward in which batch rows `rows` are that chunk,
    /// whose adapter tables come from elsewhere (this adapter's among others).
    pub fn chunk_capture(
        &mut self,
        s: &DecoderShape,
        rows: Range<usize>,
    ) -> Result<SampleCapture<'_, O>, CudaError> {
        let dropout = self.dropout();
        let Self { saved, h_final, forwarded, sample, .. } = self;
        capture(s, rows, dropout, saved, h_final, *forwarded, sample.as_ref())
    }

    /// The sample's LoRA dropout, if its adapter has any.
    fn dropout(&self) -> Option<SampleDropout> {
        let seed = self.sample.as_ref()?.dropout_seed?;
        (self.dropout_p > 0.0).then_some(SampleDropout { p: self.dropout_p, seed })
    }

    /// Records that the next `n` tokens were forwarded.
    pub fn advance(&mut self, n: usize) {
        self.forwarded = (self.forwarded + n).min(self.sample.as_ref().map_or(0, TrainSample::len));
    }
}

/// The capture of batch rows `rows`, the sample's next chunk from position `first_pos`.
fn capture<'a, O: TrainOps>(
    s: &DecoderShape,
    rows: Range<usize>,
    dropout: Option<SampleDropout>,
    saved: &'a mut [SavedLayer<O>],
    h_final: &'a mut O::Act,
    first_pos: usize,
    sample: Option<&TrainSample>,
) -> Result<SampleCapture<'a, O>, CudaError> {
    let left = sample.map_or(0, |x| x.len() - first_pos);
    if rows.len() > left {
        return Err(CudaError::Shape(format!("{} rows for {left} tokens left", rows.len())));
    }
    Ok(SampleCapture { rows, first_pos, saved, h_final, s: s.clone(), dropout })
}

/// Saves the activations of a chunk's rows of a forward into the sample's buffers.
pub struct SampleCapture<'a, O: TrainOps> {
    rows: Range<usize>,
    first_pos: usize,
    saved: &'a mut [SavedLayer<O>],
    h_final: &'a mut O::Act,
    s: DecoderShape,
    dropout: Option<SampleDropout>,
}

impl<O: TrainOps> Capture<O> for SampleCapture<'_, O> {
    fn save(&mut self, ops: &mut O, point: SavePoint, layer: usize, x: &O::Act) -> R {
        let (hid, qd) = (self.s.hidden, self.s.q_dim());
        let (dst, width) = match point {
            SavePoint::Final => (&mut *self.h_final, hid),
            p => {
                let l = self.saved.get_mut(layer).ok_or_else(|| {
                    CudaError::Shape(format!("activations of layer {layer} saved"))
                })?;
                match p {
                    SavePoint::AttnIn => (&mut l.h_in, hid),
                    SavePoint::Q => (&mut l.q, qd),
                    SavePoint::Attn => (&mut l.attn, qd),
                    SavePoint::MlpIn => (&mut l.h_mid, hid),
                    SavePoint::GateUp | SavePoint::Final => (&mut l.gate_up, 2 * self.s.inter),
                }
            }
        };
        ops.copy_rows(x, self.rows.start, dst, self.first_pos, self.rows.len(), width)
    }

    fn dropout(&self) -> Option<(SampleDropout, Range<usize>)> {
        self.dropout.map(|d| (d, self.rows.clone()))
    }
}

/// Forwards the next `n` tokens of the sample in a forward of their own (no inference rows).
#[allow(clippy::too_many_arguments)]
pub fn forward_chunk<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    adapter: &TrainAdapter<O::Logits>,
    sc: &mut TrainScratch<O>,
    n: usize,
) -> Result<usize, CudaError> {
    let Some(rows) = sc.next_chunk(n, 0) else { return Ok(0) };
    let n = rows.tokens.len();
    let batch = StepBatch::new(vec![rows], s.block_size)?;
    sc.prepare_tables(ops, adapter)?;
    let dropout = sc.dropout();
    let TrainScratch { tables, saved, h_final, forwarded, fwd, .. } = sc;
    let Some((_, lora)) = tables.as_ref() else {
        return Err(CudaError::Shape("the adapter's tables were not prepared".into()));
    };
    let first_pos = *forwarded;
    let mut cap = SampleCapture { rows: 0..n, first_pos, saved, h_final, s: s.clone(), dropout };
    let cap: &mut dyn Capture<O> = &mut cap;
    let (c, f) = (&mut *caches, inv_freq);
    forward_rows_capturing(ops, s, w, f, c, &batch, fwd, &[], Want::Logits, Some(lora), Some(cap))?;
    sc.advance(n);
    Ok(n)
}

/// After the last chunk: the loss over the sample's targets (each weighted by `grad_scale`
/// in the gradient), computed `LOSS_ROWS` rows at a time, and its gradient w.r.t. the final
/// residual stream, which starts the backward.
pub fn finish_forward<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    sc: &mut TrainScratch<O>,
    grad_scale: f32,
) -> Result<LossStats, CudaError> {
    let (_, stats) = loss_rows(ops, s, w, inv_freq, sc, grad_scale, usize::MAX)?;
    Ok(stats)
}

/// Scores up to `max_rows` more rows of the sample's loss (its forward complete), so an
/// iteration can take a share of it as of the forward; returns the rows scored and their
/// stats. The gradient w.r.t. the final residual stream accumulates over the calls; the one
/// that scores the last row finishes it and readies the backward. Pieces break at multiples
/// of `LOSS_ROWS`, so no row's logits depend on how the loss was split.
pub fn loss_rows<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    sc: &mut TrainScratch<O>,
    grad_scale: f32,
    max_rows: usize,
) -> Result<(usize, LossStats), CudaError> {
    let left = sc.loss_remaining();
    let sample = match &sc.sample {
        Some(x) if left > 0 => x.clone(),
        _ => return Err(CudaError::Shape("the loss of a sample not forwarded whole".into())),
    };
    let t = sample.len();
    let first = match sc.loss_done {
        Some(done) => done,
        None => {
            ops.rms_norm(&sc.h_final, &w.norm, &mut sc.h, t, s)?;
            ops.zero(&mut sc.dx, t * s.hidden)?;
            ops.zero(&mut sc.dh, t * s.hidden)?;
            0
        }
    };
    let end = first + max_rows.min(left);
    let mut stats = LossStats::default();
    let chunk = LOSS_ROWS.min(sc.len.max(1));
    let mut r0 = first;
    while r0 < end {
        let r1 = ((r0 / chunk + 1) * chunk).min(end);
        let want = &sample.targets[r0..r1];
        let rows = r0..r1;
        r0 = r1;
        if want.iter().all(Option::is_none) {
            continue;
        }
        let targets: Vec<i32> =
            want.iter().map(|t| t.and_then(|v| i32::try_from(v).ok()).unwrap_or(-1)).collect();
        let scales: Vec<f32> =
            want.iter().map(|t| if t.is_some() { grad_scale } else { 0.0 }).collect();
        let (h, head, lg, dx) = (&sc.h, &w.lm_head, &mut sc.logits, &mut sc.dx);
        let got = ops.loss_rows(h, head, rows, &targets, &scales, lg, dx, s)?;
        for ((loss, id), target) in got.into_iter().zip(want) {
            if let Some(target) = target {
                stats.loss_sum += f64::from(loss);
                stats.correct += usize::from(id == *target);
                stats.count += 1;
            }
        }
    }
    sc.loss_done = Some(end);
    if end < t {
        return Ok((end - first, stats));
    }
    ops.rms_norm_backward(&sc.h_final, &w.norm, &sc.dx, &mut sc.dh, t, s)?;
    let rows = SeqRows {
        tokens: sample.tokens,
        start: 0,
        block_table: sample.block_table,
        adapter: Some(0),
    };
    let batch = StepBatch::new(vec![rows], s.block_size)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    sc.step = Some(ops.upload(&batch, &cos, &sin)?);
    sc.backward = Some(w.layers.len());
    Ok((end - first, stats))
}

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
    let mut grad =
        |ops: &mut O, m: TargetModule, x: &O::Act, dy: &O::Logits, dx: &mut O::Logits| {
            let (Some(p), Some((table, d))) =
                (adapter.layers[l][m.index()].as_mut(), lora.table(s, l, m))
            else {
                return Ok(());
            };
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

    // MLP: out = mid + down(silu(g) ⊙ u), [g, u] = gate_up(norm(mid)).
    ops.silu_mul(&sv.gate_up, act, t, inter)?;
    ops.matmul_dx(dh, &lw.down, d_act, (t, hid, inter))?;
    grad(ops, DownProj, act, dh, d_act)?;
    ops.silu_mul_backward(&sv.gate_up, d_act, d_gu, t, inter)?;
    ops.rms_norm(&sv.h_mid, &lw.mlp_norm, h, t, s)?;
    ops.matmul_dx(d_gu, &lw.gate_up, dx, (t, 2 * inter, hid))?;
    grad(ops, GateProj, h, d_gu, dx)?;
    grad(ops, UpProj, h, d_gu, dx)?;
    ops.rms_norm_backward(&sv.h_mid, &lw.mlp_norm, dx, dh, t, s)?;

    // Attention: mid = in + o(attn(rope(q), rope(k), v)), [q, k, v] = qkv(norm(in)).
    ops.matmul_dx(dh, &lw.o, d_attn, (t, hid, qd))?;
    grad(ops, OProj, &sv.attn, dh, d_attn)?;
    ops.gather_kv(step, cache, k, v, s)?;
    ops.attention_backward(&sv.q, k, v, &sv.attn, d_attn, d_qkv, t, s)?;
    ops.rope_backward(step, d_qkv, s)?;
    ops.rms_norm(&sv.h_in, &lw.attn_norm, h, t, s)?;
    ops.matmul_dx(d_qkv, &lw.qkv, dx, (t, s.qkv_rows(), hid))?;
    for m in [QProj, KProj, VProj] {
        grad(ops, m, h, d_qkv, dx)?;
    }
    ops.rms_norm_backward(&sv.h_in, &lw.attn_norm, dx, dh, t, s)
}
