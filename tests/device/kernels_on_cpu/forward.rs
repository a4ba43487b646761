//! The forward's kernels: norms, RoPE + KV write, SiLU·up, embedding, fill (attention has its
//! own file).

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::random_bf16;
use crate::common::emulation::{assert_close, bf16_bits, from_bf16_bits, Arg, Emulated};
use coserve::backend::cuda::twins;

/// bf16 outputs: two bf16 ulps of each value plus a small share of the output's scale.
const BF16_RTOL: f32 = 1.0 / 128.0;
const BF16_ATOL: f32 = 4e-3;

#[test]
fn forward_kernels_match_their_twins() {
    let mut rng = StdRng::seed_from_u64(1);
    let emu = Emulated::build("norm.cu");
    let (rows, hidden, eps) = (3usize, 576usize, 1e-5f32);
    let x = random_bf16(&mut rng, rows * hidden, 2.0);
    let w = random_bf16(&mut rng, hidden, 1.0);
    let mut residual = random_bf16(&mut rng, rows * hidden, 2.0);
    let (xb, wb, mut rb) = (bf16_bits(&x), bf16_bits(&w), bf16_bits(&residual));
    let mut out = vec![0u16; rows * hidden];
    let (h, e) = (Arg::i32(hidden as i32), Arg::f32(eps));
    // SAFETY: rms_norm_bf16's parameters; buffers hold rows * hidden.
    unsafe {
        let args = [Arg::ptr(&xb), Arg::ptr(&wb), Arg::ptr_mut(&mut out), h, e];
        emu.launch("rms_norm_bf16", (rows as u32, 1, 1), 256, &args);
    }
    let want = twins::rms_norm(&x, &w, eps);
    assert_close("rms_norm_bf16", &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    // SAFETY: add_rms_norm_bf16's parameters, as above.
    unsafe {
        let args =
            [Arg::ptr_mut(&mut rb), Arg::ptr(&xb), Arg::ptr(&wb), Arg::ptr_mut(&mut out), h, e];
        emu.launch("add_rms_norm_bf16", (rows as u32, 1, 1), 256, &args);
    }
    let want = twins::add_rms_norm(&mut residual, &x, &w, eps);
    assert_close("add_rms_norm_bf16", &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    assert_close(
        "add_rms_norm_bf16 residual",
        &from_bf16_bits(&rb),
        &residual,
        BF16_RTOL,
        BF16_ATOL,
    );

    let emu = Emulated::build("rope_kv.cu");
    let positions = [0usize, 1, 17, 300, 4000];
    let slots: [i64; 5] = [3, -1, 10, 63, 0];
    let num_slots = 64;
    for (num_heads, num_kv_heads, head_dim, with_bias) in
        [(9usize, 3usize, 64usize, false), (4, 2, 128, true)]
    {
        let (tokens, half) = (positions.len(), head_dim / 2);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in &positions {
            for i in 0..half {
                let f = 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32);
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let (q_dim, kv_row) = (num_heads * head_dim, num_kv_heads * head_dim);
        let qkv = random_bf16(&mut rng, tokens * (q_dim + 2 * kv_row), 2.0);
        let (mut q, mut k, v) = twins::split_qkv(&qkv, tokens, q_dim, kv_row);
        let bias = random_bf16(&mut rng, if with_bias { q_dim + 2 * kv_row } else { 1 }, 1.0);
        let (qkvb, biasb) = (bf16_bits(&qkv), bf16_bits(&bias));
        let mut gq = vec![0u16; tokens * q_dim];
        let (mut gk, mut gv) = (vec![0u16; num_slots * kv_row], vec![0u16; num_slots * kv_row]);
        // SAFETY: rope_kv_write_bf16's parameters; every slot is below num_slots; the bias is
        // read only with has_bias, and then holds a whole fused row.
        unsafe {
            let mut args = vec![Arg::ptr(&qkvb), Arg::i32((q_dim + 2 * kv_row) as i32)];
            args.extend([Arg::ptr_mut(&mut gq), Arg::ptr(&cos), Arg::ptr(&sin), Arg::ptr(&slots)]);
            args.extend([Arg::ptr_mut(&mut gk), Arg::ptr_mut(&mut gv), Arg::ptr(&biasb)]);
            args.push(Arg::i32(i32::from(with_bias)));
            args.extend([num_heads, num_kv_heads, head_dim].map(|x| Arg::i32(x as i32)));
            emu.launch("rope_kv_write_bf16", (tokens as u32, 1, 1), 256, &args);
        }
        let (mut kc, mut vc) = (vec![0f32; num_slots * kv_row], vec![0f32; num_slots * kv_row]);
        let shape = twins::RopeShape { num_heads, num_kv_heads, head_dim };
        let b = with_bias.then_some(bias.as_slice());
        twins::rope_kv_write(&mut q, &mut k, &v, &cos, &sin, &slots, &mut kc, &mut vc, shape, b);
        for (what, got, want) in [("q", &gq, &q), ("k cache", &gk, &kc), ("v cache", &gv, &vc)] {
            let what = format!("rope_kv_write_bf16 {what}, bias {with_bias}");
            assert_close(&what, &from_bf16_bits(got), want, BF16_RTOL, BF16_ATOL);
        }
    }

    let emu = Emulated::build("activation.cu");
    let (rows, inter) = (3usize, 1536usize);
    let gu = random_bf16(&mut rng, rows * 2 * inter, 4.0);
    let gub = bf16_bits(&gu);
    let mut out = vec![0u16; rows * inter];
    // SAFETY: silu_mul_bf16's parameters (grid-stride over rows * inter).
    unsafe {
        let args =
            [Arg::ptr(&gub), Arg::ptr_mut(&mut out), Arg::i32(rows as i32), Arg::i32(inter as i32)];
        emu.launch("silu_mul_bf16", (4, 1, 1), 256, &args);
    }
    let want = twins::silu_mul(&gu, inter);
    assert_close("silu_mul_bf16", &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    let (vocab, hidden) = (1000usize, 576usize);
    let table = random_bf16(&mut rng, vocab * hidden, 1.0);
    let ids: [u32; 5] = [0, 999, 5, 1000, 42]; // one out of range: a zero row
    let tb = bf16_bits(&table);
    let mut out = vec![0u16; ids.len() * hidden];
    // SAFETY: embedding_bf16's parameters; out has ids.len() rows.
    unsafe {
        let args = [
            Arg::ptr(&ids),
            Arg::ptr(&tb),
            Arg::ptr_mut(&mut out),
            Arg::i32(hidden as i32),
            Arg::i32(vocab as i32),
        ];
        emu.launch("embedding_bf16", (ids.len() as u32, 1, 1), 256, &args);
    }
    assert_eq!(from_bf16_bits(&out), twins::embedding(&ids, &table, hidden), "embedding_bf16");

    let emu = Emulated::build("init.cu");
    let (n, seed, scale, offset) = (10_000usize, 42u64, 0.5f32, 1.0f32);
    let mut out = vec![0u16; n];
    // SAFETY: fill_uniform_bf16's parameters (grid-stride over n).
    unsafe {
        let args =
            [Arg::ptr_mut(&mut out), Arg::usize(n), Arg(seed), Arg::f32(scale), Arg::f32(offset)];
        emu.launch("fill_uniform_bf16", (8, 1, 1), 256, &args);
    }
    let want = coserve::backend::cuda::decoder::fill_uniform_host(n, seed, scale, offset);
    assert_close("fill_uniform_bf16", &from_bf16_bits(&out), &want, BF16_RTOL, 0.0);
}
