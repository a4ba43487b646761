//! Matrix products through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 output.
//!
//! The forward's products are `y[m, n] = x[m, k] · w[n, k]ᵀ` with row-major `x`, `w` and `y`
//! (weights stored as the checkpoint has them, one row per output feature); the backward's
//! also read operands untransposed (`dx = dy · w`) or transposed (`dA = gᵀ · x`) and add into
//! their output. cuBLASLt is column-major, so `d = op(a) · op(b)` is computed as
//! `dᵀ = op(b)ᵀ · op(a)ᵀ`: a row-major matrix is its column-major transpose.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream};

use super::gemm_tuning::{self, Tuned};
use super::toolkit::{load_cublaslt, Toolkit};
use super::CudaError;

/// Output element type of a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

/// Descriptors and the chosen algorithm for one shape, made once and reused.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// What the heuristic offered, its pick first.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    /// Whether `algo` was chosen by timing the candidates.
    tuned: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once; errors on
        // teardown have no one to report to.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: HashMap<PlanKey, Plan>,
    /// Whether products whose plan was not tuned yet time their algorithms first.
    tuning: bool,
    tuned: Vec<Tuned>,
}

/// Element type of a product's operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    Bf16,
    F32,
}

impl Elem {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Elem::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Elem::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

impl From<OutType> for Elem {
    fn from(o: OutType) -> Self {
        match o {
            OutType::Bf16 => Elem::Bf16,
            OutType::F32 => Elem::F32,
        }
    }
}

/// One row-major operand: `ptr` to its first element, rows `ld` elements apart, read
/// transposed when `trans`.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: CUdeviceptr,
    pub elem: Elem,
    pub ld: usize,
    pub trans: bool,
}

/// `d[m, n] = alpha · op(a)[m, k] · op(b)[k, n] + beta · d`, all row-major. `a` and `b` share
/// an element type; fp32 accumulation.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub a: Operand,
    pub b: Operand,
    pub d: Operand,
    pub mnk: (usize, usize, usize),
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    mnk: (usize, usize, usize),
    elems: (Elem, Elem),
    trans: (bool, bool),
    lds: (usize, usize, usize),
    align: u32,
}

/// Hopper wants a 32 MiB workspace, earlier chips 4 MiB; one size serves both.
const WORKSPACE_BYTES: usize = 32 << 20;

impl Gemm {
    pub fn new(toolkit: &Toolkit, stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        load_cublaslt(toolkit)?;
        let handle = lt::create_handle()?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(Self {
            handle,
            stream,
            workspace,
            plans: HashMap::new(),
            tuning: false,
            tuned: Vec::new(),
        })
    }

    /// From now on (`true`), a product whose plan was not tuned yet first times every
    /// algorithm the heuristic offered for it on its own operands (into a scratch output, so
    /// nothing it writes changes) and keeps the fastest ([`gemm_tuning::pick`]) for every
    /// later product of its shape, tuned or not. This synchronizes the stream, so it is
    /// skipped while the stream is being captured. A shape whose timing fails (a scratch
    /// buffer that does not fit, say) keeps the heuristic's pick and is not timed again.
    pub fn set_tuning(&mut self, on: bool) {
        self.tuning = on;
    }

    /// What tuning found, a line per tuned shape, in order.
    pub fn tuned(&self) -> &[Tuned] {
        &self.tuned
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` on the stream. `x`, `w` point at bf16 data; `y` at bf16
    /// or fp32 data as `out` says.
    ///
    /// # Safety
    /// The pointers must be device allocations of this context holding at least `m * k`,
    /// `n * k` and `m * n` elements, alive until the stream has run the product.
    pub unsafe fn matmul(
        &mut self,
        x: CUdeviceptr,
        w: CUdeviceptr,
        y: CUdeviceptr,
        (m, n, k): (usize, usize, usize),
        out: OutType,
    ) -> Result<(), CudaError> {
        let a = Operand { ptr: x, elem: Elem::Bf16, ld: k, trans: false };
        let b = Operand { ptr: w, elem: Elem::Bf16, ld: k, trans: true };
        let d = Operand { ptr: y, elem: out.into(), ld: n, trans: false };
        self.product(&Product { a, b, d, mnk: (m, n, k), alpha: 1.0, beta: 0.0 })
    }

    /// Runs `p` on the stream.
    ///
    /// # Safety
    /// Each operand must point into a device allocation of this context that holds the rows
    /// and columns `p` reads or writes at its `ld`, alive until the stream has run the product.
    pub unsafe fn product(&mut self, p: &Product) -> Result<(), CudaError> {
        let (m, n, k) = p.mnk;
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        if p.a.elem != p.b.elem || p.d.trans {
            return Err(CudaError::Blas(format!("unsupported product {p:?}")));
        }
        // Row-major `d = op(a) · op(b)` is column-major `dᵀ = op(b)ᵀ · op(a)ᵀ`: cuBLASLt's A
        // is our `b`, its B our `a`. The heuristic assumes 256-byte aligned operands unless
        // told otherwise; a weight slice (the k rows of a fused qkv) may be less aligned, and
        // needs a plan that allows it.
        let align = [p.a.ptr, p.b.ptr, p.d.ptr].iter().map(|&q| alignment(q)).min().unwrap_or(1);
        let key = PlanKey {
            mnk: p.mnk,
            elems: (p.a.elem, p.d.elem),
            trans: (p.a.trans, p.b.trans),
            lds: (p.a.ld, p.b.ld, p.d.ld),
            align,
        };
        if !self.plans.contains_key(&key) {
            let plan = self.plan(&key)?;
            self.plans.insert(key, plan);
        }
        if self.tuning && !self.plans[&key].tuned && !self.capturing()? {
            // SAFETY: as this function's.
            let times = unsafe { self.time_candidates(&key, p) };
            let plan = self.plans.get_mut(&key).expect("planned above");
            plan.tuned = true;
            match times {
                Ok(times) => {
                    let chosen = gemm_tuning::pick(&times);
                    plan.algo = plan.candidates[chosen];
                    tracing::debug!(
                        m, n, k, chosen, candidates = times.len(),
                        chosen_ms = ?times[chosen], heuristic_ms = ?times[0],
                        "cuBLASLt algorithm chosen by timing"
                    );
                    self.tuned.push(Tuned {
                        m,
                        n,
                        k,
                        candidates: times.len(),
                        heuristic_ms: times[0],
                        chosen_ms: times[chosen],
                        chosen,
                    });
                }
                // The heuristic's pick stays; the product itself still runs.
                Err(e) => tracing::warn!("timing cuBLASLt's algorithms for {key:?}: {e}"),
            }
        }
        let plan = &self.plans[&key];
        // SAFETY: as this function's.
        unsafe { self.run(plan, &plan.algo, p, p.d.ptr) }
    }

    /// `p` with `algo`, written to `d` (read there too when `p.beta` is not 0).
    ///
    /// # Safety
    /// As [`Self::product`]'s, with `d` in place of `p.d.ptr`.
    unsafe fn run(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        p: &Product,
        d: CUdeviceptr,
    ) -> Result<(), CudaError> {
        // The workspace is only ever used on this stream, one product at a time.
        let ws = addr(&self.workspace, &self.stream, 0);
        lt::matmul(
            self.handle,
            plan.desc,
            (&p.alpha) as *const f32 as *const c_void,
            (&p.beta) as *const f32 as *const c_void,
            p.b.ptr as *const c_void,
            plan.a,
            p.a.ptr as *const c_void,
            plan.b,
            d as *const c_void,
            plan.d,
            d as *mut c_void,
            plan.d,
            algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )?;
        Ok(())
    }

    fn capturing(&self) -> Result<bool, CudaError> {
        use cudarc::driver::sys::CUstreamCaptureStatus as S;
        Ok(self.stream.capture_status()? != S::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Milliseconds a run of each of `key`'s candidates takes on `p`'s operands (`None`: it
    /// failed to run), writing to a scratch output the size of `p`'s.
    ///
    /// # Safety
    /// As [`Self::product`]'s.
    unsafe fn time_candidates(
        &self,
        key: &PlanKey,
        p: &Product,
    ) -> Result<Vec<Option<f64>>, CudaError> {
        use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
        let plan = &self.plans[key];
        // In a step the other layers' weights pass through L2 between two uses of these, so
        // each timed run starts with them out of it: a buffer twice L2's size is cleared
        // before it. Timed warm, a matrix that fits in L2 would favour the wrong algorithm.
        let l2 = self
            .stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
            .max(0) as usize;
        let mut flush = (l2 > 0).then(|| self.stream.alloc_zeros::<u8>(2 * l2)).transpose()?;
        let elem = match p.d.elem {
            Elem::Bf16 => 2,
            Elem::F32 => 4,
        };
        // Row-major `d`: m rows `ld` apart, the last one n wide.
        let (m, n, _) = p.mnk;
        let scratch = self.stream.alloc_zeros::<u8>(((m - 1) * p.d.ld + n) * elem)?;
        // Aligned as `d` is at least, since the plan was made for that alignment.
        let d = addr(&scratch, &self.stream, 0);
        let mut times = Vec::with_capacity(plan.candidates.len());
        for algo in &plan.candidates {
            // SAFETY: as this function's; the scratch holds what `d` would.
            if unsafe { self.run(plan, algo, p, d) }.is_err() {
                times.push(None);
                continue;
            }
            let mut ms = 0.0;
            for _ in 0..gemm_tuning::TIMED_RUNS {
                if let Some(f) = flush.as_mut() {
                    self.stream.memset_zeros(f)?;
                }
                let start = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                // SAFETY: as above.
                unsafe { self.run(plan, algo, p, d) }?;
                let end = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                ms += f64::from(start.elapsed_ms(&end)?);
            }
            times.push(Some(ms / gemm_tuning::TIMED_RUNS as f64));
        }
        self.stream.synchronize()?;
        drop((scratch, flush));
        Ok(times)
    }

    fn plan(&self, key: &PlanKey) -> Result<Plan, CudaError> {
        let (m, n, k) = key.mnk;
        let (in_type, d_type) = (key.elems.0.cuda(), key.elems.1.cuda());
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )?;
        // Built field by field so a failure part-way still frees what was made (Drop).
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            // SAFETY: a plain C struct of integers; overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            candidates: Vec::new(),
            tuned: false,
        };
        let (trans_a, trans_b) = key.trans;
        use sys::cublasLtMatmulDescAttributes_t as D;
        for (attr, on) in
            [(D::CUBLASLT_MATMUL_DESC_TRANSA, trans_b), (D::CUBLASLT_MATMUL_DESC_TRANSB, trans_a)]
        {
            let op: i32 = on.into();
            // SAFETY: `desc` is live; the attribute is a 32-bit cublasOperation_t.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    (&op) as *const i32 as *const c_void,
                    size_of::<i32>(),
                )?;
            }
        }
        let (lda, ldb, ldd) = key.lds;
        // Our `b` as cuBLASLt's column-major A (`n x k`, or `k x n` read transposed), our `a`
        // as its B (`k x m`, or `m x k` read transposed), d as `n x m`.
        let (ar, ac) = if trans_b { (k64, n64) } else { (n64, k64) };
        let (br, bc) = if trans_a { (m64, k64) } else { (k64, m64) };
        plan.a = lt::create_matrix_layout(in_type, ar, ac, ldb as i64)?;
        plan.b = lt::create_matrix_layout(in_type, br, bc, lda as i64)?;
        plan.d = lt::create_matrix_layout(d_type, n64, m64, ldd as i64)?;
        let pref = lt::create_matmul_pref()?;
        let ws = WORKSPACE_BYTES as u64;
        let align = key.align;
        // SAFETY: every descriptor is live; the preference attribute is a u64.
        let heuristic = unsafe {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let mut set = lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const u64 as *const c_void,
                size_of::<u64>(),
            );
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set = set.and_then(|()| {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        (&align) as *const u32 as *const c_void,
                        size_of::<u32>(),
                    )
                });
            }
            let h = set.and_then(|()| {
                // SAFETY: a plain C struct; the heuristic fills the first `count`.
                let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
                    vec![std::mem::zeroed(); gemm_tuning::CANDIDATES];
                let mut count = 0;
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                    gemm_tuning::CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()?;
                results.truncate(count.clamp(0, gemm_tuning::CANDIDATES as i32) as usize);
                Ok(results)
            });
            let _ = lt::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| CudaError::Blas(format!("cuBLASLt has no algorithm for {key:?}: {e}")))?;
        plan.candidates = heuristic
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        plan.algo = *plan
            .candidates
            .first()
            .ok_or_else(|| CudaError::Blas(format!("cuBLASLt has no algorithm for {key:?}")))?;
        Ok(plan)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// The largest power of two up to 256 that divides `p`.
fn alignment(p: CUdeviceptr) -> u32 {
    if p == 0 {
        return 256;
    }
    1u32 << p.trailing_zeros().min(8)
}

/// The device address of a buffer, `offset` elements in. The guard cudarc returns is dropped at
/// once: with event tracking off (`Gpu::open`) it does nothing, and keeping the buffer alive
/// while the stream uses the address is the caller's job.
pub fn addr<T>(x: &CudaSlice<T>, stream: &CudaStream, offset: usize) -> CUdeviceptr {
    let (p, _guard) = cudarc::driver::DevicePtr::device_ptr(x, stream);
    p + (offset * size_of::<T>()) as CUdeviceptr
}

#[cfg(test)]
mod tests {
    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(super::alignment(0x7f00_0000_0000), 256);
        assert_eq!(super::alignment(0x7f00_0000_0d80), 128);
        assert_eq!(super::alignment(0x7f00_0000_0006), 2);
        assert_eq!(super::alignment(0), 256);
    }
}
