//! The Llama forward written once against [`DecoderOps`]: the layers, then the output head on
//! every row (the benchmark's and the selftest's greedy ids) or on the rows a server samples.

use super::lora::LoraSet;
use super::{rope_tables, DecoderOps, DecoderShape, DecoderWeights, StepBatch};
use crate::backend::cuda::CudaError;
use crate::lora::TargetModule;

type R = Result<(), CudaError>;

/// Activation buffers of a forward of up to `rows` rows.
pub struct Scratch<O: DecoderOps> {
    pub rows: usize,
    x: O::Act,
    h: O::Act,
    qkv: O::Act,
    q: O::Act,
    attn: O::Act,
    o: O::Act,
    gate_up: O::Act,
    act: O::Act,
    down: O::Act,
    pub logits: O::Logits,
    pub ids: O::Ids,
}

impl<O: DecoderOps> Scratch<O> {
    pub fn new(ops: &mut O, s: &DecoderShape, rows: usize) -> Result<Self, CudaError> {
        Ok(Self {
            rows,
            x: ops.act(rows * s.hidden)?,
            h: ops.act(rows * s.hidden)?,
            qkv: ops.act(rows * s.qkv_rows())?,
            q: ops.act(rows * s.q_dim())?,
            attn: ops.act(rows * s.q_dim())?,
            o: ops.act(rows * s.hidden)?,
            gate_up: ops.act(rows * 2 * s.inter)?,
            act: ops.act(rows * s.inter)?,
            down: ops.act(rows * s.hidden)?,
            logits: ops.logits(rows * s.vocab)?,
            ids: ops.ids(rows)?,
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
    let rows = layers_on_device(ops, s, w, caches, step, sc, lora)?;
    ops.mark("lm_head gemm")?;
    ops.matmul_logits(&sc.h, &w.lm_head, &mut sc.logits, (rows, s.vocab, s.hidden))?;
    ops.mark("argmax")?;
    ops.argmax(&sc.logits, rows, s.vocab, &mut sc.ids)
}

/// What a serving forward brings back to the host for its sampled rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Every logit, fp32: the host samples.
    Logits,
    /// The greedy id and its log-probability, picked on the device.
    Greedy,
}

/// Rows a serving forward returns: `[rows, vocab]` logits, or `(id, logprob)` per row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowsOut {
    Logits(Vec<f32>),
    Greedy(Vec<(u32, f32)>),
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
    want: Want,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> Result<RowsOut, CudaError> {
    let rows = batch.rows();
    if let Some(&r) = logits_rows.iter().find(|&&r| r as usize >= rows) {
        return Err(CudaError::Shape(format!("logits of row {r} of a {rows}-row forward")));
    }
    if logits_rows.len() > sc.rows {
        return Err(CudaError::Shape(format!(
            "{} logits rows for scratch of {}",
            logits_rows.len(),
            sc.rows
        )));
    }
    check_inv_freq(s, inv_freq)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    let step = ops.upload(batch, &cos, &sin)?;
    layers_on_device(ops, s, w, caches, &step, sc, lora)?;
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
    Ok(match want {
        Want::Logits if n == 0 => RowsOut::Logits(Vec::new()),
        Want::Logits => RowsOut::Logits(ops.logits_to_host(&sc.logits, n * s.vocab)?),
        Want::Greedy if n == 0 => RowsOut::Greedy(Vec::new()),
        Want::Greedy => {
            ops.argmax(&sc.logits, n, s.vocab, &mut sc.ids)?;
            RowsOut::Greedy(ops.read_ids(&sc.ids, n)?)
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
/// `scratch.h` and returns the number of rows. Rows with an adapter slot get its LoRA updates.
fn layers_on_device<O: DecoderOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    caches: &mut [O::Cache],
    step: &O::Step,
    sc: &mut Scratch<O>,
    lora: Option<&LoraSet<O::LoraTable>>,
) -> Result<usize, CudaError> {
    s.check()?;
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
        ops.mark("qkv gemm")?;
        ops.matmul(&sc.h, &lw.qkv, 0, &mut sc.qkv, (rows, s.qkv_rows(), hid))?;
        for m in [TargetModule::QProj, TargetModule::KProj, TargetModule::VProj] {
            if let Some((t, d)) = lora.and_then(|set| set.table(s, l, m)) {
                ops.lora(step, &sc.h, t, &mut sc.qkv, d)?;
            }
        }
        ops.mark("rope + kv write")?;
        ops.rope_kv_write(step, &sc.qkv, lw.qkv_bias.as_ref(), &mut sc.q, cache, s)?;
        ops.mark("attention")?;
        ops.attention(step, &sc.q, cache, &mut sc.attn, s)?;
        ops.mark("o gemm")?;
        ops.matmul(&sc.attn, &lw.o, 0, &mut sc.o, (rows, hid, qd))?;
        if let Some((t, d)) = lora.and_then(|set| set.table(s, l, TargetModule::OProj)) {
            ops.lora(step, &sc.attn, t, &mut sc.o, d)?;
        }
        ops.mark("norms")?;
        ops.add_rms_norm(&mut sc.x, &sc.o, &lw.mlp_norm, &mut sc.h, rows, s)?;
        ops.mark("gate_up gemm")?;
        ops.matmul(&sc.h, &lw.gate_up, 0, &mut sc.gate_up, (rows, 2 * s.inter, hid))?;
        for m in [TargetModule::GateProj, TargetModule::UpProj] {
            if let Some((t, d)) = lora.and_then(|set| set.table(s, l, m)) {
                ops.lora(step, &sc.h, t, &mut sc.gate_up, d)?;
            }
        }
        ops.mark("silu_mul")?;
        ops.silu_mul(&sc.gate_up, &mut sc.act, rows, s.inter)?;
        ops.mark("down gemm")?;
        ops.matmul(&sc.act, &lw.down, 0, &mut sc.down, (rows, hid, s.inter))?;
        if let Some((t, d)) = lora.and_then(|set| set.table(s, l, TargetModule::DownProj)) {
            ops.lora(step, &sc.act, t, &mut sc.down, d)?;
        }
    }
    ops.mark("norms")?;
    if w.layers.is_empty() {
        ops.rms_norm(&sc.x, &w.norm, &mut sc.h, rows, s)?;
    } else {
        ops.add_rms_norm(&mut sc.x, &sc.down, &w.norm, &mut sc.h, rows, s)?;
    }
    Ok(rows)
}
