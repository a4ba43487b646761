//! The CUDA side without a GPU: every kernel compiles with NVRTC for sm_80 and sm_90, and the
//! commands that need a GPU fail with a clear error on a machine without one.
//!
//! Compiling needs a CUDA toolkit folder (`$CUDA_HOME`, `$CUDA_PATH` or `/usr/local/cuda`);
//! `.ci/run` installs NVRTC from PyPI and sets `COSERVE_REQUIRE_CUDA_TOOLKIT=1`, so there the
//! compile test cannot be skipped.

use crate::common;

use std::process::Command;

use coserve::backend::cuda::device::cuda_device_count;
use coserve::backend::cuda::kernels::{check_all, KernelCache, CHECK_ARCHS, KERNEL_FILES};

use common::device::toolkit_or_skip;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let Some(toolkit) = toolkit_or_skip() else { return };
    let results = check_all(&toolkit);
    assert_eq!(results.len(), KERNEL_FILES.len() * CHECK_ARCHS.len());
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.outcome.as_ref().err().map(|e| format!("{} {}: {e}", r.file, r.arch)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn compiled_kernels_are_cached_by_source_and_arch() {
    let Some(toolkit) = toolkit_or_skip() else { return };
    let home = tempfile::tempdir().expect("tempdir");
    let cache = KernelCache::new(home.path());
    let file = &KERNEL_FILES[0];
    let first = cache.ptx(&toolkit, file, "sm_90").expect("compiles");
    let dir = home.path().join("kernels");
    let entries = || {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .expect("cache dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        v.sort();
        v
    };
    let names = entries();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("norm-sm_90-") && names[0].ends_with(".ptx"), "{names:?}");
    // A second request is served from disk: make the cached copy recognisable.
    let path = dir.join(&names[0]);
    std::fs::write(&path, format!("{first}// from the cache\n")).expect("write");
    let second = cache.ptx(&toolkit, file, "sm_90").expect("cached");
    assert!(second.ends_with("// from the cache\n"));
    // Another architecture is another entry.
    cache.ptx(&toolkit, file, "sm_80").expect("compiles");
    assert_eq!(entries().len(), 2);
}

#[test]
fn gpu_commands_fail_clearly_without_a_gpu() {
    if cuda_device_count().is_ok_and(|n| n > 0) {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_coserve"))
        .args(["selftest", "--device", "cuda"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: no CUDA driver") || err.contains("0 CUDA device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_coserve"))
        .args(["selftest", "--device", "cuda:x"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{err}");

    // `serve` checks the device before it loads a model.
    let data = tempfile::tempdir().expect("tempdir");
    for (device, want) in [("cuda", "no CUDA driver"), ("cuda:nine", "expected cpu, cuda")] {
        let out = Command::new(env!("CARGO_BIN_EXE_coserve"))
            .args(["serve", "--port", "0", "--device", device, "--model", "/nonexistent.gguf"])
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(want) || err.contains("0 CUDA device"), "{device}: {err}");
        assert!(!err.contains("panicked") && !err.contains("nonexistent"), "{err}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_coserve"))
        .args(["bench-decode", "--device", "cuda", "--dummy-weights", "llama-3-8b"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no CUDA driver") || err.contains("0 CUDA device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
