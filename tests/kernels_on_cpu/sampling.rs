//! Sampling: `sample_rows_f32` and `argmax_logprob_f32`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::emulation::{assert_close, Arg, Emulated};
use coserve::backend::cuda::sampling::{sample_row, RowSampling, MAX_TOP_LOGPROBS};
use coserve::backend::cuda::twins;

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
