//! The CUDA side: finding the toolkit and driver at run time (cudarc, dynamic loading),
//! compiling `kernels/*.cu` with NVRTC, and checking each kernel against its CPU twin.
//!
//! One binary serves CPU-only and GPU machines: nothing here is needed to build, and nothing is
//! loaded until a command asks for CUDA.

pub mod bench;
pub mod bench_coserve;
pub mod bench_train;
pub mod decoder;
pub mod device;
pub mod gemm;
pub mod gemm_tuning;
pub mod gpu;
pub mod kernels;
pub mod sampling;
pub mod selftest;
pub mod toolkit;
pub mod twins;

pub use device::{DeviceSpec, ResolvedDevice};

/// Why CUDA could not be used. Each names what was looked for and how to fix it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA toolkit with NVRTC found ({searched}); set CUDA_HOME to a folder with \
         include/cuda_bf16.h and lib64/ or lib/ holding libnvrtc.so.* and libnvrtc-builtins.so.* \
         (without a GPU: pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
         nvidia-cuda-crt==13.0.88 and use site-packages/nvidia/cu13)"
    )]
    NoToolkit { searched: String },
    #[error("could not load NVRTC: {detail}")]
    NvrtcLoad { detail: String },
    #[error("no CUDA driver on this machine (libcuda.so.1 could not be loaded); use --device cpu")]
    NoDriver,
    #[error("CUDA driver error: {0}")]
    Driver(String),
    #[error(
        "--device cuda:{ordinal} asked for, but this machine has {count} CUDA device(s); use \
         --device cpu, or an ordinal below the count"
    )]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error(
        "NVRTC {nvrtc:?} writes PTX newer than this driver (CUDA {driver:?}) can load; use a \
         toolkit no newer than the driver (CUDA_HOME) or update the driver"
    )]
    NvrtcNewerThanDriver { nvrtc: (i32, i32), driver: (i32, i32) },
    #[error("kernel {file} does not compile for {arch}:\n{log}")]
    Compile { file: String, arch: String, log: String },
    #[error("kernel cache {path}: {detail}")]
    Cache { path: String, detail: String },
    #[error("{0} needs a CUDA device (--device cuda or cuda:N); this resolved to the CPU")]
    NotCuda(&'static str),
    #[error("invalid --device {0:?}: expected cpu, cuda, cuda:N or auto")]
    BadDeviceSpec(String),
    #[error("{0}")]
    Blas(String),
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e.to_string())
    }
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        Self::Blas(format!("cuBLASLt error: {e}"))
    }
}
