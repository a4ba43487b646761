//! The device sampler's twin against the CPU sampler: the same kept sets and distributions.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::request::SamplingParams;
use crate::engine::sampler::{logprobs_of, sample, SamplerState};

fn sampling(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> RowSampling {
    RowSampling { temperature, top_k, top_p, min_p, u: 0.0, top_logprobs: 0 }
}

fn host_params(p: &RowSampling, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// The twin's probability of each token.
fn probabilities(row: &[f32], p: &RowSampling) -> Vec<f64> {
    let kept = kept_weights(row, p);
    let total: u64 = kept.iter().map(|&(_, w)| w).sum();
    let mut probs = vec![0.0; row.len()];
    for (id, w) in kept {
        probs[id as usize] = w as f64 / total as f64;
    }
    probs
}

#[test]
fn draws_follow_the_cpu_samplers_distribution() {
    let mut rng = StdRng::seed_from_u64(3);
    let cases = [
        sampling(1.0, 0, 1.0, 0.0),
        sampling(0.7, 40, 1.0, 0.0),
        sampling(1.0, 0, 0.9, 0.0),
        sampling(1.3, 0, 1.0, 0.05),
        sampling(0.8, 50, 0.8, 0.02),
        sampling(2.0, 7, 0.5, 0.0),
        sampling(1.0, 0, 0.0001, 0.0), // nucleus of the top token only
    ];
    let draws = 20_000;
    for (case, p) in cases.iter().enumerate() {
        let row: Vec<f32> = (0..300).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let probs = probabilities(&row, p);
        let hp = host_params(p, case as u64);
        let mut state = SamplerState::new(&hp, &[]);
        let mut host = vec![0usize; row.len()];
        let mut twin = vec![0usize; row.len()];
        for _ in 0..draws {
            let t = sample(&mut row.clone(), &hp, &mut state).token_id as usize;
            assert!(probs[t] > 0.0, "case {case}: the CPU sampler drew {t}, outside the kept set");
            host[t] += 1;
            let u: f64 = rng.random();
            twin[sample_row(&row, &RowSampling { u, ..*p }).id as usize] += 1;
        }
        for (t, &pr) in probs.iter().enumerate() {
            // 0.015 is over six standard deviations of a frequency from 20000 draws.
            for (who, counts) in [("CPU sampler", &host), ("twin", &twin)] {
                let f = counts[t] as f64 / draws as f64;
                assert!((f - pr).abs() < 0.015, "case {case}, token {t}: {who} {f} vs p {pr}");
            }
        }
    }
}

#[test]
fn the_draw_walks_kept_tokens_in_id_order() {
    let kept = [(3, 1u64), (5, 3)];
    assert_eq!(draw(&kept, 0.0), Some(3));
    assert_eq!(draw(&kept, 0.2499), Some(3));
    assert_eq!(draw(&kept, 0.25), Some(5));
    assert_eq!(draw(&kept, 0.999_999), Some(5));
    assert_eq!(draw(&[], 0.5), None);
}

#[test]
fn top_k_one_and_low_temperature_are_greedy_with_ties_to_the_lower_id() {
    let row = [1.0, 3.0, f32::NAN, 3.0, 2.0];
    for p in [sampling(0.0, 0, 1.0, 0.0), sampling(1.0, 1, 1.0, 0.0)] {
        for u in [0.0, 0.5, 0.99] {
            assert_eq!(sample_row(&row, &RowSampling { u, ..p }).id, 1, "{p:?} u={u}");
        }
    }
    // Top-k keeps the lower id of a tie at its cut.
    let row = [3.0, 1.0, 2.0, 1.0, 1.0];
    let ids: Vec<u32> =
        kept_weights(&row, &sampling(1.0, 3, 1.0, 0.0)).iter().map(|k| k.0).collect();
    assert_eq!(ids, [0, 1, 2]);
    // NaN never drawn; a row of -inf gives token 0, as the argmax does.
    let row = [f32::NAN, 0.0, f32::NAN];
    assert_eq!(sample_row(&row, &RowSampling { u: 0.9, ..sampling(1.0, 0, 1.0, 0.0) }).id, 1);
    let row = [f32::NEG_INFINITY; 4];
    assert_eq!(sample_row(&row, &RowSampling { u: 0.9, ..sampling(1.0, 0, 1.0, 0.0) }).id, 0);
}

#[test]
fn logprobs_are_the_cpu_samplers() {
    let mut rng = StdRng::seed_from_u64(9);
    let mut row: Vec<f32> = (0..500).map(|_| rng.random_range(-5.0f32..5.0)).collect();
    row[17] = row[40]; // a tie among the alternatives
    let p = RowSampling { top_logprobs: 20, u: 0.3, ..sampling(0.9, 0, 0.95, 0.0) };
    let got = sample_row(&row, &p);
    let want = logprobs_of(&row, got.id, 20);
    assert!((got.logprob - want.logprob).abs() < 1e-5, "{} vs {}", got.logprob, want.logprob);
    assert_eq!(got.top.len(), 20);
    for (g, w) in got.top.iter().zip(&want.top) {
        assert_eq!(g.0, w.0);
        assert!((g.1 - w.1).abs() < 1e-5);
    }
    // At most MAX_TOP_LOGPROBS, and never more than the vocabulary.
    assert_eq!(sample_row(&row, &RowSampling { top_logprobs: 50, ..p }).top.len(), 20);
    assert_eq!(sample_row(&row[..3], &RowSampling { top_logprobs: 5, ..p }).top.len(), 3);
}

#[test]
fn packing_is_the_kernels_layout() {
    let p = RowSampling {
        temperature: 0.5,
        top_k: 7,
        top_p: 0.25,
        min_p: 0.125,
        u: 0.75,
        top_logprobs: 99,
    };
    let w = p.pack();
    assert_eq!(f32::from_bits(w[0]), 0.5);
    assert_eq!(w[1], 7);
    assert_eq!(f32::from_bits(w[2]), 0.25);
    assert_eq!(f32::from_bits(w[3]), 0.125);
    assert_eq!(f64::from_bits(w[4] as u64 | (w[5] as u64) << 32), 0.75);
    assert_eq!(w[6], MAX_TOP_LOGPROBS as u32);
}
