//! The paged attention kernel's launch (`paged_attention.cu`, split-K over partitions of keys),
//! and a timing of one chunk's attention on it against the tensor-core chunk kernel.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, PushKernelArg};
use serde::Serialize;

use super::{
    attention_tiled, check_len, CudaCache, CudaOps, CudaStep, ATTN_MAX_KEYS, ATTN_THREADS, R,
};
use crate::backend::cuda::decoder::{tiled_chunk, DecoderOps, DecoderShape, SeqRows, StepBatch};
use crate::backend::cuda::gpu::{cfg, n32};
use crate::backend::cuda::CudaError;

/// Milliseconds of one forward's attention over a chunk of one sequence (`rows` rows ending at
/// position `context - 1`), median of five after two warm-ups, timed by events on the stream:
/// on the tensor-core chunk kernel (where `tiled_chunk` picks it) and on the paged kernel.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkAttentionTimes {
    pub rows: usize,
    pub context: usize,
    pub tiled_ms: Option<f64>,
    pub paged_ms: f64,
}

/// Rows of a step the paged kernel takes: `n` of them listed on the device, reaching back
/// `context` positions at most.
pub(super) struct PagedRows<'a> {
    list: &'a CudaSlice<i32>,
    n: usize,
    context: usize,
}

/// Milliseconds of one layer's attention over a batch of decodes, median of five after two
/// warm-ups, timed by events: one query head a block (`paged_attention_partial_bf16`), and
/// (where the heads' group has a divisor of 2 to 4) that many heads of a kv head a block
/// (`paged_attention_grouped_bf16`); and what the forward uses at this batch.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeAttentionTimes {
    pub batch: usize,
    pub context: usize,
    pub one_head_ms: f64,
    pub grouped_heads_per_block: Option<usize>,
    pub grouped_ms: Option<f64>,
    pub used_heads_per_block: usize,
}

impl CudaStep {
    /// Every row of the step.
    pub(super) fn all(&self) -> PagedRows<'_> {
        // Without tiles, `paged_rows` lists every row already.
        let list = self.all_rows.as_ref().unwrap_or(&self.paged_rows);
        PagedRows { list, n: self.rows, context: self.max_context }
    }

    /// The rows the tensor-core chunk kernel leaves (`StepBatch::paged_rows`).
    pub(super) fn paged(&self) -> PagedRows<'_> {
        PagedRows { list: &self.paged_rows, n: self.n_paged, context: self.paged_context }
    }
}

/// Rows from which the paged kernel takes several query heads of a kv head a block.
const GROUPED_MIN_ROWS: usize = 16;

/// Query heads a block of the paged kernel takes for `rows` listed rows: at batches of
/// [`GROUPED_MIN_ROWS`] or more, where reading each K and V piece once for the heads that share
/// it pays, the largest of 4, 3 and 2 that divides the heads' group
/// (`paged_attention_grouped_bf16`); one otherwise (`paged_attention_partial_bf16`, which
/// spreads a few rows' keys over more blocks). Decided on the rows rounded up to a power of
/// two, as the partitions are, so a decode step padded to its bucket takes the same kernel.
pub fn heads_per_block(rows: usize, s: &DecoderShape) -> usize {
    match grouped_heads(s) {
        Some(h) if rows.max(1).next_power_of_two() >= GROUPED_MIN_ROWS => h,
        _ => 1,
    }
}

/// The largest of 4, 3 and 2 that divides the heads' group, if one does.
fn grouped_heads(s: &DecoderShape) -> Option<usize> {
    let group = s.heads / s.kv_heads.max(1);
    [4, 3, 2].into_iter().find(|&h| group.is_multiple_of(h))
}

impl CudaOps {
    /// The paged kernels over `rows` of the step, [`heads_per_block`] query heads a block.
    /// The caller has checked the cache.
    pub(super) fn paged_attention(
        &mut self,
        st: &CudaStep,
        rows: PagedRows<'_>,
        q: &CudaSlice<u16>,
        cache: &CudaCache,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        let hpb = heads_per_block(rows.n, s);
        self.paged_launch(st, rows, hpb, q, cache, out, s)
    }

    /// `paged_attention_partial_bf16` (`hpb` 1) or `paged_attention_grouped_bf16`, then
    /// `paged_attention_combine_bf16`, the partitions sized by [`super::partitions`] for the
    /// blocks a row has.
    #[allow(clippy::too_many_arguments)]
    fn paged_launch(
        &mut self,
        st: &CudaStep,
        rows: PagedRows<'_>,
        hpb: usize,
        q: &CudaSlice<u16>,
        cache: &CudaCache,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        check_len(q.len().min(out.len()), st.rows * s.q_dim(), "attention")?;
        if rows.n == 0 || rows.list.len() < rows.n {
            return Err(CudaError::Shape(format!("paged attention over {} listed rows", rows.n)));
        }
        let group = s.heads / s.kv_heads.max(1);
        if !(1..=4).contains(&hpb) || !group.is_multiple_of(hpb) {
            return Err(CudaError::Shape(format!("{hpb} of a group of {group} heads a block")));
        }
        let (parts, size) = partitions(self.sms, rows.n, s.heads / hpb, rows.context);
        let n_ml = rows.n * s.heads * parts;
        let grow = self.part_ml.0.len() < n_ml || self.part_o.len() < n_ml * s.head_dim;
        if grow && self.capturing {
            return Err(CudaError::Shape(
                "attention would grow its buffers while being captured: run the forward once \
                 uncaptured first"
                    .into(),
            ));
        }
        if self.part_ml.0.len() < n_ml {
            self.part_ml = (self.gpu.zeros(n_ml)?, self.gpu.zeros(n_ml)?);
            self.epoch += 1;
        }
        if self.part_o.len() < n_ml * s.head_dim {
            self.part_o = self.gpu.zeros(n_ml * s.head_dim)?;
            self.epoch += 1;
        }
        let (mb, nh, nkv, hd, bs) = (
            st.max_blocks as i32,
            s.heads as i32,
            s.kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        let (ps, np, h) = (size as i32, parts as i32, hpb as i32);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (pm, pl) = &mut self.part_ml;
        let f = if hpb == 1 { &self.k.attn_partial } else { &self.k.attn_grouped };
        let mut b = self.gpu.stream.launch_builder(f);
        b.arg(q).arg(&cache.k).arg(&cache.v).arg(rows.list).arg(&st.row_seq).arg(&st.row_pos);
        b.arg(&st.tables).arg(&mb).arg(&mut *pm).arg(&mut *pl).arg(&mut self.part_o);
        b.arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&ps).arg(&scale);
        if hpb > 1 {
            b.arg(&h);
        }
        // SAFETY: argument list matches paged_attention_partial_bf16, or with heads_per_block
        // paged_attention_grouped_bf16 (hpb 2 to 4 dividing the group, checked above); the
        // list names rows.n rows of the step (StepBatch), the partials hold rows.n * heads *
        // parts entries, q and out the step's rows (checked above); DecoderShape checked
        // head_dim and the head ratio.
        let grid = (n32(s.heads / hpb), n32(rows.n), n32(parts));
        unsafe { b.launch(cfg(grid, ATTN_THREADS)) }?;
        let mut b = self.gpu.stream.launch_builder(&self.k.attn_combine);
        b.arg(&*pm).arg(&*pl).arg(&self.part_o).arg(rows.list).arg(out);
        b.arg(&nh).arg(&hd).arg(&np);
        // SAFETY: argument list matches paged_attention_combine_bf16, over the same rows.
        unsafe { b.launch(cfg((n32(s.heads), n32(rows.n), 1), ATTN_THREADS)) }?;
        Ok(())
    }

    /// Times one chunk's attention both ways (zeros for q and the cache: the kernels do the
    /// same work whatever the values).
    pub fn time_chunk_attention(
        &mut self,
        s: &DecoderShape,
        rows: usize,
        context: usize,
    ) -> Result<ChunkAttentionTimes, CudaError> {
        if rows == 0 || rows > context {
            return Err(CudaError::Shape(format!("a chunk of {rows} rows in {context}")));
        }
        let blocks = context.div_ceil(s.block_size);
        let seq = SeqRows {
            tokens: vec![0; rows],
            start: context - rows,
            block_table: (0..blocks as u32).collect(),
            adapter: None,
        };
        let t = Timed::new(self, s, vec![seq], blocks)?;
        let tiled_ms = tiled_chunk(rows, s.head_dim)
            .then(|| {
                t.median_ms(self, |ops, out| {
                    let f = ops.k.attn_chunk.clone();
                    attention_tiled::chunk(&ops.gpu, &f, &t.st, &t.q, &t.cache, out, s)
                })
            })
            .transpose()?;
        let paged_ms = t.median_ms(self, |ops, out| {
            ops.paged_attention(&t.st, t.st.all(), &t.q, &t.cache, out, s)
        })?;
        Ok(ChunkAttentionTimes { rows, context, tiled_ms, paged_ms })
    }

    /// Times one layer's attention over `batch` decodes at position `context` both ways: one
    /// query head a block, and the heads of a kv head together where the group allows.
    pub fn time_decode_attention(
        &mut self,
        s: &DecoderShape,
        batch: usize,
        context: usize,
    ) -> Result<DecodeAttentionTimes, CudaError> {
        let per = (context + 1).div_ceil(s.block_size);
        let seqs = (0..batch)
            .map(|i| SeqRows {
                tokens: vec![0],
                start: context,
                block_table: ((i * per) as u32..((i + 1) * per) as u32).collect(),
                adapter: None,
            })
            .collect();
        let t = Timed::new(self, s, seqs, batch * per)?;
        let time = |ops: &mut Self, hpb: usize| {
            t.median_ms(ops, |ops, out| {
                ops.paged_launch(&t.st, t.st.all(), hpb, &t.q, &t.cache, out, s)
            })
        };
        let one_head_ms = time(self, 1)?;
        let grouped = grouped_heads(s);
        let grouped_ms = grouped.map(|h| time(self, h)).transpose()?;
        Ok(DecodeAttentionTimes {
            batch,
            context,
            one_head_ms,
            grouped_heads_per_block: grouped,
            grouped_ms,
            used_heads_per_block: heads_per_block(batch, s),
        })
    }
}

/// One layer's attention of a made-up step, to time (zeros for q and the cache: the kernels do
/// the same work whatever the values).
struct Timed {
    st: CudaStep,
    q: CudaSlice<u16>,
    cache: CudaCache,
}

impl Timed {
    fn new(
        ops: &mut CudaOps,
        s: &DecoderShape,
        seqs: Vec<SeqRows>,
        blocks: usize,
    ) -> Result<Self, CudaError> {
        let batch = StepBatch::new(seqs, s.block_size)?;
        let rope = vec![0f32; batch.rows() * s.head_dim / 2];
        let st = ops.upload(&batch, &rope, &rope)?;
        let q = ops.gpu.zeros::<u16>(batch.rows() * s.q_dim())?;
        Ok(Self { st, q, cache: ops.cache(s, blocks)? })
    }

    /// Median milliseconds of five runs of `f` after two warm-ups, timed by events on the
    /// stream.
    fn median_ms(
        &self,
        ops: &mut CudaOps,
        mut f: impl FnMut(&mut CudaOps, &mut CudaSlice<u16>) -> R,
    ) -> Result<f64, CudaError> {
        let mut out = ops.gpu.zeros::<u16>(self.q.len())?;
        let mut ms = Vec::new();
        for rep in 0..7 {
            let start = ops.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            f(ops, &mut out)?;
            let end = ops.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            if rep >= 2 {
                ms.push(f64::from(start.elapsed_ms(&end)?));
            }
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }
}

/// (partitions, keys per partition) of attention over `max_context` keys: enough blocks to fill
/// the SMs a few times over, no partition under 64 keys or over the kernel's ATTN_MAX_KEYS.
/// The size is chosen for the rows and the context rounded up to powers of two, so a decode
/// step padded to its CUDA graph's bucket (`decoder::graphs`) cuts each row's keys where the
/// step run eagerly does: the same sums in the same order (partitions past a row's keys add
/// nothing). As the rounding up can halve the partitions of the context itself, the aim is 8
/// blocks an SM, which gives at context 1025 the cuts of the unrounded rule's 4.
fn partitions(sms: usize, rows: usize, heads: usize, max_context: usize) -> (usize, usize) {
    let (r, c) = (rows.max(1).next_power_of_two(), max_context.max(1).next_power_of_two());
    let want = (8 * sms).div_ceil(r * heads.max(1));
    let parts = want.clamp(1, c.div_ceil(64).max(1));
    let size = c.div_ceil(parts).clamp(1, ATTN_MAX_KEYS);
    (max_context.div_ceil(size).max(1), size)
}

#[cfg(test)]
mod tests {
    use super::heads_per_block;
    use crate::backend::cuda::decoder::DecoderShape;

    fn shape(heads: usize, kv_heads: usize) -> DecoderShape {
        DecoderShape {
            vocab: 1,
            hidden: 64,
            inter: 64,
            layers: 1,
            heads,
            kv_heads,
            head_dim: 128,
            eps: 1e-5,
            block_size: 16,
            qkv_bias: false,
        }
    }

    #[test]
    fn heads_share_a_block_at_large_batches_where_the_group_divides() {
        // Llama-3-8B's group of 4: one head a block up to 8 rows, four from 9 (16 rounded up).
        assert_eq!(heads_per_block(1, &shape(32, 8)), 1);
        assert_eq!(heads_per_block(8, &shape(32, 8)), 1);
        assert_eq!(heads_per_block(9, &shape(32, 8)), 4);
        assert_eq!(heads_per_block(16, &shape(32, 8)), 4);
        // Groups of 8 in fours, 6 in threes, 3 and 2 whole; 5, 7 and no GQA one head a block.
        let cases = [(64, 8, 4), (12, 2, 3), (9, 3, 3), (4, 2, 2), (40, 8, 1), (28, 4, 1)];
        for (heads, kv, want) in cases.into_iter().chain([(32, 32, 1)]) {
            assert_eq!(heads_per_block(64, &shape(heads, kv)), want, "{heads}/{kv}");
        }
    }

    #[test]
    fn partitions_cover_the_context_within_the_kernel_limit() {
        for (rows, heads, ctx) in
            [(1, 32, 1025), (256, 32, 1025), (1, 9, 1), (7, 4, 150), (2, 4, 5000)]
        {
            let (parts, size) = super::partitions(132, rows, heads, ctx);
            assert!((1..=super::ATTN_MAX_KEYS).contains(&size), "{size}");
            assert!(parts * size >= ctx && (parts - 1) * size < ctx, "{parts} x {size} for {ctx}");
        }
        // At the decode benchmark's context, a batch of 1, 16 (grouped heads) and 64: the
        // partitions of 64, 228 and 512 keys that the unrounded rule made (61, 205, 512).
        let at_1025 = [(1, 32), (16, 8), (64, 8)].map(|(r, h)| super::partitions(132, r, h, 1025));
        assert_eq!(at_1025, [(17, 64), (5, 228), (3, 512)]);
        // One sequence: many partitions; a big batch: as few as the limit allows.
        assert!(super::partitions(132, 1, 32, 1025).0 >= 8);
        assert_eq!(super::partitions(132, 256, 32, 1025).0, 3);
    }

    #[test]
    fn a_padded_step_cuts_keys_where_the_eager_step_does() {
        use crate::backend::cuda::decoder::graphs::{context_bucket, row_bucket};
        // Llama-3-8B's heads: the kernel (heads a block) and the partitions alike.
        let s = shape(32, 8);
        for rows in 1..=300 {
            let (eager_hpb, padded_hpb) =
                (heads_per_block(rows, &s), heads_per_block(row_bucket(rows), &s));
            assert_eq!(eager_hpb, padded_hpb, "{rows} rows");
            for ctx in [1, 7, 64, 65, 300, 1000, 1025, 4096, 5000] {
                let eager = super::partitions(132, rows, 32 / eager_hpb, ctx);
                let padded =
                    super::partitions(132, row_bucket(rows), 32 / padded_hpb, context_bucket(ctx));
                assert_eq!(eager.1, padded.1, "{rows} rows, context {ctx}");
                assert!(padded.0 >= eager.0);
            }
        }
    }
}
