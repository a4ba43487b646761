//! The paged attention kernel's launch (`paged_attention.cu`, split-K over partitions of keys),
//! and a timing of one chunk's attention on it against the tensor-core chunk kernel.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, PushKernelArg};
use serde::Serialize;

use super::{attention_tiled, check_len, CudaCache, CudaOps, CudaStep, ATTN_THREADS, R};
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

impl CudaOps {
    /// `paged_attention_partial_bf16` then `paged_attention_combine_bf16` over `rows` of the
    /// step, the partitions sized by [`super::partitions`]. The caller has checked the cache.
    pub(super) fn paged_attention(
        &mut self,
        st: &CudaStep,
        rows: PagedRows<'_>,
        q: &CudaSlice<u16>,
        cache: &CudaCache,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        check_len(q.len().min(out.len()), st.rows * s.q_dim(), "attention")?;
        if rows.n == 0 || rows.list.len() < rows.n {
            return Err(CudaError::Shape(format!("paged attention over {} listed rows", rows.n)));
        }
        let (parts, size) = self.partitions(rows.n, s.heads, rows.context);
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
        }
        if self.part_o.len() < n_ml * s.head_dim {
            self.part_o = self.gpu.zeros(n_ml * s.head_dim)?;
        }
        let (mb, nh, nkv, hd, bs) = (
            st.max_blocks as i32,
            s.heads as i32,
            s.kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        let (ps, np) = (size as i32, parts as i32);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (pm, pl) = &mut self.part_ml;
        let mut b = self.gpu.stream.launch_builder(&self.k.attn_partial);
        b.arg(q).arg(&cache.k).arg(&cache.v).arg(rows.list).arg(&st.row_seq).arg(&st.row_pos);
        b.arg(&st.tables).arg(&mb).arg(&mut *pm).arg(&mut *pl).arg(&mut self.part_o);
        b.arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&ps).arg(&scale);
        // SAFETY: argument list matches paged_attention_partial_bf16; the list names rows.n
        // rows of the step (StepBatch), the partials hold rows.n * heads * parts entries, q
        // and out the step's rows (checked above); DecoderShape checked head_dim and the head
        // ratio.
        unsafe { b.launch(cfg((n32(s.heads), n32(rows.n), n32(parts)), ATTN_THREADS)) }?;
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
        let cache = self.cache(s, blocks)?;
        let seq = SeqRows {
            tokens: vec![0; rows],
            start: context - rows,
            block_table: (0..blocks as u32).collect(),
            adapter: None,
        };
        let batch = StepBatch::new(vec![seq], s.block_size)?;
        let rope = vec![0f32; rows * s.head_dim / 2];
        let st = self.upload(&batch, &rope, &rope)?;
        let q = self.gpu.zeros::<u16>(rows * s.q_dim())?;
        let mut out = self.gpu.zeros::<u16>(rows * s.q_dim())?;
        let mut time = |ops: &mut Self, tiled: bool| -> Result<f64, CudaError> {
            let mut ms = Vec::new();
            for rep in 0..7 {
                let ev = || ops.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
                let start = ev()?;
                if tiled {
                    let f = ops.k.attn_chunk.clone();
                    attention_tiled::chunk(&ops.gpu, &f, &st, &q, &cache, &mut out, s)?;
                } else {
                    ops.paged_attention(&st, st.all(), &q, &cache, &mut out, s)?;
                }
                let end = ops.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                if rep >= 2 {
                    ms.push(f64::from(start.elapsed_ms(&end)?));
                }
            }
            ms.sort_by(f64::total_cmp);
            Ok(ms[ms.len() / 2])
        };
        let tiled = tiled_chunk(rows, s.head_dim);
        let tiled_ms = tiled.then(|| time(self, true)).transpose()?;
        let paged_ms = time(self, false)?;
        Ok(ChunkAttentionTimes { rows, context, tiled_ms, paged_ms })
    }
}
