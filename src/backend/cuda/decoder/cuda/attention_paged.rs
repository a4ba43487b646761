//! The paged attention kernel's launch (`paged_attention.cu`, split-K over partitions of keys),
//! and a timing of one chunk's attention on it against the tensor-core chunk kernel.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, PushKernelArg};
use serde::Serialize;

use super::{attention_tiled, CudaCache, CudaOps, CudaStep, ATTN_THREADS, R};
use crate::backend::cuda::decoder::{
    tiled_attention_head, DecoderOps, DecoderShape, SeqRows, StepBatch,
};
use crate::backend::cuda::gpu::{cfg, n32};
use crate::backend::cuda::CudaError;

/// Milliseconds of one forward's attention over a chunk of one sequence (`rows` rows ending at
/// position `context - 1`), median of five after two warm-ups, timed by events on the stream:
/// on the tensor-core chunk kernel (where the head size has it) and on the paged kernel.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkAttentionTimes {
    pub rows: usize,
    pub context: usize,
    pub tiled_ms: Option<f64>,
    pub paged_ms: f64,
}

impl CudaOps {
    /// `paged_attention_partial_bf16` then `paged_attention_combine_bf16` over the step's rows,
    /// the partitions sized by [`super::partitions`]. The caller has checked the cache.
    pub(super) fn paged_attention(
        &mut self,
        st: &CudaStep,
        q: &CudaSlice<u16>,
        cache: &CudaCache,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        let (parts, size) = self.partitions(st.rows, s.heads, st.max_context);
        let n_ml = st.rows * s.heads * parts;
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
        b.arg(q).arg(&cache.k).arg(&cache.v).arg(&st.row_seq).arg(&st.row_pos).arg(&st.tables);
        b.arg(&mb).arg(&mut *pm).arg(&mut *pl).arg(&mut self.part_o).arg(&nh).arg(&nkv).arg(&hd);
        b.arg(&bs).arg(&ps).arg(&scale);
        // SAFETY: argument list matches paged_attention_partial_bf16; the partials hold
        // rows * heads * parts entries; DecoderShape checked head_dim and the head ratio.
        unsafe { b.launch(cfg((n32(s.heads), n32(st.rows), n32(parts)), ATTN_THREADS)) }?;
        let mut b = self.gpu.stream.launch_builder(&self.k.attn_combine);
        b.arg(&*pm).arg(&*pl).arg(&self.part_o).arg(out).arg(&nh).arg(&hd).arg(&np);
        // SAFETY: argument list matches paged_attention_combine_bf16.
        unsafe { b.launch(cfg((n32(s.heads), n32(st.rows), 1), ATTN_THREADS)) }?;
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
                    ops.paged_attention(&st, &q, &cache, &mut out, s)?;
                }
                let end = ops.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                if rep >= 2 {
                    ms.push(f64::from(start.elapsed_ms(&end)?));
                }
            }
            ms.sort_by(f64::total_cmp);
            Ok(ms[ms.len() / 2])
        };
        let tiled_ms = tiled_attention_head(s.head_dim).then(|| time(self, true)).transpose()?;
        let paged_ms = time(self, false)?;
        Ok(ChunkAttentionTimes { rows, context, tiled_ms, paged_ms })
    }
}
