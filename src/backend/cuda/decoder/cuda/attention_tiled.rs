//! The tensor-core attention kernels of `attention_tiled.cu` on the device: the forward of a
//! step's long chunks (`chunk`), and a training sample's backward (`AttentionBackward`), which
//! runs the direct kernels of `attention_backward.cu` for head sizes the tiled ones lack (up
//! to their AB_MAX_LEN tokens).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};
use serde::Serialize;

use super::{check_len, CudaCache, CudaStep};
use crate::backend::cuda::decoder::DecoderShape;
use crate::backend::cuda::decoder::{tiled_attention_head, ATTENTION_TILE};
use crate::backend::cuda::gemm::addr;
use crate::backend::cuda::gpu::{cfg, n32, Gpu};
use crate::backend::cuda::CudaError;

/// `attention_backward.cu`'s AB_MAX_LEN and AB_THREADS.
const AB_MAX_LEN: usize = 4096;
const AB_THREADS: u32 = 128;
/// `attention_tiled.cu`'s ABT_THREADS (its ABT_TILE is `ATTENTION_TILE`).
const ABT_THREADS: u32 = 128;

/// Whether every buffer starts on 16 bytes (the tiled kernels read 16 bytes at a time).
pub(super) fn aligned<const N: usize>(gpu: &Gpu, bufs: [&CudaSlice<u16>; N]) -> bool {
    bufs.iter().all(|x| addr(x, &gpu.stream, 0) % 16 == 0)
}

/// `attention_chunk_tiled` over the step's row tiles (`StepBatch::tiles`, the chunks
/// `tiled_chunk` picks); the caller has checked the head size and the cache.
pub(super) fn chunk(
    gpu: &Gpu,
    f: &CudaFunction,
    st: &CudaStep,
    q: &CudaSlice<u16>,
    cache: &CudaCache,
    out: &mut CudaSlice<u16>,
    s: &DecoderShape,
) -> Result<(), CudaError> {
    check_len(q.len().min(out.len()), st.rows * s.q_dim(), "attention")?;
    if st.n_tiles == 0 || st.n_tiles > 65535 || st.tiles.len() < 4 * st.n_tiles {
        return Err(CudaError::Shape(format!("{} tiles of tiled attention", st.n_tiles)));
    }
    let (mb, nh, nkv, hd) =
        (st.max_blocks as i32, s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
    let (bs, scale) = (s.block_size as i32, 1.0 / (s.head_dim as f32).sqrt());
    let mut b = gpu.stream.launch_builder(f);
    b.arg(q).arg(&cache.k).arg(&cache.v).arg(&st.tiles).arg(&st.tables).arg(&mb).arg(out);
    b.arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale);
    // SAFETY: argument list matches attention_chunk_tiled; head_dim 64 or 128 and the head
    // ratio (the caller, DecoderShape), q, out and the caches 16-byte aligned and long enough
    // (checked here and by the caller's check_cache); every tile's rows are rows of the step
    // and its sequence's table names a block for each of their positions (StepBatch::new);
    // ABT_THREADS threads.
    unsafe { b.launch(cfg((n32(s.heads), n32(st.n_tiles), 1), ABT_THREADS)) }?;
    Ok(())
}

pub(super) struct AttentionBackward {
    dq: CudaFunction,
    dkv: CudaFunction,
    dq_tiled: CudaFunction,
    dkv_tiled: CudaFunction,
    dkv_sum: CudaFunction,
    /// Each row's log-sum-exp and rowsum(dO ∘ O), per query head.
    lse: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    /// The tiled path's dK and dV per query head, before a GQA group's heads are summed.
    dk_part: CudaSlice<f32>,
    dv_part: CudaSlice<f32>,
}

/// The buffers of one backward: q, o `[len, q_dim]`, k, v `[len, kv_dim]` (bf16), d_o
/// `[len, q_dim]`, and d_qkv `[len, qkv_rows]` whose q, k and v column blocks it writes.
pub(super) struct AttentionBackwardArgs<'a> {
    pub q: &'a CudaSlice<u16>,
    pub k: &'a CudaSlice<u16>,
    pub v: &'a CudaSlice<u16>,
    pub o: &'a CudaSlice<u16>,
    pub d_o: &'a CudaSlice<f32>,
    pub d_qkv: &'a mut CudaSlice<f32>,
    pub len: usize,
}

fn grow(gpu: &Gpu, x: &mut CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
    if x.len() < n {
        *x = gpu.zeros(n)?;
    }
    Ok(())
}

impl AttentionBackward {
    pub(super) fn new(gpu: &mut Gpu) -> Result<Self, CudaError> {
        Ok(Self {
            dq: gpu.func("attention_backward.cu", "attention_backward_dq_f32")?,
            dkv: gpu.func("attention_backward.cu", "attention_backward_dkv_f32")?,
            dq_tiled: gpu.func("attention_tiled.cu", "attention_backward_dq_tiled")?,
            dkv_tiled: gpu.func("attention_tiled.cu", "attention_backward_dkv_tiled")?,
            dkv_sum: gpu.func("attention_tiled.cu", "attention_backward_dkv_sum_f32")?,
            lse: gpu.zeros(1)?,
            delta: gpu.zeros(1)?,
            dk_part: gpu.zeros(1)?,
            dv_part: gpu.zeros(1)?,
        })
    }

    /// The tiled kernels where the head size allows (and `allow_tiled`), else the direct ones.
    pub(super) fn run(
        &mut self,
        gpu: &Gpu,
        a: AttentionBackwardArgs<'_>,
        s: &DecoderShape,
        allow_tiled: bool,
    ) -> Result<(), CudaError> {
        let (len, qd, kvd) = (a.len, s.q_dim(), s.kv_dim());
        check_len(a.q.len().min(a.o.len()).min(a.d_o.len()), len * qd, "attention backward")?;
        check_len(a.k.len().min(a.v.len()), len * kvd, "attention backward")?;
        check_len(a.d_qkv.len(), len * s.qkv_rows(), "q/k/v gradient")?;
        let st = gpu.stream.clone();
        let tiled =
            allow_tiled && tiled_attention_head(s.head_dim) && aligned(gpu, [a.q, a.k, a.v, a.o]);
        // Grids have up to 65535 rows: the partials' sum takes one block row per token.
        if len == 0 || len > 65535 || (!tiled && len > AB_MAX_LEN) {
            return Err(CudaError::Shape(format!(
                "attention backward over {len} tokens (1 to {AB_MAX_LEN} at head size {})",
                s.head_dim
            )));
        }
        grow(gpu, &mut self.lse, len * s.heads)?;
        grow(gpu, &mut self.delta, len * s.heads)?;
        let (l, nh, nkv, hd) = (len as i32, s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
        let stride = s.qkv_rows() as i32;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (dk, dv) = (addr(a.d_qkv, &st, qd), addr(a.d_qkv, &st, qd + kvd));
        let (q, k, v, o, d_o) = (a.q, a.k, a.v, a.o, a.d_o);
        let dq_fn = if tiled { &self.dq_tiled } else { &self.dq };
        let mut b = st.launch_builder(dq_fn);
        b.arg(q).arg(k).arg(v).arg(o).arg(d_o).arg(&mut *a.d_qkv).arg(&mut self.lse);
        b.arg(&mut self.delta).arg(&l).arg(&nh).arg(&nkv).arg(&hd).arg(&scale).arg(&stride);
        if !tiled {
            // SAFETY: argument list matches attention_backward_dq_f32; len <= AB_MAX_LEN,
            // head_dim a multiple of 32 up to 256 (DecoderShape), AB_THREADS threads; dq is
            // the q block of rows `stride` apart inside d_qkv (checked).
            unsafe { b.launch(cfg((n32(s.heads), n32(len), 1), AB_THREADS)) }?;
            let mut b = st.launch_builder(&self.dkv);
            b.arg(q).arg(k).arg(v).arg(d_o).arg(&self.lse).arg(&self.delta).arg(&dk).arg(&dv);
            b.arg(&l).arg(&nh).arg(&nkv).arg(&hd).arg(&scale).arg(&stride);
            // SAFETY: as above for attention_backward_dkv_f32; dk and dv are the addresses of
            // d_qkv's k and v blocks (rows `stride` apart, inside it), passed by value as the
            // kernel's pointer arguments.
            return unsafe { b.launch(cfg((n32(s.kv_heads), n32(len), 1), AB_THREADS)) }
                .map(|_| ())
                .map_err(Into::into);
        }
        let tiles = n32(len.div_ceil(ATTENTION_TILE));
        // SAFETY: argument list matches attention_backward_dq_tiled; head_dim 64 or 128,
        // num_heads a multiple of num_kv_heads (DecoderShape), q/k/v/o 16-byte aligned
        // (checked), at most 65535 tiles, ABT_THREADS threads; dq is d_qkv's q block.
        unsafe { b.launch(cfg((n32(s.heads), tiles, 1), ABT_THREADS)) }?;
        grow(gpu, &mut self.dk_part, len * qd)?;
        grow(gpu, &mut self.dv_part, len * qd)?;
        let mut b = st.launch_builder(&self.dkv_tiled);
        b.arg(q).arg(k).arg(v).arg(d_o).arg(&self.lse).arg(&self.delta);
        b.arg(&mut self.dk_part).arg(&mut self.dv_part);
        b.arg(&l).arg(&nh).arg(&nkv).arg(&hd).arg(&scale);
        // SAFETY: as above for attention_backward_dkv_tiled; the partials hold len * q_dim.
        unsafe { b.launch(cfg((n32(s.heads), tiles, 1), ABT_THREADS)) }?;
        let mut b = st.launch_builder(&self.dkv_sum);
        b.arg(&self.dk_part).arg(&self.dv_part).arg(&dk).arg(&dv);
        b.arg(&l).arg(&nh).arg(&nkv).arg(&hd).arg(&stride);
        // SAFETY: argument list matches attention_backward_dkv_sum_f32: one block per (kv
        // head, row) over the partials; dk and dv as for the direct kernel above.
        unsafe { b.launch(cfg((n32(s.kv_heads), n32(len), 1), ABT_THREADS)) }?;
        Ok(())
    }
}

/// Milliseconds of one sample's attention backward (every layer runs one), median of five,
/// timed by events on the stream: the tiled kernels where the head size has them, and the
/// direct ones where the sample fits them.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionBackwardTimes {
    pub tokens: usize,
    pub tiled_ms: Option<f64>,
    pub direct_ms: Option<f64>,
}

impl AttentionBackward {
    pub(super) fn time(
        &mut self,
        gpu: &Gpu,
        s: &DecoderShape,
        len: usize,
    ) -> Result<AttentionBackwardTimes, CudaError> {
        let (qd, kvd) = (s.q_dim(), s.kv_dim());
        // Zeros: the kernels do the same work whatever the values.
        let (q, o) = (gpu.zeros::<u16>(len * qd)?, gpu.zeros::<u16>(len * qd)?);
        let (k, v) = (gpu.zeros::<u16>(len * kvd)?, gpu.zeros::<u16>(len * kvd)?);
        let d_o = gpu.zeros::<f32>(len * qd)?;
        let mut d_qkv = gpu.zeros::<f32>(len * s.qkv_rows())?;
        let mut time = |tiled: bool| -> Result<f64, CudaError> {
            let mut ms = Vec::new();
            for rep in 0..7 {
                let start = gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                let (q, k, v, o, d_o) = (&q, &k, &v, &o, &d_o);
                let a = AttentionBackwardArgs { q, k, v, o, d_o, d_qkv: &mut d_qkv, len };
                self.run(gpu, a, s, tiled)?;
                let end = gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                // The first two warm up (module load, buffers grown).
                if rep >= 2 {
                    ms.push(f64::from(start.elapsed_ms(&end)?));
                }
            }
            ms.sort_by(f64::total_cmp);
            Ok(ms[ms.len() / 2])
        };
        let tiled_ms = tiled_attention_head(s.head_dim).then(|| time(true)).transpose()?;
        let direct_ms = (len <= AB_MAX_LEN).then(|| time(false)).transpose()?;
        Ok(AttentionBackwardTimes { tokens: len, tiled_ms, direct_ms })
    }
}
