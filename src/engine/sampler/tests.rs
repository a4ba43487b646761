//! Sampler unit tests.
use super::*;

fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() }
}

fn random_logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

/// Token counts of `draws` samples from the same logits.
fn histogram(logits: &[f32], p: &SamplingParams, draws: usize) -> Vec<usize> {
    let mut state = SamplerState::new(p, &[]);
    let mut counts = vec![0; logits.len()];
    for _ in 0..draws {
        counts[sample(&mut logits.to_vec(), p, &mut state).token_id as usize] += 1;
    }
    counts
}

#[test]
fn greedy_takes_the_argmax_with_ties_to_the_lowest_id() {
    let p = SamplingParams::greedy(4);
    let mut state = SamplerState::new(&p, &[]);
    assert_eq!(sample(&mut [1.0, 3.0, 3.0, 2.0], &p, &mut state).token_id, 1);
    assert_eq!(sample(&mut [-1.0, -3.0, -1.0], &p, &mut state).token_id, 0);
    assert_eq!(sample(&mut [0.0, 0.0, 5.0], &p, &mut state).token_id, 2);
}

#[test]
fn top_k_one_equals_greedy() {
    let mut rng = StdRng::seed_from_u64(7);
    for seed in 0..20 {
        let mut logits = random_logits(&mut rng, 1000);
        logits[(seed * 37 % 1000) as usize] = 4.0; // a tie on the maximum now and then
        logits[(seed * 53 % 1000) as usize] = 4.0;
        let greedy = SamplingParams::greedy(4);
        let expect = sample(&mut logits.clone(), &greedy, &mut SamplerState::new(&greedy, &[]));
        let p = SamplingParams { top_k: 1, ..params(1.5, seed) };
        let got = sample(&mut logits, &p, &mut SamplerState::new(&p, &[]));
        assert_eq!(got.token_id, expect.token_id);
    }
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let mut rng = StdRng::seed_from_u64(1);
    let rows: Vec<Vec<f32>> = (0..64).map(|_| random_logits(&mut rng, 500)).collect();
    let run = |p: &SamplingParams| {
        let mut state = SamplerState::new(p, &[1, 2, 3]);
        rows.iter()
            .map(|r| {
                let t = sample(&mut r.clone(), p, &mut state).token_id;
                state.observe(t);
                t
            })
            .collect::<Vec<_>>()
    };
    let variants = [
        params(1.0, 42),
        SamplingParams { top_k: 50, top_p: 0.9, min_p: 0.01, ..params(0.8, 42) },
        SamplingParams { top_p: 0.95, repetition_penalty: 1.3, ..params(1.2, 42) },
    ];
    for p in &variants {
        assert_eq!(run(p), run(p));
        let other = SamplingParams { seed: Some(43), ..p.clone() };
        assert_ne!(run(p), run(&other));
    }
}

#[test]
fn penalties_change_the_logits_as_specified() {
    let p = SamplingParams {
        repetition_penalty: 2.0,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::greedy(4)
    };
    let mut state = SamplerState::new(&p, &[0, 2, 0]);
    state.observe(1);
    state.observe(1);
    state.observe(2);
    let mut logits = [2.0, 1.5, -1.0, 0.5];
    let picked = sample(&mut logits, &p, &mut state).token_id;
    // 0: prompt, positive -> /2; 1: output twice -> /2, -2*0.5, -0.25;
    // 2: prompt+output once, negative -> *2, -0.5, -0.25; 3: untouched.
    assert_eq!(logits, [1.0, 0.75 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 0.5]);
    assert_eq!(picked, 0);
    // The repetition penalty alone reaches prompt tokens.
    let mut rep_only = SamplerState::new(&p, &[1]);
    let rp = SamplingParams { frequency_penalty: 0.0, presence_penalty: 0.0, ..p.clone() };
    assert_eq!(sample(&mut [1.0, 1.5, 0.0], &rp, &mut rep_only).token_id, 0);
}

/// probabilities 0.5, 0.3, 0.15, 0.05
fn tiny() -> Vec<f32> {
    [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect()
}

#[test]
fn top_p_cuts_after_the_mass_is_reached() {
    let base = params(1.0, 3);
    let kept = |top_p: f32| histogram(&tiny(), &SamplingParams { top_p, ..base.clone() }, 4000);
    assert_eq!(kept(0.45), vec![4000, 0, 0, 0]);
    let h = kept(0.7);
    assert_eq!((h[2], h[3]), (0, 0));
    let share = h[0] as f64 / 4000.0;
    assert!((share - 0.5 / 0.8).abs() < 0.03, "renormalised share {share}");
    let h = kept(0.85);
    assert!(h[2] > 0 && h[3] == 0);
    assert!(kept(1.0).iter().all(|&c| c > 0));
}

#[test]
fn min_p_cuts_relative_to_the_top_token() {
    let base = params(1.0, 4);
    let kept = |min_p: f32| histogram(&tiny(), &SamplingParams { min_p, ..base.clone() }, 4000);
    // Relative probabilities 1, 0.6, 0.3, 0.1.
    let h = kept(0.25);
    assert!(h[0] > 0 && h[1] > 0 && h[2] > 0 && h[3] == 0);
    assert_eq!(kept(0.7), vec![4000, 0, 0, 0]);
    // Combined with top-k (the ranked path).
    let p = SamplingParams { min_p: 0.5, top_k: 3, ..base.clone() };
    let h = histogram(&tiny(), &p, 4000);
    assert!(h[0] > 0 && h[1] > 0 && h[2] == 0 && h[3] == 0);
    let share = h[0] as f64 / 4000.0;
    assert!((share - 0.5 / 0.8).abs() < 0.03, "renormalised share {share}");
}

/// How many of `w` (weights in rank order) top-p keeps, by the definition.
fn nucleus_by_definition(w: &[f64], p_mass: f64) -> usize {
    let (mut keep, mut before) = (0, 0.0);
    while keep < w.len() && (keep == 0 || before < p_mass) {
        before += w[keep];
        keep += 1;
    }
    keep
}

fn ids(cands: &[(f32, u32)]) -> Vec<u32> {
    let mut ids: Vec<u32> = cands.iter().map(|c| c.1).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn nucleus_equals_its_definition() {
    let mut rng = StdRng::seed_from_u64(21);
    for n in [1usize, 2, 63, 64, 65, 200, 257, 1000, 5000] {
        for (spread, top_p) in [(0.5f32, 0.3f64), (3.0, 0.9), (10.0, 0.5), (1.0, 0.99)] {
            let mut cands: Vec<(f32, u32)> =
                (0..n).map(|i| (rng.random_range(-spread..spread), i as u32)).collect();
            let max = cands.iter().fold(f32::NEG_INFINITY, |a, c| a.max(c.0));
            let weight = |c: &(f32, u32)| exp_approx_scaled(c.0, max, 1.0);
            let mut ranked = cands.clone();
            ranked.sort_by(by_rank);
            let w: Vec<f64> = ranked.iter().map(|c| weight(c) as f64).collect();
            let p_mass = top_p * w.iter().sum::<f64>();
            let want = nucleus_by_definition(&w, p_mass);
            let keep = nucleus(&mut cands, p_mass, weight);
            assert_eq!(ids(&cands[..keep]), ids(&ranked[..want]), "n {n} top_p {top_p}");
        }
    }
}

#[test]
fn rank_filter_keeps_exactly_the_top_k_and_nucleus() {
    let mut rng = StdRng::seed_from_u64(22);
    let p = SamplingParams::default();
    let mut state = SamplerState::new(&p, &[]);
    for (vocab, spread) in [(10usize, 1.0f32), (3000, 4.0), (20_000, 12.0), (20_000, 0.5)] {
        let mut logits = random_logits(&mut rng, vocab);
        logits.iter_mut().for_each(|l| *l *= spread);
        logits[vocab / 2] = logits[vocab / 3]; // a tie
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let mut ranked: Vec<(f32, u32)> =
            logits.iter().enumerate().map(|(i, &l)| (l, i as u32)).collect();
        ranked.sort_by(by_rank);
        for (t, top_k, top_p) in [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 0, 0.5), (1.0, 40, 0.8)] {
            let top_k = if top_k == 0 { vocab } else { top_k.min(vocab) };
            let pool = &ranked[..top_k];
            let w: Vec<f64> =
                pool.iter().map(|c| exp_approx_scaled(c.0, max, 1.0 / t) as f64).collect();
            let want = nucleus_by_definition(&w, top_p as f64 * w.iter().sum::<f64>());
            let n = rank_filter(&logits, max, 1.0 / t, top_k, top_p, &mut state);
            assert_eq!(
                ids(&state.candidates[..n]),
                ids(&pool[..want]),
                "vocab {vocab} spread {spread} t {t} k {top_k} p {top_p}"
            );
        }
    }
}

#[test]
fn logprobs_are_normalised_sorted_and_from_raw_logits() {
    let logits = [1.0f32, 2.0, 2.0, 0.0, -1.0];
    let lp = logprobs_of(&logits, 3, 5);
    let total: f64 = lp.top.iter().map(|(_, l)| (*l as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6, "sum {total}");
    let order: Vec<u32> = lp.top.iter().map(|(id, _)| *id).collect();
    assert_eq!(order, vec![1, 2, 0, 3, 4]);
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    let exact = 0.0 - logits.iter().map(|l| (*l as f64).exp()).sum::<f64>().ln();
    assert!((lp.logprob as f64 - exact).abs() < 1e-6);
    assert_eq!(lp.token_id, 3);
    assert_eq!(logprobs_of(&logits, 3, 2).top.len(), 2);
    assert!(logprobs_of(&logits, 3, 0).top.is_empty());

    // The sampled token's logprob ignores penalties and temperature.
    let p = SamplingParams {
        logprobs: Some(2),
        repetition_penalty: 1.5,
        presence_penalty: 1.0,
        ..SamplingParams::greedy(4)
    };
    let mut state = SamplerState::new(&p, &[1]);
    state.observe(2);
    // Penalised: 1 -> 2/1.5, 2 -> 2/1.5 - 1; the pick is a penalised token.
    let got = sample(&mut logits.to_vec(), &p, &mut state);
    assert_eq!(got.token_id, 1);
    assert_eq!(got.logprob, Some(logprobs_of(&logits, 1, 2)));
}
