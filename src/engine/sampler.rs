//! Sampling: logits -> next token, with penalties, seeded RNG and logprobs.
//!
//! Order as in vLLM: logprobs from the raw logits; repetition penalty (prompt and output
//! tokens), frequency and presence penalties (output tokens); then greedy argmax, or
//! temperature, top-k, top-p, min-p and one draw from the sequence's own RNG.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::request::{SamplingParams, TokenLogprob};
use crate::backend::cpu::exp_shifted;
use crate::backend::cuda::sampling::{
    sample_row, RowSampling, GREEDY_TEMPERATURE, MAX_TOP_LOGPROBS,
};

/// Per-sequence sampling state: its own RNG (seeded from params.seed, else from OS entropy) and token counts for penalties.
pub struct SamplerState {
    rng: StdRng,
    /// Distinct prompt tokens, sorted (kept only when the repetition penalty is on).
    prompt_tokens: Vec<u32>,
    /// How often each generated token occurred.
    output_counts: HashMap<u32, u32>,
    /// Reused buffers: (logit, id) candidates, softmax weights, (count, mass) per bucket.
    candidates: Vec<(f32, u32)>,
    window: Vec<(f32, u32)>,
    weights: Vec<f32>,
    histogram: Vec<(usize, f64)>,
}

impl SamplerState {
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut prompt_tokens = Vec::new();
        if params.repetition_penalty != 1.0 {
            prompt_tokens.extend_from_slice(prompt_ids);
            prompt_tokens.sort_unstable();
            prompt_tokens.dedup();
        }
        Self {
            rng,
            prompt_tokens,
            output_counts: HashMap::new(),
            candidates: Vec::new(),
            window: Vec::new(),
            weights: Vec::new(),
            histogram: Vec::new(),
        }
    }

    /// Records a generated token (for presence/frequency/repetition penalties).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
    }
}

impl std::fmt::Debug for SamplerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerState")
            .field("prompt_tokens", &self.prompt_tokens.len())
            .field("output_tokens", &self.output_counts.values().sum::<u32>())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    pub logprob: Option<TokenLogprob>,
}

/// Picks the next token from one row of logits (vocab-sized, modified in place as scratch).
///
/// `state` must have been created with the same `params`.
pub fn sample(logits: &mut [f32], params: &SamplingParams, state: &mut SamplerState) -> Sampled {
    sample_by(logits, params, state, |logits, params, state| {
        if params.temperature < GREEDY_TEMPERATURE {
            argmax(logits)
        } else {
            draw(logits, params, state)
        }
    })
}

/// As [`sample`], but the draw is the device sampler's (`sampling::sample_row`, after the
/// penalties): a server on a device samples a step of a sequence on the host or on the device
/// depending on its batch, and the sequence's tokens must not depend on which.
pub fn sample_as_device(
    logits: &mut [f32],
    params: &SamplingParams,
    state: &mut SamplerState,
) -> Sampled {
    sample_by(logits, params, state, |logits, params, state| {
        sample_row(logits, &RowSampling { top_logprobs: 0, ..state.device_row(params) }).id
    })
}

fn sample_by(
    logits: &mut [f32],
    params: &SamplingParams,
    state: &mut SamplerState,
    pick: impl FnOnce(&[f32], &SamplingParams, &mut SamplerState) -> u32,
) -> Sampled {
    debug_assert!(!logits.is_empty(), "empty logits row");
    if logits.is_empty() {
        return Sampled { token_id: 0, logprob: None };
    }
    let raw = params.logprobs.map(|top| LogSoftmax::new(logits, top));
    // Original logits of penalised tokens, to report the sampled token's raw logprob.
    let mut stash = Vec::new();
    apply_penalties(logits, params, state, raw.is_some().then_some(&mut stash));

    let token_id = pick(logits, params, state);
    let logprob = raw.map(|lsm| {
        let original = stash.iter().find(|(t, _)| *t == token_id).map(|(_, l)| *l);
        let current = logits.get(token_id as usize).copied().unwrap_or(f32::NEG_INFINITY);
        lsm.entry(token_id, original.unwrap_or(current))
    });
    Sampled { token_id, logprob }
}

/// log_softmax of raw logits: logprob of `token` plus the `top` most likely (token, logprob), sorted descending, ties by lower id.
pub fn logprobs_of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lsm = LogSoftmax::new(logits, top);
    let logit = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    lsm.entry(token, logit)
}

/// The log-normaliser of a logits row and its most likely entries.
struct LogSoftmax {
    log_z: f64,
    top: Vec<(u32, f32)>,
}

impl LogSoftmax {
    fn new(logits: &[f32], top: usize) -> Self {
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let log_z = if max.is_finite() {
            // Chunks through a stack buffer: no vocabulary-sized allocation per call.
            let mut buf = [0f32; 1024];
            let sum: f64 = logits
                .chunks(buf.len())
                .map(|c| exp_shifted(c, max, 1.0, &mut buf[..c.len()]))
                .sum();
            max as f64 + sum.ln()
        } else {
            max as f64
        };
        let top = top_entries(logits, top)
            .into_iter()
            .map(|(l, id)| (id, (l as f64 - log_z) as f32))
            .collect();
        Self { log_z, top }
    }

    fn entry(self, token_id: u32, logit: f32) -> TokenLogprob {
        TokenLogprob { token_id, logprob: (logit as f64 - self.log_z) as f32, top: self.top }
    }
}

/// Descending by logit, ties by lower id; a total order, so selections are deterministic.
fn by_rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The `k` best (logit, id) pairs in rank order, by one pass keeping a small sorted list.
fn top_entries(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    let k = k.min(logits.len());
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (id, &l) in logits.iter().enumerate() {
        let cand = (l, id as u32);
        if best.len() == k && by_rank(&cand, &best[k - 1]) != Ordering::Less {
            continue;
        }
        let at = best.partition_point(|e| by_rank(e, &cand) == Ordering::Less);
        best.insert(at, cand);
        best.truncate(k);
    }
    best
}

fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    state: &SamplerState,
    mut stash: Option<&mut Vec<(u32, f32)>>,
) {
    let rep = params.repetition_penalty;
    let (freq, pres) = (params.frequency_penalty, params.presence_penalty);
    let mut remember = |logits: &[f32], t: u32| {
        if let (Some(s), Some(&l)) = (stash.as_deref_mut(), logits.get(t as usize)) {
            s.push((t, l));
        }
    };
    if rep != 1.0 && rep > 0.0 {
        let outputs_not_in_prompt =
            state.output_counts.keys().filter(|t| state.prompt_tokens.binary_search(t).is_err());
        for &t in state.prompt_tokens.iter().chain(outputs_not_in_prompt) {
            remember(logits, t);
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / rep } else { *l * rep };
            }
        }
    }
    if freq != 0.0 || pres != 0.0 {
        for (&t, &count) in &state.output_counts {
            if rep == 1.0 || rep <= 0.0 {
                remember(logits, t);
            }
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= freq * count as f32 + pres;
            }
        }
    }
}

/// Whether sampling is a plain argmax of the raw logits: greedy, no penalty, at most the chosen
/// token's logprob and no prompt logprobs. A device then picks the token itself.
pub fn is_plain_greedy(p: &SamplingParams) -> bool {
    p.temperature < GREEDY_TEMPERATURE
        && (p.repetition_penalty == 1.0 || p.repetition_penalty <= 0.0)
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
        && p.logprobs.unwrap_or(0) == 0
        && p.prompt_logprobs.is_none()
}

/// Whether the device sampler can pick this sequence's tokens: it knows temperature, top-k,
/// top-p, min-p, the penalties (its logprobs are still of the logits before them, as here) and
/// up to [`MAX_TOP_LOGPROBS`] alternatives, not prompt logprobs.
pub fn samples_on_device(p: &SamplingParams) -> bool {
    p.logprobs.unwrap_or(0) <= MAX_TOP_LOGPROBS && p.prompt_logprobs.is_none()
}

impl SamplerState {
    /// This step's penalties for the device (a row of `Penalties`): every token a penalty
    /// touches, once, in id order, with its repetition factor (1: none) and what the frequency
    /// and presence penalties subtract after it, which is what [`sample`] does to the row.
    pub fn device_penalties(&self, p: &SamplingParams) -> Vec<(u32, f32, f32)> {
        let rep = p.repetition_penalty;
        let rep_on = rep != 1.0 && rep > 0.0;
        let (freq, pres) = (p.frequency_penalty, p.presence_penalty);
        let sub_on = freq != 0.0 || pres != 0.0;
        let sub = |t: u32| match (sub_on, self.output_counts.get(&t)) {
            (true, Some(&count)) => freq * count as f32 + pres,
            _ => 0.0,
        };
        let mut out: Vec<(u32, f32, f32)> = Vec::new();
        if rep_on {
            out.extend(self.prompt_tokens.iter().map(|&t| (t, rep, sub(t))));
        }
        if rep_on || sub_on {
            let outputs = self.output_counts.keys().copied();
            let not_listed =
                outputs.filter(|t| !rep_on || self.prompt_tokens.binary_search(t).is_err());
            out.extend(not_listed.map(|t| (t, if rep_on { rep } else { 1.0 }, sub(t))));
        }
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    /// This step's row for the device sampler (`samples_on_device` must hold). Draws the
    /// step's uniform number as [`sample`] would: once per step, and not when greedy.
    pub fn device_row(&mut self, p: &SamplingParams) -> RowSampling {
        let greedy = p.temperature < GREEDY_TEMPERATURE;
        RowSampling {
            temperature: if greedy { 0.0 } else { p.temperature },
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            u: if greedy { 0.0 } else { self.rng.random() },
            top_logprobs: p.logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS) as u32,
        }
    }
}

/// Index of the largest logit, ties to the lowest id.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Temperature, top-k, top-p and min-p, then one draw from the sequence's RNG.
fn draw(logits: &[f32], params: &SamplingParams, state: &mut SamplerState) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    // One uniform number per step, whatever the filters, keeps the stream aligned to steps.
    let u: f64 = state.rng.random();
    if !max.is_finite() {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature;
    let vocab = logits.len();
    let top_k = if params.top_k == 0 { vocab } else { params.top_k.min(vocab) };
    let (top_p, min_p) = (params.top_p, params.min_p);

    if top_k == vocab && top_p >= 1.0 {
        // No ranking needed: weights over the whole vocabulary in id order, min-p as a
        // threshold on them (the top token has weight exactly 1).
        state.weights.resize(vocab, 0.0);
        let mut total = exp_shifted(logits, max, inv_t, &mut state.weights);
        if min_p > 0.0 {
            total = 0.0;
            for w in state.weights.iter_mut() {
                if *w < min_p {
                    *w = 0.0;
                }
                total += *w as f64;
            }
        }
        return walk(state.weights.iter().copied().enumerate(), u * total).unwrap_or(0) as u32;
    }

    let keep = rank_filter(logits, max, inv_t, top_k, top_p, state);
    // Without top-k, `weights` already holds every token's weight (the same bits).
    let known = top_k == vocab;
    let weights = &state.weights;
    let weight = |&(l, id): &(f32, u32)| match weights.get(id as usize) {
        Some(&w) if known => w,
        _ => exp_approx_scaled(l, max, inv_t),
    };
    // Min-p keeps tokens whose probability is at least min_p times the top one's (weight 1);
    // the kept set is a rank prefix, so filtering it in any order gives the same set.
    let kept = state.candidates[..keep].iter().filter_map(|c| {
        let w = weight(c);
        (w >= min_p).then_some((c.1 as usize, w))
    });
    let kept_mass: f64 = kept.clone().map(|(_, w)| w as f64).sum();
    walk(kept, u * kept_mass).unwrap_or(0) as u32
}

/// Applies top-k then top-p: leaves the kept (logit, id) pairs in `state.candidates[..n]`, in
/// a deterministic order, and returns n.
fn rank_filter(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    top_k: usize,
    top_p: f32,
    state: &mut SamplerState,
) -> usize {
    let vocab = logits.len();
    // Rank only where a filter cuts: a histogram over logit buckets finds the one bucket that
    // holds the top-k (or top-p) boundary; buckets above it are kept whole, those below dropped.
    let SamplerState { candidates: cands, window, weights, histogram: hist, .. } = state;
    let weight = |&(l, _): &(f32, u32)| exp_approx_scaled(l, max, inv_t);
    hist.clear();
    hist.resize(NUM_BUCKETS, (0, 0.0));
    let mut total = 0.0;
    if top_k < vocab {
        for &l in logits.iter() {
            hist[bucket(l, max, inv_t)].0 += 1;
        }
    } else {
        weights.resize(vocab, 0.0);
        total = exp_shifted(logits, max, inv_t, weights);
        for (&l, &w) in logits.iter().zip(weights.iter()) {
            let b = &mut hist[bucket(l, max, inv_t)];
            b.0 += 1;
            b.1 += w as f64;
        }
    }
    let p_mass = top_p as f64 * total;
    let (mut count_above, mut mass_above, mut cut) = (0, 0.0, NUM_BUCKETS);
    for (b, &(count, mass)) in hist.iter().enumerate() {
        let reached =
            if top_k < vocab { count_above + count >= top_k } else { mass_above + mass >= p_mass };
        if reached {
            cut = b;
            break;
        }
        count_above += count;
        mass_above += mass;
    }
    cands.clear();
    window.clear();
    for (i, &l) in logits.iter().enumerate() {
        match bucket(l, max, inv_t).cmp(&cut) {
            Ordering::Less => cands.push((l, i as u32)),
            Ordering::Equal => window.push((l, i as u32)),
            Ordering::Greater => {}
        }
    }
    if top_k < vocab {
        // The pool: the best top_k; top-p then measures mass against the pool's.
        let rest = top_k - count_above;
        if rest < window.len() {
            window.select_nth_unstable_by(rest, by_rank);
        }
        cands.extend_from_slice(&window[..rest.min(window.len())]);
        let pool_mass: f64 = cands.iter().map(|c| weight(c) as f64).sum();
        if top_p < 1.0 {
            nucleus(cands, top_p as f64 * pool_mass, weight)
        } else {
            cands.len()
        }
    } else {
        let in_window = nucleus(window, p_mass - mass_above, weight);
        cands.extend_from_slice(&window[..in_window]);
        cands.len()
    }
}

fn exp_approx_scaled(l: f32, max: f32, inv_t: f32) -> f32 {
    crate::backend::cpu::exp_approx((l - max) * inv_t)
}

/// Histogram buckets per unit of (max - logit) / temperature; 128 units cover every token
/// with a nonzero weight (e^-87 underflows).
const BUCKETS_PER_UNIT: f32 = 8.0;
const NUM_BUCKETS: usize = 1024;

/// 0 for the top logit, then non-decreasing as the logit falls (so buckets follow the rank).
fn bucket(l: f32, max: f32, inv_t: f32) -> usize {
    (((max - l) * inv_t * BUCKETS_PER_UNIT) as usize).min(NUM_BUCKETS - 1)
}

/// Moves the top-p nucleus to the front of `cands` and returns its size: in rank order, a
/// token is kept while the mass ranked before it is below `p_mass` (the first always is).
/// Bisects the ranking with partial selections guided by mass, so only a small final window
/// is ever sorted. The order left is deterministic.
fn nucleus(cands: &mut [(f32, u32)], p_mass: f64, weight: impl Fn(&(f32, u32)) -> f32) -> usize {
    const WINDOW: usize = 64;
    // Invariant: cands[..lo] are the best `lo`, all kept, of mass `before`; cands[..hi] are
    // the best `hi`, and everything ranked from `hi` on is dropped.
    let (mut lo, mut hi, mut before) = (0, cands.len(), 0f64);
    while hi - lo > WINDOW {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, by_rank);
        let upper: f64 = cands[lo..mid].iter().map(|c| weight(c) as f64).sum();
        if before + upper >= p_mass {
            hi = mid;
        } else {
            before += upper;
            lo = mid;
        }
    }
    cands[lo..hi].sort_unstable_by(by_rank);
    let mut keep = lo;
    for c in &cands[lo..hi] {
        if keep > 0 && before >= p_mass {
            break;
        }
        before += weight(c) as f64;
        keep += 1;
    }
    keep
}

/// The first id at which the running sum of weights exceeds `target`; the last id with a
/// positive weight if rounding leaves the target unreached.
fn walk(weights: impl Iterator<Item = (usize, f32)>, target: f64) -> Option<usize> {
    let mut acc = 0f64;
    let mut last = None;
    for (id, w) in weights {
        if w > 0.0 {
            acc += w as f64;
            last = Some(id);
            if acc > target {
                return last;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests;
