//! Decode steps replayed as CUDA graphs. A step of decodes alone (one row a sequence, every row
//! sampled) is padded to a bucket of rows and a bucket of context. The first step
//! of a bucket runs as usual and is then recorded; each later one copies its batch into the
//! recorded step's buffers and replays the graph: one launch for the whole forward instead of
//! some ten a layer, each with its host-side cost and the gap it leaves on the GPU.
//!
//! The padding rows decode token 0 at position 0 in a block of their own past the engine's
//! (`DeviceDecoder` keeps one more), so they touch no sequence's cache. Attention cuts keys by
//! the rows and context rounded up (`cuda::partitions`), so padding changes no row's sums; on a
//! GPU the products may pick other cuBLASLt algorithms for the padded row count, as they may
//! for any change of batch size.

use super::forward::{logits_on_device, rows_out};
use super::runner::DeviceDecoder;
use super::train::TrainOps;
use super::{rope_tables, DecoderOps, RowsOut, SeqRows, StepBatch, Want};
use crate::backend::cuda::CudaError;

/// Steps of more rows run as they come: their launches weigh little against their work.
pub const MAX_GRAPH_ROWS: usize = 256;
/// Recorded steps kept; the one used longest ago goes first.
const MAX_GRAPHS: usize = 48;

/// Rows a step of `rows` decodes is padded to: 1, 2, 4, 8, then multiples of 8 (never past
/// the next power of two, which `cuda::partitions` relies on).
pub fn row_bucket(rows: usize) -> usize {
    if rows <= 8 {
        rows.max(1).next_power_of_two()
    } else {
        rows.div_ceil(8) * 8
    }
}

/// Context a step whose longest row attends to `context` keys is recorded for.
pub fn context_bucket(context: usize) -> usize {
    context.max(1).next_power_of_two()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    rows: usize,
    context: usize,
    /// Whether rows run through the resident adapters' tables (recorded with their launches).
    adapters: bool,
}

struct Recorded<O: DecoderOps> {
    key: Key,
    graph: O::Graph,
    step: O::Step,
    used: u64,
}

/// The recorded decode steps of a [`DeviceDecoder`].
pub struct DecodeGraphs<O: DecoderOps> {
    /// The padding rows' block (one past the engine's).
    pad_block: u32,
    recorded: Vec<Recorded<O>>,
    /// `DecoderOps::epoch` when the steps above were recorded.
    epoch: u64,
    clock: u64,
    /// Steps replayed, and steps recorded, so far.
    pub replays: u64,
    pub recordings: u64,
}

impl<O: DecoderOps> DecodeGraphs<O> {
    pub fn new(pad_block: u32) -> Self {
        Self { pad_block, recorded: Vec::new(), epoch: 0, clock: 0, replays: 0, recordings: 0 }
    }

    /// Forgets every recorded step (they point into buffers about to go).
    pub fn clear(&mut self) {
        self.recorded.clear();
    }

    /// `seqs` padded to their bucket, or `None` when they are not a step a graph takes: one
    /// row a sequence, each row's logits wanted in order, at most `max_rows` rows once
    /// padded. Rows with adapters need `adapter_slots` (the resident adapters) above 0.
    fn padded(
        &self,
        seqs: &[SeqRows],
        logits_rows: &[u32],
        block_size: usize,
        max_rows: usize,
        adapter_slots: usize,
    ) -> Result<Option<(StepBatch, Key)>, CudaError> {
        let n = seqs.len();
        let adapters = seqs.iter().any(|q| q.adapter.is_some());
        let decodes = seqs.iter().all(|q| q.tokens.len() == 1) && (!adapters || adapter_slots > 0);
        let in_order = logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        let rows = row_bucket(n);
        if n == 0 || !decodes || logits_rows.len() != n || !in_order || rows > max_rows {
            return Ok(None);
        }
        if let Some(b) = seqs.iter().flat_map(|q| &q.block_table).find(|&&b| b >= self.pad_block) {
            return Err(CudaError::Shape(format!(
                "the batch reaches block {b} of a {}-block cache",
                self.pad_block
            )));
        }
        // Padded below with the padding block: a table short of its row must fail as it does
        // unpadded, not send the row's K and V there.
        if let Some(q) = seqs.iter().find(|q| q.start / block_size >= q.block_table.len()) {
            return Err(CudaError::Shape(format!("position {} is past its block table", q.start)));
        }
        let context = context_bucket(seqs.iter().map(|q| q.start + 1).max().unwrap_or(1));
        // Every table as wide as the context bucket (the padding entries are never read), so
        // the step's shape depends on the bucket alone.
        let width = context.div_ceil(block_size);
        let table = |t: &[u32]| -> Vec<u32> {
            (0..width).map(|j| t.get(j).copied().unwrap_or(self.pad_block)).collect()
        };
        let mut padded: Vec<SeqRows> = seqs
            .iter()
            .map(|q| SeqRows {
                tokens: q.tokens.clone(),
                start: q.start,
                block_table: table(&q.block_table),
                adapter: q.adapter,
            })
            .collect();
        padded.resize_with(rows, || SeqRows {
            tokens: vec![0],
            start: 0,
            block_table: table(&[]),
            adapter: None,
        });
        let mut batch = StepBatch::new(padded, block_size)?;
        // The recorded launches are sized for the bucket's context, for every block of the
        // cache and for every resident adapter's slot, whichever the rows reach or name: so
        // each step of the bucket has the recorded one's shape.
        batch.max_context = context;
        batch.paged_context = context;
        batch.blocks_needed = self.pad_block as usize + 1;
        if adapters {
            if batch.slots_needed > adapter_slots {
                return Err(CudaError::Shape(format!(
                    "adapter slot {} of {adapter_slots}",
                    batch.slots_needed - 1
                )));
            }
            batch.slots_needed = adapter_slots;
        }
        Ok(Some((batch, Key { rows, context, adapters })))
    }
}

impl<O: TrainOps> DeviceDecoder<O> {
    /// Replays decode steps as CUDA graphs from now on (`true`, where the backend records
    /// them), or runs every step as it comes.
    pub fn replay_decodes(&mut self, on: bool) {
        self.graphs = on.then(|| DecodeGraphs::new(self.num_blocks as u32));
    }

    /// The backend, for what it reports (its tuned products, say).
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// (steps replayed, steps recorded) so far.
    pub fn replay_counts(&self) -> (u64, u64) {
        self.graphs.as_ref().map_or((0, 0), |g| (g.replays, g.recordings))
    }

    /// `seqs` as a replayed decode step (recorded first when its bucket has none yet), or
    /// `None` when replay is off or the step is not one a graph takes.
    pub fn forward_replayed(
        &mut self,
        seqs: &[SeqRows],
        logits_rows: &[u32],
        want: Want<'_>,
    ) -> Result<Option<RowsOut>, CudaError> {
        let (Some(g), Some(sc)) = (self.graphs.as_mut(), self.scratch.as_mut()) else {
            return Ok(None);
        };
        let max_rows = sc.rows.min(sc.logits_rows).min(MAX_GRAPH_ROWS);
        let slots = if self.lora.is_some() { self.resident.len() } else { 0 };
        let bs = self.shape.block_size;
        let Some((batch, key)) = g.padded(seqs, logits_rows, bs, max_rows, slots)? else {
            return Ok(None);
        };
        let (ops, s, w, caches) = (&mut self.ops, &self.shape, &self.weights, &mut self.caches);
        let lora = if key.adapters { self.lora.as_ref() } else { None };
        let (cos, sin) = rope_tables(&self.inv_freq, &batch.positions);
        if ops.epoch() != g.epoch {
            g.clear();
            g.epoch = ops.epoch();
        }
        g.clock += 1;
        let n = seqs.len();
        if let Some(r) = g.recorded.iter_mut().find(|r| r.key == key) {
            ops.upload_into(&mut r.step, &batch, &cos, &sin)?;
            ops.replay(&r.graph)?;
            r.used = g.clock;
            g.replays += 1;
            return rows_out(ops, s, sc, n, want).map(Some);
        }
        // The bucket's first step: run it (choosing its products' algorithms by timing them,
        // as every replay will run them), then record the same launches over its buffers.
        let step = ops.upload(&batch, &cos, &sin)?;
        ops.tune_products(true);
        let ran = logits_on_device(ops, s, w, caches, &step, sc, lora);
        ops.tune_products(false);
        ran?;
        let out = rows_out(ops, s, sc, n, want)?;
        if ops.epoch() != g.epoch {
            g.clear();
            g.epoch = ops.epoch();
        }
        match ops.record(|o| logits_on_device(o, s, w, caches, &step, sc, lora).map(|_| ())) {
            Ok(Some(graph)) => {
                if g.recorded.len() >= MAX_GRAPHS {
                    if let Some(i) = (0..g.recorded.len()).min_by_key(|&i| g.recorded[i].used) {
                        g.recorded.swap_remove(i);
                    }
                }
                g.recorded.push(Recorded { key, graph, step, used: g.clock });
                g.recordings += 1;
                tracing::debug!(rows = key.rows, context = key.context, "decode step recorded");
            }
            // Nothing to replay: each step of a backend that does not record runs padded.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("decode steps run unrecorded from now on: recording failed: {e}");
                self.graphs = None;
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::decoder::host::HostOps;
    use crate::backend::cuda::decoder::tiny::tiny_decoder;
    use crate::lora::{AdapterLease, LoraConfig, LoraWeights, ServedAdapter};
    use std::sync::Arc;

    /// The tiny decoder with `adapter` resident in slot 0.
    fn decoder(replay: bool, adapter: &AdapterLease) -> DeviceDecoder<HostOps> {
        let (c, s, w) = tiny_decoder();
        let mut d = DeviceDecoder::new(HostOps, s, w, c.rope_inv_freq(), 40, 64).unwrap();
        d.replay_decodes(replay);
        assert_eq!(d.place_adapters(&[adapter]).unwrap(), [0]);
        d
    }

    /// An adapter on every projection with B away from zero, so it changes what it touches.
    fn adapter() -> AdapterLease {
        let (c, _, _) = tiny_decoder();
        let mut weights = LoraWeights::init(&LoraConfig { r: 2, ..LoraConfig::default() }, &c, 3);
        for pair in weights.layers.iter_mut().flatten().flatten() {
            for (i, b) in pair.b.iter_mut().enumerate() {
                *b = ((i * 7919) % 17) as f32 / 17.0 - 0.5;
            }
        }
        Arc::new(ServedAdapter { id: "ft:tiny".into(), weights, created: 0 })
    }

    /// Padded steps (the host does not record, so each one runs padded) give every real row
    /// what the step run as it comes gives, and leave the sequences' caches as it does, over
    /// batches whose size and context buckets change, tables longer than needed included, and
    /// with and without a row through an adapter (sequence 1's).
    #[test]
    fn a_padded_decode_step_computes_what_the_step_alone_does() {
        use crate::backend::cuda::twins::argmax_logprob;
        let lease = adapter();
        let (mut padded, mut plain) = (decoder(true, &lease), decoder(false, &lease));
        let slot = |i: usize| (i == 1).then_some(0);
        // Five sequences of eight blocks each (the last ones never reached), disjoint.
        let lens = [3usize, 14, 31, 15, 9];
        let table = |i: usize| -> Vec<u32> { (0..8).map(|b| (39 - i * 8 - b) as u32).collect() };
        let prompts: Vec<SeqRows> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| SeqRows {
                tokens: (0..n).map(|j| ((i * 31 + j * 7) % 200) as u32).collect(),
                start: 0,
                block_table: table(i),
                adapter: slot(i),
            })
            .collect();
        let last: Vec<u32> =
            (0..lens.len()).map(|i| lens[..=i].iter().sum::<usize>() as u32 - 1).collect();
        let first = plain.forward_seqs(prompts.clone(), &last, Want::Greedy).unwrap();
        assert_eq!(padded.forward_seqs(prompts, &last, Want::Greedy).unwrap(), first);
        let RowsOut::Greedy(first) = first else { panic!("greedy ids") };
        let mut next: Vec<u32> = first.iter().map(|p| p.0).collect();
        let mut pos = lens.to_vec();
        // Who decodes at each step: 5, 3, 1 and 2 rows (buckets 8, 4, 1, 2), contexts
        // crossing 16 and 32.
        let active: [&[usize]; 8] = [
            &[0, 1, 2, 3, 4],
            &[0, 1, 2, 3, 4],
            &[0, 2, 4],
            &[1, 3, 4],
            &[2],
            &[2],
            &[0, 3],
            &[0, 1, 2, 3, 4],
        ];
        for (step, act) in active.iter().enumerate() {
            let batch: Vec<SeqRows> = act
                .iter()
                .map(|&i| SeqRows {
                    tokens: vec![next[i]],
                    start: pos[i],
                    block_table: table(i),
                    adapter: slot(i),
                })
                .collect();
            let rows: Vec<u32> = (0..act.len() as u32).collect();
            let want = if step % 3 == 1 { Want::Logits } else { Want::Greedy };
            let a = padded.forward_replayed(&batch, &rows, want).unwrap().expect("a padded step");
            let b = plain.forward_seqs(batch, &rows, want).unwrap();
            assert_eq!(a, b, "step {step}");
            let picks: Vec<u32> = match b {
                RowsOut::Greedy(g) => g.iter().map(|p| p.0).collect(),
                RowsOut::Logits(l) => l.chunks(200).map(|r| argmax_logprob(r).0).collect(),
                RowsOut::Sampled(_) => unreachable!("not asked"),
            };
            for (k, &i) in act.iter().enumerate() {
                pos[i] += 1;
                next[i] = picks[k];
            }
        }
        assert!(pos[2] > 32 && pos[0] < 16, "the contexts meant to cross buckets: {pos:?}");
        // The padding rows wrote to their own block only.
        let real = 40 * 16 * 32;
        for (a, b) in padded.caches.iter().zip(&plain.caches) {
            assert_eq!(a.k[..real], b.k[..real]);
            assert_eq!(a.v[..real], b.v[..real]);
        }
        assert_eq!(padded.replay_counts(), (0, 0), "the host records nothing");
        // A row past its table fails as it does unpadded.
        let past = SeqRows { tokens: vec![1], start: 16, block_table: vec![3], adapter: None };
        assert!(plain.forward_seqs(vec![past.clone()], &[0], Want::Greedy).is_err());
        assert!(padded.forward_replayed(&[past], &[0], Want::Greedy).is_err());
        // A prompt chunk is not a step a graph takes.
        let chunk =
            SeqRows { tokens: vec![1, 2], start: pos[0], block_table: table(0), adapter: None };
        assert!(padded.forward_replayed(&[chunk], &[1], Want::Greedy).unwrap().is_none());
    }

    /// What `upload_into` requires of a step replayed over a recorded one.
    fn shape_of(b: &StepBatch) -> [usize; 9] {
        [
            b.rows(),
            b.max_blocks,
            b.max_context,
            b.blocks_needed,
            b.slots_needed,
            b.block_tables.len(),
            b.tiles.len(),
            b.paged_rows.len(),
            b.paged_context,
        ]
    }

    /// Steps of one bucket have one shape, whichever blocks and adapter slots their rows use
    /// and whether or not they need padding rows.
    #[test]
    fn steps_of_a_bucket_have_the_recorded_shape() {
        let g = DecodeGraphs::<HostOps>::new(40);
        let seq = |start: usize, table: Vec<u32>, adapter: Option<u32>| SeqRows {
            tokens: vec![1],
            start,
            block_table: table,
            adapter,
        };
        let shape = |seqs: &[SeqRows]| {
            let rows: Vec<u32> = (0..seqs.len() as u32).collect();
            let (b, key) = g.padded(seqs, &rows, 16, 64, 3).unwrap().expect("a bucket");
            (key, shape_of(&b))
        };
        // One row, context bucket 32: a low block and a high one, tables exact or longer.
        let a = shape(&[seq(20, vec![0, 1], None)]);
        assert_eq!(a, shape(&[seq(17, vec![38, 39, 5], None)]));
        // Four rows, with and without a padding row, adapters in different slots.
        let b = shape(&[
            seq(3, vec![2], Some(0)),
            seq(9, vec![4], None),
            seq(15, vec![6], None),
            seq(1, vec![7], None),
        ]);
        assert_eq!(
            b,
            shape(&[seq(12, vec![39], Some(2)), seq(2, vec![3], None), seq(0, vec![1], None)])
        );
        assert_ne!(a.0, b.0);
    }

    #[test]
    fn buckets_cover_the_rows_within_the_next_power_of_two() {
        for n in 1..=600 {
            let b = row_bucket(n);
            assert!(b >= n && b <= n.next_power_of_two(), "{n} -> {b}");
        }
        assert_eq!([1, 3, 5, 9, 17, 250].map(row_bucket), [1, 4, 8, 16, 24, 256]);
        assert_eq!([1, 2, 64, 65, 1000].map(context_bucket), [1, 2, 64, 128, 1024]);
    }
}
