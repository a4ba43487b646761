//! `--device cpu|cuda[:N]|auto` and what it resolves to on this machine.

use std::str::FromStr;

use super::CudaError;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when a driver and a GPU are present, else the CPU.
    #[default]
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = CudaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CudaError::BadDeviceSpec(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// A device that exists on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedDevice {
    Cpu,
    Cuda { ordinal: usize, name: String, compute_capability: (i32, i32), total_memory: usize },
}

impl ResolvedDevice {
    /// NVRTC's `--gpu-architecture` for this device (`None` on the CPU).
    pub fn arch(&self) -> Option<String> {
        match self {
            Self::Cpu => None,
            Self::Cuda { compute_capability: (major, minor), .. } => {
                Some(format!("sm_{major}{minor}"))
            }
        }
    }
}

impl std::fmt::Display for ResolvedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal, name, compute_capability: (a, b), total_memory } => write!(
                f,
                "cuda:{ordinal} ({name}, compute {a}.{b}, {:.1} GiB)",
                *total_memory as f64 / (1u64 << 30) as f64
            ),
        }
    }
}

/// How many CUDA devices the driver sees; `NoDriver` when there is no driver at all.
pub fn cuda_device_count() -> Result<usize, CudaError> {
    // SAFETY: only probes whether libcuda can be opened; cudarc would panic on first use
    // otherwise.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(count) => Ok(usize::try_from(count).unwrap_or(0)),
        // A driver without a GPU (e.g. a container with the library mounted) has none.
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The CUDA version the driver supports, as (major, minor): 13000 from the driver is (13, 0).
pub fn driver_cuda_version() -> Result<(i32, i32), CudaError> {
    // SAFETY: probing only; cudarc would panic without the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let mut v = 0;
    // SAFETY: one out-parameter, written by the driver.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Driver(format!("cuDriverGetVersion: {r:?}")));
    }
    Ok((v / 1000, v % 1000 / 10))
}

impl DeviceSpec {
    /// The device this spec names on this machine. `cuda` without a driver or GPU is an error;
    /// `auto` then falls back to the CPU.
    pub fn resolve(self) -> Result<ResolvedDevice, CudaError> {
        match self {
            Self::Cpu => Ok(ResolvedDevice::Cpu),
            Self::Cuda(ordinal) => describe(ordinal),
            Self::Auto => match cuda_device_count() {
                Ok(n) if n > 0 => describe(0),
                _ => Ok(ResolvedDevice::Cpu),
            },
        }
    }
}

fn describe(ordinal: usize) -> Result<ResolvedDevice, CudaError> {
    let count = cuda_device_count()?;
    if ordinal >= count {
        return Err(CudaError::NoSuchDevice { ordinal, count });
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal)?;
    Ok(ResolvedDevice::Cuda {
        ordinal,
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        total_memory: ctx.total_mem()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda:1:2"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{bad}: {err}");
        }
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Auto] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn cuda_without_a_driver_is_a_clear_error_and_auto_falls_back() {
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), ResolvedDevice::Cpu);
        match cuda_device_count() {
            Err(CudaError::NoDriver) => {
                let err = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
                assert!(err.contains("no CUDA driver") && err.contains("--device cpu"), "{err}");
                assert_eq!(DeviceSpec::Auto.resolve().unwrap(), ResolvedDevice::Cpu);
            }
            // A GPU machine: the device must describe itself.
            Ok(n) if n > 0 => {
                let d = DeviceSpec::Auto.resolve().unwrap();
                assert!(d.arch().is_some_and(|a| a.starts_with("sm_")), "{d}");
                let err = DeviceSpec::Cuda(n).resolve().unwrap_err();
                assert!(matches!(err, CudaError::NoSuchDevice { .. }), "{err}");
            }
            other => eprintln!("driver present without devices: {other:?}"),
        }
    }
}
