//! The hybrid token scheduler's training half: after decodes and prefill chunks are planned,
//! how many fine-tuning forward tokens, loss rows or backward layers this iteration takes.

use std::time::Duration;

use super::cost_model::{CostModel, IterationWork};
use crate::backend::cpu::frozen::TrainDtype;

/// When fine-tuning runs (`--finetune-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FinetuneMode {
    /// Inside every iteration, as much as the latency target leaves room for.
    #[default]
    Coserve,
    /// Only in iterations with no inference work at all.
    Temporal,
    /// Never: jobs stay queued.
    InferenceOnly,
}

impl std::fmt::Display for FinetuneMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FinetuneMode::Coserve => "coserve",
            FinetuneMode::Temporal => "temporal",
            FinetuneMode::InferenceOnly => "inference-only",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingConfig {
    pub mode: FinetuneMode,
    /// Target time per output token of inference (an iteration's duration while decoding).
    pub tpot_slo: Duration,
    /// Training forward tokens per iteration at most, and loss rows likewise.
    pub max_train_tokens_per_iter: usize,
    pub max_bwd_layers_per_iter: usize,
    /// Fraction of the caps always given to training, even past the latency target.
    pub min_train_share: f32,
    /// Precision of the CPU's training products with frozen weights (`--train-dtype`; a
    /// device trains in bf16).
    pub train_dtype: TrainDtype,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            mode: FinetuneMode::Coserve,
            tpot_slo: Duration::from_millis(150),
            max_train_tokens_per_iter: 128,
            max_bwd_layers_per_iter: 8,
            min_train_share: 0.0,
            train_dtype: TrainDtype::F32,
        }
    }
}

/// The training sample's state when the iteration is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainState {
    pub forward_remaining: usize,
    pub loss_remaining: usize,
    pub backward_remaining: usize,
    pub sample_len: usize,
}

/// A sample runs its forward, then its loss, then its backward: an iteration takes work of
/// one of the three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainWork {
    pub forward_tokens: usize,
    pub loss_rows: usize,
    pub backward_layers: usize,
}

impl TrainWork {
    /// The work of the sample's current phase: up to `tokens` of its forward while that lasts,
    /// else up to `rows` of its loss, else up to `layers` of its backward.
    pub fn for_state(st: TrainState, tokens: usize, rows: usize, layers: usize) -> Self {
        let mut work = Self::default();
        if st.forward_remaining > 0 {
            work.forward_tokens = tokens.min(st.forward_remaining);
        } else if st.loss_remaining > 0 {
            work.loss_rows = rows.min(st.loss_remaining);
        } else {
            work.backward_layers = layers.min(st.backward_remaining);
        }
        work
    }
}

/// Fine-tuning work for one iteration that already holds `inference_tokens` of inference.
/// `inference_pending`: requests are running or waiting (temporal mode then yields).
pub fn plan_training(
    cfg: &TrainingConfig,
    cost: &CostModel,
    inference_tokens: usize,
    inference_pending: bool,
    st: TrainState,
) -> TrainWork {
    let (cap_tok, cap_layers) = (cfg.max_train_tokens_per_iter, cfg.max_bwd_layers_per_iter);
    let (mut tok, mut rows, mut layers) = match cfg.mode {
        FinetuneMode::InferenceOnly => (0, 0, 0),
        FinetuneMode::Temporal if inference_pending => (0, 0, 0),
        _ if inference_tokens == 0 => (cap_tok, cap_tok, cap_layers),
        FinetuneMode::Temporal => (cap_tok, cap_tok, cap_layers),
        FinetuneMode::Coserve if !cost.is_warm() => {
            // Learn the costs with small steps before trusting them.
            (cap_tok.min(8), cap_tok.min(8), 1)
        }
        FinetuneMode::Coserve => {
            let inference = IterationWork { tokens: inference_tokens, ..Default::default() };
            let slack = cfg.tpot_slo.as_secs_f64() - cost.predict(&inference);
            let c = cost.marginal_costs();
            if slack <= 0.0 {
                (0, 0, 0)
            } else {
                let tok = (slack / c.token) as usize;
                let rows = (slack / c.loss_row) as usize;
                let layers = (slack / (c.bwd_layer_token * st.sample_len.max(1) as f64)) as usize;
                (tok.min(cap_tok), rows.min(cap_tok), layers.min(cap_layers))
            }
        }
    };
    if cfg.mode == FinetuneMode::Coserve && cfg.min_train_share > 0.0 {
        // In f32, so 0.1 of 1000 is 100, not 100.0000015 rounded up.
        let share = cfg.min_train_share.min(1.0);
        tok = tok.max((share * cap_tok as f32).ceil() as usize);
        rows = rows.max((share * cap_tok as f32).ceil() as usize);
        layers = layers.max((share * cap_layers as f32).ceil() as usize);
    }
    TrainWork::for_state(st, tok, rows, layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm_cost() -> CostModel {
        let mut m = CostModel::new();
        for i in 0..100usize {
            let (f, b, l) = (i % 200 + 1, (i * 97) % 5000, if i % 5 == 0 { i % 128 } else { 0 });
            let w = IterationWork { tokens: f, bwd_layer_tokens: b, loss_rows: l };
            m.observe(&w, 0.01 + 0.001 * f as f64 + 0.00001 * b as f64 + 0.0005 * l as f64);
        }
        m
    }

    const FWD: TrainState = TrainState {
        forward_remaining: 500,
        loss_remaining: 0,
        backward_remaining: 0,
        sample_len: 500,
    };
    const LOSS: TrainState = TrainState {
        forward_remaining: 0,
        loss_remaining: 400,
        backward_remaining: 0,
        sample_len: 500,
    };
    const BWD: TrainState = TrainState {
        forward_remaining: 0,
        loss_remaining: 0,
        backward_remaining: 30,
        sample_len: 100,
    };

    #[test]
    fn coserve_fills_the_slack_below_the_target() {
        let cfg = TrainingConfig {
            tpot_slo: Duration::from_millis(100),
            max_train_tokens_per_iter: 1000,
            max_bwd_layers_per_iter: 30,
            ..TrainingConfig::default()
        };
        let cost = warm_cost();
        // 20 decode tokens cost 30 ms: 70 ms left, 1 ms a token.
        let w = plan_training(&cfg, &cost, 20, true, FWD);
        assert!((68..=70).contains(&w.forward_tokens), "{w:?}");
        assert_eq!((w.loss_rows, w.backward_layers), (0, 0));
        // A loss row costs 0.5 ms: 140 rows fit.
        let w = plan_training(&cfg, &cost, 20, true, LOSS);
        assert!((138..=140).contains(&w.loss_rows), "{w:?}");
        assert_eq!((w.forward_tokens, w.backward_layers), (0, 0));
        // A backward layer over 100 tokens costs 1 ms: 70 layers fit, 30 remain.
        let w = plan_training(&cfg, &cost, 20, true, BWD);
        assert_eq!(w, TrainWork { backward_layers: 30, ..TrainWork::default() });
        // Past the target: nothing, unless a minimum share is set.
        assert_eq!(plan_training(&cfg, &cost, 95, true, FWD), TrainWork::default());
        let cfg = TrainingConfig { min_train_share: 0.1, ..cfg };
        assert_eq!(plan_training(&cfg, &cost, 95, true, FWD).forward_tokens, 100);
    }

    #[test]
    fn temporal_and_inference_only() {
        let cost = warm_cost();
        let cfg = TrainingConfig { mode: FinetuneMode::Temporal, ..TrainingConfig::default() };
        assert_eq!(plan_training(&cfg, &cost, 5, true, FWD), TrainWork::default());
        assert_eq!(plan_training(&cfg, &cost, 0, false, FWD).forward_tokens, 128);
        assert_eq!(plan_training(&cfg, &cost, 0, false, LOSS).loss_rows, 128);
        let cfg = TrainingConfig { mode: FinetuneMode::InferenceOnly, ..cfg };
        assert_eq!(plan_training(&cfg, &cost, 0, false, FWD), TrainWork::default());
    }
}
