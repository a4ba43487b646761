//! `sample_rows_f32` against its twin: rows at real vocabulary sizes, each with other filters,
//! ties, -inf and NaN logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{compare, Check, Gpu};
use crate::backend::cuda::sampling::{
    apply_penalties, apply_penalties_on_device, kept_weights, sample_on_device, sample_row,
    sample_row_from, Penalties, RowSample, RowSampling,
};
use crate::backend::cuda::twins::round_bf16;
use crate::backend::cuda::CudaError;

/// (temperature, top_k, top_p, min_p, top_logprobs) of each row.
const ROWS: [(f32, u32, f32, f32, u32); 12] = [
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

/// Rows of `vocab` random logits in [-10, 10), one per entry of the filter table, with many
/// ties in every fourth row, -inf or NaN logits in others, and each row's parameters with a
/// uniform number drawn from `rng`. Shared with the kernel's test on the CPU.
pub fn cases(rng: &mut StdRng, vocab: usize) -> (Vec<f32>, Vec<RowSampling>) {
    let mut logits = Vec::with_capacity(ROWS.len() * vocab);
    for r in 0..ROWS.len() {
        for i in 0..vocab {
            let mut v: f32 = rng.random_range(-10.0..10.0);
            match r % 4 {
                1 => v = round_bf16(v / 4.0) * 4.0, // many ties
                2 if i % 7 == 3 => v = f32::NEG_INFINITY,
                3 if i % 11 == 5 => v = f32::NAN,
                _ => {}
            }
            logits.push(v);
        }
    }
    let params = ROWS
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
    (logits, params)
}

pub(super) fn check_sampling(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(11);
    for vocab in [128_256usize, 151_936, 1000] {
        let (logits, params) = cases(&mut rng, vocab);
        let rows = params.len();
        let dl = gpu.up(&logits)?;
        let got = sample_on_device(gpu, &dl, None, vocab, &params)?;
        let again = sample_on_device(gpu, &dl, None, vocab, &params)?;
        let shape = format!("rows={rows} vocab={vocab}");
        let twin: Vec<_> =
            logits.chunks_exact(vocab).zip(&params).map(|(row, p)| sample_row(row, p)).collect();

        // A pick may differ from the twin's only where expf's last bits move the draw across
        // a boundary between two kept tokens: then the device's token must be the twin's
        // neighbour within a millionth of the kept mass.
        let off: Vec<f32> = got
            .iter()
            .zip(&twin)
            .zip(logits.chunks_exact(vocab).zip(&params))
            .map(|((g, t), (row, p))| {
                if g.id == t.id {
                    return 0.0;
                }
                let kept = kept_weights(row, p);
                let total: u64 = kept.iter().map(|k| k.1).sum();
                let target = ((p.u * total as f64) as u64).min(total.saturating_sub(1));
                let mut acc = 0u64;
                for &(id, w) in &kept {
                    if id == g.id {
                        let gap = target.saturating_sub(acc + w).max(acc.saturating_sub(target));
                        return gap as f32 / total.max(1) as f32;
                    }
                    acc += w;
                }
                f32::INFINITY // not in the twin's kept set
            })
            .collect();
        let worst = off.iter().fold(0f64, |a, &o| a.max(o as f64));
        checks.push(Check {
            kernel: "sample_rows_f32 (picks)".into(),
            shape: shape.clone(),
            max_abs_error: worst,
            worst_ratio: worst / 1e-6,
            passed: worst <= 1e-6,
            error: None,
        });
        let ids = |s: &[RowSample]| -> Vec<f32> { s.iter().map(|x| x.id as f32).collect() };
        compare(
            checks,
            "sample_rows_f32 (same picks twice)",
            shape.clone(),
            &ids(&again),
            &ids(&got),
            0.0,
            0.0,
        );
        // Log-probabilities of the device's picks, from the raw logits.
        let picked = |got: &[RowSample]| -> (Vec<f32>, Vec<f32>) {
            let of = |(g, row): (&RowSample, &[f32])| {
                (g.logprob, crate::engine::sampler::logprobs_of(&sanitized(row), g.id, 0).logprob)
            };
            got.iter().zip(logits.chunks_exact(vocab)).map(of).unzip()
        };
        let (lp, want_lp) = picked(&got);
        compare(checks, "sample_rows_f32 (logprobs)", shape.clone(), &lp, &want_lp, 1e-4, 1e-5);
        let flat = |s: &[RowSample]| -> (Vec<f32>, Vec<f32>) {
            s.iter().flat_map(|x| x.top.iter().map(|&(id, lp)| (id as f32, lp))).unzip()
        };
        let ((gi, gl), (ti, tl)) = (flat(&got), flat(&twin));
        compare(checks, "sample_rows_f32 (top ids)", shape.clone(), &gi, &ti, 0.0, 0.0);
        compare(checks, "sample_rows_f32 (top logprobs)", shape.clone(), &gl, &tl, 1e-4, 1e-5);

        // Drawn from rows changed as penalties change them, log-probabilities of the rows
        // before: the picks' and the alternatives'.
        let changed = penalised_copy(&logits);
        let dc = gpu.up(&changed)?;
        let got = sample_on_device(gpu, &dc, Some(&dl), vocab, &params)?;
        let twin: Vec<_> = changed
            .chunks_exact(vocab)
            .zip(logits.chunks_exact(vocab))
            .zip(&params)
            .map(|((row, raw), p)| sample_row_from(row, raw, p))
            .collect();
        let (lp, want_lp) = picked(&got);
        let name = "sample_rows_f32 (logprobs before penalties)";
        compare(checks, name, shape.clone(), &lp, &want_lp, 1e-4, 1e-5);
        let ((gi, gl), (ti, tl)) = (flat(&got), flat(&twin));
        let name = "sample_rows_f32 (top ids before penalties)";
        compare(checks, name, shape.clone(), &gi, &ti, 0.0, 0.0);
        let name = "sample_rows_f32 (top logprobs before penalties)";
        compare(checks, name, shape, &gl, &tl, 1e-4, 1e-5);
    }
    Ok(())
}

/// `logits` changed as penalties change a row: every fifth token's logit divided by 1.5 and
/// lowered by 2, and every seventh raised by 3 (a negative presence penalty), so that picks
/// often land on changed tokens. Shared with the kernel's test on the CPU.
pub fn penalised_copy(logits: &[f32]) -> Vec<f32> {
    let change = |(i, &v): (usize, &f32)| match (i % 5, i % 7) {
        (2, _) => v / 1.5 - 2.0,
        (_, 4) => v + 3.0,
        _ => v,
    };
    logits.iter().enumerate().map(change).collect()
}

/// Rows of `vocab` random logits in [-10, 10) (some 0 and -0, one NaN) and penalties on them:
/// repetition alone, subtraction alone, both, a row with none, tokens past the vocabulary, and
/// a row with more entries than the kernel's block has threads. Shared with the kernel's test
/// on the CPU.
pub fn penalty_cases(rng: &mut StdRng, vocab: usize) -> (Vec<f32>, Penalties) {
    let rows = 5;
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-10.0..10.0)).collect();
    logits[1] = 0.0;
    logits[2] = -0.0;
    logits[vocab + 3] = f32::NAN;
    let mut p = Penalties::default();
    p.push_row([
        (0, 1.3, 0.0),
        (1, 1.3, 0.0),
        (2, 1.3, 0.0),
        (9, 1.0, 0.75),
        (vocab as u32, 2.0, 1.0),
    ]);
    p.push_row([(3, 0.8, 0.0), (4, 1.2, 1.6), (5, 1.0, 0.4)]);
    p.push_row([]);
    // Every other token, many more than the block's threads.
    p.push_row((0..vocab as u32).step_by(2).map(|t| (t, 1.1, 0.25 * (t % 7) as f32)));
    p.push_row([(vocab as u32 - 1, 3.0, 2.0), (vocab as u32 + 7, 3.0, 2.0)]);
    (logits, p)
}

/// `apply_penalties_f32` against its twin, bit for bit: one division or product and one
/// subtraction per logit, as on the host.
pub(super) fn check_penalties(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(12);
    for vocab in [128_256usize, 1000] {
        let (logits, p) = penalty_cases(&mut rng, vocab);
        let mut dl = gpu.up(&logits)?;
        apply_penalties_on_device(gpu, &mut dl, vocab, &p)?;
        let got = gpu.down(&dl)?;
        let mut want = logits.clone();
        for (r, row) in want.chunks_exact_mut(vocab).enumerate() {
            apply_penalties(row, p.row(r));
        }
        // Exactly, NaN equal to NaN.
        let bits = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| if x.is_nan() { 0.5 } else { x }).collect()
        };
        let shape = format!("rows={} vocab={vocab}, {} entries", p.rows(), p.arrays().1.len());
        compare(checks, "apply_penalties_f32", shape, &bits(&got), &bits(&want), 0.0, 0.0);
    }
    Ok(())
}

/// NaN as -inf, as the kernel reads logits.
fn sanitized(row: &[f32]) -> Vec<f32> {
    row.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }).collect()
}
