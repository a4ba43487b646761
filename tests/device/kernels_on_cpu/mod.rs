//! The CUDA kernels' own code, run on the CPU (`common::emulation`), against their twins at
//! small shapes, so their indexing, barriers, shuffles and atomics are checked without a GPU.
//! The tolerances are the selftest's (`coserve selftest --device cuda`), which runs the same
//! comparisons on a GPU at real shapes.

mod attention;
mod forward;
mod sampling;
mod training;

use rand::rngs::StdRng;
use rand::Rng;

use coserve::backend::cuda::twins::round_bf16;

fn random_f32(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

fn random_bf16(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| round_bf16(rng.random_range(-range..range))).collect()
}
