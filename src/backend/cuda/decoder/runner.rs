//! The decoder as the engine runs it: weights, one KV cache per layer addressed by the engine's
//! block tables, and scratch grown to the largest forward seen.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::cuda::CudaOps;
use super::device_jobs::{DeviceJob, JoinedTables};
use super::graphs::DecodeGraphs;
use super::lora::LoraSet;
use super::train::{TrainOps, TrainSample};
use super::{
    forward_rows, DecoderShape, DecoderWeights, RowsOut, Scratch, SeqRows, StepBatch, Want,
};
use crate::backend::cuda::gpu::Gpu;
use crate::backend::cuda::{CudaError, DeviceSpec};
use crate::lora::optim::AdamW;
use crate::lora::{AdapterLease, LoraWeights};
use crate::model::llama::{ForwardBatch, Llama};
use crate::model::loss::LossStats;

/// Rows of a forward that run through a served adapter: one whole sequence's rows, as the
/// engine sends them.
pub struct AdapterRows<'a> {
    pub rows: Range<usize>,
    pub adapter: &'a AdapterLease,
}

/// A model that runs an iteration's forward on a device with a KV cache of its own, laid out in
/// the engine's blocks. What the engine needs of it, object-safe. Not `Send`: it is built on
/// the thread that uses it, as device handles belong to one thread.
pub trait DeviceModel {
    /// One iteration's forward: every row's K and V written to its slot, and for each of
    /// `batch.logits_rows`, its logits (`Want::Logits`, `[rows, vocab]`), its greedy id and
    /// log-probability (`Want::Greedy`) or its token sampled on the device (`Want::Sample`).
    /// The rows of `adapters` run through those adapters.
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError>;
    /// [`forward`](Self::forward) with up to `max_tokens` more tokens of fine-tuning job
    /// `key`'s sample as extra rows of the same forward (so the weights are read once for
    /// both), when the model can: returns what `forward` returns and how many of the sample's
    /// tokens it forwarded (0: none, the job forwards in [`train_forward`](Self::train_forward)).
    fn forward_coserved(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
        train: Option<(u64, usize)>,
    ) -> Result<(RowsOut, usize), CudaError> {
        let _ = train;
        Ok((self.forward(batch, adapters, want)?, 0))
    }
    /// Whether the engine's host sampler picks from this model's logits (always asked for
    /// whole, `Want::Logits`), rather than the device's sampling.
    fn samples_on_host(&self) -> bool {
        false
    }
    /// Whether the device still works after a failed forward (a fault that poisons the
    /// context, such as an illegal address, fails every later call too).
    fn check(&mut self) -> Result<(), CudaError>;

    // Fine-tuning jobs on the device, each keyed by the engine (see `device_jobs`): the
    // adapter, its gradients and AdamW state stay on the device, one sample in flight per job.
    // A device model that cannot train says so.

    /// Whether the methods below work.
    fn trains(&self) -> bool {
        false
    }
    /// Puts a job's adapter and optimizer state on the device.
    fn train_open(&mut self, key: u64, adapter: &LoraWeights, optimizer: &AdamW) -> R {
        let _ = (key, adapter, optimizer);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// Starts a sample (its K and V go to the blocks of its table).
    fn train_begin(&mut self, key: u64, sample: TrainSample) -> R {
        let _ = (key, sample);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// Forwards up to `max_tokens` more tokens of the sample; returns how many.
    fn train_forward(&mut self, key: u64, max_tokens: usize) -> Result<usize, CudaError> {
        let _ = (key, max_tokens);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// After the last chunk: up to `max_rows` more rows of the sample's loss, its gradient
    /// scaled by `grad_scale` (the same for every call of a sample); returns the rows scored
    /// and their stats. The backward can start once every row has.
    fn train_loss(
        &mut self,
        key: u64,
        grad_scale: f32,
        max_rows: usize,
    ) -> Result<(usize, LossStats), CudaError> {
        let _ = (key, grad_scale, max_rows);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// Runs up to `max_layers` layers of the sample's backward; returns how many.
    fn train_backward(&mut self, key: u64, max_layers: usize) -> Result<usize, CudaError> {
        let _ = (key, max_layers);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// Clips the summed gradients to `max_norm`, takes an AdamW step at `lr`, zeroes the
    /// gradients; returns the norm before clipping.
    fn train_step(&mut self, key: u64, lr: f32, max_norm: f32) -> Result<f64, CudaError> {
        let _ = (key, lr, max_norm);
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// The job's adapter and optimizer state on the host.
    fn train_state(&mut self, key: u64) -> Result<(LoraWeights, AdamW), CudaError> {
        let _ = key;
        Err(CudaError::Shape("this device model does not train".into()))
    }
    /// Frees the job's state on the device.
    fn train_close(&mut self, key: u64) {
        let _ = key;
    }
}

type R = Result<(), CudaError>;

/// Rows one forward may have: the attention launch's grid.y.
pub const MAX_ROWS: usize = 65_535;
/// Adapters kept on the device beyond those a forward needs (still served, just not in it).
const MAX_RESIDENT: usize = 16;

pub struct DeviceDecoder<O: TrainOps> {
    pub(super) ops: O,
    pub(super) shape: DecoderShape,
    pub(super) weights: DecoderWeights<O::Weight>,
    pub(super) inv_freq: Vec<f32>,
    pub(super) caches: Vec<O::Cache>,
    pub(super) scratch: Option<Scratch<O>>,
    pub(super) num_blocks: usize,
    /// Adapters on the device in slot order, and their tables.
    pub(super) resident: Vec<AdapterLease>,
    pub(super) lora: Option<LoraSet<O::LoraTable>>,
    /// The tables of `resident` and of a job's adapter after them, for forwards with rows of
    /// both (they point into both, so they go whenever either does).
    pub(super) joined: Option<JoinedTables<O::LoraTable>>,
    /// Fine-tuning jobs' state on the device, by the engine's key.
    pub(super) jobs: HashMap<u64, DeviceJob<O>>,
    /// Decode steps recorded for replay, when on (`replay_decodes`).
    pub(super) graphs: Option<DecodeGraphs<O>>,
}

impl<O: TrainOps> DeviceDecoder<O> {
    /// Allocates a cache of `num_blocks` blocks per layer (and one more, the padding rows' of
    /// replayed decode steps) and scratch for forwards of up to `max_rows` rows, so that a
    /// device too small fails here rather than on some later batch.
    pub fn new(
        mut ops: O,
        shape: DecoderShape,
        weights: DecoderWeights<O::Weight>,
        inv_freq: Vec<f32>,
        num_blocks: usize,
        max_rows: usize,
    ) -> Result<Self, CudaError> {
        ops.check_shape(&shape)?;
        if inv_freq.len() != shape.head_dim / 2 || weights.layers.len() != shape.layers {
            return Err(CudaError::Shape(format!(
                "{} RoPE frequencies and {} layers for head_dim {} and {} layers",
                inv_freq.len(),
                weights.layers.len(),
                shape.head_dim,
                shape.layers
            )));
        }
        if max_rows == 0 || max_rows > MAX_ROWS {
            return Err(CudaError::Shape(format!(
                "forwards of {max_rows} rows (the device takes 1 to {MAX_ROWS}: lower \
                 --max-num-batched-tokens)"
            )));
        }
        let caches = (0..shape.layers)
            .map(|_| ops.cache(&shape, num_blocks + 1))
            .collect::<Result<_, _>>()?;
        let scratch = Some(Scratch::new(&mut ops, &shape, max_rows)?);
        Ok(Self {
            ops,
            shape,
            weights,
            inv_freq,
            caches,
            scratch,
            num_blocks,
            resident: Vec::new(),
            jobs: HashMap::new(),
            lora: None,
            joined: None,
            graphs: None,
        })
    }

    /// One forward over `seqs`, returning the logits of `logits_rows` (rows of the flattened
    /// batch, sequences in order).
    pub fn forward_rows(
        &mut self,
        seqs: Vec<SeqRows>,
        logits_rows: &[u32],
    ) -> Result<Vec<f32>, CudaError> {
        match self.forward_seqs(seqs, logits_rows, Want::Logits)? {
            RowsOut::Logits(l) => Ok(l),
            RowsOut::Greedy(_) | RowsOut::Sampled(_) => {
                Err(CudaError::Shape("sampled rows where logits were asked".into()))
            }
        }
    }

    /// `seqs` as one forward's batch, checked against the cache, with the scratch grown to its
    /// rows if needed.
    pub(super) fn batch_of(&mut self, seqs: Vec<SeqRows>) -> Result<StepBatch, CudaError> {
        let batch = StepBatch::new(seqs, self.shape.block_size)?;
        if batch.blocks_needed > self.num_blocks {
            return Err(CudaError::Shape(format!(
                "the batch reaches block {} of a {}-block cache",
                batch.blocks_needed - 1,
                self.num_blocks
            )));
        }
        let rows = batch.rows();
        if self.scratch.as_ref().is_none_or(|sc| sc.rows < rows) {
            // More rows than the engine's budget (a caller of its own): grow, old buffers first,
            // and the recorded steps that point into them before.
            if let Some(g) = &mut self.graphs {
                g.clear();
            }
            self.scratch = None;
            self.scratch = Some(Scratch::new(&mut self.ops, &self.shape, rows.min(MAX_ROWS))?);
        }
        Ok(batch)
    }

    /// One forward over `seqs`, returning what `want` asks for of `logits_rows`.
    pub fn forward_seqs(
        &mut self,
        seqs: Vec<SeqRows>,
        logits_rows: &[u32],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        let batch = self.batch_of(seqs)?;
        let Some(sc) = self.scratch.as_mut() else {
            return Err(CudaError::Shape("no scratch".into()));
        };
        let (s, w) = (&self.shape, &self.weights);
        let (f, c) = (&self.inv_freq, &mut self.caches);
        let lora = self.lora.as_ref();
        forward_rows(&mut self.ops, s, w, f, c, &batch, sc, logits_rows, want, lora)
    }

    /// The engine's batch as the decoder's sequences (see [`step_rows`]), each with its
    /// adapter's slot, placing the adapters on the device as needed.
    fn rows_with_adapters(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
    ) -> Result<(Vec<SeqRows>, Vec<u32>), CudaError> {
        let (mut seqs, logits_rows) = step_rows(batch)?;
        if adapters.is_empty() {
            return Ok((seqs, logits_rows));
        }
        let leases: Vec<&AdapterLease> = adapters.iter().map(|a| a.adapter).collect();
        let slots = self.place_adapters(&leases)?;
        for (a, slot) in adapters.iter().zip(slots) {
            let i = batch.seqs.iter().position(|s| (s.q_start..s.q_start + s.q_len) == a.rows);
            let Some(i) = i else {
                return Err(CudaError::Shape(format!(
                    "adapter rows {:?} are no sequence's",
                    a.rows
                )));
            };
            seqs[i].adapter = Some(slot);
        }
        Ok((seqs, logits_rows))
    }

    /// The slot of each of `needed` (distinct adapters), uploading them when one is not on
    /// the device yet. Adapters no one else holds any more (deleted, and no request left on
    /// them) are dropped then.
    pub fn place_adapters(&mut self, needed: &[&AdapterLease]) -> Result<Vec<u32>, CudaError> {
        let here =
            |set: &[AdapterLease], a: &AdapterLease| set.iter().position(|r| Arc::ptr_eq(r, a));
        if needed.iter().any(|a| here(&self.resident, a).is_none()) {
            let mut next: Vec<AdapterLease> = Vec::new();
            for a in needed {
                if here(&next, a).is_none() {
                    next.push(Arc::clone(a));
                }
            }
            for r in &self.resident {
                if next.len() < MAX_RESIDENT && Arc::strong_count(r) > 1 && here(&next, r).is_none()
                {
                    next.push(Arc::clone(r));
                }
            }
            // The old tables go first, and the joined ones and recorded steps that point into
            // them before.
            if let Some(g) = &mut self.graphs {
                g.clear();
            }
            self.joined = None;
            self.lora = None;
            self.resident = Vec::new();
            let weights: Vec<_> = next.iter().map(|a| &a.weights).collect();
            self.lora = Some(LoraSet::new(&mut self.ops, &self.shape, &weights)?);
            self.resident = next;
        }
        needed
            .iter()
            .map(|a| {
                let slot = here(&self.resident, a)
                    .ok_or_else(|| CudaError::Shape("an adapter not placed".into()))?;
                u32::try_from(slot).map_err(|_| CudaError::Shape("an adapter slot".into()))
            })
            .collect()
    }
}

/// `model` on CUDA device `ordinal`: its weights rounded to bf16 and uploaded one tensor at a
/// time, a cache of `num_blocks` blocks of `block_size` tokens per layer and scratch for
/// `max_rows` rows. Kernels compile into `home`'s cache.
pub fn open_cuda(
    ordinal: usize,
    home: &Path,
    model: &Llama,
    block_size: usize,
    num_blocks: usize,
    max_rows: usize,
) -> Result<DeviceDecoder<CudaOps>, CudaError> {
    let ops = CudaOps::new(Gpu::open(DeviceSpec::Cuda(ordinal), home, "serve")?)?;
    let (shape, weights) = super::from_model::convert(model, block_size, |t| ops.gpu.up_bf16(&t))?;
    let inv_freq = model.inv_freq().to_vec();
    DeviceDecoder::new(ops, shape, weights, inv_freq, num_blocks, max_rows)
}

impl<O: TrainOps> DeviceModel for DeviceDecoder<O> {
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        let (seqs, logits_rows) = self.rows_with_adapters(batch, adapters)?;
        if let Some(out) = self.forward_replayed(&seqs, &logits_rows, want)? {
            return Ok(out);
        }
        self.forward_seqs(seqs, &logits_rows, want)
    }

    fn forward_coserved(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
        train: Option<(u64, usize)>,
    ) -> Result<(RowsOut, usize), CudaError> {
        match train.filter(|&(_, n)| n > 0) {
            Some((key, max_tokens)) => {
                let (seqs, logits_rows) = self.rows_with_adapters(batch, adapters)?;
                self.job_forward_with(seqs, &logits_rows, want, key, max_tokens)
            }
            None => Ok((self.forward(batch, adapters, want)?, 0)),
        }
    }

    fn samples_on_host(&self) -> bool {
        self.ops.samples_on_host()
    }

    fn check(&mut self) -> Result<(), CudaError> {
        self.ops.sync()
    }

    fn trains(&self) -> bool {
        true
    }

    fn train_open(&mut self, key: u64, adapter: &LoraWeights, optimizer: &AdamW) -> R {
        self.job_open(key, adapter, optimizer)
    }

    fn train_begin(&mut self, key: u64, sample: TrainSample) -> R {
        self.job_begin(key, sample)
    }

    fn train_forward(&mut self, key: u64, max_tokens: usize) -> Result<usize, CudaError> {
        self.job_forward(key, max_tokens)
    }

    fn train_loss(
        &mut self,
        key: u64,
        grad_scale: f32,
        max_rows: usize,
    ) -> Result<(usize, LossStats), CudaError> {
        self.job_loss(key, grad_scale, max_rows)
    }

    fn train_backward(&mut self, key: u64, max_layers: usize) -> Result<usize, CudaError> {
        self.job_backward(key, max_layers)
    }

    fn train_step(&mut self, key: u64, lr: f32, max_norm: f32) -> Result<f64, CudaError> {
        self.job_step(key, lr, max_norm)
    }

    fn train_state(&mut self, key: u64) -> Result<(LoraWeights, AdamW), CudaError> {
        self.job_state(key)
    }

    fn train_close(&mut self, key: u64) {
        self.job_close(key);
    }
}

/// The engine's flattened batch as the decoder's sequences, with its logits rows renumbered to
/// the decoder's row order (sequences one after another, in the order of `batch.seqs`).
fn step_rows(batch: &ForwardBatch<'_>) -> Result<(Vec<SeqRows>, Vec<u32>), CudaError> {
    let mut row_map = vec![u32::MAX; batch.tokens.len()];
    let mut seqs = Vec::with_capacity(batch.seqs.len());
    let mut next = 0u32;
    for s in batch.seqs {
        let tokens = batch.tokens.get(s.q_start..s.q_start + s.q_len).ok_or_else(|| {
            CudaError::Shape(format!(
                "rows {}..+{} of a {}-row batch",
                s.q_start,
                s.q_len,
                batch.tokens.len()
            ))
        })?;
        let start = s.context_len.checked_sub(s.q_len).ok_or_else(|| {
            CudaError::Shape(format!("{} rows in a context of {}", s.q_len, s.context_len))
        })?;
        for slot in &mut row_map[s.q_start..s.q_start + s.q_len] {
            *slot = next;
            next += 1;
        }
        seqs.push(SeqRows {
            tokens: tokens.to_vec(),
            start,
            block_table: s.block_table.to_vec(),
            adapter: None,
        });
    }
    let logits_rows = batch
        .logits_rows
        .iter()
        .map(|&r| match row_map.get(r) {
            Some(&m) if m != u32::MAX => Ok(m),
            _ => Err(CudaError::Shape(format!("logits of row {r}, which no sequence owns"))),
        })
        .collect::<Result<_, _>>()?;
    Ok((seqs, logits_rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::paged_attention::AttnSeq;

    #[test]
    fn engine_rows_map_to_decoder_rows() {
        let (t0, t1) = ([7u32, 8], [3u32, 4]);
        // The second sequence's rows come first in the engine's batch.
        let tables = [vec![5u32], vec![1u32, 2]];
        let seqs = [
            AttnSeq { q_start: 2, q_len: 2, context_len: 2, block_table: &tables[0] },
            AttnSeq { q_start: 0, q_len: 2, context_len: 20, block_table: &tables[1] },
        ];
        let tokens = [t1[0], t1[1], t0[0], t0[1]];
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &[18, 19, 0, 1],
            slot_mapping: &[],
            seqs: &seqs,
            logits_rows: &[1, 3],
        };
        let (rows, logits) = step_rows(&batch).unwrap();
        assert_eq!(rows[0].tokens, t0);
        assert_eq!((rows[1].tokens.as_slice(), rows[1].start), (&t1[..], 18));
        assert_eq!(logits, [3, 1]);
        let bad = ForwardBatch { logits_rows: &[4], ..batch };
        assert!(step_rows(&bad).is_err());
    }
}
