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
        Ok(Self { handle, stream, workspace, plans: HashMap::new() })
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
        let plan = &self.plans[&key];
        let (ws, _guard) =
            cudarc::driver::DevicePtrMut::device_ptr_mut(&mut self.workspace, &self.stream);
        lt::matmul(
            self.handle,
            plan.desc,
            (&p.alpha) as *const f32 as *const c_void,
            (&p.beta) as *const f32 as *const c_void,
            p.b.ptr as *const c_void,
            plan.a,
            p.a.ptr as *const c_void,
            plan.b,
            p.d.ptr as *const c_void,
            plan.d,
            p.d.ptr as *mut c_void,
            plan.d,
            &plan.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )?;
        Ok(())
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
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| CudaError::Blas(format!("cuBLASLt has no algorithm for {key:?}: {e}")))?;
        plan.algo = heuristic.algo;
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
