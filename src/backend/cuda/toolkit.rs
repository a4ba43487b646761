//! Finding the CUDA pieces at run time: NVRTC (to compile `kernels/*.cu`) with the headers it
//! needs, and the driver (to run them).
//!
//! Nothing is linked at build time. NVRTC and its builtins library are opened by absolute path
//! from the toolkit folder, so neither `LD_LIBRARY_PATH` nor a system install is needed: once a
//! library is loaded, the loader answers later requests for its soname with the same copy.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::CudaError;

/// A CUDA toolkit folder: `include/` with `cuda_bf16.h`, and `lib64/` or `lib/` with NVRTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolkit {
    pub home: PathBuf,
    pub include: PathBuf,
    pub nvrtc: PathBuf,
    pub nvrtc_builtins: PathBuf,
}

/// Where a toolkit is looked for, in order: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`.
pub fn candidate_homes() -> Vec<PathBuf> {
    let mut homes: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    homes.push(PathBuf::from("/usr/local/cuda"));
    homes
}

impl Toolkit {
    /// The first candidate home that holds everything NVRTC needs.
    pub fn find() -> Result<Self, CudaError> {
        let homes = candidate_homes();
        let mut problems = Vec::new();
        for home in &homes {
            match Self::probe(home) {
                Ok(t) => return Ok(t),
                Err(why) => problems.push(why),
            }
        }
        Err(CudaError::NoToolkit { searched: problems.join("; ") })
    }

    /// The toolkit at `home`, if it has the headers and both NVRTC libraries.
    pub fn at(home: &Path) -> Result<Self, CudaError> {
        Self::probe(home).map_err(|searched| CudaError::NoToolkit { searched })
    }

    /// The toolkit at `home`, or what it lacks.
    fn probe(home: &Path) -> Result<Self, String> {
        let include = home.join("include");
        if !include.join("cuda_bf16.h").is_file() {
            return Err(format!("{}: no include/cuda_bf16.h", home.display()));
        }
        let lib_dirs = [home.join("lib64"), home.join("lib")];
        let find = |prefix: &str| lib_dirs.iter().find_map(|dir| newest_versioned(dir, prefix));
        match (find("libnvrtc.so."), find("libnvrtc-builtins.so.")) {
            (Some(nvrtc), Some(nvrtc_builtins)) => {
                Ok(Self { home: home.to_path_buf(), include, nvrtc, nvrtc_builtins })
            }
            _ => Err(format!(
                "{}: no libnvrtc.so.* and libnvrtc-builtins.so.* in lib64/ or lib/",
                home.display()
            )),
        }
    }

    /// Opens NVRTC from this toolkit for the rest of the process. Only the first call loads;
    /// later calls report how that went.
    pub fn load_nvrtc(&self) -> Result<(), CudaError> {
        static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                for lib in [&self.nvrtc_builtins, &self.nvrtc] {
                    // SAFETY: loading NVRTC runs only its own initialisers; the handle is kept
                    // for the life of the process (cudarc resolves symbols through it later).
                    match unsafe { libloading::Library::new(lib) } {
                        Ok(l) => std::mem::forget(l),
                        Err(e) => return Err(format!("{}: {e}", lib.display())),
                    }
                }
                // SAFETY: only probes whether the library can be opened.
                if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                    Ok(())
                } else {
                    Err(format!(
                        "{} loaded, but not under a name cudarc looks for",
                        self.nvrtc.display()
                    ))
                }
            })
            .clone()
            .map_err(|detail| CudaError::NvrtcLoad { detail })
    }
}

/// Opens cuBLASLt for the rest of the process: from the toolkit's `lib64/` or `lib/` by absolute
/// path when it is there (so no `LD_LIBRARY_PATH` is needed), else wherever the system loader
/// finds it. cudarc would panic on a missing library; this is the check that keeps it from
/// getting that far.
pub fn load_cublaslt(toolkit: &Toolkit) -> Result<(), CudaError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dirs = [toolkit.home.join("lib64"), toolkit.home.join("lib")];
            if let Some(lib) = dirs.iter().find_map(|d| newest_versioned(d, "libcublasLt.so.")) {
                // SAFETY: as for NVRTC: only the library's initialisers run; the handle is
                // kept for the life of the process.
                match unsafe { libloading::Library::new(&lib) } {
                    Ok(l) => std::mem::forget(l),
                    Err(e) => return Err(format!("{}: {e}", lib.display())),
                }
            }
            // SAFETY: only probes whether the library can be opened.
            if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "no libcublasLt.so.* in {}/lib64 or lib, nor on the loader's path",
                    toolkit.home.display()
                ))
            }
        })
        .clone()
        .map_err(|detail| CudaError::Blas(format!("could not load cuBLASLt: {detail}")))
}

/// The file in `dir` named `prefix` + version with the highest version (`libnvrtc.so.13` over
/// `libnvrtc.so.12`); alternative builds such as `libnvrtc.alt.so.13` do not match the prefix.
fn newest_versioned(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let version = |name: &str| -> Option<Vec<u32>> {
        let v = name.strip_prefix(prefix)?;
        v.split('.').map(|p| p.parse().ok()).collect()
    };
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((version(&name)?, e.path()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_plain_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.alt.so.14", "libnvrtc.so.x"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let got = newest_versioned(dir.path(), "libnvrtc.so.").unwrap();
        assert_eq!(got.file_name().unwrap(), "libnvrtc.so.13");
        assert!(newest_versioned(dir.path(), "libnvrtc-builtins.so.").is_none());
    }

    #[test]
    fn a_folder_without_headers_is_not_a_toolkit() {
        let dir = tempfile::tempdir().unwrap();
        let err = Toolkit::at(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cuda_bf16.h"), "{err}");
        std::fs::create_dir_all(dir.path().join("include")).unwrap();
        std::fs::write(dir.path().join("include/cuda_bf16.h"), b"").unwrap();
        let err = Toolkit::at(dir.path()).unwrap_err().to_string();
        assert!(err.contains("libnvrtc"), "{err}");
        std::fs::create_dir_all(dir.path().join("lib")).unwrap();
        for name in ["libnvrtc.so.13", "libnvrtc-builtins.so.13.0"] {
            std::fs::write(dir.path().join("lib").join(name), b"").unwrap();
        }
        let t = Toolkit::at(dir.path()).unwrap();
        assert!(t.nvrtc.ends_with("lib/libnvrtc.so.13"));
        assert!(t.nvrtc_builtins.ends_with("lib/libnvrtc-builtins.so.13.0"));
    }
}
