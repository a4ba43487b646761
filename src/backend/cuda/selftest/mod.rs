//! `coserve selftest --device cuda`: runs every kernel on the GPU at several shapes and
//! compares it with its CPU twin (`twins`) on the same bf16-rounded inputs.

pub mod attention;
pub mod backward;
mod layers;
mod lora_tables;
mod model;
mod products;
mod replay;
pub mod sampling;
mod train_step;
mod training;

use std::path::Path;

use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

use super::decoder::cuda::CudaOps;
pub(super) use super::gpu::{cfg, n32, Gpu};
use super::twins::round_bf16;
use super::{CudaError, DeviceSpec};

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

/// Compiles the kernels for the device named by `spec` and checks each one (or the suites
/// whose names contain one of `only`, when it is not empty). Fails only when there is no GPU
/// or toolkit; a failing kernel is a failed check in the report.
pub fn run(spec: DeviceSpec, home: &Path, only: &[String]) -> Result<Report, CudaError> {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    let mut gpu = Gpu::open(spec, home, "the selftest (CUDA kernels against their CPU twins)")?;
    let mut checks = Vec::new();
    let suites: [(&str, Suite); 16] = [
        ("rms_norm_bf16", layers::check_norm),
        ("rope_kv_write_bf16", layers::check_rope),
        ("silu_mul_bf16", layers::check_silu),
        ("embedding_bf16", layers::check_embedding),
        ("paged_attention_bf16", attention::check_attention),
        ("attention_chunk_tiled", attention::check_chunk_attention),
        ("argmax_logprob_f32", training::check_argmax),
        ("sample_rows_f32", sampling::check_sampling),
        ("apply_penalties_f32", sampling::check_penalties),
        ("cross_entropy_f32", training::check_cross_entropy),
        ("lora_bf16", training::check_lora),
        ("lora_dropout", training::check_lora_dropout),
        ("adamw_f32", training::check_adamw),
        ("training utilities", training::check_grad_utils),
        ("backward_f32", backward::check_backward),
        ("attention_backward", backward::check_attention_backward),
    ];
    for (name, suite) in suites.into_iter().filter(|(name, _)| wanted(name)) {
        // Synchronise after each suite so an asynchronous fault is reported against it.
        let outcome = suite(&mut gpu, &mut checks).and_then(|()| gpu.sync());
        record_failure(&mut checks, name, outcome);
    }
    let (device, arch) = (gpu.device.to_string(), gpu.arch.clone());
    // Then the pieces built on the kernels: cuBLASLt and the whole decoder.
    match CudaOps::new(gpu) {
        Err(e) => record_failure(&mut checks, "decoder_ops", Err(e)),
        Ok(mut ops) => {
            let suites: [(&str, OpsSuite); 8] = [
                ("fill_uniform_bf16", model::check_fill),
                ("gemm_bf16", model::check_gemm),
                ("gemm products", products::check_products),
                ("attention of a mixed step", attention::check_step_attention),
                ("LoRA over joined tables", lora_tables::check_joined_tables),
                ("decoder_end_to_end", model::check_decoder),
                ("decoder_end_to_end (q/k/v biases)", model::check_decoder_with_biases),
                ("training_step", train_step::check_training_step),
            ];
            for (name, suite) in suites.into_iter().filter(|(name, _)| wanted(name)) {
                let outcome = suite(&mut ops, &mut checks).and_then(|()| ops.gpu.sync());
                record_failure(&mut checks, name, outcome);
            }
            // Last, as it hands the operations to a server's decoder.
            let name = "decoder_graph_replay";
            if wanted(name) {
                let outcome = replay::check_replayed_decodes(ops, &mut checks);
                record_failure(&mut checks, name, outcome);
            }
        }
    }
    let passed = checks.iter().filter(|c| c.passed).count();
    Ok(Report { device, arch, failed: checks.len() - passed, passed, checks })
}

/// A suite that stopped with an error counts as one failed check.
fn record_failure(checks: &mut Vec<Check>, name: &str, outcome: Result<(), CudaError>) {
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

type OpsSuite = fn(&mut CudaOps, &mut Vec<Check>) -> Result<(), CudaError>;
type Suite = fn(&mut Gpu, &mut Vec<Check>) -> Result<(), CudaError>;

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
