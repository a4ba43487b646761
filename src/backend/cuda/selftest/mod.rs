//! `coserve selftest --device cuda`: runs every kernel on the GPU at several shapes and
//! compares it with its CPU twin (`twins`) on the same bf16-rounded inputs.

mod layers;
mod training;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

use super::kernels::{KernelCache, KERNEL_FILES};
use super::toolkit::Toolkit;
use super::twins::round_bf16;
use super::{CudaError, DeviceSpec, ResolvedDevice};

/// One comparison of a kernel output with its twin.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub kernel: String,
    pub shape: String,
    /// Largest |gpu - cpu| over the output.
    pub max_abs_error: f64,
    /// Largest |gpu - cpu| / (atol + rtol * |cpu|); the check passes at <= 1.
    pub worst_ratio: f64,
    pub passed: bool,
    /// Set when the kernel could not be compiled, loaded or launched.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub arch: String,
    pub checks: Vec<Check>,
    pub passed: usize,
    pub failed: usize,
}

/// Compiles the kernels for the device named by `spec` and checks each one. Fails only when
/// there is no GPU or toolkit; a failing kernel is a failed check in the report.
pub fn run(spec: DeviceSpec, home: &Path) -> Result<Report, CudaError> {
    let device = spec.resolve()?;
    let (ResolvedDevice::Cuda { ordinal, .. }, Some(arch)) = (&device, device.arch()) else {
        return Err(CudaError::NotCuda("the selftest (CUDA kernels against their CPU twins)"));
    };
    let toolkit = Toolkit::find()?;
    // PTX from a newer NVRTC than the driver fails to load in every module: say so once, up front.
    toolkit.load_nvrtc()?;
    let (nvrtc, driver) = (super::kernels::nvrtc_version()?, super::device::driver_cuda_version()?);
    if nvrtc > driver {
        return Err(CudaError::NvrtcNewerThanDriver { nvrtc, driver });
    }
    let ctx = CudaContext::new(*ordinal)?;
    let mut gpu = Gpu {
        stream: ctx.default_stream(),
        ctx,
        toolkit,
        cache: KernelCache::new(home),
        arch: arch.clone(),
        modules: HashMap::new(),
    };
    let mut checks = Vec::new();
    let suites: [(&str, Suite); 9] = [
        ("rms_norm_bf16", layers::check_norm),
        ("rope_kv_write_bf16", layers::check_rope),
        ("silu_mul_bf16", layers::check_silu),
        ("embedding_bf16", layers::check_embedding),
        ("paged_attention_bf16", layers::check_attention),
        ("argmax_logprob_f32", training::check_argmax),
        ("cross_entropy_f32", training::check_cross_entropy),
        ("lora_bf16", training::check_lora),
        ("adamw_f32", training::check_adamw),
    ];
    for (name, suite) in suites {
        // Synchronise after each suite so an asynchronous fault is reported against it.
        let outcome = suite(&mut gpu, &mut checks).and_then(|()| Ok(gpu.stream.synchronize()?));
        if let Err(e) = outcome {
            checks.push(Check {
                kernel: name.into(),
                shape: String::new(),
                max_abs_error: f64::NAN,
                worst_ratio: f64::NAN,
                passed: false,
                error: Some(e.to_string()),
            });
        }
    }
    let passed = checks.iter().filter(|c| c.passed).count();
    Ok(Report { device: device.to_string(), arch, failed: checks.len() - passed, passed, checks })
}

type Suite = fn(&mut Gpu, &mut Vec<Check>) -> Result<(), CudaError>;

pub(super) struct Gpu {
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    toolkit: Toolkit,
    cache: KernelCache,
    arch: String,
    modules: HashMap<&'static str, Arc<CudaModule>>,
}

impl Gpu {
    pub(super) fn func(
        &mut self,
        file: &'static str,
        name: &str,
    ) -> Result<CudaFunction, CudaError> {
        if !self.modules.contains_key(file) {
            let kf = KERNEL_FILES
                .iter()
                .find(|k| k.name == file)
                .ok_or_else(|| CudaError::Driver(format!("no kernel file {file}")))?;
            let ptx = self.cache.ptx(&self.toolkit, kf, &self.arch)?;
            let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
            self.modules.insert(file, module);
        }
        Ok(self.modules[file].load_function(name)?)
    }

    pub(super) fn up<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(x)?)
    }

    pub(super) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros(n.max(1))?)
    }

    pub(super) fn down<T: DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        Ok(self.stream.clone_dtoh(x)?)
    }

    pub(super) fn up_bf16(&self, x: &[f32]) -> Result<CudaSlice<u16>, CudaError> {
        let bits: Vec<u16> = x.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        self.up(&bits)
    }

    pub(super) fn down_bf16(&self, x: &CudaSlice<u16>, len: usize) -> Result<Vec<f32>, CudaError> {
        let bits = self.down(x)?;
        Ok(bits.iter().take(len).map(|b| half::bf16::from_bits(*b).to_f32()).collect())
    }
}

pub(super) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub(super) fn n32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Uniform values in (-range, range), rounded to bf16 so host and device start equal.
pub(super) fn random_bf16(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| round_bf16(rng.random_range(-range..range))).collect()
}

/// Records one comparison: tolerance `atol_frac * max|want| + rtol * |want|` per element.
pub(super) fn compare(
    checks: &mut Vec<Check>,
    kernel: &str,
    shape: String,
    got: &[f32],
    want: &[f32],
    rtol: f64,
    atol_frac: f64,
) {
    let scale = want.iter().fold(0f64, |a, &w| a.max((w as f64).abs()));
    let atol = (atol_frac * scale).max(1e-30);
    let (mut max_abs, mut worst) = (0f64, 0f64);
    let mut finite = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        finite &= d.is_finite();
        max_abs = max_abs.max(d);
        worst = worst.max(d / (atol + rtol * (w as f64).abs()));
    }
    let passed = finite && worst <= 1.0;
    let error = (got.len() != want.len())
        .then(|| format!("output length {} where the twin has {}", got.len(), want.len()));
    checks.push(Check {
        kernel: kernel.into(),
        shape,
        max_abs_error: max_abs,
        worst_ratio: worst,
        passed,
        error,
    });
}

/// bf16 outputs: two bf16 ulps of each value plus a small share of the output's scale.
pub(super) const BF16_RTOL: f64 = 1.0 / 128.0;
pub(super) const BF16_ATOL: f64 = 4e-3;
