//! The CUDA kernels' own code, run on the CPU (`common::emulation`), against their twins: the
//! sampling and training kernels at small shapes, so their indexing, barriers, shuffles and
//! atomics are checked without a GPU. The tolerances are the selftest's (`coserve selftest
//! --device cuda`), which runs the same comparisons on a GPU at real shapes.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::emulation::{assert_close, bf16_bits, from_bf16_bits, Arg, Emulated};
use coserve::backend::cuda::sampling::{sample_row, RowSampling, MAX_TOP_LOGPROBS};
use coserve::backend::cuda::twins::{self, round_bf16};

fn random_f32(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

fn random_bf16(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| round_bf16(rng.random_range(-range..range))).collect()
}

#[test]
fn sampling_kernels_pick_what_their_twins_pick() {
    let emu = Emulated::build("sampling.cu");
    let mut rng = StdRng::seed_from_u64(11);
    // (temperature, top_k, top_p, min_p, top_logprobs): every filter alone and together.
    let rows: [(f32, u32, f32, f32, u32); 12] = [
        (1.0, 0, 1.0, 0.0, 0),
        (0.7, 50, 1.0, 0.0, 5),
        (0.0, 0, 1.0, 0.0, 20),
        (1.5, 7, 0.9, 0.0, 0),
        (0.3, 1, 1.0, 0.0, 3),
        (2.0, 0, 0.5, 0.05, 1),
        (1.0, 3000, 0.95, 0.0, 20),
        (0.9, 20, 0.8, 0.1, 0),
        (1.0, 0, 1e-5, 0.0, 2),
        (1.2, 5, 1.0, 0.2, 20),
        (0.8, 0, 0.9, 0.0, 0),
        (1.0, 100_000, 0.99, 0.01, 4),
    ];
    // Under and over one logit per thread, and one not a multiple of the block.
    for vocab in [40usize, 1000, 5003] {
        let n = rows.len();
        let mut logits = Vec::with_capacity(n * vocab);
        for r in 0..n {
            for i in 0..vocab {
                let mut v: f32 = rng.random_range(-10.0..10.0);
                match r % 4 {
                    1 => v = (v * 4.0).round() / 4.0, // many ties
                    2 if i % 7 == 3 => v = f32::NEG_INFINITY,
                    3 if i % 11 == 5 => v = f32::NAN,
                    _ => {}
                }
                logits.push(v);
            }
        }
        let params: Vec<RowSampling> = rows
            .iter()
            .map(|&(temperature, top_k, top_p, min_p, top_logprobs)| RowSampling {
                temperature,
                top_k,
                top_p,
                min_p,
                u: rng.random(),
                top_logprobs,
            })
            .collect();
        let packed: Vec<u32> = params.iter().flat_map(RowSampling::pack).collect();
        let (mut ids, mut lps) = (vec![0u32; n], vec![0f32; n]);
        let (mut top_ids, mut top_lps) =
            (vec![0u32; n * MAX_TOP_LOGPROBS], vec![0f32; n * MAX_TOP_LOGPROBS]);
        // SAFETY: sample_rows_f32's parameters; every buffer holds what n rows need.
        unsafe {
            emu.launch(
                "sample_rows_f32",
                (n as u32, 1, 1),
                1024,
                &[
                    Arg::ptr(&logits),
                    Arg::i32(vocab as i32),
                    Arg::ptr(&packed),
                    Arg::ptr_mut(&mut ids),
                    Arg::ptr_mut(&mut lps),
                    Arg::ptr_mut(&mut top_ids),
                    Arg::ptr_mut(&mut top_lps),
                ],
            )
        };
        for (r, (row, p)) in logits.chunks_exact(vocab).zip(&params).enumerate() {
            let want = sample_row(row, p);
            // The same libm's expf on both sides: the same weights, so the same draw.
            assert_eq!(ids[r], want.id, "vocab {vocab}, row {r} {p:?}");
            assert_close(&format!("logprob, row {r}"), &lps[r..=r], &[want.logprob], 1e-5, 1e-5);
            let at = r * MAX_TOP_LOGPROBS..r * MAX_TOP_LOGPROBS + want.top.len();
            let want_ids: Vec<u32> = want.top.iter().map(|t| t.0).collect();
            let want_lps: Vec<f32> = want.top.iter().map(|t| t.1).collect();
            assert_eq!(top_ids[at.clone()], want_ids[..], "top ids, vocab {vocab}, row {r}");
            assert_close(&format!("top logprobs, row {r}"), &top_lps[at], &want_lps, 1e-5, 1e-5);
        }

        let (mut ids, mut lps) = (vec![0u32; n], vec![0f32; n]);
        // SAFETY: argmax_logprob_f32's parameters, 1024 threads as its shared arrays need.
        unsafe {
            emu.launch(
                "argmax_logprob_f32",
                (n as u32, 1, 1),
                1024,
                &[
                    Arg::ptr(&logits),
                    Arg::i32(vocab as i32),
                    Arg::ptr_mut(&mut ids),
                    Arg::ptr_mut(&mut lps),
                ],
            )
        };
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            // NaN rows aside: the argmax kernel reads logits as they are.
            if row.iter().any(|v| v.is_nan()) {
                continue;
            }
            let (id, lp) = twins::argmax_logprob(row);
            assert_eq!(ids[r], id, "argmax, vocab {vocab}, row {r}");
            assert_close("argmax logprob", &lps[r..=r], &[lp], 1e-5, 1e-5);
        }
    }
}

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
    use coserve::model::attention_backward::{attention_backward, AttnBackwardInput};
    let emu = Emulated::build("attention_backward.cu");
    let mut rng = StdRng::seed_from_u64(22);
    for (len, nh, nkv, hd) in [(37usize, 4usize, 2usize, 64usize), (20, 6, 1, 128)] {
        let q = random_bf16(&mut rng, len * nh * hd, 1.0);
        let k = random_bf16(&mut rng, len * nkv * hd, 1.0);
        let v = random_bf16(&mut rng, len * nkv * hd, 1.0);
        let o = random_bf16(&mut rng, len * nh * hd, 1.0);
        let d_o = random_f32(&mut rng, len * nh * hd, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let (want_dq, want_dk, want_dv) = attention_backward(&AttnBackwardInput {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            d_o: &d_o,
            len,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale,
        });
        let (qb, kb, vb, ob) = (bf16_bits(&q), bf16_bits(&k), bf16_bits(&v), bf16_bits(&o));
        let mut dq = vec![0f32; len * nh * hd];
        let (mut lse, mut delta) = (vec![0f32; len * nh], vec![0f32; len * nh]);
        let (mut dk, mut dv) = (vec![0f32; len * nkv * hd], vec![0f32; len * nkv * hd]);
        let dims = [len, nh, nkv, hd].map(|x| Arg::i32(x as i32));
        // SAFETY: attention_backward_dq_f32's parameters; len within AB_MAX_LEN, head_dim a
        // multiple of 32, the 128 threads it is written for.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(&ob)];
            args.extend([Arg::ptr(&d_o), Arg::ptr_mut(&mut dq), Arg::ptr_mut(&mut lse)]);
            args.push(Arg::ptr_mut(&mut delta));
            args.extend(dims);
            args.extend([Arg::f32(scale), Arg::i32((nh * hd) as i32)]);
            emu.launch("attention_backward_dq_f32", (nh as u32, len as u32, 1), 128, &args);
        }
        // SAFETY: attention_backward_dkv_f32's parameters, as above.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(&d_o)];
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

    use coserve::lora::optim::{adamw_update, AdamWScalars};
    let emu = Emulated::build("adamw.cu");
    let n = 2_000usize;
    let mut p = random_f32(&mut rng, n, 1.0);
    let g = random_f32(&mut rng, n, 1e-2);
    let mut m = random_f32(&mut rng, n, 1e-3);
    let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1e-5)).collect();
    let (lr, t) = (2e-4f32, 3f64);
    let (beta1, beta2, eps, weight_decay) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32);
    let s = AdamWScalars {
        beta1,
        beta2,
        eps,
        weight_decay,
        decay: 1.0 - lr * weight_decay,
        step_size: (lr as f64 / (1.0 - (beta1 as f64).powf(t))) as f32,
        bc2_sqrt: (1.0 - (beta2 as f64).powf(t)).sqrt() as f32,
    };
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

#[test]
fn paged_attention_kernels_match_their_twin() {
    use coserve::backend::cpu::paged_attention::{AttnSeq, AttnShape};
    let emu = Emulated::build("paged_attention.cu");
    let mut rng = StdRng::seed_from_u64(5);
    // (q_len, context_len): decodes short and long, a prefill chunk, a whole prompt.
    let seq_shapes = [(1usize, 1usize), (1, 17), (5, 40), (1, 150), (9, 9)];
    let (num_heads, num_kv_heads, head_dim, bs) = (4usize, 2usize, 64usize, 16usize);
    let blocks_per: Vec<usize> = seq_shapes.iter().map(|&(_, c)| c.div_ceil(bs)).collect();
    let num_blocks: usize = blocks_per.iter().sum();
    // Blocks shuffled, so no table is the identity.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let max_blocks = blocks_per.iter().copied().max().unwrap_or(1);
    let mut tables = vec![0i32; seq_shapes.len() * max_blocks];
    let (mut row_seq, mut row_pos, mut host_tables) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = 0;
    for (s, (&(q_len, ctx), &nb)) in seq_shapes.iter().zip(&blocks_per).enumerate() {
        let t: Vec<u32> = ids[next..next + nb].to_vec();
        next += nb;
        for (j, &b) in t.iter().enumerate() {
            tables[s * max_blocks + j] = b as i32;
        }
        host_tables.push(t);
        for r in 0..q_len {
            row_seq.push(s as i32);
            row_pos.push((ctx - q_len + r) as i32);
        }
    }
    let rows = row_seq.len();
    let kv_len = num_blocks * bs * num_kv_heads * head_dim;
    let q = random_bf16(&mut rng, rows * num_heads * head_dim, 1.0);
    let kc = random_bf16(&mut rng, kv_len, 1.0);
    let vc = random_bf16(&mut rng, kv_len, 1.0);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let shape = AttnShape { num_heads, num_kv_heads, head_dim, block_size: bs, scale };
    let mut q_start = 0;
    let seqs: Vec<AttnSeq> = seq_shapes
        .iter()
        .zip(&host_tables)
        .map(|(&(q_len, context_len), t)| {
            let s = AttnSeq { q_start, q_len, context_len, block_table: t };
            q_start += q_len;
            s
        })
        .collect();
    let want = twins::attention(&q, &kc, &vc, &seqs, &shape);
    let (qb, kb, vb) = (bf16_bits(&q), bf16_bits(&kc), bf16_bits(&vc));
    let max_ctx = seq_shapes.iter().map(|s| s.1).max().unwrap_or(1);
    // One partition, and several (split-K, then the combine).
    for partition in [64usize, 512] {
        let parts = max_ctx.div_ceil(partition);
        let mut pm = vec![0f32; rows * num_heads * parts];
        let mut pl = vec![0f32; rows * num_heads * parts];
        let mut po = vec![0f32; rows * num_heads * parts * head_dim];
        let mut out = vec![0u16; rows * num_heads * head_dim];
        let dims = [num_heads, num_kv_heads, head_dim, bs, partition].map(|x| Arg::i32(x as i32));
        // SAFETY: paged_attention_partial_bf16's parameters; partial buffers hold rows * heads
        // * parts entries; 128 threads = ATTN_THREADS; every table entry is a block of the
        // caches.
        unsafe {
            let mut args = vec![Arg::ptr(&qb), Arg::ptr(&kb), Arg::ptr(&vb), Arg::ptr(&row_seq)];
            args.extend([Arg::ptr(&row_pos), Arg::ptr(&tables), Arg::i32(max_blocks as i32)]);
            args.extend([Arg::ptr_mut(&mut pm), Arg::ptr_mut(&mut pl), Arg::ptr_mut(&mut po)]);
            args.extend(dims);
            args.push(Arg::f32(scale));
            let grid = (num_heads as u32, rows as u32, parts as u32);
            emu.launch("paged_attention_partial_bf16", grid, 128, &args);
        }
        // SAFETY: paged_attention_combine_bf16's parameters, as above.
        unsafe {
            let mut args = vec![Arg::ptr(&pm), Arg::ptr(&pl), Arg::ptr(&po)];
            args.extend([Arg::ptr_mut(&mut out), Arg::i32(num_heads as i32)]);
            args.extend([Arg::i32(head_dim as i32), Arg::i32(parts as i32)]);
            emu.launch(
                "paged_attention_combine_bf16",
                (num_heads as u32, rows as u32, 1),
                128,
                &args,
            );
        }
        let what = format!("paged attention, {parts} partitions");
        assert_close(&what, &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    }
}
