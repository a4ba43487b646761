//! Checks of what is built on the kernels: random weights, cuBLASLt products, and the whole
//! decoder on a small random model against the same decoder run through the CPU twins.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{compare, random_bf16, Check, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::decoder::cuda::CudaOps;
use crate::backend::cuda::decoder::host::{HostCache, HostOps};
use crate::backend::cuda::decoder::lora::{LoraDims, LoraSet};
use crate::backend::cuda::decoder::{
    fill_uniform_host, forward_on_device, forward_rows, forward_with, rope_tables, DecoderOps,
    DecoderShape, DecoderWeights, RowsOut, Scratch, SeqRows, StepBatch, Want,
};
use crate::backend::cuda::CudaError;
use crate::lora::{LoraConfig, LoraPair, LoraWeights, TargetModule};

pub(super) fn check_fill(ops: &mut CudaOps, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    for (n, seed, scale, offset) in [(10_000usize, 42u64, 0.5f32, 1.0f32), (3, 7, 0.02, 0.0)] {
        let mut t = ops.gpu.zeros::<u16>(n)?;
        ops.fill(&mut t, seed, scale, offset)?;
        let got = ops.gpu.down_bf16(&t, n)?;
        let want = fill_uniform_host(n, seed, scale, offset);
        let shape = format!("n={n} seed={seed} scale={scale} offset={offset}");
        // One bf16 rounding apart at most (the device may fuse the multiply-add).
        compare(checks, "fill_uniform_bf16", shape, &got, &want, BF16_RTOL, 0.0);
    }
    Ok(())
}

pub(super) fn check_gemm(ops: &mut CudaOps, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(11);
    // (m, n, k, first weight row): a decode GEMV, odd sizes, a batch, a prefill chunk.
    for (m, n, k, row0) in [
        (1usize, 4096usize, 4096usize, 0usize),
        (7, 1000, 576, 3),
        (64, 3072, 1024, 0),
        (300, 512, 2048, 16),
    ] {
        let x = random_bf16(&mut rng, m * k, 1.0);
        let w = random_bf16(&mut rng, (row0 + n) * k, 1.0 / (k as f32).sqrt());
        let want: Vec<f64> = x
            .chunks_exact(k)
            .flat_map(|xr| {
                w[row0 * k..].chunks_exact(k).map(move |wr| {
                    xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                })
            })
            .collect();
        let (dx, dw) = (ops.gpu.up_bf16(&x)?, ops.gpu.up_bf16(&w)?);
        let want_bf16: Vec<f32> =
            want.iter().map(|&v| crate::backend::cuda::twins::round_bf16(v as f32)).collect();
        let want_f32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let shape = format!("m={m} n={n} k={k} weight rows from {row0}");
        let mut dy = ops.gpu.zeros::<u16>(m * n)?;
        ops.matmul(&dx, &dw, row0, &mut dy, (m, n, k))?;
        let got = ops.gpu.down_bf16(&dy, m * n)?;
        compare(checks, "gemm_bf16", shape.clone(), &got, &want_bf16, BF16_RTOL, BF16_ATOL);
        if row0 == 0 {
            let mut dl = ops.gpu.zeros::<f32>(m * n)?;
            ops.matmul_logits(&dx, &dw, &mut dl, (m, n, k))?;
            let got = ops.gpu.down(&dl)?;
            compare(checks, "gemm_bf16_f32_out", shape, &got[..m * n], &want_f32, 1e-3, 1e-3);
        }
    }
    Ok(())
}

/// Logits after two layers of bf16 activations: each layer's roundings may land on either
/// side, so allow a few bf16 steps of the logits' scale.
pub(super) const E2E_RTOL: f64 = 1.0 / 32.0;
pub(super) const E2E_ATOL: f64 = 1.0 / 64.0;

pub(super) fn check_decoder(ops: &mut CudaOps, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    decoder_checks(ops, checks, false)
}

/// The same with Qwen2's q/k/v biases (the graph replay is checked once, above).
pub(super) fn check_decoder_with_biases(
    ops: &mut CudaOps,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    decoder_checks(ops, checks, true)
}

fn decoder_checks(
    ops: &mut CudaOps,
    checks: &mut Vec<Check>,
    qkv_bias: bool,
) -> Result<(), CudaError> {
    let s = small_shape(qkv_bias);
    let (weights, host_weights, inv_freq) = small_model(ops, &s, 7)?;

    // Sequence A: a 150-token prompt over shuffled blocks (long enough for split-K in its
    // decodes); sequence B: a 6-token prompt. Then three decode steps of both. A's prompt
    // attends on the tensor-core chunk kernel, B's on the paged one in the same forward. With
    // biases, A's prompt runs alone first (the chunk kernel only) and B's joins A's first
    // decode (the paged kernel only).
    let num_blocks = 12;
    let mut rng = StdRng::seed_from_u64(12);
    let mut blocks: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.random_range(0..=i));
    }
    let tables = [blocks[..10].to_vec(), blocks[10..11].to_vec()];
    let prompts: [Vec<u32>; 2] = [
        (0..150).map(|_| rng.random_range(0..s.vocab as u32)).collect(),
        (0..6).map(|_| rng.random_range(0..s.vocab as u32)).collect(),
    ];
    let slots = num_blocks * s.block_size * s.kv_dim();
    let mut gpu_caches =
        (0..s.layers).map(|_| ops.cache(&s, num_blocks)).collect::<Result<Vec<_>, _>>()?;
    let mut host_caches: Vec<HostCache> =
        (0..s.layers).map(|_| HostCache { k: vec![0.0; slots], v: vec![0.0; slots] }).collect();
    let rows = prompts.iter().map(Vec::len).sum();
    let mut host = HostOps;
    let mut gsc = Scratch::new(ops, &s, rows)?;
    let mut hsc = Scratch::new(&mut host, &s, rows)?;

    // With biases, also an adapter (rank 8 on every projection) on the long sequence.
    let adapter = qkv_bias.then(|| random_adapter(&s, 8, &mut rng));
    let gpu_lora = adapter.as_ref().map(|a| LoraSet::new(ops, &s, &[a])).transpose()?;
    let host_lora = adapter.as_ref().map(|a| LoraSet::new(&mut host, &s, &[a])).transpose()?;
    let mut seqs: Vec<SeqRows> = prompts
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(i, (p, t))| SeqRows {
            adapter: (i == 0 && adapter.is_some()).then_some(0),
            tokens: p.clone(),
            start: 0,
            block_table: t.clone(),
        })
        .collect();
    let mut later = if qkv_bias { seqs.split_off(1) } else { Vec::new() };
    for step in 0..4 {
        let batch = StepBatch::new(seqs.clone(), s.block_size)?;
        let n = batch.rows();
        let (gl, hl) = (gpu_lora.as_ref(), host_lora.as_ref());
        let got_ids =
            forward_with(ops, &s, &weights, &inv_freq, &mut gpu_caches, &batch, &mut gsc, gl)?;
        let (hw, hc) = (&host_weights, &mut host_caches);
        let want_ids = forward_with(&mut host, &s, hw, &inv_freq, hc, &batch, &mut hsc, hl)?;
        let got = ops.logits_to_host(&gsc.logits, n * s.vocab)?;
        let want = host.logits_to_host(&hsc.logits, n * s.vocab)?;
        let what = match (step, qkv_bias) {
            (0, false) => "prompts 150 + 6",
            (0, true) => "prompt 150 alone",
            (1, true) => "a decode and prompt 6",
            _ => "decodes of both",
        };
        let biases = if qkv_bias { ", q/k/v biases, an adapter on the 150" } else { "" };
        let shape =
            format!("step {step} ({what}), {n} rows, 2 layers hidden 256 heads 4/2{biases}");
        compare(
            checks,
            "decoder_end_to_end (logits)",
            shape.clone(),
            &got,
            &want,
            E2E_RTOL,
            E2E_ATOL,
        );
        if step == 0 {
            // The serving path: the output head on the last row of each prompt only.
            let mut last = vec![prompts[0].len() as u32 - 1, n as u32 - 1];
            last.dedup();
            let want_rows: Vec<f32> = last
                .iter()
                .flat_map(|&r| &want[r as usize * s.vocab..(r as usize + 1) * s.vocab])
                .copied()
                .collect();
            let (w, c) = (&weights, &mut gpu_caches);
            let out =
                forward_rows(ops, &s, w, &inv_freq, c, &batch, &mut gsc, &last, Want::Logits, gl);
            match out {
                Ok(RowsOut::Greedy(_) | RowsOut::Sampled(_)) => checks
                    .push(failed("decoder_serving_rows (logits)", CudaError::Shape("ids".into()))),
                Ok(RowsOut::Logits(got)) => compare(
                    checks,
                    "decoder_serving_rows (logits)",
                    format!("rows {last:?} of {n} gathered"),
                    &got,
                    &want_rows,
                    E2E_RTOL,
                    E2E_ATOL,
                ),
                Err(e) => checks.push(failed("decoder_serving_rows (logits)", e)),
            }
        }
        // Greedy ids must agree wherever the CPU's choice is clear of the tolerance.
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (r, row) in want.chunks_exact(s.vocab).enumerate() {
            let mut sorted = row.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if ((sorted[0] - sorted[1]) as f64) > 2.0 * E2E_ATOL * scale {
                g.push(got_ids[r].0 as f32);
                w.push(want_ids[r].0 as f32);
            }
        }
        let shape = format!("{shape}, {} of {n} rows clear", g.len());
        compare(checks, "decoder_end_to_end (greedy ids)", shape, &g, &w, 0.0, 0.0);
        if step == 3 && !qkv_bias {
            // Reported as its own failed check, so the end-to-end checks above still count.
            let replay = check_replay(
                ops,
                &s,
                &weights,
                &inv_freq,
                &mut gpu_caches,
                &batch,
                &mut gsc,
                &got,
                checks,
            );
            if let Err(e) = replay {
                checks.push(failed("decoder_cuda_graph (logits)", e));
            }
        }
        // Next: each sequence decodes the CPU's greedy token after its last row.
        let mut last = 0;
        for sr in seqs.iter_mut() {
            last += sr.tokens.len();
            sr.start += sr.tokens.len();
            sr.tokens = vec![want_ids[last - 1].0];
        }
        seqs.append(&mut later);
    }
    Ok(())
}

/// The selftest's small model: two layers, hidden 256, four heads of 64 over two kv heads.
pub(super) fn small_shape(qkv_bias: bool) -> DecoderShape {
    DecoderShape {
        vocab: 1000,
        hidden: 256,
        inter: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        eps: 1e-5,
        block_size: 16,
        qkv_bias,
    }
}

/// Random weights of `s` made on the device (`seed`), the same values on the host, and the
/// RoPE frequencies.
pub(super) type SmallModel =
    (DecoderWeights<cudarc::driver::CudaSlice<u16>>, DecoderWeights<Vec<f32>>, Vec<f32>);

pub(super) fn small_model(
    ops: &mut CudaOps,
    s: &DecoderShape,
    seed: u64,
) -> Result<SmallModel, CudaError> {
    let weights = ops.dummy_weights(s, seed)?;
    let host_tensors = weights
        .tensors()
        .iter()
        .map(|t| ops.gpu.down_bf16(t, t.len()))
        .collect::<Result<_, _>>()?;
    let host_weights = DecoderWeights::from_tensors(s, host_tensors)?;
    Ok((weights, host_weights, rope_inv_freq(s)))
}

pub(super) fn rope_inv_freq(s: &DecoderShape) -> Vec<f32> {
    (0..s.head_dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / s.head_dim as f32)).collect()
}

/// An adapter of rank `r` on every projection, random A and B, PEFT layouts.
pub(super) fn random_adapter(s: &DecoderShape, r: usize, rng: &mut StdRng) -> LoraWeights {
    let config =
        LoraConfig { r, alpha: 16.0, dropout: 0.0, target_modules: TargetModule::ALL.to_vec() };
    let layers = (0..s.layers)
        .map(|_| {
            TargetModule::ALL.map(|m| {
                let d = LoraDims::of(s, m, r);
                let a = (0..r * d.in_dim).map(|_| rng.random_range(-0.05..0.05)).collect();
                let b = (0..d.out_dim * r).map(|_| rng.random_range(-0.05..0.05)).collect();
                Some(LoraPair { in_dim: d.in_dim, out_dim: d.out_dim, a, b })
            })
        })
        .collect();
    LoraWeights { config, layers }
}

/// A check that could not run to its comparison.
pub(super) fn failed(kernel: &str, e: CudaError) -> Check {
    Check {
        kernel: kernel.into(),
        shape: String::new(),
        max_abs_error: f64::NAN,
        worst_ratio: f64::NAN,
        passed: false,
        error: Some(e.to_string()),
    }
}

/// The last decode step again, captured as a CUDA graph and replayed: the logits must equal
/// the eager run's exactly (same kernels, same inputs, same order).
#[allow(clippy::too_many_arguments)]
fn check_replay(
    ops: &mut CudaOps,
    s: &DecoderShape,
    weights: &DecoderWeights<cudarc::driver::CudaSlice<u16>>,
    inv_freq: &[f32],
    caches: &mut [crate::backend::cuda::decoder::cuda::CudaCache],
    batch: &StepBatch,
    sc: &mut Scratch<CudaOps>,
    eager: &[f32],
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    let mut step = ops.upload(batch, &cos, &sin)?;
    let graph = ops.capture(|o| forward_on_device(o, s, weights, caches, &step, sc))?;
    // Replayed twice, with the batch copied in again between, as a server would.
    for _ in 0..2 {
        ops.upload_into(&mut step, batch, &cos, &sin)?;
        graph.launch()?;
    }
    let got = ops.logits_to_host(&sc.logits, batch.rows() * s.vocab)?;
    let shape = format!("{} decode rows, replayed twice", batch.rows());
    compare(checks, "decoder_cuda_graph (logits)", shape, &got, eager, 0.0, 0.0);
    Ok(())
}
