//! One CUDA device as the rest of the CUDA side uses it: a context with one stream, the
//! kernels compiled for its architecture (loaded on first use), and typed copies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};

use super::kernels::{KernelCache, KERNEL_FILES};
use super::toolkit::Toolkit;
use super::{CudaError, DeviceSpec, ResolvedDevice};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Everything runs on this one stream, in order.
    pub stream: Arc<CudaStream>,
    pub toolkit: Toolkit,
    pub device: ResolvedDevice,
    pub arch: String,
    cache: KernelCache,
    modules: HashMap<&'static str, Arc<CudaModule>>,
}

impl Gpu {
    /// Opens the device `spec` names, with the toolkit its kernels are compiled by. `what`
    /// names the command, for the error on a machine where `spec` resolves to the CPU.
    pub fn open(spec: DeviceSpec, home: &Path, what: &'static str) -> Result<Self, CudaError> {
        let device = spec.resolve()?;
        let (ResolvedDevice::Cuda { ordinal, .. }, Some(arch)) = (&device, device.arch()) else {
            return Err(CudaError::NotCuda(what));
        };
        let toolkit = Toolkit::find()?;
        // PTX from a newer NVRTC than the driver fails to load in every module: say so once.
        toolkit.load_nvrtc()?;
        let (nvrtc, driver) =
            (super::kernels::nvrtc_version()?, super::device::driver_cuda_version()?);
        if nvrtc > driver {
            return Err(CudaError::NvrtcNewerThanDriver { nvrtc, driver });
        }
        let ctx = CudaContext::new(*ordinal)?;
        // SAFETY: every buffer is used on the one stream below only, so cross-stream event
        // tracking has nothing to order; leaving it on would record an event per argument.
        unsafe { ctx.disable_event_tracking() };
        Ok(Self {
            // A stream of its own: the legacy default stream cannot be captured into a graph.
            stream: ctx.new_stream()?,
            ctx,
            toolkit,
            arch,
            device,
            cache: KernelCache::new(home),
            modules: HashMap::new(),
        })
    }

    /// The kernel `name` of `kernels/<file>`, compiling and loading the file on first use.
    pub fn func(&mut self, file: &'static str, name: &str) -> Result<CudaFunction, CudaError> {
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

    pub fn up<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(x)?)
    }

    /// `n` zeroed elements (at least one, so an empty batch still has a valid pointer).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros(n.max(1))?)
    }

    pub fn down<T: DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        Ok(self.stream.clone_dtoh(x)?)
    }

    pub fn up_bf16(&self, x: &[f32]) -> Result<CudaSlice<u16>, CudaError> {
        let bits: Vec<u16> = x.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        self.up(&bits)
    }

    pub fn down_bf16(&self, x: &CudaSlice<u16>, len: usize) -> Result<Vec<f32>, CudaError> {
        let bits = self.down(x)?;
        Ok(bits.iter().take(len).map(|b| half::bf16::from_bits(*b).to_f32()).collect())
    }

    pub fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

pub fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// A launch dimension; sizes past `u32` saturate (the launch then fails with a driver error
/// rather than silently wrapping).
pub fn n32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
