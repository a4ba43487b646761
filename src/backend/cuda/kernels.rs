//! The CUDA kernels embedded in the binary (`kernels/*.cu`), compiled with NVRTC for the
//! device's architecture at first use and cached on disk by source hash and architecture.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::toolkit::Toolkit;
use super::CudaError;

/// Prepended to every kernel file: bf16 helpers and block reductions.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One `.cu` file and the `extern "C"` kernels the host launches from it.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

macro_rules! kernel_file {
    ($name:literal, [$($f:literal),+ $(,)?]) => {
        KernelFile {
            name: $name,
            source: include_str!(concat!("../../../kernels/", $name)),
            functions: &[$($f),+],
        }
    };
}

pub const KERNEL_FILES: &[KernelFile] = &[
    kernel_file!("norm.cu", ["rms_norm_bf16", "add_rms_norm_bf16"]),
    kernel_file!("rope_kv.cu", ["rope_kv_write_bf16"]),
    kernel_file!("activation.cu", ["silu_mul_bf16", "embedding_bf16"]),
    kernel_file!(
        "paged_attention.cu",
        [
            "paged_attention_partial_bf16",
            "paged_attention_grouped_bf16",
            "paged_attention_combine_bf16"
        ]
    ),
    kernel_file!("sampling.cu", ["argmax_logprob_f32", "sample_rows_f32", "apply_penalties_f32"]),
    kernel_file!("cross_entropy.cu", ["cross_entropy_f32"]),
    kernel_file!(
        "lora.cu",
        ["lora_shrink_bf16", "lora_expand_bf16", "lora_dropout_bf16", "lora_dropout_add_f32"]
    ),
    kernel_file!("adamw.cu", ["adamw_f32"]),
    kernel_file!("init.cu", ["fill_uniform_bf16"]),
    kernel_file!(
        "backward.cu",
        [
            "rms_norm_backward_f32",
            "silu_mul_backward_f32",
            "rope_backward_f32",
            "f32_to_bf16",
            "sum_squares_f32",
            "scale_f32"
        ]
    ),
    kernel_file!(
        "attention_backward.cu",
        ["attention_backward_dq_f32", "attention_backward_dkv_f32"]
    ),
    kernel_file!(
        "attention_tiled.cu",
        [
            "attention_chunk_tiled",
            "attention_backward_dq_tiled",
            "attention_backward_dkv_tiled",
            "attention_backward_dkv_sum_f32"
        ]
    ),
];

/// The architectures `coserve kernels check` compiles for: A100 and H100.
pub const CHECK_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// NVRTC options besides the architecture and include path. Kept in the cache key.
const OPTIONS: &[&str] = &["--std=c++17"];

impl KernelFile {
    /// The text NVRTC compiles: the common prelude, then the file.
    pub fn full_source(&self) -> String {
        format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.source)
    }

    /// The argument of `function`'s `__launch_bounds__` (a number, or a macro of the file): the
    /// most threads a block of it may have. Every kernel declares one, so the compiler keeps
    /// its registers within what a block that size may have, instead of the launch failing on
    /// the device.
    pub fn launch_bound(&self, function: &str) -> Option<&'static str> {
        let source: &'static str = self.source;
        let prefix = "extern \"C\" __global__ void __launch_bounds__(";
        source.match_indices(prefix).find_map(|(at, _)| {
            let rest = &source[at + prefix.len()..];
            let (bounds, after) = rest.split_once(") ")?;
            let bound = bounds.split(',').next()?.trim();
            after.strip_prefix(function)?.starts_with('(').then_some(bound)
        })
    }

    /// Cache key: source, options, NVRTC version and architecture.
    fn digest(&self, arch: &str, nvrtc_version: (i32, i32)) -> String {
        let mut h = Sha256::new();
        h.update(self.full_source().as_bytes());
        for o in OPTIONS {
            h.update(o.as_bytes());
        }
        h.update(format!("nvrtc {}.{} {arch}", nvrtc_version.0, nvrtc_version.1).as_bytes());
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// NVRTC's version; the toolkit's NVRTC must be loaded first.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters, written by NVRTC; the library was loaded by `load_nvrtc`.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    match r {
        cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS => Ok((major, minor)),
        e => Err(CudaError::NvrtcLoad { detail: format!("nvrtcVersion failed: {e:?}") }),
    }
}

/// Compiles one kernel file to PTX for `arch` (e.g. `sm_90`). Every kernel the host launches
/// must be in the PTX, so a renamed or misspelled kernel fails here rather than at launch.
pub fn compile(toolkit: &Toolkit, file: &KernelFile, arch: &str) -> Result<String, CudaError> {
    toolkit.load_nvrtc()?;
    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths: vec![toolkit.include.display().to_string()],
        options,
        name: Some(file.name.to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(file.full_source(), opts).map_err(|e| {
        CudaError::Compile { file: file.name.into(), arch: arch.into(), log: compile_log(&e) }
    })?;
    let text = ptx.to_src();
    let missing: Vec<&str> = file
        .functions
        .iter()
        .copied()
        .filter(|f| !text.contains(&format!(".entry {f}(")))
        .collect();
    if !missing.is_empty() {
        return Err(CudaError::Compile {
            file: file.name.into(),
            arch: arch.into(),
            log: format!("kernels not found in the PTX: {}", missing.join(", ")),
        });
    }
    // The bound reaches the device only as the entry's `.maxntid`.
    let unbounded: Vec<&str> =
        file.functions.iter().copied().filter(|f| max_threads(&text, f).is_none()).collect();
    if !unbounded.is_empty() {
        return Err(CudaError::Compile {
            file: file.name.into(),
            arch: arch.into(),
            log: format!("kernels without .maxntid in the PTX: {}", unbounded.join(", ")),
        });
    }
    Ok(text)
}

/// The `.maxntid` (most threads a block) of `function`'s entry in `ptx`.
pub fn max_threads(ptx: &str, function: &str) -> Option<u32> {
    let entry = ptx.split(&format!(".entry {function}(")).nth(1)?;
    // The directives sit between the parameter list and the body.
    let head = &entry[..entry.find('{')?];
    let dims = head.split(".maxntid").nth(1)?.lines().next()?;
    dims.split(',').map(|d| d.trim().parse::<u32>().ok()).try_fold(1u32, |n, d| n.checked_mul(d?))
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            log.to_string_lossy().trim().to_string()
        }
        other => format!("{other:?}"),
    }
}

/// PTX on disk, one file per kernel file, architecture and digest.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// The cache under `$COSERVE_HOME/kernels`.
    pub fn new(home: &Path) -> Self {
        Self { dir: home.join("kernels") }
    }

    /// The PTX of `file` for `arch`: from disk when cached, else compiled and saved (written to
    /// a temporary file and renamed, so a concurrent reader never sees half a file).
    pub fn ptx(
        &self,
        toolkit: &Toolkit,
        file: &KernelFile,
        arch: &str,
    ) -> Result<String, CudaError> {
        toolkit.load_nvrtc()?;
        let stem = file.name.trim_end_matches(".cu");
        let path =
            self.dir.join(format!("{stem}-{arch}-{}.ptx", file.digest(arch, nvrtc_version()?)));
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(text);
        }
        let text = compile(toolkit, file, arch)?;
        let cache_err = |detail: std::io::Error| CudaError::Cache {
            path: path.display().to_string(),
            detail: detail.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(cache_err)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &text).map_err(cache_err)?;
        std::fs::rename(&tmp, &path).map_err(cache_err)?;
        Ok(text)
    }
}

/// One line of `coserve kernels check`.
#[derive(Debug)]
pub struct CheckResult {
    pub file: &'static str,
    pub arch: &'static str,
    pub outcome: Result<String, CudaError>,
}

/// Compiles every kernel file for every architecture in `CHECK_ARCHS`; the outcome is the PTX.
pub fn check_all(toolkit: &Toolkit) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for file in KERNEL_FILES {
        for &arch in CHECK_ARCHS {
            out.push(CheckResult { file: file.name, arch, outcome: compile(toolkit, file, arch) });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_file() {
        for file in KERNEL_FILES {
            for f in file.functions {
                let bound = file.launch_bound(f);
                assert!(
                    bound.is_some(),
                    "{} does not define {f} with its launch bounds",
                    file.name
                );
            }
            // And nothing launchable is left unlisted.
            let defined = file.source.matches("extern \"C\" __global__ void ").count();
            assert_eq!(defined, file.functions.len(), "{}", file.name);
        }
        let norm = KERNEL_FILES[0];
        assert_eq!(norm.launch_bound("rms_norm_bf16"), Some("1024"));
        assert_eq!(norm.launch_bound("rms_norm"), None);
    }

    #[test]
    fn max_threads_reads_the_entry_s_own_directive() {
        let ptx = ".visible .entry a(\n\t.param .u64 a_0\n)\n.maxntid 128, 1, 1\n{\n}\n\
                   .visible .entry b(\n\t.param .u64 b_0\n)\n{\n}\n\
                   .visible .entry c(\n)\n.maxntid 64, 2, 1\n.minnctapersm 2\n{\n}\n";
        assert_eq!(max_threads(ptx, "a"), Some(128));
        assert_eq!(max_threads(ptx, "b"), None);
        assert_eq!(max_threads(ptx, "c"), Some(128));
        assert_eq!(max_threads(ptx, "d"), None);
    }

    #[test]
    fn the_cache_key_follows_source_arch_and_compiler() {
        let a = KERNEL_FILES[0];
        let mut b = a;
        b.source = "// changed\n";
        assert_ne!(a.digest("sm_90", (13, 0)), b.digest("sm_90", (13, 0)));
        assert_ne!(a.digest("sm_90", (13, 0)), a.digest("sm_80", (13, 0)));
        assert_ne!(a.digest("sm_90", (13, 0)), a.digest("sm_90", (13, 1)));
        assert_eq!(a.digest("sm_90", (13, 0)), a.digest("sm_90", (13, 0)));
    }
}
