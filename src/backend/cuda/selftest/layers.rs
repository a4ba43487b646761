//! Checks of the kernels a forward pass runs.

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{cfg, compare, n32, random_bf16, Check, Gpu, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;
use cudarc::driver::PushKernelArg;

pub(super) fn check_norm(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(1);
    let eps = 1e-5f32;
    for (rows, hidden) in [(1usize, 576usize), (7, 4096)] {
        let x = random_bf16(&mut rng, rows * hidden, 2.0);
        let w = random_bf16(&mut rng, hidden, 1.0);
        let mut residual = random_bf16(&mut rng, rows * hidden, 2.0);
        let shape = format!("rows={rows} hidden={hidden}");
        let (dx, dw) = (gpu.up_bf16(&x)?, gpu.up_bf16(&w)?);
        let mut dres = gpu.up_bf16(&residual)?;
        let mut dout = gpu.zeros::<u16>(rows * hidden)?;
        let h = hidden as i32;
        let f = gpu.func("norm.cu", "rms_norm_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&dw).arg(&mut dout).arg(&h).arg(&eps);
        // SAFETY: argument list matches rms_norm_bf16; buffers hold rows * hidden elements.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 256)) }?;
        let got = gpu.down_bf16(&dout, rows * hidden)?;
        compare(
            checks,
            "rms_norm_bf16",
            shape.clone(),
            &got,
            &twins::rms_norm(&x, &w, eps),
            BF16_RTOL,
            BF16_ATOL,
        );

        let f = gpu.func("norm.cu", "add_rms_norm_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dres).arg(&dx).arg(&dw).arg(&mut dout).arg(&h).arg(&eps);
        // SAFETY: argument list matches add_rms_norm_bf16.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 256)) }?;
        let want = twins::add_rms_norm(&mut residual, &x, &w, eps);
        let got = gpu.down_bf16(&dout, rows * hidden)?;
        compare(checks, "add_rms_norm_bf16", shape.clone(), &got, &want, BF16_RTOL, BF16_ATOL);
        let got_res = gpu.down_bf16(&dres, rows * hidden)?;
        compare(
            checks,
            "add_rms_norm_bf16 (residual)",
            shape,
            &got_res,
            &residual,
            BF16_RTOL,
            BF16_ATOL,
        );
    }
    Ok(())
}

pub(super) fn check_rope(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(2);
    let positions = [0usize, 1, 17, 300, 4000];
    let slots: [i64; 5] = [3, -1, 10, 63, 0];
    let num_slots = 64;
    // The last shape with Qwen2's attention biases.
    for (num_heads, num_kv_heads, head_dim, with_bias) in
        [(9usize, 3usize, 64usize, false), (32, 8, 128, false), (40, 8, 128, true)]
    {
        let tokens = positions.len();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in &positions {
            for &f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let (q_dim, kv_row) = (num_heads * head_dim, num_kv_heads * head_dim);
        // A fused projection row, q then k then v.
        let qkv = random_bf16(&mut rng, tokens * (q_dim + 2 * kv_row), 2.0);
        let (mut q, mut k, v) = twins::split_qkv(&qkv, tokens, q_dim, kv_row);
        let bias = random_bf16(&mut rng, if with_bias { q_dim + 2 * kv_row } else { 1 }, 1.0);
        let (dbias, has_bias) = (gpu.up_bf16(&bias)?, i32::from(with_bias));
        let dqkv = gpu.up_bf16(&qkv)?;
        let mut dq = gpu.zeros::<u16>(tokens * q_dim)?;
        let (dcos, dsin, dslots) = (gpu.up(&cos)?, gpu.up(&sin)?, gpu.up(&slots)?);
        let mut dkc = gpu.zeros::<u16>(num_slots * kv_row)?;
        let mut dvc = gpu.zeros::<u16>(num_slots * kv_row)?;
        let (nh, nkv, hd) = (num_heads as i32, num_kv_heads as i32, head_dim as i32);
        let stride = (q_dim + 2 * kv_row) as i32;
        let f = gpu.func("rope_kv.cu", "rope_kv_write_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dqkv).arg(&stride).arg(&mut dq).arg(&dcos).arg(&dsin).arg(&dslots);
        b.arg(&mut dkc).arg(&mut dvc).arg(&dbias).arg(&has_bias).arg(&nh).arg(&nkv).arg(&hd);
        // SAFETY: argument list matches rope_kv_write_bf16; every slot is below num_slots; the
        // bias is read only with has_bias, and then holds q_dim + 2 kv_row values.
        unsafe { b.launch(cfg((n32(tokens), 1, 1), 256)) }?;
        let (mut kc, mut vc) = (vec![0f32; num_slots * kv_row], vec![0f32; num_slots * kv_row]);
        let shape_t = twins::RopeShape { num_heads, num_kv_heads, head_dim };
        let b = with_bias.then_some(bias.as_slice());
        twins::rope_kv_write(&mut q, &mut k, &v, &cos, &sin, &slots, &mut kc, &mut vc, shape_t, b);
        let shape = format!(
            "tokens={tokens} heads={num_heads}/{num_kv_heads} head_dim={head_dim}{}",
            if with_bias { " with biases" } else { "" }
        );
        for (what, dev, want) in [("q", &dq, &q), ("k cache", &dkc, &kc), ("v cache", &dvc, &vc)] {
            let got = gpu.down_bf16(dev, want.len())?;
            compare(
                checks,
                &format!("rope_kv_write_bf16 ({what})"),
                shape.clone(),
                &got,
                want,
                BF16_RTOL,
                BF16_ATOL,
            );
        }
    }
    Ok(())
}

pub(super) fn check_silu(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, inter) in [(3usize, 1536usize), (2, 14336)] {
        let gu = random_bf16(&mut rng, rows * 2 * inter, 4.0);
        let dgu = gpu.up_bf16(&gu)?;
        let mut dout = gpu.zeros::<u16>(rows * inter)?;
        let (r, i) = (rows as i32, inter as i32);
        let f = gpu.func("activation.cu", "silu_mul_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dgu).arg(&mut dout).arg(&r).arg(&i);
        // SAFETY: argument list matches silu_mul_bf16 (grid-stride loop over rows * inter).
        unsafe { b.launch(cfg((n32((rows * inter).div_ceil(256).min(4096)), 1, 1), 256)) }?;
        let got = gpu.down_bf16(&dout, rows * inter)?;
        let shape = format!("rows={rows} inter={inter}");
        compare(
            checks,
            "silu_mul_bf16",
            shape,
            &got,
            &twins::silu_mul(&gu, inter),
            BF16_RTOL,
            BF16_ATOL,
        );
    }
    Ok(())
}

pub(super) fn check_embedding(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(4);
    // SmolLM2's width and Qwen2.5-14B's.
    for (vocab, hidden) in [(1000usize, 576usize), (3000, 5120)] {
        let table = random_bf16(&mut rng, vocab * hidden, 1.0);
        let ids: [u32; 5] = [0, vocab as u32 - 1, 5, vocab as u32, 42];
        let (dt, dids) = (gpu.up_bf16(&table)?, gpu.up(&ids)?);
        let mut dout = gpu.zeros::<u16>(ids.len() * hidden)?;
        let (h, v) = (hidden as i32, vocab as u32);
        let f = gpu.func("activation.cu", "embedding_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dids).arg(&dt).arg(&mut dout).arg(&h).arg(&v);
        // SAFETY: argument list matches embedding_bf16; out has ids.len() rows.
        unsafe { b.launch(cfg((n32(ids.len()), 1, 1), 256)) }?;
        let got = gpu.down_bf16(&dout, ids.len() * hidden)?;
        let shape =
            format!("ids={} vocab={vocab} hidden={hidden} (one id out of range)", ids.len());
        compare(
            checks,
            "embedding_bf16",
            shape,
            &got,
            &twins::embedding(&ids, &table, hidden),
            0.0,
            0.0,
        );
    }
    Ok(())
}
