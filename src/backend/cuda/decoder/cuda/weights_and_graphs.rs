//! What surrounds `CudaOps`' forward: weights made or uploaded on the device, the copy
//! bandwidth, per-operation GPU timing, tuned products, and CUDA-graph capture and replay.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaGraph, CudaSlice, PushKernelArg};

use super::{CudaOps, CudaStep, R, ROW_THREADS};
use crate::backend::cuda::decoder::{DecoderShape, DecoderWeights, StepBatch};
use crate::backend::cuda::gpu::{cfg, n32};
use crate::backend::cuda::CudaError;

impl CudaOps {
    /// What timing the products' algorithms found so far, a line per tuned shape
    /// ([`DecoderOps::tune_products`](crate::backend::cuda::decoder::DecoderOps::tune_products)).
    pub fn tuned_products(&self) -> &[crate::backend::cuda::gemm_tuning::Tuned] {
        self.gemm.tuned()
    }

    /// Records an event at each `mark` from now on.
    pub fn start_profile(&mut self) {
        self.profile = Some(Vec::new());
    }

    /// GPU milliseconds between each mark and the next, summed by name in first-seen order.
    pub fn finish_profile(&mut self) -> Result<Vec<(String, f64)>, CudaError> {
        let events = self.profile.take().unwrap_or_default();
        let mut out: Vec<(String, f64)> = Vec::new();
        for pair in events.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1)? as f64;
            match out.iter_mut().find(|(n, _)| n == pair[0].0) {
                Some(e) => e.1 += ms,
                None => out.push((pair[0].0.to_string(), ms)),
            }
        }
        Ok(out)
    }

    /// `out[i] = offset + scale * u(seed, i)`, u uniform in [-1, 1).
    pub fn fill(&mut self, out: &mut CudaSlice<u16>, seed: u64, scale: f32, offset: f32) -> R {
        let n = out.len() as u64;
        let grid = n32(out.len().div_ceil(ROW_THREADS as usize).clamp(1, 32 * self.sms));
        let mut b = self.gpu.stream.launch_builder(&self.k.fill);
        b.arg(out).arg(&n).arg(&seed).arg(&scale).arg(&offset);
        // SAFETY: argument list matches fill_uniform_bf16; it writes out[0..n) only.
        unsafe { b.launch(cfg((grid, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    /// A model of shape `s` with random weights made on the device.
    pub fn dummy_weights(
        &mut self,
        s: &DecoderShape,
        seed: u64,
    ) -> Result<DecoderWeights<CudaSlice<u16>>, CudaError> {
        let mut tensors = Vec::new();
        for (i, (n, scale, offset)) in DecoderWeights::<()>::layout(s).into_iter().enumerate() {
            // SAFETY: filled completely right below, before any read.
            let mut t = unsafe { self.gpu.stream.alloc::<u16>(n.max(1)) }?;
            self.fill(&mut t, seed.wrapping_add(i as u64), scale, offset)?;
            tensors.push(t);
        }
        DecoderWeights::from_tensors(s, tensors)
    }

    /// Host weights (bf16 values held as f32) copied to the device as bf16.
    pub fn upload_weights(
        &mut self,
        s: &DecoderShape,
        w: &DecoderWeights<Vec<f32>>,
    ) -> Result<DecoderWeights<CudaSlice<u16>>, CudaError> {
        let tensors = w.tensors().iter().map(|t| self.gpu.up_bf16(t)).collect::<Result<_, _>>()?;
        DecoderWeights::from_tensors(s, tensors)
    }

    /// Device-to-device copy bandwidth, bytes read plus bytes written per second: the median
    /// of ten copies of 1 GiB, timed by events on the stream.
    pub fn copy_bandwidth(&mut self) -> Result<f64, CudaError> {
        const BYTES: usize = 1 << 30;
        let src = self.gpu.zeros::<u8>(BYTES)?;
        let mut dst = self.gpu.zeros::<u8>(BYTES)?;
        for _ in 0..3 {
            self.gpu.stream.memcpy_dtod(&src, &mut dst)?;
        }
        let mut rates = Vec::new();
        for _ in 0..10 {
            let start = self.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            self.gpu.stream.memcpy_dtod(&src, &mut dst)?;
            let end = self.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let ms = start.elapsed_ms(&end)? as f64;
            rates.push(2.0 * BYTES as f64 / (ms / 1e3));
        }
        rates.sort_by(f64::total_cmp);
        Ok(rates[rates.len() / 2])
    }

    /// Copies `batch` into the buffers of `step` in place (a captured forward reads them at
    /// fixed addresses). The batch must have the same shape as the one `step` was made from.
    pub fn upload_in_place(
        &mut self,
        step: &mut CudaStep,
        b: &StepBatch,
        cos: &[f32],
        sin: &[f32],
    ) -> R {
        if b.rows() != step.rows
            || b.max_blocks != step.max_blocks
            || b.max_context != step.max_context
            || b.block_tables.len() != step.tables.len()
            || b.blocks_needed > step.blocks_needed
            || b.slots_needed > step.slots_needed
            || cos.len() != step.cos.len()
            || sin.len() != step.sin.len()
            || b.tiles.len() != 4 * step.n_tiles
            || b.paged_rows.len() != step.n_paged
            || b.paged_context != step.paged_context
        {
            return Err(CudaError::Shape("a captured forward replayed on another shape".into()));
        }
        let st = &self.gpu.stream;
        st.memcpy_htod(&b.tokens, &mut step.tokens)?;
        st.memcpy_htod(cos, &mut step.cos)?;
        st.memcpy_htod(sin, &mut step.sin)?;
        st.memcpy_htod(&b.slots, &mut step.slots)?;
        st.memcpy_htod(&b.row_seq, &mut step.row_seq)?;
        st.memcpy_htod(&b.row_pos, &mut step.row_pos)?;
        st.memcpy_htod(&b.row_slots, &mut step.row_slots)?;
        st.memcpy_htod(&b.block_tables, &mut step.tables)?;
        // The tiles and rows lists keep their one placeholder entry when empty.
        if !b.tiles.is_empty() {
            st.memcpy_htod(&b.tiles, &mut step.tiles)?;
        }
        if !b.paged_rows.is_empty() {
            st.memcpy_htod(&b.paged_rows, &mut step.paged_rows)?;
        }
        Ok(())
    }

    /// Records what `f` puts on the stream as a CUDA graph instead of running it. `f` must not
    /// allocate, copy to or from the host, or wait: run it once uncaptured first, so every
    /// buffer and cuBLASLt plan it needs exists (attention refuses to grow its buffers during a
    /// capture). The graph holds raw addresses of the weights, caches, scratch, step and this
    /// value's attention partials: replay it only while all of them live, and before any
    /// larger forward regrows the partials.
    pub fn capture(&mut self, f: impl FnOnce(&mut Self) -> R) -> Result<CudaGraph, CudaError> {
        use cudarc::driver::sys::{
            CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus,
        };
        if self.profile.is_some() {
            return Err(CudaError::Driver("a profiled forward cannot be captured".into()));
        }
        self.gpu.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        self.capturing = true;
        let recorded = f(self);
        self.capturing = false;
        // End the capture whatever happened, so the stream is usable again. An error cudarc
        // recorded meanwhile (a buffer's free refused, say) fails the first call before the
        // capture ends, and is cleared by it: then end it again, discarding what it recorded.
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = self.gpu.stream.end_capture(flags);
        let none = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if graph.is_err() && self.gpu.stream.capture_status().is_ok_and(|s| s != none) {
            let _ = self.gpu.stream.end_capture(flags);
        }
        recorded?;
        graph?.ok_or_else(|| CudaError::Driver("stream capture recorded nothing".into()))
    }
}
