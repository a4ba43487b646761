//! The CUDA backend's host side run whole without a GPU: `coserve selftest --device cuda`
//! against a stand-in driver and cuBLASLt (`tests/emulation/fake_cuda.cpp`) whose kernel
//! launches run the kernels' own code on the CPU (`tests/emulation/cuda_on_cpu.h`) and whose
//! products follow cuBLASLt's column-major definition. So the launches of `CudaOps` (argument
//! lists, grids, buffer sizes), the cuBLASLt operand mapping, the CUDA-graph capture and the
//! training step on the device are checked against the twins on every machine.
//!
//! Needs the NVRTC toolkit (the kernels are still compiled to PTX first, as on a GPU) and a
//! C++20 compiler; `.ci/run` provides both and sets `COSERVE_REQUIRE_CUDA_TOOLKIT=1`.

mod common;

use std::path::Path;
use std::process::Command;

use common::emulation::{build_fake_driver, build_kernel_library};
use coserve::backend::cuda::kernels::KERNEL_FILES;
use coserve::backend::cuda::toolkit::Toolkit;

fn toolkit() -> Option<Toolkit> {
    match Toolkit::find() {
        Ok(t) => Some(t),
        Err(e) if std::env::var_os("COSERVE_REQUIRE_CUDA_TOOLKIT").is_some() => {
            panic!("COSERVE_REQUIRE_CUDA_TOOLKIT is set but: {e}")
        }
        Err(e) => {
            eprintln!("skipped, no CUDA toolkit: {e}");
            None
        }
    }
}

/// A toolkit folder for the emulated device: the real headers and NVRTC, the stand-in
/// cuBLASLt. Returns (toolkit home, driver folder, kernel libraries folder).
fn emulated_device(
    root: &Path,
    toolkit: &Toolkit,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (home, driver, kernels) = (root.join("toolkit"), root.join("driver"), root.join("kernels"));
    for d in [&home.join("lib"), &driver, &kernels] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::os::unix::fs::symlink(&toolkit.include, home.join("include")).expect("symlink include");
    // NVRTC with every library beside it (it loads its siblings by name).
    let nvrtc_dir = toolkit.nvrtc.parent().expect("NVRTC's folder");
    for entry in std::fs::read_dir(nvrtc_dir).expect("NVRTC's folder").flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().contains(".so") && !name.to_string_lossy().contains("cublas") {
            std::os::unix::fs::symlink(entry.path(), home.join("lib").join(&name)).expect("link");
        }
    }
    build_fake_driver(&driver);
    std::os::unix::fs::symlink(
        driver.join("libcublasLt.so.13"),
        home.join("lib/libcublasLt.so.13"),
    )
    .expect("link cuBLASLt");
    for f in KERNEL_FILES {
        build_kernel_library(f.name, &kernels);
    }
    (home, driver, kernels)
}

#[test]
fn the_selftest_passes_on_the_emulated_device() {
    let Some(toolkit) = toolkit() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let (home, driver, kernels) = emulated_device(root.path(), &toolkit);
    let json = root.path().join("selftest.json");
    let out = Command::new(env!("CARGO_BIN_EXE_coserve"))
        // The kernels alone are checked at small shapes in kernels_on_cpu.rs; here what runs
        // on them: the decoder, products, graph, training step, and the sampler's launch.
        .args(["selftest", "--device", "cuda", "--json"])
        .arg(&json)
        .args(["--only", "fill_uniform,gemm,decoder_end_to_end,training_step,sample_rows"])
        .env("LD_LIBRARY_PATH", &driver)
        .env("CUDA_HOME", &home)
        .env_remove("CUDA_PATH")
        .env("COSERVE_EMULATED_KERNELS", &kernels)
        .env("COSERVE_HOME", root.path().join("cache"))
        .output()
        .expect("run coserve selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "selftest failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON summary")).expect("JSON");
    assert!(report["device"].as_str().unwrap_or("").contains("emulated"), "{report}");
    assert_eq!(report["failed"], 0, "{stdout}");
    let checks = report["checks"].as_array().expect("checks");
    for suite in [
        "fill_uniform_bf16",
        "sample_rows_f32 (picks)",
        "gemm_bf16",
        "gemm product dY·B (bf16)",
        "decoder_end_to_end (greedy ids)",
        "decoder_cuda_graph (logits)",
        "training_step (weights after AdamW)",
    ] {
        assert!(checks.iter().any(|c| c["kernel"] == suite), "no {suite:?} check:\n{stdout}");
    }
}
