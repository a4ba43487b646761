//! Sampling: `sample_rows_f32`, `argmax_logprob_f32` and `apply_penalties_f32`.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::common::emulation::{assert_close, Arg, Emulated};
use coserve::backend::cuda::sampling::{
    apply_penalties, sample_row_from, RowSampling, MAX_TOP_LOGPROBS,
};
use coserve::backend::cuda::selftest::sampling::{cases, penalised_copy, penalty_cases};
use coserve::backend::cuda::twins;

#[test]
fn sampling_kernels_pick_what_their_twins_pick() {
    let emu = Emulated::build("sampling.cu");
    let mut rng = StdRng::seed_from_u64(11);
    // Under and over one logit per thread, and one not a multiple of the block.
    for vocab in [40usize, 1000, 5003] {
        // The selftest's rows: every filter alone and together, ties, -inf and NaN.
        let (raw, params) = cases(&mut rng, vocab);
        // Drawn from the rows as given, then from rows changed as penalties change them with
        // the log-probabilities of the rows before.
        for changed in [false, true] {
            let logits = if changed { penalised_copy(&raw) } else { raw.clone() };
            let n = params.len();
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
                        // One pointer for both when nothing changed, as the device path passes.
                        Arg::ptr(if changed { &raw } else { &logits }),
                        Arg::i32(vocab as i32),
                        Arg::ptr(&packed),
                        Arg::ptr_mut(&mut ids),
                        Arg::ptr_mut(&mut lps),
                        Arg::ptr_mut(&mut top_ids),
                        Arg::ptr_mut(&mut top_lps),
                    ],
                )
            };
            let rows = logits.chunks_exact(vocab).zip(raw.chunks_exact(vocab));
            for (r, ((row, raw_row), p)) in rows.zip(&params).enumerate() {
                let want = sample_row_from(row, raw_row, p);
                // The same libm's expf on both sides: the same weights, so the same draw.
                assert_eq!(ids[r], want.id, "vocab {vocab}, row {r} {p:?}");
                assert_close(
                    &format!("logprob, row {r}"),
                    &lps[r..=r],
                    &[want.logprob],
                    1e-5,
                    1e-5,
                );
                let at = r * MAX_TOP_LOGPROBS..r * MAX_TOP_LOGPROBS + want.top.len();
                let want_ids: Vec<u32> = want.top.iter().map(|t| t.0).collect();
                let want_lps: Vec<f32> = want.top.iter().map(|t| t.1).collect();
                assert_eq!(top_ids[at.clone()], want_ids[..], "top ids, vocab {vocab}, row {r}");
                assert_close(
                    &format!("top logprobs, row {r}"),
                    &top_lps[at],
                    &want_lps,
                    1e-5,
                    1e-5,
                );
            }
        }
        let logits = raw;
        let n = params.len();

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

#[test]
fn the_penalty_kernel_changes_logits_as_its_twin_does() {
    let emu = Emulated::build("sampling.cu");
    let mut rng = StdRng::seed_from_u64(12);
    for vocab in [40usize, 1000] {
        let (mut logits, p) = penalty_cases(&mut rng, vocab);
        let before = logits.clone();
        let mut want = logits.clone();
        for (r, row) in want.chunks_exact_mut(vocab).enumerate() {
            apply_penalties(row, p.row(r));
        }
        let (offsets, tokens, rep, sub) = p.arrays();
        // SAFETY: apply_penalties_f32's parameters; offsets bound each row's entries, logits
        // holds every row.
        unsafe {
            emu.launch(
                "apply_penalties_f32",
                (p.rows() as u32, 1, 1),
                128,
                &[
                    Arg::ptr_mut(&mut logits),
                    Arg::i32(vocab as i32),
                    Arg::ptr(offsets),
                    Arg::ptr(tokens),
                    Arg::ptr(rep),
                    Arg::ptr(sub),
                ],
            )
        };
        let bits = |v: &[f32]| -> Vec<u32> {
            v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect()
        };
        assert_eq!(bits(&logits), bits(&want), "vocab {vocab}");
        assert_ne!(bits(&logits), bits(&before), "the penalties change logits");
    }
}
