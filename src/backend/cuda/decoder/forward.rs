//! The Llama forward written once against [`DecoderOps`]: the layers, then the output head on
//! every row (the benchmark's and the selftest's greedy ids) or on the rows a server samples.

use std::ops::Range;

use super::lora::{DropoutSite, LoraSet};
use super::{rope_tables, DecoderOps, DecoderShape, DecoderWeights, StepBatch};
use crate::backend::cuda::sampling::{Penalties, RowSample, RowSampling};
use crate::backend::cuda::CudaError;
use crate::lora::dropout::SampleDropout;
use crate::lora::TargetModule;

type R = Result<(), CudaError>;

/// The points of a forward where a training sample's activations are saved for its backward
/// (`decoder::train`): `x` is the residual stream or the named activation, every row of the
/// batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavePoint {
    /// The attention RMSNorm's input (the residual stream entering layer `l`).
    AttnIn,
    /// Rotated queries.
    Q,
    /// The attention output (o_proj's input).
    Attn,
    /// The MLP RMSNorm's input.
    MlpIn,
    /// gate/up projections, LoRA updates included.
    GateUp,
    /// The final RMSNorm's input (`layer` is the number of layers).
    Final,
}

/// Saves rows of a forward's activations (see [`SavePoint`]).
pub trait Capture<O: DecoderOps> {
    fn save(&mut self, ops: &mut O, point: SavePoint, layer: usize, x: &O::Act) -> R;

    /// The LoRA dropout of the captured rows (a training sample's) and which rows of the
    /// forward they are.
    fn dropout(&self) -> Option<(SampleDropout, Range<usize>)> {
        None
    }
}

/// Activation buffers of a forward of up to `rows` rows.
pub struct Scratch<O: DecoderOps> {
    pub rows: usize,
    /// Rows `logits` and `ids` hold.
    pub logits_rows: usize,
    x: O::Act,
    h: O::Act,
    qkv: O::Act,
    q: O::Act,
    attn: O::Act,
    o: O::Act,
    gate_up: O::Act,
    act: O::Act,
    down: O::Act,
    /// A LoRA input with a training sample's rows dropped, made when first needed.
    dropped: Option<O::Act>,
    pub logits: O::Logits,
    pub ids: O::Ids,
}

impl<O: DecoderOps> Scratch<O> {
    pub fn new(ops: &mut O, s: &DecoderShape, rows: usize) -> Result<Self, CudaError> {
        Self::with_logits_rows(ops, s, rows, rows)
    }

    /// Scratch for forwards of up to `rows` rows, of which up to `logits_rows` get logits (a
    /// training forward needs none: its loss computes logits chunk by chunk).
    pub fn with_logits_rows(
        ops: &mut O,
        s: &DecoderShape,
        rows: usize,
        logits_rows: usize,
    ) -> Result<Self, CudaError> {
        let lr = logits_rows.max(1);
        Ok(Self {
            rows,
            logits_rows: lr,
            x: ops.act(rows * s.hidden)?,
            h: ops.act(rows * s.hidden)?,
            qkv: ops.act(rows * s.qkv_rows())?,
            q: ops.act(rows * s.q_dim())?,
            attn: ops.act(rows * s.q_dim())?,
            o: ops.act(rows * s.hidden)?,
            gate_up: ops.act(rows * 2 * s.inter)?,
            act: ops.act(rows * s.inter)?,
            down: ops.act(rows * s.hidden)?,
            dropped: None,
            logits: ops.logits(lr * s.vocab)?,
            ids: ops.ids(lr)?,
        })
    }
}

/// One forward over `batch`: writes each row's K and V into `caches` (one per layer), leaves
/// every row's logits in `scratch.logits` and returns each row's greedy id and logprob.
pub fn forward<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    batch: &StepBatch,
    sc: &mut Scratch<O>,
) -> Result<Vec<(u32, f32)>, CudaError> {
    forward_with(ops, s, w, inv_freq, caches, batch, sc, None)
}

/// [`forward`] with the rows' adapters.
#[allow(clippy::too_many_arguments)]
pub fn forward_with<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    batch: &StepBatch,
    sc: &mut Scratch<O>,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> Result<Vec<(u32, f32)>, CudaError> {
    check_inv_freq(s, inv_freq)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    ops.mark("upload + embedding")?;
    let step = ops.upload(batch, &cos, &sin)?;
    forward_on_device_with(ops, s, w, caches, &step, sc, lora)?;
    ops.mark("ids to host")?;
    let ids = ops.read_ids(&sc.ids, batch.rows())?;
    ops.mark("end")?;
    Ok(ids)
}

/// The part of a forward that runs on the device alone, from the uploaded batch to the greedy
/// ids in `scratch.ids`: no host copy and no wait, so it can be captured and replayed.
pub fn forward_on_device<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    sc: &mut Scratch<O>,
) -> R {
    forward_on_device_with(ops, s, w, caches, step, sc, None)
}

/// [`forward_on_device`] with the rows' adapters.
fn forward_on_device_with<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    sc: &mut Scratch<O>,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> R {
    let rows = logits_on_device(ops, s, w, caches, step, sc, lora)?;
    ops.mark("argmax")?;
    ops.argmax(&sc.logits, rows, s.vocab, &mut sc.ids)
}

/// Every layer (with the rows' adapters), then the output head on each of the step's rows into
/// `scratch.logits` (a decode step as a server replays it, `graphs`): nothing brought back.
/// Returns the number of rows.
pub(super) fn logits_on_device<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    sc: &mut Scratch<O>,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> Result<usize, CudaError> {
    let rows = layers_on_device(ops, s, w, caches, step, sc, lora, None)?;
    if rows > sc.logits_rows {
        return Err(CudaError::Shape(format!("logits of {rows} rows for {}", sc.logits_rows)));
    }
    ops.mark("lm_head gemm")?;
    ops.matmul_logits(&sc.h, &w.lm_head, &mut sc.logits, (rows, s.vocab, s.hidden))?;
    Ok(rows)
}

/// What a serving forward brings back to the host for its sampled rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want<'a> {
    /// Every logit, fp32: the host samples.
    Logits,
    /// The greedy id and its log-probability, picked on the device.
    Greedy,
    /// Each row sampled on the device as its entry asks (one per row).
    Sample(&'a [RowSampling], &'a Penalties),
}

/// Rows a serving forward returns: `[rows, vocab]` logits, `(id, logprob)` per row, or each
/// row's device pick.
#[derive(Debug, Clone, PartialEq)]
pub enum RowsOut {
    Logits(Vec<f32>),
    Greedy(Vec<(u32, f32)>),
    Sampled(Vec<RowSample>),
}

/// One forward over `batch` that returns, for the rows `logits_rows` (indices into the batch's
/// rows, in the order wanted), what `want` asks for: what a server samples from. The output
/// head runs on those rows only.
#[allow(clippy::too_many_arguments)]
pub fn forward_rows<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    batch: &StepBatch,
    sc: &mut Scratch<O>,
    logits_rows: &[u32],
    want: Want<'_>,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> Result<RowsOut, CudaError> {
    forward_rows_capturing(ops, s, w, inv_freq, caches, batch, sc, logits_rows, want, lora, None)
}

/// [`forward_rows`] that also hands the activations of its rows to `capture` (a training
/// sample's chunk among the batch's rows).
#[allow(clippy::too_many_arguments)]
pub fn forward_rows_capturing<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    caches: &mut [O::Cache],
    batch: &StepBatch,
    sc: &mut Scratch<O>,
    logits_rows: &[u32],
    want: Want<'_>,
    lora: Option<&LoraSet<O::LoraTable>>,
    capture: Option<&mut dyn Capture<O>>,
) -> Result<RowsOut, CudaError> {
    let rows = batch.rows();
    if let Some(&r) = logits_rows.iter().find(|&&r| r as usize >= rows) {
        return Err(CudaError::Shape(format!("logits of row {r} of a {rows}-row forward")));
    }
    // The gathered rows go through `o` (`rows` wide) on their way to the output head.
    if logits_rows.len() > sc.logits_rows.min(sc.rows) {
        return Err(CudaError::Shape(format!(
            "{} logits rows for scratch of {}",
            logits_rows.len(),
            sc.logits_rows
        )));
    }
    check_inv_freq(s, inv_freq)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    ops.mark("upload + embedding")?;
    let step = ops.upload(batch, &cos, &sin)?;
    layers_on_device(ops, s, w, caches, &step, sc, lora, capture)?;
    let n = logits_rows.len();
    if n > 0 {
        // A decode-only batch samples every row in order: no gather.
        let all = n == rows && logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        let x = if all {
            &sc.h
        } else {
            ops.gather_rows(&sc.h, rows, logits_rows, &mut sc.o, s.hidden)?;
            &sc.o
        };
        ops.matmul_logits(x, &w.lm_head, &mut sc.logits, (n, s.vocab, s.hidden))?;
    }
    rows_out(ops, s, sc, n, want)
}

/// What `want` asks for of the first `n` rows of `sc.logits`.
pub(super) fn rows_out<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    sc: &mut Scratch<O>,
    n: usize,
    want: Want<'_>,
) -> Result<RowsOut, CudaError> {
    Ok(match want {
        Want::Logits if n == 0 => RowsOut::Logits(Vec::new()),
        Want::Logits => RowsOut::Logits(ops.logits_to_host(&sc.logits, n * s.vocab)?),
        Want::Greedy if n == 0 => RowsOut::Greedy(Vec::new()),
        Want::Greedy => {
            ops.argmax(&sc.logits, n, s.vocab, &mut sc.ids)?;
            RowsOut::Greedy(ops.read_ids(&sc.ids, n)?)
        }
        Want::Sample(params, pen) if params.len() != n || (pen.any() && pen.rows() != n) => {
            return Err(CudaError::Shape(format!(
                "{} sampling rows, {} of penalties, for {n} rows",
                params.len(),
                pen.rows()
            )))
        }
        Want::Sample(params, pen) => {
            RowsOut::Sampled(ops.sample(&mut sc.logits, s.vocab, params, pen)?)
        }
    })
}

fn check_inv_freq(s: &DecoderShape, inv_freq: &[f32]) -> R {
    if inv_freq.len() != s.head_dim / 2 {
        return Err(CudaError::Shape(format!(
            "{} RoPE frequencies for head_dim {}",
            inv_freq.len(),
            s.head_dim
        )));
    }
    Ok(())
}

/// Every layer and the final norm: leaves each row's normalised last hidden state in
/// `scratch.h` and returns the number of rows. Rows with an adapter slot get its LoRA updates;
/// `capture` is handed the activations a training backward needs.
#[allow(clippy::too_many_arguments)]
fn layers_on_device<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    sc: &mut Scratch<O>,
    lora: Option<&LoraSet<O::LoraTable>>,
    mut capture: Option<&mut dyn Capture<O>>,
) -> Result<usize, CudaError> {
    let drop = capture.as_deref().and_then(|c| c.dropout());
    // The dropped copy of a LoRA input holds the widest input of a full scratch.
    let cap = s.hidden.max(s.q_dim()).max(s.inter) * sc.rows;
    let mut save = |ops: &mut O, p: SavePoint, l: usize, x: &O::Act| match capture.as_deref_mut() {
        Some(c) => c.save(ops, p, l, x),
        None => Ok(()),
    };
    ops.check_shape(s)?;
    let rows = ops.rows(step);
    if rows > sc.rows || caches.len() != w.layers.len() {
        return Err(CudaError::Shape(format!(
            "{rows} rows for scratch of {}, {} caches for {} layers",
            sc.rows,
            caches.len(),
            w.layers.len()
        )));
    }
    let (hid, qd) = (s.hidden, s.q_dim());
    ops.embedding(step, &w.embed, &mut sc.x, s)?;
    for (l, (lw, cache)) in w.layers.iter().zip(caches.iter_mut()).enumerate() {
        // The MLP output of the layer before joins the residual stream here.
        ops.mark("norms")?;
        if l == 0 {
            ops.rms_norm(&sc.x, &lw.attn_norm, &mut sc.h, rows, s)?;
        } else {
            ops.add_rms_norm(&mut sc.x, &sc.down, &lw.attn_norm, &mut sc.h, rows, s)?;
        }
        save(ops, SavePoint::AttnIn, l, &sc.x)?;
        ops.mark("qkv gemm")?;
        ops.matmul(&sc.h, &lw.qkv, 0, &mut sc.qkv, (rows, s.qkv_rows(), hid))?;
        for m in [TargetModule::QProj, TargetModule::KProj, TargetModule::VProj] {
            if let Some((t, d)) = lora.and_then(|set| set.table(s, l, m)) {
                ops.mark("lora")?;
                let dropped = &mut sc.dropped;
                let x = lora_input(ops, step, &sc.h, dropped, &drop, (l, m), (hid, cap))?;
                ops.lora(step, x, t, &mut sc.qkv, d)?;
            }
        }
        ops.mark("rope + kv write")?;
        ops.rope_kv_write(step, &sc.qkv, lw.qkv_bias.as_ref(), &mut sc.q, cache, s)?;
        save(ops, SavePoint::Q, l, &sc.q)?;
        ops.mark("attention")?;
        ops.attention(step, &sc.q, cache, &mut sc.attn, s)?;
        save(ops, SavePoint::Attn, l, &sc.attn)?;
        ops.mark("o gemm")?;
        ops.matmul(&sc.attn, &lw.o, 0, &mut sc.o, (rows, hid, qd))?;
        if let Some((t, d)) = lora.and_then(|set| set.table(s, l, TargetModule::OProj)) {
            ops.mark("lora")?;
            let (dropped, site) = (&mut sc.dropped, (l, TargetModule::OProj));
            let x = lora_input(ops, step, &sc.attn, dropped, &drop, site, (qd, cap))?;
            ops.lora(step, x, t, &mut sc.o, d)?;
        }
        ops.mark("norms")?;
        ops.add_rms_norm(&mut sc.x, &sc.o, &lw.mlp_norm, &mut sc.h, rows, s)?;
        save(ops, SavePoint::MlpIn, l, &sc.x)?;
        ops.mark("gate_up gemm")?;
        ops.matmul(&sc.h, &lw.gate_up, 0, &mut sc.gate_up, (rows, 2 * s.inter, hid))?;
        for m in [TargetModule::GateProj, TargetModule::UpProj] {
            if let Some((t, d)) = lora.and_then(|set| set.table(s, l, m)) {
                ops.mark("lora")?;
                let dropped = &mut sc.dropped;
                let x = lora_input(ops, step, &sc.h, dropped, &drop, (l, m), (hid, cap))?;
                ops.lora(step, x, t, &mut sc.gate_up, d)?;
            }
        }
        save(ops, SavePoint::GateUp, l, &sc.gate_up)?;
        ops.mark("silu_mul")?;
        ops.silu_mul(&sc.gate_up, &mut sc.act, rows, s.inter)?;
        ops.mark("down gemm")?;
        ops.matmul(&sc.act, &lw.down, 0, &mut sc.down, (rows, hid, s.inter))?;
        if let Some((t, d)) = lora.and_then(|set| set.table(s, l, TargetModule::DownProj)) {
            ops.mark("lora")?;
            let (dropped, site) = (&mut sc.dropped, (l, TargetModule::DownProj));
            let x = lora_input(ops, step, &sc.act, dropped, &drop, site, (s.inter, cap))?;
            ops.lora(step, x, t, &mut sc.down, d)?;
        }
    }
    ops.mark("norms")?;
    if w.layers.is_empty() {
        ops.rms_norm(&sc.x, &w.norm, &mut sc.h, rows, s)?;
    } else {
        ops.add_rms_norm(&mut sc.x, &sc.down, &w.norm, &mut sc.h, rows, s)?;
    }
    save(ops, SavePoint::Final, w.layers.len(), &sc.x)?;
    Ok(rows)
}

/// What projection `m`'s LoRA reads: `x`, or with a training sample's dropout, a copy of `x`
/// (`width` wide) in `dropped` with the sample's rows dropped (made on first use, `capacity`
/// values, enough for the widest input).
fn lora_input<'a, O: DecoderOps>(
    ops: &mut O,
    step: &O::Step,
    x: &'a O::Act,
    dropped: &'a mut Option<O::Act>,
    drop: &Option<(SampleDropout, Range<usize>)>,
    (layer, module): (usize, TargetModule),
    (width, capacity): (usize, usize),
) -> Result<&'a O::Act, CudaError> {
    let Some((dropout, rows)) = drop else { return Ok(x) };
    let out = match dropped {
        Some(buf) => buf,
        None => dropped.insert(ops.act(capacity)?),
    };
    let site = DropoutSite { dropout: *dropout, layer, module };
    ops.lora_dropout(step, x, out, rows.clone(), width, site)?;
    Ok(out)
}
