//! The training step's kernels: norm, SiLU and RoPE backward, gradient clipping's pieces,
//! attention backward, cross-entropy, AdamW, LoRA shrink/expand and LoRA dropout.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{random_bf16, random_f32};
use crate::common::emulation::{assert_close, bf16_bits, from_bf16_bits, Arg, Emulated};
use coserve::backend::cuda::selftest::backward::AttnCase;
use coserve::backend::cuda::twins::{self, round_bf16};
use coserve::lora::dropout::SampleDropout;

/// fp32 gradients: kernel and twin differ only by summation order.
const F32_RTOL: f32 = 1e-4;
const F32_ATOL: f32 = 1e-5;

#[test]
fn norm_silu_and_rope_backward_kernels_match_their_twins() {
    let emu = Emulated::build("backward.cu");
    let mut rng = StdRng::seed_from_u64(21);
    let (rows, hidden, eps) = (3usize, 576usize, 1e-5f32);
    let x = random_bf16(&mut rng, rows * hidden, 2.0);
    let w = random_bf16(&mut rng, hidden, 1.0);
    let dy = random_f32(&mut rng, rows * hidden, 1.0);
    let mut dx = random_f32(&mut rng, rows * hidden, 1.0); // added to, not overwritten
    let mut got = dx.clone();
    let (xb, wb) = (bf16_bits(&x), bf16_bits(&w));
    // SAFETY: rms_norm_backward_f32's parameters; every buffer holds rows * hidden.
    unsafe {
        emu.launch(
            "rms_norm_backward_f32",
            (rows as u32, 1, 1),
            256,
            &[
                Arg::ptr(&xb),
                Arg::ptr(&wb),
                Arg::ptr(&dy),
                Arg::ptr_mut(&mut got),
                Arg::i32(hidden as i32),
                Arg::f32(eps),
            ],
        )
    };
    twins::rms_norm_backward(&x, &w, eps, &dy, &mut dx);
    assert_close("rms_norm_backward_f32", &got, &dx, F32_RTOL, F32_ATOL);

    let (rows, inter) = (3usize, 1536usize);
    let gu = random_bf16(&mut rng, rows * 2 * inter, 4.0);
    let da = random_f32(&mut rng, rows * inter, 1.0);
    let gub = bf16_bits(&gu);
    let mut got = vec![0f32; rows * 2 * inter];
    // SAFETY: silu_mul_backward_f32's parameters (grid-stride over rows * inter).
    unsafe {
        emu.launch(
            "silu_mul_backward_f32",
            (4, 1, 1),
            256,
            &[
                Arg::ptr(&gub),
                Arg::ptr(&da),
                Arg::ptr_mut(&mut got),
                Arg::i32(rows as i32),
                Arg::i32(inter as i32),
            ],
        )
    };
    let want = twins::silu_mul_backward(&gu, &da, inter);
    assert_close("silu_mul_backward_f32", &got, &want, F32_RTOL, F32_ATOL);

    let positions = [0usize, 1, 17, 300, 4000];
    let (num_heads, num_kv_heads, head_dim) = (9usize, 3usize, 64usize);
    let (tokens, half) = (positions.len(), head_dim / 2);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &positions {
        for i in 0..half {
            let angle = p as f64 / 10000f64.powf(2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    // Rows of q, k and v gradients; v's part must come back untouched.
    let stride = (num_heads + 2 * num_kv_heads) * head_dim;
    let mut d = random_f32(&mut rng, tokens * stride, 1.0);
    let mut got = d.clone();
    // SAFETY: rope_backward_f32's parameters; d holds tokens rows of `stride`.
    unsafe {
        emu.launch(
            "rope_backward_f32",
            (tokens as u32, 1, 1),
            256,
            &[
                Arg::ptr_mut(&mut got),
                Arg::i32(stride as i32),
                Arg::ptr(&cos),
                Arg::ptr(&sin),
                Arg::i32(num_heads as i32),
                Arg::i32(num_kv_heads as i32),
                Arg::i32(head_dim as i32),
            ],
        )
    };
    let shape = twins::RopeShape { num_heads, num_kv_heads, head_dim };
    twins::rope_backward(&mut d, stride, &cos, &sin, shape);
    assert_close("rope_backward_f32", &got, &d, F32_RTOL, F32_ATOL);

    // Gradient clipping's pieces: bf16 rounding, the sum of squares, the scaling.
    let n = 10_003usize;
    let x = random_f32(&mut rng, n, 3.0);
    let grid = (n.div_ceil(256).min(16) as u32, 1, 1);
    let mut y = vec![0u16; n];
    // SAFETY: f32_to_bf16's parameters (grid-stride over n; both buffers hold n).
    unsafe {
        emu.launch("f32_to_bf16", grid, 256, &[Arg::ptr(&x), Arg::ptr_mut(&mut y), Arg::usize(n)])
    };
    let want: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
    assert_eq!(from_bf16_bits(&y), want, "f32_to_bf16");
    let mut sq = [0f32];
    // SAFETY: sum_squares_f32's parameters (one float out, zeroed).
    unsafe {
        emu.launch(
            "sum_squares_f32",
            grid,
            256,
            &[Arg::ptr(&x), Arg::usize(n), Arg::ptr_mut(&mut sq)],
        )
    };
    let want = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() as f32;
    assert_close("sum_squares_f32", &sq, &[want], 1e-5, 0.0);
    let mut xs = x.clone();
    // SAFETY: scale_f32's parameters (grid-stride over n).
    unsafe {
        emu.launch("scale_f32", grid, 256, &[Arg::ptr_mut(&mut xs), Arg::usize(n), Arg::f32(0.37)])
    };
    let want: Vec<f32> = x.iter().map(|&v| v * 0.37).collect();
    assert_eq!(xs, want, "scale_f32");
}

#[test]
fn attention_backward_kernels_match_the_cpu_backward() {
    use coserve::model::attention_backward::attention_backward;
    let emu = Emulated::build("attention_backward.cu");
    let mut rng = StdRng::seed_from_u64(22);
    for (len, nh, nkv, hd) in [(37usize, 4usize, 2usize, 64usize), (20, 6, 1, 128)] {
        let c = AttnCase::random(&mut rng, (len, nh, nkv, hd));
        let (want_dq, want_dk, want_dv) = attention_backward(&c.input());
        let (scale, d_o) = (c.input().scale, c.d_o.as_slice());
        let (qb, kb, vb, ob) = (bf16_bits(&c.q), bf16_bits(&c.k), bf16_bits(&c.v), bf16_bits(&c.o));
        let mut dq = vec![0f32; len * nh * hd];
        let (mut lse, mut delta) = (vec![0f32; len * nh], vec![0f32; len * nh]);
        let (mut dk, mut dv) = (vec![0f32; len * nkv * hd], vec![0f32; len * nkv * hd]);
        let dims = [len, nh, nkv, hd].map(|x| Arg::i32(x as i32));
        // SAFETY: attention_backward_dq_f32's parameters; len within AB_MAX_LEN, head_dim a
        // multiple of 32, the 128 threads it is written for.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(&ob)];
            args.extend([Arg::ptr(d_o), Arg::ptr_mut(&mut dq), Arg::ptr_mut(&mut lse)]);
            args.push(Arg::ptr_mut(&mut delta));
            args.extend(dims);
            args.extend([Arg::f32(scale), Arg::i32((nh * hd) as i32)]);
            emu.launch("attention_backward_dq_f32", (nh as u32, len as u32, 1), 128, &args);
        }
        // SAFETY: attention_backward_dkv_f32's parameters, as above.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(d_o)];
            args.extend([Arg::ptr(&lse), Arg::ptr(&delta), Arg::ptr_mut(&mut dk)]);
            args.push(Arg::ptr_mut(&mut dv));
            args.extend(dims);
            args.extend([Arg::f32(scale), Arg::i32((nkv * hd) as i32)]);
            emu.launch("attention_backward_dkv_f32", (nkv as u32, len as u32, 1), 128, &args);
        }
        // Sums over up to `len` keys or queries, in another order than the CPU's products.
        for (what, got, want) in
            [("dq", &dq, &want_dq), ("dk", &dk, &want_dk), ("dv", &dv, &want_dv)]
        {
            let what = format!("attention_backward {what}, len {len} heads {nh}/{nkv} dim {hd}");
            assert_close(&what, got, want, 1e-3, 1e-3);
        }
    }
}

#[test]
fn tiled_attention_backward_kernels_match_their_twin() {
    let emu = Emulated::build("attention_tiled.cu");
    let mut rng = StdRng::seed_from_u64(23);
    // A partial tile with GQA; three tiles with a group of four; one whole tile without GQA.
    for (len, nh, nkv, hd) in [(37usize, 4usize, 2usize, 64usize), (70, 4, 1, 128), (32, 2, 2, 64)]
    {
        let c = AttnCase::random(&mut rng, (len, nh, nkv, hd));
        let (want_dq, want_dk, want_dv) = twins::attention_backward_bf16(&c.input());
        let (scale, d_o) = (c.input().scale, c.d_o.as_slice());
        let (qb, kb, vb, ob) = (bf16_bits(&c.q), bf16_bits(&c.k), bf16_bits(&c.v), bf16_bits(&c.o));
        let mut dq = vec![0f32; len * nh * hd];
        let (mut lse, mut delta) = (vec![0f32; len * nh], vec![0f32; len * nh]);
        let (mut dk_part, mut dv_part) = (vec![0f32; len * nh * hd], vec![0f32; len * nh * hd]);
        let (mut dk, mut dv) = (vec![0f32; len * nkv * hd], vec![0f32; len * nkv * hd]);
        let dims = [len, nh, nkv, hd].map(|x| Arg::i32(x as i32));
        let tiles = len.div_ceil(32) as u32;
        // SAFETY: attention_backward_dq_tiled's parameters; head_dim 64 or 128, the 128
        // threads it is written for, every buffer as long as the shape needs.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(&ob)];
            args.extend([Arg::ptr(d_o), Arg::ptr_mut(&mut dq), Arg::ptr_mut(&mut lse)]);
            args.push(Arg::ptr_mut(&mut delta));
            args.extend(dims);
            args.extend([Arg::f32(scale), Arg::i32((nh * hd) as i32)]);
            emu.launch("attention_backward_dq_tiled", (nh as u32, tiles, 1), 128, &args);
        }
        // SAFETY: attention_backward_dkv_tiled's parameters, as above.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(d_o)];
            args.extend([Arg::ptr(&lse), Arg::ptr(&delta), Arg::ptr_mut(&mut dk_part)]);
            args.push(Arg::ptr_mut(&mut dv_part));
            args.extend(dims);
            args.push(Arg::f32(scale));
            emu.launch("attention_backward_dkv_tiled", (nh as u32, tiles, 1), 128, &args);
        }
        // SAFETY: attention_backward_dkv_sum_f32's parameters: the partials of every head.
        unsafe {
            let mut args = vec![Arg::ptr(&dk_part), Arg::ptr(&dv_part)];
            args.extend([Arg::ptr_mut(&mut dk), Arg::ptr_mut(&mut dv)]);
            args.extend(dims);
            args.push(Arg::i32((nkv * hd) as i32));
            emu.launch("attention_backward_dkv_sum_f32", (nkv as u32, len as u32, 1), 128, &args);
        }
        // Sums over up to `len` keys or queries, fp32 against the twin's f64.
        for (what, got, want) in
            [("dq", &dq, &want_dq), ("dk", &dk, &want_dk), ("dv", &dv, &want_dv)]
        {
            let what =
                format!("tiled attention backward {what}, len {len} heads {nh}/{nkv} dim {hd}");
            assert_close(&what, got, want, 1e-3, 1e-3);
        }
    }
}

#[test]
fn cross_entropy_adamw_and_lora_kernels_match_their_twins() {
    let mut rng = StdRng::seed_from_u64(7);
    let emu = Emulated::build("cross_entropy.cu");
    let vocab = 3001usize;
    let targets: [i32; 3] = [5, -1, 3000];
    let scales: [f32; 3] = [0.5, 1.0, 0.25];
    let mut logits = random_f32(&mut rng, 3 * vocab, 8.0);
    let mut got = logits.clone();
    let mut loss = [0f32; 3];
    // SAFETY: cross_entropy_f32's parameters; three rows of vocab logits.
    unsafe {
        emu.launch(
            "cross_entropy_f32",
            (3, 1, 1),
            512,
            &[
                Arg::ptr_mut(&mut got),
                Arg::ptr(&targets),
                Arg::ptr(&scales),
                Arg::ptr_mut(&mut loss),
                Arg::i32(vocab as i32),
            ],
        )
    };
    let want_loss: Vec<f32> = logits
        .chunks_exact_mut(vocab)
        .zip(targets.iter().zip(&scales))
        .map(|(row, (&t, &s))| twins::cross_entropy(row, t, s))
        .collect();
    assert_close("cross_entropy_f32 loss", &loss, &want_loss, 1e-4, 1e-5);
    assert_close("cross_entropy_f32 gradient", &got, &logits, 1e-3, 1e-6);

    use coserve::lora::optim::{adamw_update, AdamWConfig, AdamWScalars};
    let emu = Emulated::build("adamw.cu");
    let n = 2_000usize;
    let mut p = random_f32(&mut rng, n, 1.0);
    let g = random_f32(&mut rng, n, 1e-2);
    let mut m = random_f32(&mut rng, n, 1e-3);
    let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1e-5)).collect();
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let s = AdamWScalars::new(config, 2e-4, 3);
    let (mut gp, mut gm, mut gv) = (p.clone(), m.clone(), v.clone());
    // SAFETY: adamw_f32's parameters (size_t n, then six floats).
    unsafe {
        let mut args = vec![Arg::ptr_mut(&mut gp), Arg::ptr(&g), Arg::ptr_mut(&mut gm)];
        args.extend([Arg::ptr_mut(&mut gv), Arg::usize(n)]);
        args.extend([s.beta1, s.beta2, s.eps, s.decay, s.step_size, s.bc2_sqrt].map(Arg::f32));
        emu.launch("adamw_f32", (n.div_ceil(256) as u32, 1, 1), 256, &args);
    }
    adamw_update(&mut p, &g, &mut m, &mut v, &s);
    assert_close("adamw_f32 params", &gp, &p, 1e-6, 1e-7);
    assert_close("adamw_f32 exp_avg", &gm, &m, 1e-5, 1e-6);
    assert_close("adamw_f32 exp_avg_sq", &gv, &v, 1e-5, 1e-6);

    let emu = Emulated::build("lora.cu");
    let (in_dim, out_dim) = (576usize, 320usize);
    let slots: [i32; 6] = [0, 1, -1, 1, 0, -1];
    let adapters: Vec<twins::TwinAdapter> = [(8usize, 2.0f32), (16, 0.5)]
        .iter()
        .map(|&(rank, scale)| twins::TwinAdapter {
            a: random_f32(&mut rng, rank * in_dim, 0.1),
            b: random_f32(&mut rng, out_dim * rank, 0.1),
            rank,
            scale,
        })
        .collect();
    let tokens = slots.len();
    let x = random_bf16(&mut rng, tokens * in_dim, 1.0);
    // The adapted columns are a block of a wider fused output (as k in q/k/v).
    let (ld, col0, max_rank) = (out_dim + 96, 64usize, 16usize);
    let mut y = random_bf16(&mut rng, tokens * ld, 1.0);
    let a_ptrs: Vec<u64> = adapters.iter().map(|a| a.a.as_ptr() as u64).collect();
    let b_ptrs: Vec<u64> = adapters.iter().map(|a| a.b.as_ptr() as u64).collect();
    let ranks: Vec<i32> = adapters.iter().map(|a| a.rank as i32).collect();
    let lora_scales: Vec<f32> = adapters.iter().map(|a| a.scale).collect();
    let xb = bf16_bits(&x);
    let mut yb = bf16_bits(&y);
    let mut u = vec![0f32; tokens * max_rank];
    // SAFETY: lora_shrink_bf16's parameters; 4 warps a block, one per rank row; the A tables
    // the pointers name live in `adapters`.
    unsafe {
        let mut args = vec![Arg::ptr(&xb), Arg::ptr(&a_ptrs), Arg::ptr(&ranks), Arg::ptr(&slots)];
        args.extend([Arg::ptr_mut(&mut u), Arg::i32(in_dim as i32), Arg::i32(max_rank as i32)]);
        let grid = (tokens as u32, max_rank.div_ceil(4) as u32, 1);
        emu.launch("lora_shrink_bf16", grid, 128, &args);
    }
    // SAFETY: lora_expand_bf16's parameters; row t writes columns col0..col0 + out_dim of a
    // row ld wide, inside y.
    unsafe {
        let mut args = vec![Arg::ptr(&u), Arg::ptr(&b_ptrs), Arg::ptr(&ranks)];
        args.extend([Arg::ptr(&lora_scales), Arg::ptr(&slots), Arg::ptr_mut(&mut yb[col0..])]);
        args.extend([out_dim, ld, max_rank].map(|x| Arg::i32(x as i32)));
        let grid = (tokens as u32, out_dim.div_ceil(256) as u32, 1);
        emu.launch("lora_expand_bf16", grid, 256, &args);
    }
    twins::lora(&x, &mut y, &slots, &adapters, in_dim, out_dim, (ld, col0));
    assert_close("lora_shrink_expand_bf16", &from_bf16_bits(&yb), &y, 1.0 / 128.0, 4e-3);
}

/// The dropout kernels draw the CPU's masks bit for bit (ChaCha8 as `rand_chacha` seeds and
/// runs it), over a row width that is not a multiple of their 16-element blocks.
#[test]
fn lora_dropout_kernels_draw_the_cpu_masks() {
    let emu = Emulated::build("lora.cu");
    let mut rng = StdRng::seed_from_u64(23);
    let (width, threads) = (1541usize, 64u32);
    let pos = [7usize, 0, 1, 300, 2];
    let rows = pos.len();
    let (drop_rows, layer, module) = (1..4usize, 3usize, 6usize);
    let d = SampleDropout { p: 0.3, seed: 0xDEAD_BEEF_1234_5678 };
    let pos_i32: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
    let grid = (rows as u32, width.div_ceil(16).div_ceil(threads as usize) as u32, 1);
    let site = |args: &mut Vec<Arg>| {
        args.extend([Arg::f32(d.p), Arg::usize(d.seed as usize)]);
        args.extend([Arg::i32(layer as i32), Arg::i32(module as i32)]);
    };

    let x = random_bf16(&mut rng, rows * width, 2.0);
    let xb = bf16_bits(&x);
    let mut got = vec![0u16; rows * width];
    // SAFETY: lora_dropout_bf16's parameters; x and out hold rows * width, pos one per row.
    unsafe {
        let mut args = vec![Arg::ptr(&xb), Arg::ptr_mut(&mut got), Arg::ptr(&pos_i32)];
        args.extend([drop_rows.start, drop_rows.end, width].map(|v| Arg::i32(v as i32)));
        site(&mut args);
        emu.launch("lora_dropout_bf16", grid, threads, &args);
    }
    let mut want = vec![0f32; rows * width];
    twins::lora_dropout(&x, &mut want, &pos, drop_rows.clone(), width, d, layer, module);
    assert_eq!(from_bf16_bits(&got), want, "lora_dropout_bf16");
    let dropped = want.iter().zip(&x).filter(|(w, x)| **w == 0.0 && **x != 0.0).count();
    let expect = (drop_rows.len() * width) as f32 * d.p;
    assert!((dropped as f32 - expect).abs() < 0.1 * expect, "{dropped} dropped, ~{expect} due");
    // Rows outside the sample pass through.
    assert_eq!(want[..width], x[..width]);

    let src = random_f32(&mut rng, rows * width, 1.0);
    let mut got = random_f32(&mut rng, rows * width, 1.0);
    let mut want = got.clone();
    // SAFETY: lora_dropout_add_f32's parameters; src and dst hold rows * width.
    unsafe {
        let mut args = vec![Arg::ptr(&src), Arg::ptr_mut(&mut got), Arg::ptr(&pos_i32)];
        args.push(Arg::i32(width as i32));
        site(&mut args);
        emu.launch("lora_dropout_add_f32", grid, threads, &args);
    }
    twins::lora_dropout_add(&src, &mut want, &pos, width, d, layer, module);
    assert_close("lora_dropout_add_f32", &got, &want, 1e-6, 1e-7);
}
