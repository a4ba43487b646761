//! Matrix products through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 output.
//!
//! Every product the decoder does is `y[m, n] = x[m, k] · w[n, k]ᵀ` with row-major `x`, `w`
//! and `y` (weights stored as the checkpoint has them, one row per output feature). cuBLASLt is
//! column-major, so this is computed as `yᵀ = w · xᵀ`: A = w seen as a `k × n` column-major
//! matrix and transposed, B = x seen as `k × m` column-major, D = y seen as `n × m`.

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
    plans: HashMap<(usize, usize, usize, OutType, u32), Plan>,
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
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        // The heuristic assumes 256-byte aligned operands unless told otherwise; a weight
        // slice (the k rows of a fused qkv) may be less aligned, and needs a plan that allows it.
        let align = [x, w, y].iter().map(|&p| alignment(p)).min().unwrap_or(1);
        let key = (m, n, k, out, align);
        if !self.plans.contains_key(&key) {
            let plan = self.plan(m, n, k, out, align)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let (alpha, beta) = (1f32, 0f32);
        let (ws, _guard) =
            cudarc::driver::DevicePtrMut::device_ptr_mut(&mut self.workspace, &self.stream);
        lt::matmul(
            self.handle,
            plan.desc,
            (&alpha) as *const f32 as *const c_void,
            (&beta) as *const f32 as *const c_void,
            w as *const c_void,
            plan.a,
            x as *const c_void,
            plan.b,
            y as *const c_void,
            plan.d,
            y as *mut c_void,
            plan.d,
            &plan.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )?;
        Ok(())
    }

    fn plan(
        &self,
        m: usize,
        n: usize,
        k: usize,
        out: OutType,
        align: u32,
    ) -> Result<Plan, CudaError> {
        let bf16 = sys::cudaDataType::CUDA_R_16BF;
        let d_type = match out {
            OutType::Bf16 => bf16,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        };
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
        let transpose: i32 = 1;
        // SAFETY: `desc` is live; the attribute is a 32-bit cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose) as *const i32 as *const c_void,
                size_of::<i32>(),
            )?;
        }
        plan.a = lt::create_matrix_layout(bf16, k64, n64, k as i64)?;
        plan.b = lt::create_matrix_layout(bf16, k64, m64, k as i64)?;
        plan.d = lt::create_matrix_layout(d_type, n64, m64, n as i64)?;
        let pref = lt::create_matmul_pref()?;
        let ws = WORKSPACE_BYTES as u64;
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
        .map_err(|e| {
            CudaError::Blas(format!("cuBLASLt has no algorithm for {m}x{k} · ({n}x{k})ᵀ: {e}"))
        })?;
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
