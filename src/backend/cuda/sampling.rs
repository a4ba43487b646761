//! Sampling on the device (`sample_rows_f32`): what each row asks for, what comes back, and the
//! kernel's CPU twin, which is also how the twin-backed decoder samples.
//!
//! The kept set is the CPU sampler's (`engine::sampler`): top-k, then top-p measured against
//! the top-k pool, then min-p, over tokens ranked by logit with ties to the lower id. The one
//! uniform number a step draws comes from the sequence's own generator on the host, so a seed
//! still fixes the tokens. Weights are summed in 2^40 fixed point, in id order, which makes the
//! device's draw independent of thread timing.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::gpu::{cfg, n32, Gpu};
use super::CudaError;

/// What one row asks of the device sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// Below [`GREEDY_TEMPERATURE`]: the argmax.
    pub temperature: f32,
    /// 0 (or the vocabulary or more): off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// The step's uniform number in [0, 1).
    pub u: f64,
    /// How many of the most likely tokens to report (at most [`MAX_TOP_LOGPROBS`]).
    pub top_logprobs: u32,
}

impl RowSampling {
    /// The argmax, reporting `top_logprobs` alternatives.
    pub fn greedy(top_logprobs: u32) -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0, top_logprobs }
    }

    /// The kernel's `SampleRow`: 32 bytes, as eight 32-bit words.
    pub fn pack(&self) -> [u32; 8] {
        let u = self.u.to_bits();
        [
            self.temperature.to_bits(),
            self.top_k.min(i32::MAX as u32),
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            u as u32,
            (u >> 32) as u32,
            self.top_logprobs.min(MAX_TOP_LOGPROBS as u32),
            0,
        ]
    }
}

/// The sampling penalties of a forward's sampled rows, applied to their logits before the
/// draw (`apply_penalties_f32`): per row the tokens a penalty touches, each once, with its
/// repetition factor (1: none) and what the frequency and presence penalties then subtract.
/// No rows: no penalties at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Row `r`'s entries are `offsets[r] .. offsets[r + 1]` (empty, or one more than rows).
    offsets: Vec<u32>,
    tokens: Vec<u32>,
    repetition: Vec<f32>,
    subtract: Vec<f32>,
}

impl Penalties {
    /// Adds the next row's entries: (token, repetition factor, amount subtracted).
    pub fn push_row(&mut self, entries: impl IntoIterator<Item = (u32, f32, f32)>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        for (t, rep, sub) in entries {
            self.tokens.push(t);
            self.repetition.push(rep);
            self.subtract.push(sub);
        }
        self.offsets.push(self.tokens.len() as u32);
    }

    /// Whether any row has an entry (else the logits go to the draw as they are).
    pub fn any(&self) -> bool {
        !self.tokens.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The kernel's arrays: row offsets, then per entry the token, repetition factor and
    /// subtracted amount.
    pub fn arrays(&self) -> (&[u32], &[u32], &[f32], &[f32]) {
        (&self.offsets, &self.tokens, &self.repetition, &self.subtract)
    }

    /// Row `r`'s entries.
    pub fn row(&self, r: usize) -> impl Iterator<Item = (u32, f32, f32)> + '_ {
        let (a, b) = match (self.offsets.get(r), self.offsets.get(r + 1)) {
            (Some(&a), Some(&b)) => (a as usize, b as usize),
            _ => (0, 0),
        };
        (a..b).map(|e| (self.tokens[e], self.repetition[e], self.subtract[e]))
    }
}

/// `apply_penalties_f32` on one row: the repetition factor divides a positive logit and
/// multiplies a negative one, then the subtracted amount comes off.
pub fn apply_penalties(row: &mut [f32], entries: impl Iterator<Item = (u32, f32, f32)>) {
    for (t, rep, sub) in entries {
        let Some(l) = row.get_mut(t as usize) else { continue };
        if rep != 1.0 {
            *l = if *l > 0.0 { *l / rep } else { *l * rep };
        }
        *l -= sub;
    }
}

/// Runs `apply_penalties_f32` on the first `penalties.rows()` rows of `logits` (`vocab` wide).
pub fn apply_penalties_on_device(
    gpu: &mut Gpu,
    logits: &mut CudaSlice<f32>,
    vocab: usize,
    penalties: &Penalties,
) -> Result<(), CudaError> {
    let rows = penalties.rows();
    if !penalties.any() {
        return Ok(());
    }
    let v = i32::try_from(vocab).ok().filter(|&v| v > 0);
    let (Some(v), true) = (v, logits.len() >= rows * vocab) else {
        return Err(CudaError::Shape(format!(
            "penalties on {rows} rows of {vocab} in {} logits",
            logits.len()
        )));
    };
    let (offsets, tokens, rep, sub) = penalties.arrays();
    let (offsets, tokens, rep, sub) =
        (gpu.up(offsets)?, gpu.up(tokens)?, gpu.up(rep)?, gpu.up(sub)?);
    let f = gpu.func("sampling.cu", "apply_penalties_f32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *logits).arg(&v).arg(&offsets).arg(&tokens).arg(&rep).arg(&sub);
    // SAFETY: argument list matches apply_penalties_f32, one block per row; offsets holds rows
    // + 1 bounds into the three entry arrays, each token is checked against the vocabulary,
    // and logits holds rows * vocab (checked). A row lists each token once, so no two threads
    // write one logit.
    unsafe { b.launch(cfg((n32(rows), 1, 1), 128)) }?;
    Ok(())
}

/// A row's pick: the token, its log-probability under the raw logits, and the requested most
/// likely tokens with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSample {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a row can ask for (the chat API's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Below this temperature sampling is greedy, on the host and the device (as vLLM's
/// `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

const FIXED_ONE: f32 = 1_099_511_627_776.0; // 2^40

fn fixed(w: f32) -> u64 {
    (w * FIXED_ONE) as u64
}

/// NaN ranks as -inf, as in the kernel.
fn logit(row: &[f32], i: usize) -> f32 {
    let v = row[i];
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The best `n` ids by logit descending, ties to the lower id, in that order.
fn top_ranked(row: &[f32], n: usize) -> Vec<u32> {
    let rank = |&a: &u32, &b: &u32| {
        logit(row, b as usize).total_cmp(&logit(row, a as usize)).then(a.cmp(&b))
    };
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let n = n.min(ids.len());
    if n < ids.len() && n > 0 {
        ids.select_nth_unstable_by(n - 1, rank);
    }
    ids.truncate(n);
    ids.sort_unstable_by(rank);
    ids
}

/// The largest logit and its lowest id (NaN as -inf; 0 for a row of -inf).
fn argmax(row: &[f32]) -> (f32, u32) {
    (0..row.len()).fold((f32::NEG_INFINITY, 0), |(m, at), i| {
        let v = logit(row, i);
        if v > m {
            (v, i as u32)
        } else {
            (m, at)
        }
    })
}

/// The tokens a draw chooses among, in id order, each with its fixed-point weight; empty when
/// the row is greedy or has no finite maximum.
pub fn kept_weights(row: &[f32], p: &RowSampling) -> Vec<(u32, u64)> {
    let max = argmax(row).0;
    if p.temperature < GREEDY_TEMPERATURE || !max.is_finite() {
        return Vec::new();
    }
    let inv_t = 1.0 / p.temperature;
    let weight = |id: u32| ((logit(row, id as usize) - max) * inv_t).exp();
    // Rank only as far as a filter needs.
    let top_k = if p.top_k > 0 { (p.top_k as usize).min(row.len()) } else { row.len() };
    let mut pool = if top_k < row.len() || p.top_p < 1.0 {
        top_ranked(row, top_k)
    } else {
        (0..row.len() as u32).collect()
    };
    if p.top_p < 1.0 {
        let pool_mass: u64 = pool.iter().map(|&id| fixed(weight(id))).sum();
        let p_mass = ((p.top_p as f64 * pool_mass as f64) as u64).max(1);
        let mut before = 0u64;
        let keep = pool
            .iter()
            .take_while(|&&id| {
                let kept = before < p_mass;
                before += fixed(weight(id));
                kept
            })
            .count();
        pool.truncate(keep);
    }
    let mut kept: Vec<(u32, u64)> = pool
        .into_iter()
        .filter_map(|id| {
            let w = weight(id);
            (w >= p.min_p).then(|| (id, fixed(w)))
        })
        .collect();
    kept.sort_unstable_by_key(|&(id, _)| id);
    kept
}

/// Where a draw lands among `kept` (id order): the first token at which the running sum of
/// weights passes `floor(u * total)`.
pub fn draw(kept: &[(u32, u64)], u: f64) -> Option<u32> {
    let total: u64 = kept.iter().map(|&(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let target = ((u * total as f64) as u64).min(total - 1);
    let mut acc = 0u64;
    kept.iter()
        .find(|&&(_, w)| {
            acc += w;
            acc > target
        })
        .map(|&(id, _)| id)
}

/// `sample_rows_f32` for one row without penalties.
pub fn sample_row(row: &[f32], p: &RowSampling) -> RowSample {
    sample_row_from(row, row, p)
}

/// `sample_rows_f32` for one row: drawn from `row`, log-probabilities of `raw` (the row
/// before its penalties; as long).
pub fn sample_row_from(row: &[f32], raw: &[f32], p: &RowSampling) -> RowSample {
    if row.is_empty() || raw.len() != row.len() {
        return RowSample { id: 0, logprob: f32::NEG_INFINITY, top: Vec::new() };
    }
    let best = argmax(row).1;
    let raw_max = argmax(raw).0;
    let log_z = if raw_max.is_finite() {
        let sum: f64 = (0..raw.len()).map(|i| ((logit(raw, i) - raw_max) as f64).exp()).sum();
        raw_max + sum.ln() as f32
    } else {
        raw_max
    };
    let id = draw(&kept_weights(row, p), p.u).unwrap_or(best);
    let n_top = (p.top_logprobs as usize).min(MAX_TOP_LOGPROBS);
    let top = top_ranked(raw, n_top).iter().map(|&t| (t, logit(raw, t as usize) - log_z)).collect();
    RowSample { id, logprob: logit(raw, id as usize) - log_z, top }
}

/// Runs `sample_rows_f32` on the first `params.len()` rows of `logits` (`vocab` wide) and
/// brings back each row's pick, its log-probabilities of `raw` (the rows before their
/// penalties) where given, else of `logits`.
pub fn sample_on_device(
    gpu: &mut Gpu,
    logits: &CudaSlice<f32>,
    raw: Option<&CudaSlice<f32>>,
    vocab: usize,
    params: &[RowSampling],
) -> Result<Vec<RowSample>, CudaError> {
    let rows = params.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    let raw = raw.unwrap_or(logits);
    let v = i32::try_from(vocab).ok().filter(|&v| v > 0);
    let (Some(v), true) = (v, logits.len().min(raw.len()) >= rows * vocab) else {
        return Err(CudaError::Shape(format!(
            "sampling {rows} rows of {vocab} from {} logits",
            logits.len()
        )));
    };
    let words: Vec<u32> = params.iter().flat_map(RowSampling::pack).collect();
    let packed = gpu.up(&words)?;
    let (mut ids, mut lps) = (gpu.zeros::<u32>(rows)?, gpu.zeros::<f32>(rows)?);
    let mut top_ids = gpu.zeros::<u32>(rows * MAX_TOP_LOGPROBS)?;
    let mut top_lps = gpu.zeros::<f32>(rows * MAX_TOP_LOGPROBS)?;
    let f = gpu.func("sampling.cu", "sample_rows_f32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(logits).arg(raw).arg(&v).arg(&packed).arg(&mut ids).arg(&mut lps);
    b.arg(&mut top_ids).arg(&mut top_lps);
    // SAFETY: argument list matches sample_rows_f32, one block of the 1024 threads it is
    // written for per row; `packed` holds a 32-byte SampleRow per row, the outputs one entry
    // (MAX_TOP_LOGPROBS for the top lists) per row, `logits` and `raw` rows * vocab (checked).
    unsafe { b.launch(cfg((n32(rows), 1, 1), 1024)) }?;
    let (ids, lps) = (gpu.down(&ids)?, gpu.down(&lps)?);
    let (top_ids, top_lps) = (gpu.down(&top_ids)?, gpu.down(&top_lps)?);
    Ok(params
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let n = (p.top_logprobs as usize).min(MAX_TOP_LOGPROBS).min(vocab);
            let at = r * MAX_TOP_LOGPROBS..r * MAX_TOP_LOGPROBS + n;
            let top = top_ids[at.clone()].iter().copied().zip(top_lps[at].iter().copied());
            RowSample { id: ids[r], logprob: lps[r], top: top.collect() }
        })
        .collect())
}

#[cfg(test)]
mod tests;
