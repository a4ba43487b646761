//! Checks of the kernels sampling and training run.

use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{cfg, compare, n32, random_bf16, Check, Gpu, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;

pub(super) fn check_argmax(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(6);
    for vocab in [49152usize, 128256] {
        let rows = 4;
        let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-10.0..10.0)).collect();
        let dl = gpu.up(&logits)?;
        let (mut dids, mut dlp) = (gpu.zeros::<u32>(rows)?, gpu.zeros::<f32>(rows)?);
        let v = vocab as i32;
        let f = gpu.func("sampling.cu", "argmax_logprob_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dl).arg(&v).arg(&mut dids).arg(&mut dlp);
        // SAFETY: argument list matches argmax_logprob_f32; 1024 threads, its shared arrays' size.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 1024)) }?;
        let (ids, lps) = (gpu.down(&dids)?, gpu.down(&dlp)?);
        let want: Vec<(u32, f32)> = logits.chunks_exact(vocab).map(twins::argmax_logprob).collect();
        let got_ids: Vec<f32> = ids.iter().take(rows).map(|&i| i as f32).collect();
        let want_ids: Vec<f32> = want.iter().map(|w| w.0 as f32).collect();
        let shape = format!("rows={rows} vocab={vocab}");
        compare(checks, "argmax_logprob_f32 (ids)", shape.clone(), &got_ids, &want_ids, 0.0, 0.0);
        let want_lp: Vec<f32> = want.iter().map(|w| w.1).collect();
        compare(checks, "argmax_logprob_f32 (logprobs)", shape, &lps[..rows], &want_lp, 1e-4, 1e-4);
    }
    Ok(())
}

pub(super) fn check_cross_entropy(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(7);
    // SmolLM2's vocabulary and Llama-3's.
    for vocab in [49152usize, 128256] {
        let targets: [i32; 3] = [5, -1, vocab as i32 - 1];
        let scales: [f32; 3] = [0.5, 1.0, 0.25];
        let mut logits: Vec<f32> = (0..3 * vocab).map(|_| rng.random_range(-8.0..8.0)).collect();
        let (mut dl, dt, ds) = (gpu.up(&logits)?, gpu.up(&targets)?, gpu.up(&scales)?);
        let mut dloss = gpu.zeros::<f32>(3)?;
        let v = vocab as i32;
        let f = gpu.func("cross_entropy.cu", "cross_entropy_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dl).arg(&dt).arg(&ds).arg(&mut dloss).arg(&v);
        // SAFETY: argument list matches cross_entropy_f32; three rows of vocab logits.
        unsafe { b.launch(cfg((3, 1, 1), 512)) }?;
        let want_loss: Vec<f32> = logits
            .chunks_exact_mut(vocab)
            .zip(targets.iter().zip(&scales))
            .map(|(row, (&t, &s))| twins::cross_entropy(row, t, s))
            .collect();
        let shape = format!("rows=3 vocab={vocab} (one row without a target)");
        compare(
            checks,
            "cross_entropy_f32 (loss)",
            shape.clone(),
            &gpu.down(&dloss)?[..3],
            &want_loss,
            1e-4,
            1e-5,
        );
        compare(checks, "cross_entropy_f32 (grad)", shape, &gpu.down(&dl)?, &logits, 1e-3, 1e-4);
    }
    Ok(())
}

pub(super) fn check_lora(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(8);
    for (in_dim, out_dim) in [(576usize, 1536usize), (4096, 1024)] {
        let slots: [i32; 6] = [0, 1, -1, 1, 0, -1];
        let adapters: Vec<twins::TwinAdapter> = [(8usize, 2.0f32), (16, 0.5)]
            .iter()
            .map(|&(rank, scale)| twins::TwinAdapter {
                a: (0..rank * in_dim).map(|_| rng.random_range(-0.1..0.1)).collect(),
                b: (0..out_dim * rank).map(|_| rng.random_range(-0.1..0.1)).collect(),
                rank,
                scale,
            })
            .collect();
        let tokens = slots.len();
        let x = random_bf16(&mut rng, tokens * in_dim, 1.0);
        // The adapted columns are a block of a wider fused output (as k in q/k/v).
        let (ld, col0) = (out_dim + 96, 64usize);
        let mut y = random_bf16(&mut rng, tokens * ld, 1.0);
        let a_dev: Vec<CudaSlice<f32>> =
            adapters.iter().map(|a| gpu.up(&a.a)).collect::<Result<_, _>>()?;
        let b_dev: Vec<CudaSlice<f32>> =
            adapters.iter().map(|a| gpu.up(&a.b)).collect::<Result<_, _>>()?;
        // Keep each pointer's guard alive until the kernels are queued.
        let stream = gpu.stream.clone();
        let a_guarded: Vec<_> = a_dev.iter().map(|s| s.device_ptr(&stream)).collect();
        let b_guarded: Vec<_> = b_dev.iter().map(|s| s.device_ptr(&stream)).collect();
        let a_ptrs: Vec<u64> = a_guarded.iter().map(|g| g.0).collect();
        let b_ptrs: Vec<u64> = b_guarded.iter().map(|g| g.0).collect();
        let ranks: Vec<i32> = adapters.iter().map(|a| a.rank as i32).collect();
        let scales: Vec<f32> = adapters.iter().map(|a| a.scale).collect();
        let max_rank = 16usize;
        let (dx, dslots, dranks, dscales) =
            (gpu.up_bf16(&x)?, gpu.up(&slots)?, gpu.up(&ranks)?, gpu.up(&scales)?);
        let (dap, dbp) = (gpu.up(&a_ptrs)?, gpu.up(&b_ptrs)?);
        let mut dy = gpu.up_bf16(&y)?;
        let mut du = gpu.zeros::<f32>(tokens * max_rank)?;
        let (ind, outd, mr, ldi) = (in_dim as i32, out_dim as i32, max_rank as i32, ld as i32);
        let f = gpu.func("lora.cu", "lora_shrink_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&dap).arg(&dranks).arg(&dslots).arg(&mut du).arg(&ind).arg(&mr);
        // SAFETY: argument list matches lora_shrink_bf16; 4 warps per block, one per rank row.
        unsafe { b.launch(cfg((n32(tokens), n32(max_rank.div_ceil(4)), 1), 128)) }?;
        let f = gpu.func("lora.cu", "lora_expand_bf16")?;
        {
            let mut dy_cols = dy.slice_mut(col0..);
            let mut b = gpu.stream.launch_builder(&f);
            b.arg(&du).arg(&dbp).arg(&dranks).arg(&dscales).arg(&dslots).arg(&mut dy_cols);
            b.arg(&outd).arg(&ldi).arg(&mr);
            // SAFETY: argument list matches lora_expand_bf16; the A/B buffers outlive the
            // launch; row t's columns col0..col0 + out_dim lie inside y.
            unsafe { b.launch(cfg((n32(tokens), n32(out_dim.div_ceil(256)), 1), 256)) }?;
        }
        drop((a_guarded, b_guarded));
        twins::lora(&x, &mut y, &slots, &adapters, in_dim, out_dim, (ld, col0));
        let got = gpu.down_bf16(&dy, y.len())?;
        let shape =
            format!("tokens={tokens} in={in_dim} out={out_dim} at column {col0} of {ld}, ranks=8,16 (two tokens without)");
        compare(checks, "lora_shrink_expand_bf16", shape, &got, &y, BF16_RTOL, BF16_ATOL);
    }
    Ok(())
}

/// LoRA dropout and its backward draw the CPU's masks (`lora::dropout`) bit for bit; rows
/// outside the training sample's pass through.
pub(super) fn check_lora_dropout(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    use crate::lora::dropout::SampleDropout;
    let mut rng = StdRng::seed_from_u64(11);
    let threads = 64u32;
    struct Case {
        /// Each row's depth in its sequence.
        pos: &'static [usize],
        /// The training sample's rows.
        drop_rows: std::ops::Range<usize>,
        width: usize,
        layer: usize,
        module: usize,
    }
    // A width that is not a multiple of a thread's 16 elements, and Llama-3-8B's MLP width at
    // its last layer.
    let cases = [
        Case { pos: &[7, 0, 1, 300, 2, 9], drop_rows: 1..4, width: 1541, layer: 3, module: 6 },
        Case { pos: &[1023, 1024, 5], drop_rows: 0..3, width: 14336, layer: 31, module: 4 },
    ];
    for Case { pos, drop_rows, width, layer, module } in cases {
        let d = SampleDropout { p: 0.1, seed: 0x5EED_0000_0000_0042 ^ width as u64 };
        let rows = pos.len();
        let pos_i32: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
        let grid = (n32(rows), n32(width.div_ceil(16).div_ceil(threads as usize)), 1);
        let (w, r0, r1) = (width as i32, drop_rows.start as i32, drop_rows.end as i32);
        let (l, m) = (layer as i32, module as i32);
        let shape = format!(
            "rows={rows} width={width} sample rows {drop_rows:?} layer={layer} module={module} p={}",
            d.p
        );

        let x = random_bf16(&mut rng, rows * width, 2.0);
        let (dx, dpos) = (gpu.up_bf16(&x)?, gpu.up(&pos_i32)?);
        let mut dout = gpu.zeros::<u16>(rows * width)?;
        let f = gpu.func("lora.cu", "lora_dropout_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&mut dout).arg(&dpos).arg(&r0).arg(&r1).arg(&w);
        b.arg(&d.p).arg(&d.seed).arg(&l).arg(&m);
        // SAFETY: argument list matches lora_dropout_bf16; x and out hold rows of `width`,
        // pos one position per row.
        unsafe { b.launch(cfg(grid, threads)) }?;
        let mut want = vec![0f32; rows * width];
        twins::lora_dropout(&x, &mut want, pos, drop_rows.clone(), width, d, layer, module);
        let got = gpu.down_bf16(&dout, rows * width)?;
        compare(checks, "lora_dropout_bf16", shape.clone(), &got, &want, 0.0, 0.0);

        let src: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut want: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (dsrc, mut ddst) = (gpu.up(&src)?, gpu.up(&want)?);
        let f = gpu.func("lora.cu", "lora_dropout_add_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dsrc).arg(&mut ddst).arg(&dpos).arg(&w);
        b.arg(&d.p).arg(&d.seed).arg(&l).arg(&m);
        // SAFETY: argument list matches lora_dropout_add_f32; src and dst hold rows of `width`.
        unsafe { b.launch(cfg(grid, threads)) }?;
        twins::lora_dropout_add(&src, &mut want, pos, width, d, layer, module);
        compare(checks, "lora_dropout_add_f32", shape, &gpu.down(&ddst)?, &want, 1e-6, 1e-7);
    }
    Ok(())
}

pub(super) fn check_adamw(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    use crate::lora::optim::{adamw_update, AdamWConfig, AdamWScalars};
    let mut rng = StdRng::seed_from_u64(9);
    // A length that leaves the last block part full, and one of a million.
    for n in [10_000usize, 1_000_001] {
        let mut p: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-1e-2..1e-2)).collect();
        let mut m: Vec<f32> = (0..n).map(|_| rng.random_range(-1e-3..1e-3)).collect();
        let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1e-5)).collect();
        let weight_decay = 0.01f32;
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay };
        let s = AdamWScalars::new(config, 2e-4, 3);
        let (mut dp, dg, mut dm, mut dv) = (gpu.up(&p)?, gpu.up(&g)?, gpu.up(&m)?, gpu.up(&v)?);
        let nn = n;
        let f = gpu.func("adamw.cu", "adamw_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dp).arg(&dg).arg(&mut dm).arg(&mut dv).arg(&nn);
        b.arg(&s.beta1).arg(&s.beta2).arg(&s.eps).arg(&s.decay).arg(&s.step_size).arg(&s.bc2_sqrt);
        // SAFETY: argument list matches adamw_f32 (size_t n, then six floats).
        unsafe { b.launch(cfg((n32(n.div_ceil(256)), 1, 1), 256)) }?;
        adamw_update(&mut p, &g, &mut m, &mut v, &s);
        let shape = format!("n={n} step=3 weight_decay={weight_decay}");
        compare(checks, "adamw_f32 (params)", shape.clone(), &gpu.down(&dp)?, &p, 1e-6, 1e-7);
        compare(checks, "adamw_f32 (exp_avg)", shape.clone(), &gpu.down(&dm)?, &m, 1e-5, 1e-6);
        compare(checks, "adamw_f32 (exp_avg_sq)", shape, &gpu.down(&dv)?, &v, 1e-5, 1e-6);
    }
    Ok(())
}

/// The small kernels of the training step: bf16 rounding of gradients for the products, the
/// sum of squares of gradient clipping, and its scaling.
pub(super) fn check_grad_utils(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(10);
    // The second length is past the grid's 1024 blocks of 256: each thread loops.
    for n in [100_003usize, 1_000_003] {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        let dx = gpu.up(&x)?;
        let shape = format!("n={n}");
        let grid = cfg((n32(n.div_ceil(256).min(1024)), 1, 1), 256);

        let mut y = gpu.zeros::<u16>(n)?;
        let f = gpu.func("backward.cu", "f32_to_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&mut y).arg(&n);
        // SAFETY: argument list matches f32_to_bf16 (grid-stride over n; both buffers hold n).
        unsafe { b.launch(grid) }?;
        let want: Vec<f32> = x.iter().map(|&v| twins::round_bf16(v)).collect();
        compare(checks, "f32_to_bf16", shape.clone(), &gpu.down_bf16(&y, n)?, &want, 0.0, 0.0);

        let mut sq = gpu.zeros::<f32>(1)?;
        let f = gpu.func("backward.cu", "sum_squares_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&n).arg(&mut sq);
        // SAFETY: argument list matches sum_squares_f32 (one float out, zeroed).
        unsafe { b.launch(grid) }?;
        let want = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() as f32;
        compare(checks, "sum_squares_f32", shape.clone(), &gpu.down(&sq)?, &[want], 1e-5, 0.0);

        let mut dxs = gpu.up(&x)?;
        let by = 0.37f32;
        let f = gpu.func("backward.cu", "scale_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dxs).arg(&n).arg(&by);
        // SAFETY: argument list matches scale_f32 (grid-stride over n).
        unsafe { b.launch(grid) }?;
        let want: Vec<f32> = x.iter().map(|&v| v * by).collect();
        compare(checks, "scale_f32", shape, &gpu.down(&dxs)?, &want, 0.0, 0.0);
    }
    Ok(())
}
