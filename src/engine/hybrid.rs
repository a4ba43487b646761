//! The hybrid token scheduler's training half: after decodes and prefill chunks are planned,
//! how many fine-tuning forward tokens or backward layers this iteration takes.

use std::time::Duration;

use super::cost_model::CostModel;

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
    pub max_train_tokens_per_iter: usize,
    pub max_bwd_layers_per_iter: usize,
    /// Fraction of the caps always given to training, even past the latency target.
    pub min_train_share: f32,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            mode: FinetuneMode::Coserve,
            tpot_slo: Duration::from_millis(150),
            max_train_tokens_per_iter: 128,
            max_bwd_layers_per_iter: 8,
            min_train_share: 0.0,
        }
    }
}

/// The training sample's state when the iteration is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainState {
    pub forward_remaining: usize,
    pub backward_remaining: usize,
    pub sample_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainWork {
    pub forward_tokens: usize,
    pub backward_layers: usize,
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
    let (mut tok, mut layers) = match cfg.mode {
        FinetuneMode::InferenceOnly => (0, 0),
        FinetuneMode::Temporal if inference_pending => (0, 0),
        _ if inference_tokens == 0 => (cap_tok, cap_layers),
        FinetuneMode::Temporal => (cap_tok, cap_layers),
        FinetuneMode::Coserve if !cost.is_warm() => {
            // Learn the costs with small steps before trusting them.
            (cap_tok.min(8), 1)
        }
        FinetuneMode::Coserve => {
            let slack = cfg.tpot_slo.as_secs_f64() - cost.predict(inference_tokens, 0);
            let (per_tok, per_layer_tok) = cost.marginal_costs();
            if slack <= 0.0 {
                (0, 0)
            } else {
                let tok = (slack / per_tok) as usize;
                let layers = (slack / (per_layer_tok * st.sample_len.max(1) as f64)) as usize;
                (tok.min(cap_tok), layers.min(cap_layers))
            }
        }
    };
    if cfg.mode == FinetuneMode::Coserve && cfg.min_train_share > 0.0 {
        // In f32, so 0.1 of 1000 is 100, not 100.0000015 rounded up.
        let share = cfg.min_train_share.min(1.0);
        tok = tok.max((share * cap_tok as f32).ceil() as usize);
        layers = layers.max((share * cap_layers as f32).ceil() as usize);
    }
    TrainWork {
        forward_tokens: tok.min(st.forward_remaining),
        backward_layers: if st.forward_remaining > 0 {
            0
        } else {
            layers.min(st.backward_remaining)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm_cost() -> CostModel {
        let mut m = CostModel::new();
        for i in 0..100usize {
            let (f, b) = (i % 200 + 1, (i * 97) % 5000);
            m.observe(f, b, 0.01 + 0.001 * f as f64 + 0.00001 * b as f64);
        }
        m
    }

    const FWD: TrainState =
        TrainState { forward_remaining: 500, backward_remaining: 0, sample_len: 500 };
    const BWD: TrainState =
        TrainState { forward_remaining: 0, backward_remaining: 30, sample_len: 100 };

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
        assert_eq!(w.backward_layers, 0);
        // A backward layer over 100 tokens costs 1 ms: 70 layers fit, 30 remain.
        let w = plan_training(&cfg, &cost, 20, true, BWD);
        assert_eq!(w, TrainWork { forward_tokens: 0, backward_layers: 30 });
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
        let cfg = TrainingConfig { mode: FinetuneMode::InferenceOnly, ..cfg };
        assert_eq!(plan_training(&cfg, &cost, 0, false, FWD), TrainWork::default());
    }
}
