//! Causal-LM cross-entropy over a training sample and its gradient w.r.t. the final hidden
//! states, computed over row chunks so the `[tokens, vocab]` logits never exist whole.

use rayon::prelude::*;

use super::backward::{rms_norm_backward, BackwardWeights};
use super::llama::{rms_norm, Llama};
use crate::backend::cpu::gemm::MatRef;
use crate::backend::cpu::{exp_shifted, max};

/// Rows of logits computed at once: bounds the logits buffer to `ROWS x vocab` floats, while
/// the head's weights are streamed once per `ROWS` rows, forward and backward (128 rows: 25 MiB
/// of logits for a 49,152 vocabulary; the head's backward product ran about 10% faster than at
/// 64). Results do not depend on it: every row's loss and gradient are computed alone.
const ROWS: usize = 128;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// Sum of per-token negative log-likelihoods (nats).
    pub loss_sum: f64,
    /// Tokens whose argmax prediction equals the target.
    pub correct: usize,
    /// Tokens with a target.
    pub count: usize,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.loss_sum += o.loss_sum;
        self.correct += o.correct;
        self.count += o.count;
    }

    pub fn mean_loss(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.loss_sum / self.count as f64
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.correct as f64 / self.count as f64
        }
    }
}

/// Loss of predicting `targets[i]` from final hidden row `i` (rows without a target are
/// skipped). With `bw`, also writes `grad_scale · ∂loss/∂h` into `dh` (`[rows, hidden]`,
/// zero where there is no target), e.g. `grad_scale = 1 / tokens in the batch` for a mean.
pub fn lm_loss(
    model: &Llama,
    bw: Option<&BackwardWeights>,
    h: &[f32],
    targets: &[Option<u32>],
    grad_scale: f32,
    dh: Option<&mut [f32]>,
) -> LossStats {
    let grad = (bw.is_some() && dh.is_some()).then_some(grad_scale);
    let mut run = LossRun::new(targets, grad);
    run.run(model, bw, h, dh, usize::MAX);
    run.stats()
}

/// A sample's loss computed a few rows at a time, so that it can be spread over iterations.
/// Its results have the same bits however it is split: every row's loss and gradient are
/// computed alone, and the losses are added in row order.
#[derive(Debug, Clone)]
pub struct LossRun {
    /// `(row of h, target)` for every row with a target.
    rows: Vec<(usize, u32)>,
    next: usize,
    grad_scale: Option<f32>,
    stats: LossStats,
}

impl LossRun {
    /// `grad_scale`: the gradient's weight, `None` for the loss alone.
    pub fn new(targets: &[Option<u32>], grad_scale: Option<f32>) -> Self {
        let rows = targets.iter().enumerate().filter_map(|(i, t)| t.map(|t| (i, t))).collect();
        Self { rows, next: 0, grad_scale, stats: LossStats::default() }
    }

    /// Rows with a target still to run.
    pub fn remaining(&self) -> usize {
        self.rows.len() - self.next
    }

    /// The loss over the rows run so far.
    pub fn stats(&self) -> LossStats {
        self.stats
    }

    /// Runs up to `max_rows` more rows; returns how many ran. With `bw` and `dh` (and a
    /// gradient scale), writes their rows of `grad_scale · ∂loss/∂h` into `dh` (`[rows,
    /// hidden]`). `bw` also sets the precision of the logits (`--train-dtype`).
    pub fn run(
        &mut self,
        model: &Llama,
        bw: Option<&BackwardWeights>,
        h: &[f32],
        dh: Option<&mut [f32]>,
        max_rows: usize,
    ) -> usize {
        let mut grad = bw.zip(dh);
        let c = &model.config;
        let hs = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let head = model.lm_head();
        let vocab = head.rows;
        let end = self.next + max_rows.min(self.remaining());
        let rows = &self.rows[self.next..end];
        let grad_scale = self.grad_scale.filter(|_| grad.is_some());
        // The logits buffer is kept per thread between calls: a fresh one per chunk cost page
        // faults and zeroing of 25 MiB. The head's product overwrites every value it reads.
        thread_local! {
            static LOGITS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut buf = LOGITS.take();
        let need = rows.len().min(ROWS) * vocab;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        for chunk in rows.chunks(ROWS) {
            let n = chunk.len();
            let mut hr = Vec::with_capacity(n * hs);
            for &(i, _) in chunk {
                hr.extend_from_slice(&h[i * hs..(i + 1) * hs]);
            }
            let mut x = vec![0f32; n * hs];
            rms_norm(&hr, &model.norm, eps, &mut x);
            let logits = &mut buf[..n * vocab];
            // The bf16 precision (`--train-dtype`) covers the head's products too.
            match bw.and_then(BackwardWeights::head_forward) {
                Some(w) => w.product(MatRef::new(&x, n, hs), false, logits, vocab),
                None => head.forward(&x, n, logits),
            }
            // Rows are independent; their results are added in row order below.
            let per_row: Vec<(f64, bool)> = logits
                .par_chunks_exact_mut(vocab)
                .zip(chunk)
                .map_init(
                    || vec![0f32; vocab],
                    |probs, (row, &(_, target))| {
                        let (loss, arg) = row_loss(row, target as usize, grad_scale, probs);
                        (loss, arg == target as usize)
                    },
                )
                .collect();
            for (loss, correct) in per_row {
                self.stats.loss_sum += loss;
                self.stats.correct += usize::from(correct);
                self.stats.count += 1;
            }
            if let (Some(_), Some((bw, dh))) = (grad_scale, grad.as_mut()) {
                let mut dx = vec![0f32; n * hs];
                bw.head.product(MatRef::new(logits, n, vocab), false, &mut dx, hs);
                let mut dhr = vec![0f32; n * hs];
                rms_norm_backward(&hr, &model.norm, eps, &dx, &mut dhr);
                for (k, &(i, _)) in chunk.iter().enumerate() {
                    dh[i * hs..(i + 1) * hs].copy_from_slice(&dhr[k * hs..(k + 1) * hs]);
                }
            }
        }
        LOGITS.set(buf);
        self.next = end;
        rows.len()
    }
}

/// Negative log-likelihood of `target` under one row of logits, and the row's argmax (the
/// first index of its maximum). With `grad_scale`, overwrites the row with
/// `grad_scale · (softmax − onehot)`. `probs` is scratch of the row's length.
pub(crate) fn row_loss(
    row: &mut [f32],
    target: usize,
    grad_scale: Option<f32>,
    probs: &mut [f32],
) -> (f64, usize) {
    let max = max(row);
    // The first index holding the maximum, as a strict `>` scan would find it.
    let arg = row.iter().position(|&v| v == max).unwrap_or(0);
    let sum = exp_shifted(row, max, 1.0, probs);
    let lse = max as f64 + sum.ln();
    let logit = row.get(target).copied().unwrap_or(f32::NEG_INFINITY) as f64;
    // d loss / d logits = softmax − onehot, scaled; reuses the logits buffer.
    if let Some(scale) = grad_scale {
        let k = (scale as f64 / sum) as f32;
        row.iter_mut().zip(probs.iter()).for_each(|(v, p)| *v = p * k);
        if let Some(v) = row.get_mut(target) {
            *v -= scale;
        }
    }
    (lse - logit, arg)
}
