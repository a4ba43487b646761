//! The CUDA kernels of `kernels/*.cu` run on the CPU: each file is compiled by the C++ compiler
//! (`$CXX`, else `c++`) against `tests/emulation/cuda_on_cpu.h` into a shared library, and a
//! launch runs every CUDA thread of a block as a fiber of the calling thread. Slow, but it runs the kernels' own
//! indexing, barriers, shuffles and atomics, so their logic is checked against the twins on a
//! machine without a GPU.

use std::ffi::c_void;
use std::path::Path;
use std::process::Command;

use coserve::backend::cuda::kernels::KERNEL_FILES;

type Entry = unsafe extern "C" fn(u32, u32, u32, u32, *mut *mut c_void);

pub struct Emulated {
    lib: libloading::Library,
    _dir: tempfile::TempDir,
}

/// One kernel argument as cuLaunchKernel takes it: the value's bytes (pointers are host
/// addresses here).
#[derive(Clone, Copy)]
pub struct Arg(pub u64);

impl Arg {
    pub fn ptr<T>(x: &[T]) -> Self {
        Self(x.as_ptr() as u64)
    }
    pub fn ptr_mut<T>(x: &mut [T]) -> Self {
        Self(x.as_mut_ptr() as u64)
    }
    pub fn i32(v: i32) -> Self {
        Self(v as u32 as u64)
    }
    pub fn f32(v: f32) -> Self {
        Self(v.to_bits() as u64)
    }
    pub fn usize(v: usize) -> Self {
        Self(v as u64)
    }
}

fn emulation_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulation")
}

/// Runs the C++ compiler on `src` into the shared library `out` (hidden symbols, so each
/// library keeps its own emulator state), with `tests/emulation` on the include path.
fn compile(src: &Path, out: &Path, extra: &[&str]) {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let result = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-w"])
        .args(["-fvisibility=hidden", "-fno-gnu-unique"])
        // Fibers switch stacks with _longjmp, which the fortified check would refuse.
        .arg("-U_FORTIFY_SOURCE")
        .arg("-I")
        .arg(emulation_dir())
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(
        result.status.success(),
        "{} does not compile for the CPU:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
}

/// Builds `file` (as `coserve kernels check` names it) into `dir/<file>.so`, exporting
/// `emulate_<kernel>(grid x, y, z, block x, args)`, `emulate_<kernel>_sizes(&n)` and
/// `emulate_<kernel>_max_threads()` (its launch bound) per kernel.
pub fn build_kernel_library(file: &str, dir: &Path) -> std::path::PathBuf {
    let kf = KERNEL_FILES.iter().find(|k| k.name == file).expect("a kernel file");
    let mut src = String::from("#include \"cuda_on_cpu.h\"\n");
    src += &kf.full_source();
    for f in kf.functions {
        let bound = kf.launch_bound(f).unwrap_or_else(|| panic!("{f} has no launch bounds"));
        src += &format!(
            "\n#define EXPORT extern \"C\" __attribute__((visibility(\"default\")))\n\
             EXPORT void emulate_{f}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, \
             void** args) {{\n    emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, 1, 1}}, [&] {{ \
             emu::call({f}, args); }});\n}}\n\
             EXPORT const unsigned* emulate_{f}_sizes(unsigned* n) {{ return \
             emu::param_sizes({f}, n); }}\n\
             EXPORT unsigned emulate_{f}_max_threads() {{ return {bound}; }}\n#undef EXPORT\n"
        );
    }
    let stem = file.trim_end_matches(".cu");
    let cpp = dir.join(format!("{stem}.cpp"));
    std::fs::write(&cpp, src).expect("write source");
    let lib = dir.join(format!("{stem}.so"));
    compile(&cpp, &lib, &[]);
    lib
}

/// Builds the stand-in CUDA driver and cuBLASLt (`tests/emulation/fake_cuda.cpp`) into
/// `dir/libcuda.so.1` and `dir/libcublasLt.so.13`, with the plain names linked to them.
pub fn build_fake_driver(dir: &Path) {
    let src = emulation_dir().join("fake_cuda.cpp");
    for (name, link) in [("libcuda.so.1", "libcuda.so"), ("libcublasLt.so.13", "libcublasLt.so")] {
        compile(&src, &dir.join(name), &[&format!("-Wl,-soname,{name}"), "-ldl"]);
        let _ = std::fs::remove_file(dir.join(link));
        std::os::unix::fs::symlink(name, dir.join(link)).expect("symlink");
    }
}

impl Emulated {
    /// Compiles `file` (as `coserve kernels check` names it) for the CPU.
    pub fn build(file: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = build_kernel_library(file, dir.path());
        // SAFETY: the library was just built from the kernel source and the emulation header;
        // loading it runs no initialisers of ours beyond static zeroing.
        let lib = unsafe { libloading::Library::new(&lib) }.expect("load the emulated kernels");
        Self { lib, _dir: dir }
    }

    /// Runs `kernel` over `grid` blocks of `threads` threads.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every pointer must
    /// cover what the kernel reads and writes with this launch.
    pub unsafe fn launch(&self, kernel: &str, grid: (u32, u32, u32), threads: u32, args: &[Arg]) {
        let mut values: Vec<u64> = args.iter().map(|a| a.0).collect();
        let mut slots: Vec<*mut c_void> =
            values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        let name = format!("emulate_{kernel}");
        // SAFETY: generated in `build` for every kernel, with this signature.
        let bound: libloading::Symbol<unsafe extern "C" fn() -> u32> =
            unsafe { self.lib.get(format!("{name}_max_threads").as_bytes()) }
                .expect("an emulated kernel's bound");
        // SAFETY: it takes nothing and returns a constant.
        let bound = unsafe { bound() };
        // A device refuses the launch, whatever the kernel would compute.
        assert!(threads <= bound, "{kernel} launched with {threads} threads, bound {bound}");
        // SAFETY: every emulate_* entry has the `Entry` signature (generated in `build`).
        let f: libloading::Symbol<Entry> =
            unsafe { self.lib.get(name.as_bytes()) }.expect("an emulated kernel");
        // SAFETY: the caller guarantees the arguments; `slots` points into `values`, both alive
        // for the call.
        unsafe { f(grid.0, grid.1, grid.2, threads, slots.as_mut_ptr()) };
    }
}

/// bf16 bits of each value (round to nearest even, as the device stores).
pub fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

pub fn from_bf16_bits(x: &[u16]) -> Vec<f32> {
    x.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

/// Compares two outputs as the selftest does: each element within `rtol * |want|` plus
/// `atol_frac` of the largest |want|; panics naming the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_frac: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |a, &w| a.max(w.abs()));
    let atol = (atol_frac * scale).max(1e-30);
    let mut worst = (0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = (g - w).abs() / (atol + rtol * w.abs());
        let r = if r.is_nan() { f32::INFINITY } else { r };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 1.0, "{what}: element {i} is {} where the twin has {}", got[i], want[i]);
}
