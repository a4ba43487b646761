//! One training sample's life in the engine: forwarded in chunks appended to iterations (over
//! its own KV blocks, saving pruned activations), then its loss a few rows per iteration, then
//! its backward a few layers per iteration, top-down. Its blocks free when the sample is
//! dropped.

use std::ops::Range;

use crate::backend::cpu::paged_attention::AttnSeq;
use crate::kv::{BlockAllocator, BlockTable, KvCache, OutOfBlocks};
use crate::lora::LoraWeights;
use crate::model::activations::{Capture, SavedActivations};
use crate::model::backward::{backward_layer, BackwardScratch, BackwardWeights, LayerBackward};
use crate::model::llama::{ForwardBatch, Llama};
use crate::model::lora_apply::{LoraSlice, TrainRows};
use crate::model::loss::{LossRun, LossStats};

pub struct TrainingSample {
    pub tokens: Vec<u32>,
    /// `trained[i]`: token `i` is a loss target.
    pub trained: Vec<bool>,
    blocks: BlockTable,
    slots: Vec<usize>,
    acts: SavedActivations,
    /// Tokens forwarded so far.
    forwarded: usize,
    dropout_seed: u64,
    /// Validation: no dropout, loss only.
    eval: bool,
    /// Started once the forward is complete; its gradient goes to `dh` until it ends.
    loss: Option<(LossRun, Vec<f32>)>,
    loss_ended: bool,
    backward: Option<Backward>,
}

struct Backward {
    /// Layers still to run; the next one is `remaining - 1`.
    remaining: usize,
    /// Gradient w.r.t. the residual stream above layer `remaining - 1`, `[T, hidden]`.
    dh: Vec<f32>,
    scratch: BackwardScratch,
}

impl TrainingSample {
    /// Takes KV blocks for the whole sample up front, so its forward never waits for blocks.
    pub fn new(
        tokens: Vec<u32>,
        trained: Vec<bool>,
        allocator: &BlockAllocator,
        model: &Llama,
        adapter: &LoraWeights,
        dropout_seed: u64,
    ) -> Result<Self, OutOfBlocks> {
        Self::reusing(tokens, trained, allocator, model, adapter, dropout_seed, None)
    }

    /// As [`TrainingSample::new`], saving activations into `spare`'s buffers (a finished
    /// sample's, from [`TrainingSample::into_activations`]).
    pub fn reusing(
        tokens: Vec<u32>,
        trained: Vec<bool>,
        allocator: &BlockAllocator,
        model: &Llama,
        adapter: &LoraWeights,
        dropout_seed: u64,
        spare: Option<SavedActivations>,
    ) -> Result<Self, OutOfBlocks> {
        let mut blocks = BlockTable::new(allocator.clone());
        blocks.reserve(tokens.len())?;
        let slots = (0..tokens.len()).map(|p| blocks.slot(p)).collect();
        let acts = SavedActivations::reuse(spare, &model.config, adapter, tokens.len());
        Ok(Self {
            tokens,
            trained,
            blocks,
            slots,
            acts,
            forwarded: 0,
            dropout_seed,
            eval: false,
            loss: None,
            loss_ended: false,
            backward: None,
        })
    }

    /// A sample forwarded only for its loss (validation): no dropout.
    pub fn for_eval(mut self) -> Self {
        self.eval = true;
        self
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn forward_remaining(&self) -> usize {
        self.len() - self.forwarded
    }

    pub fn forwarded(&self) -> usize {
        self.forwarded
    }

    /// Rows of the loss still to run: 0 until the forward is complete and once the loss
    /// has ended.
    pub fn loss_remaining(&self) -> usize {
        if self.forward_remaining() > 0 || self.loss_ended {
            return 0;
        }
        match &self.loss {
            Some((run, _)) => run.remaining(),
            None => self.targets().iter().flatten().count(),
        }
    }

    /// Layers of backward still to run (0 before the forward ends and after the backward).
    pub fn backward_remaining(&self) -> usize {
        self.backward.as_ref().map_or(0, |b| b.remaining)
    }

    pub fn is_done(&self) -> bool {
        self.forward_remaining() == 0 && self.backward.as_ref().is_some_and(|b| b.remaining == 0)
    }

    /// Ends the sample (its KV blocks free), keeping its activation buffers for the next.
    pub fn into_activations(self) -> SavedActivations {
        self.acts
    }

    pub fn activation_bytes(&self) -> usize {
        self.acts.bytes()
    }

    /// Appends the next `n` tokens of the sample to an iteration's inputs.
    pub fn push_chunk(&self, n: usize, inputs: &mut ChunkInputs) -> Range<usize> {
        let r0 = inputs.tokens.len();
        for p in self.forwarded..self.forwarded + n {
            inputs.tokens.push(self.tokens[p]);
            inputs.positions.push(p);
            inputs.slots.push(self.slots[p]);
        }
        r0..r0 + n
    }

    pub fn attn_seq(&self, rows: &Range<usize>) -> AttnSeq<'_> {
        AttnSeq {
            q_start: rows.start,
            q_len: rows.len(),
            context_len: self.forwarded + rows.len(),
            block_table: self.blocks.block_ids(),
        }
    }

    pub fn lora_slice<'a>(&self, rows: &Range<usize>, adapter: &'a LoraWeights) -> LoraSlice<'a> {
        LoraSlice {
            rows: rows.clone(),
            adapter,
            train: (!self.eval).then_some(TrainRows {
                dropout_seed: self.dropout_seed,
                first_pos: self.forwarded,
            }),
        }
    }

    pub fn capture(&mut self, rows: &Range<usize>) -> Capture<'_> {
        Capture {
            rows: rows.clone(),
            first_pos: self.forwarded,
            acts: &mut self.acts,
            slots: &self.slots,
        }
    }

    /// Records that a chunk of `n` tokens ran.
    pub fn advance(&mut self, n: usize) {
        self.forwarded = (self.forwarded + n).min(self.len());
    }

    fn targets(&self) -> Vec<Option<u32>> {
        (0..self.len())
            .map(|i| {
                let next = i + 1;
                (next < self.len() && self.trained[next]).then(|| self.tokens[next])
            })
            .collect()
    }

    /// Runs up to `max_rows` more rows of the loss once the forward is complete (starting it
    /// if need be; with `max_rows` 0 that only starts it). In training, `grad_scale` weights
    /// this sample's loss in the optimizer step and the loss's gradient starts the backward;
    /// an evaluation sample's loss has none. Returns the rows run and, when this call ended
    /// the loss, the sample's loss.
    pub fn run_loss(
        &mut self,
        model: &Llama,
        bw: &BackwardWeights,
        grad_scale: f32,
        max_rows: usize,
    ) -> (usize, Option<LossStats>) {
        if self.forward_remaining() > 0 || self.loss_ended {
            return (0, None);
        }
        let grad = (!self.eval).then_some(grad_scale);
        if self.loss.is_none() {
            let n = if grad.is_some() { self.len() * model.config.hidden_size } else { 0 };
            self.loss = Some((LossRun::new(&self.targets(), grad), vec![0f32; n]));
        }
        let Some((run, dh)) = self.loss.as_mut() else { return (0, None) };
        let dh = grad.map(|_| dh.as_mut_slice());
        let ran = run.run(model, Some(bw), &self.acts.h_final, dh, max_rows);
        if run.remaining() > 0 {
            return (ran, None);
        }
        let stats = run.stats();
        self.loss_ended = true;
        if let Some((_, dh)) = self.loss.take() {
            if !self.eval {
                self.backward = Some(Backward {
                    remaining: model.layers.len(),
                    dh,
                    scratch: BackwardScratch::default(),
                });
            }
        }
        (ran, Some(stats))
    }

    /// The whole loss at once after the last chunk (see [`TrainingSample::run_loss`]).
    pub fn finish_forward(
        &mut self,
        model: &Llama,
        bw: &BackwardWeights,
        grad_scale: f32,
    ) -> LossStats {
        self.run_loss(model, bw, grad_scale, usize::MAX).1.unwrap_or_default()
    }

    /// Runs up to `max_layers` layers of the backward; returns how many ran.
    pub fn backward_layers(
        &mut self,
        model: &Llama,
        bw: &BackwardWeights,
        kv: &KvCache,
        adapter: &LoraWeights,
        grads: &mut LoraWeights,
        max_layers: usize,
    ) -> usize {
        let Some(b) = self.backward.as_mut() else { return 0 };
        let n = max_layers.min(b.remaining);
        for _ in 0..n {
            let li = b.remaining - 1;
            let lb = LayerBackward {
                acts: &self.acts,
                adapter,
                kv,
                slots: &self.slots,
                dropout_seed: self.dropout_seed,
            };
            backward_layer(model, bw, li, &lb, grads, &mut b.dh, &mut b.scratch);
            b.remaining -= 1;
        }
        n
    }
}

/// The flattened token inputs of one iteration.
#[derive(Debug, Default)]
pub struct ChunkInputs {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub slots: Vec<usize>,
}

/// Forwards the next `n` tokens of `sample` in an iteration of its own (no inference rows),
/// its frozen products in `bw`'s precision.
pub fn forward_chunk_alone(
    model: &Llama,
    bw: &BackwardWeights,
    kv: &mut KvCache,
    adapter: &LoraWeights,
    sample: &mut TrainingSample,
    n: usize,
) {
    let n = n.min(sample.forward_remaining());
    if n == 0 {
        return;
    }
    let mut inputs = ChunkInputs::default();
    let rows = sample.push_chunk(n, &mut inputs);
    let seqs = [sample.attn_seq(&rows)];
    let lora = [sample.lora_slice(&rows, adapter)];
    let block_ids = seqs[0].block_table.to_vec();
    let seqs = [AttnSeq { block_table: &block_ids, ..seqs[0] }];
    let batch = ForwardBatch {
        tokens: &inputs.tokens,
        positions: &inputs.positions,
        slot_mapping: &inputs.slots,
        seqs: &seqs,
        logits_rows: &[],
    };
    let mut caps = [sample.capture(&rows)];
    model.forward_with(&batch, kv, &lora, &mut caps, Some(bw));
    sample.advance(n);
}
