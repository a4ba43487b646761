//! Co-serving on the GPU, measured on the decoder seam: every iteration decodes a batch of
//! sequences and, in the same forward, a chunk of a training sample's tokens; after the
//! sample's last chunk its loss runs, then its backward a few layers per iteration, then an
//! AdamW step. Reported next to the same decode batch alone (FlexLLM's co-serving figure).
//!
//! Each iteration's training work is either fixed (so many tokens, loss rows, layers) or
//! sized as the engine sizes it: `plan_training` with a cost model learning from the
//! iterations as they run, against a latency target of a ratio of the batch's step alone.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::bench::BLOCK_SIZE;
use super::decoder::train::{
    backward_layers, loss_rows, TrainAdapter, TrainOps, TrainSample, TrainScratch,
};
use super::decoder::{
    forward_rows_capturing, Capture, DecoderShape, DecoderWeights, Scratch, SeqRows, StepBatch,
    Want,
};
use super::CudaError;
use crate::bench_finetune::synthetic_tokens;
use crate::engine::cost_model::{CostModel, IterationWork};
use crate::engine::hybrid::{plan_training, FinetuneMode, TrainState, TrainWork, TrainingConfig};

/// How each co-served iteration's training work is sized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sizing {
    /// `tokens` forward tokens (or loss rows) and `layers` backward layers per iteration.
    Fixed { tokens: usize, layers: usize },
    /// As the engine sizes it: as much as its cost model predicts keeps the iteration within
    /// `ratio` times the decode batch's step alone.
    StepTarget { ratio: f64 },
}

/// What one co-serving measurement sets.
#[derive(Debug, Clone)]
pub struct CoserveSetup {
    pub decode_batch: usize,
    pub context: usize,
    pub seq_len: usize,
    /// One measurement per sizing, against the same decode batch alone.
    pub sizings: Vec<Sizing>,
    /// Training samples timed (after one untimed).
    pub samples: usize,
    /// A sizing that has not finished its samples by then stops and reports what it did.
    pub time_limit: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoserveOnDevice {
    pub decode_batch: usize,
    pub context: usize,
    /// "fixed" or "step target".
    pub sizing: &'static str,
    /// Fixed: the tokens and layers of every iteration; step target: the caps (the sample).
    pub train_tokens_per_iter: usize,
    pub bwd_layers_per_iter: usize,
    /// Step target: the iteration time aimed at, as a ratio of the batch's step alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_target_ratio: Option<f64>,
    /// Median decode step of the batch alone (greedy ids back on the host).
    pub inference_only_step_ms: f64,
    /// Median, mean and 90th percentile of the timed iterations with the co-served training.
    pub coserved_step_ms: f64,
    pub coserved_step_mean_ms: f64,
    pub coserved_step_p90_ms: f64,
    /// The three over the step alone.
    pub step_ratio: f64,
    pub step_ratio_mean: f64,
    pub step_ratio_p90: f64,
    /// Training tokens per second while co-serving (samples forwarded and back-propagated).
    pub coserved_train_tokens_per_s: f64,
    /// Timed samples completed (fewer than asked when the time limit ran out).
    pub samples: usize,
    pub iterations: usize,
    /// Timed iterations by their training work (idle: the decode batch only).
    pub forward_iterations: usize,
    pub loss_iterations: usize,
    pub backward_iterations: usize,
    pub idle_iterations: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(i.min(sorted.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}

/// Where a measurement's iterations run: the decode batch and the training sample's cache
/// blocks and scratch.
struct Bench<'a, O: TrainOps> {
    ops: &'a mut O,
    s: &'a DecoderShape,
    w: &'a DecoderWeights<O::Weight>,
    inv_freq: &'a [f32],
    caches: Vec<O::Cache>,
    decodes: Vec<SeqRows>,
    fsc: Scratch<O>,
    sampled: Vec<u32>,
}

impl<O: TrainOps> Bench<'_, O> {
    /// One decode step of the batch with `train` (a chunk of the sample) as extra rows.
    fn forward(&mut self, train: Option<(SeqRows, &mut TrainScratch<O>)>) -> Result<(), CudaError> {
        let Self { ops, s, w, inv_freq, caches, decodes, fsc, sampled } = self;
        let mut seqs = decodes.clone();
        let (first, n) = (decodes.len(), train.as_ref().map_or(0, |t| t.0.tokens.len()));
        let mut sc = train.map(|(chunk, sc)| {
            seqs.push(chunk);
            sc
        });
        let batch = StepBatch::new(seqs, BLOCK_SIZE)?;
        let mut chunk = match sc.as_deref_mut() {
            Some(sc) => Some(sc.chunk_forward(s, first..first + n)?),
            None => None,
        };
        let (lora, cap) = match chunk.as_mut() {
            Some((lora, cap)) => (Some(*lora), Some(cap as &mut dyn Capture<O>)),
            None => (None, None),
        };
        let (b, want) = (&batch, Want::Greedy);
        forward_rows_capturing(*ops, s, w, inv_freq, caches, b, fsc, sampled, want, lora, cap)?;
        if let Some(sc) = sc {
            sc.advance(n);
        }
        Ok(())
    }
}

/// Runs the measurements with the training state of `ad` (its weights keep training), each
/// sizing in turn, handing each to `out` as it is measured: an error that stops the rest
/// leaves the caller what was measured before it.
#[allow(clippy::too_many_arguments)]
pub fn run<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    ad: &mut TrainAdapter<O::Logits>,
    sc: &mut TrainScratch<O>,
    lr: f32,
    max_norm: f32,
    cfg: &CoserveSetup,
    mut out: impl FnMut(CoserveOnDevice),
) -> Result<(), CudaError> {
    let (decode_batch, context, seq_len) = (cfg.decode_batch, cfg.context, cfg.seq_len);
    for z in &cfg.sizings {
        let fine = match *z {
            Sizing::Fixed { tokens, layers } => tokens > 0 && layers > 0,
            Sizing::StepTarget { ratio } => ratio.is_finite() && ratio >= 1.0,
        };
        if !fine {
            return Err(CudaError::Shape(format!("co-serving sized by {z:?}")));
        }
    }
    let per_seq = (context + 1).div_ceil(BLOCK_SIZE);
    let train_blocks = seq_len.div_ceil(BLOCK_SIZE);
    let blocks = decode_batch * per_seq + train_blocks;
    // Zeroed: what the decodes attend to does not change their cost.
    let caches = (0..s.layers).map(|_| ops.cache(s, blocks)).collect::<Result<Vec<_>, _>>()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let decodes: Vec<SeqRows> = (0..decode_batch)
        .map(|i| SeqRows {
            adapter: None,
            tokens: vec![rng.random_range(0..s.vocab as u32)],
            start: context,
            block_table: ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect(),
        })
        .collect();
    let train_table: Vec<u32> = (blocks - train_blocks..blocks).map(|b| b as u32).collect();
    let widest = cfg.sizings.iter().map(|z| match z {
        Sizing::Fixed { tokens, .. } => (*tokens).min(seq_len),
        Sizing::StepTarget { .. } => seq_len,
    });
    let fsc =
        Scratch::with_logits_rows(ops, s, decode_batch + widest.max().unwrap_or(0), decode_batch)?;
    let sampled: Vec<u32> = (0..decode_batch as u32).collect();
    let mut b = Bench { ops, s, w, inv_freq, caches, decodes, fsc, sampled };

    // The decode batch alone.
    let mut times = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        b.forward(None)?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let alone = median(&mut times);

    let mut next = 0u64;
    for &sizing in &cfg.sizings {
        let begin = |sc: &mut TrainScratch<O>, next: &mut u64| {
            *next += 1;
            let tokens = synthetic_tokens(s.vocab, seq_len, 1000 + *next);
            sc.begin(TrainSample::new(tokens, &vec![true; seq_len], train_table.clone()))
        };
        begin(sc, &mut next)?;
        let tcfg = TrainingConfig {
            mode: FinetuneMode::Coserve,
            tpot_slo: Duration::from_secs_f64(match sizing {
                Sizing::StepTarget { ratio } => ratio * alone,
                Sizing::Fixed { .. } => 0.0,
            }),
            max_train_tokens_per_iter: seq_len,
            max_bwd_layers_per_iter: s.layers,
            ..TrainingConfig::default()
        };
        let mut cost = CostModel::new();
        let grad_scale = 1.0 / (seq_len - 1) as f32;
        let (mut times, mut kinds, mut done) = (Vec::new(), [0usize; 4], 0);
        // When the first (untimed) sample and the last timed one completed.
        let (mut started, mut finished) = (None, None);
        let deadline = Instant::now() + cfg.time_limit;
        while done < cfg.samples + 1 && Instant::now() < deadline {
            let st = TrainState {
                forward_remaining: sc.forward_remaining(),
                loss_remaining: sc.loss_remaining(),
                backward_remaining: sc.backward_remaining(),
                sample_len: seq_len,
            };
            let work = match sizing {
                Sizing::Fixed { tokens, layers } => {
                    TrainWork::for_state(st, tokens, tokens, layers)
                }
                Sizing::StepTarget { .. } => plan_training(&tcfg, &cost, decode_batch, true, st),
            };
            // Iterations count from the end of the first (untimed) sample.
            let timed = started.is_some();
            let t = Instant::now();
            let mut ran = IterationWork { tokens: decode_batch, ..IterationWork::default() };
            match sc.next_chunk(work.forward_tokens, 0) {
                Some(chunk) if work.forward_tokens > 0 => {
                    ran.tokens += chunk.tokens.len();
                    sc.prepare_tables(b.ops, ad)?;
                    b.forward(Some((chunk, &mut *sc)))?;
                }
                _ => b.forward(None)?,
            }
            if work.loss_rows > 0 {
                let (ops, w) = (&mut *b.ops, b.w);
                ran.loss_rows = loss_rows(ops, s, w, inv_freq, sc, grad_scale, work.loss_rows)?.0;
            }
            if work.backward_layers > 0 {
                let (ops, w, c) = (&mut *b.ops, b.w, &mut b.caches);
                let n = backward_layers(ops, s, w, c, ad, sc, work.backward_layers)?;
                ran.bwd_layer_tokens = n * seq_len;
                if sc.is_done() {
                    ad.clip_and_step(b.ops, lr, Some(max_norm))?;
                    done += 1;
                    if done == 1 {
                        started = Some(Instant::now());
                    } else {
                        finished = Some(Instant::now());
                    }
                    begin(sc, &mut next)?;
                }
            }
            b.ops.sync()?;
            let secs = t.elapsed().as_secs_f64();
            cost.observe(&ran, secs);
            if timed {
                times.push(secs);
                let kind = if ran.bwd_layer_tokens > 0 {
                    2
                } else if ran.loss_rows > 0 {
                    1
                } else if ran.tokens > decode_batch {
                    0
                } else {
                    3
                };
                kinds[kind] += 1;
            }
        }
        let samples = done.saturating_sub(1);
        let elapsed = match (started, finished) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        };
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let p90 = {
            let mut v = times.clone();
            v.sort_by(f64::total_cmp);
            quantile(&v, 0.9)
        };
        let iterations = times.len();
        let med = median(&mut times);
        let (tokens, layers, target) = match sizing {
            Sizing::Fixed { tokens, layers } => (tokens, layers, None),
            Sizing::StepTarget { ratio } => (seq_len, s.layers, Some(ratio)),
        };
        out(CoserveOnDevice {
            decode_batch,
            context,
            sizing: if target.is_some() { "step target" } else { "fixed" },
            train_tokens_per_iter: tokens,
            bwd_layers_per_iter: layers,
            step_target_ratio: target,
            inference_only_step_ms: alone * 1e3,
            coserved_step_ms: med * 1e3,
            coserved_step_mean_ms: mean * 1e3,
            coserved_step_p90_ms: p90 * 1e3,
            step_ratio: med / alone,
            step_ratio_mean: mean / alone,
            step_ratio_p90: p90 / alone,
            coserved_train_tokens_per_s: (samples * seq_len) as f64 / elapsed,
            samples,
            iterations,
            forward_iterations: kinds[0],
            loss_iterations: kinds[1],
            backward_iterations: kinds[2],
            idle_iterations: kinds[3],
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::decoder::host::HostOps;
    use crate::backend::cuda::decoder::tiny::tiny_decoder;
    use crate::lora::optim::AdamWConfig;
    use crate::lora::{LoraConfig, LoraWeights};

    /// The measurement's loop on the twins: samples go through forward, loss, backward and
    /// the optimizer step, and it ends.
    #[test]
    fn coserving_loop_runs_on_the_twins() {
        let (c, s, w) = tiny_decoder();
        let lora = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
        let mut ops = HostOps;
        let adapter = LoraWeights::init(&lora, &c, 1);
        let mut ad = TrainAdapter::new(&mut ops, &s, &adapter, AdamWConfig::default()).unwrap();
        let mut sc = TrainScratch::new(&mut ops, &s, &ad, 40).unwrap();
        let setup = CoserveSetup {
            decode_batch: 3,
            context: 20,
            seq_len: 40,
            sizings: vec![
                Sizing::Fixed { tokens: 16, layers: 2 },
                Sizing::StepTarget { ratio: 3.0 },
            ],
            samples: 2,
            time_limit: Duration::from_secs(120),
        };
        let inv = c.rope_inv_freq();
        let mut r = Vec::new();
        let keep = |c| r.push(c);
        run(&mut ops, &s, &w, &inv, &mut ad, &mut sc, 1e-3, 1.0, &setup, keep).unwrap();
        let [fixed, planned] = &r[..] else { panic!("{r:?}") };
        assert_eq!((fixed.sizing, planned.sizing), ("fixed", "step target"));
        // Per sample: 3 forward iterations (16 + 16 + 8 tokens), 3 of loss (as many rows), 2
        // of backward (2 + 1 layers).
        assert_eq!(fixed.iterations, 2 * 8);
        let kinds = |c: &CoserveOnDevice| {
            [c.forward_iterations, c.loss_iterations, c.backward_iterations, c.idle_iterations]
        };
        assert_eq!(kinds(fixed), [6, 6, 4, 0]);
        assert_eq!((fixed.samples, planned.samples), (2, 2), "{planned:?}");
        // The planner gave the samples their work (with some idle iterations, maybe).
        assert!(planned.forward_iterations > 0 && planned.backward_iterations > 0, "{planned:?}");
        assert_eq!(planned.step_target_ratio, Some(3.0));
        // One untimed and two timed samples each, an optimizer step after every one.
        assert_eq!(ad.step, 6);
        for c in &r {
            assert!(c.coserved_train_tokens_per_s > 0.0 && c.inference_only_step_ms > 0.0);
            assert!(c.coserved_step_p90_ms >= c.coserved_step_ms, "{c:?}");
        }
    }
}
