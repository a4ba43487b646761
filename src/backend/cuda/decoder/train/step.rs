//! One training sample's token-level life on a device, written once against [`TrainOps`]: its
//! forward in chunks (alone, or as rows of a serving forward), then its loss (`loss.rs`), then
//! its backward a few layers at a time (`backward.rs`), as the CPU engine's `TrainingSample`
//! does.
//!
//! Graph pruning as on the CPU (`model::activations`): per layer the forward keeps the two
//! RMSNorm inputs, the rotated queries, the attention output and the gate/up pre-activations;
//! keys and values stay in the sample's cache blocks; normalised inputs, SiLU, softmax, the
//! LoRA low-rank activations and LoRA dropout's masks are recomputed in the backward.

use std::ops::Range;

use super::{TrainAdapter, TrainOps, LOSS_ROWS};
use crate::backend::cuda::decoder::lora::LoraSet;
use crate::backend::cuda::decoder::{
    forward_rows_capturing, Capture, DecoderShape, DecoderWeights, SavePoint, Scratch, SeqRows,
    StepBatch, Want,
};
use crate::backend::cuda::CudaError;
use crate::lora::dropout::SampleDropout;

type R = Result<(), CudaError>;

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
pub(super) struct SavedLayer<O: TrainOps> {
    pub(super) h_in: O::Act,
    pub(super) h_mid: O::Act,
    pub(super) q: O::Act,
    pub(super) attn: O::Act,
    pub(super) gate_up: O::Act,
}

/// One sample in flight (up to `len` tokens) with the buffers of its forward and backward.
pub struct TrainScratch<O: TrainOps> {
    pub len: usize,
    /// The adapter's LoRA dropout probability (0: none).
    pub(super) dropout_p: f32,
    pub(super) sample: Option<TrainSample>,
    pub(super) forwarded: usize,
    /// Rows of the loss scored, once it has started.
    pub(super) loss_done: Option<usize>,
    /// Layers of backward left, once the loss has run.
    pub(super) backward: Option<usize>,
    pub(super) saved: Vec<SavedLayer<O>>,
    pub(super) h_final: O::Act,
    /// A forward of the sample's chunks alone (no logits).
    pub(super) fwd: Scratch<O>,
    pub(super) h: O::Act,
    pub(super) act: O::Act,
    pub(super) k: O::Act,
    pub(super) v: O::Act,
    pub(super) u: O::Logits,
    pub(super) dh: O::Logits,
    pub(super) dx: O::Logits,
    pub(super) d_act: O::Logits,
    pub(super) d_gu: O::Logits,
    pub(super) d_attn: O::Logits,
    pub(super) d_qkv: O::Logits,
    /// The gradient the next products read, in bf16 (`[len, widest output]`).
    pub(super) dy_bf16: O::Act,
    pub(super) logits: O::Logits,
    /// With dropout: a projection's dropped input and the gradient w.r.t. it, `[len, widest]`.
    pub(super) dropped: Option<(O::Act, O::Logits)>,
    /// The sample's rows made ready, for the backward's K/V gather and RoPE.
    pub(super) step: Option<O::Step>,
    /// The adapter's tables and the optimizer step they were made at.
    pub(super) tables: Option<(u64, LoraSet<O::LoraTable>)>,
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
            dy_bf16: ops.act(len * hid.max(2 * i).max(s.qkv_rows()))?,
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

    /// Whether the forward is complete and the loss has not ended.
    pub fn loss_pending(&self) -> bool {
        self.sample.as_ref().is_some_and(|x| self.forwarded == x.len()) && self.backward.is_none()
    }

    /// Rows of the loss left to score, those with a target, as on the CPU (0 until the forward
    /// is complete, and once the loss has ended).
    pub fn loss_remaining(&self) -> usize {
        match &self.sample {
            Some(x) if self.loss_pending() => {
                x.targets[self.loss_done.unwrap_or(0)..].iter().flatten().count()
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
    pub(super) fn dropout(&self) -> Option<SampleDropout> {
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
    let mut batch = StepBatch::new(vec![rows], s.block_size)?;
    batch.train = vec![true];
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
