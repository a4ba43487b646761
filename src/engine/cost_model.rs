//! Online model of iteration time, used to decide how much fine-tuning work fits in an
//! iteration without pushing inference past its latency target.
//!
//! `seconds ≈ θ0 + θ1·forward_tokens + θ2·backward_layer_tokens + θ3·loss_rows`, fitted by
//! recursive least squares with a forgetting factor, so it follows the machine as load and
//! thermals change.

/// Features are scaled to similar magnitudes to keep the fit well conditioned.
const TOKEN_UNIT: f64 = 100.0;
const BWD_UNIT: f64 = 1000.0;
const LOSS_UNIT: f64 = 100.0;
/// Iterations observed before predictions are trusted.
const WARM_AFTER: u64 = 8;
const N: usize = 4;

/// An iteration's work, as the cost model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IterationWork {
    /// Tokens forwarded: inference and training.
    pub tokens: usize,
    /// Backward layers times the tokens of their sample.
    pub bwd_layer_tokens: usize,
    /// Rows of a training loss (the LM head forward and backward).
    pub loss_rows: usize,
}

/// Seconds one more unit of each kind of work adds to an iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginalCosts {
    pub token: f64,
    pub bwd_layer_token: f64,
    pub loss_row: f64,
}

#[derive(Debug, Clone)]
pub struct CostModel {
    theta: [f64; N],
    p: [[f64; N]; N],
    lambda: f64,
    observations: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self::new()
    }
}

impl CostModel {
    pub fn new() -> Self {
        let mut p = [[0.0; N]; N];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = 100.0;
        }
        Self { theta: [0.0; N], p, lambda: 0.98, observations: 0 }
    }

    fn features(w: &IterationWork) -> [f64; N] {
        [
            1.0,
            w.tokens as f64 / TOKEN_UNIT,
            w.bwd_layer_tokens as f64 / BWD_UNIT,
            w.loss_rows as f64 / LOSS_UNIT,
        ]
    }

    pub fn is_warm(&self) -> bool {
        self.observations >= WARM_AFTER
    }

    /// Predicted seconds for an iteration of this much work.
    pub fn predict(&self, w: &IterationWork) -> f64 {
        let x = Self::features(w);
        (0..N).map(|i| self.theta[i] * x[i]).sum::<f64>().max(0.0)
    }

    /// Never below a tiny positive floor, so budgets stay finite before the fit has seen
    /// any work of a kind (the caps then bound it).
    pub fn marginal_costs(&self) -> MarginalCosts {
        let floor = 1e-6;
        MarginalCosts {
            token: (self.theta[1] / TOKEN_UNIT).max(floor),
            bwd_layer_token: (self.theta[2] / BWD_UNIT).max(floor),
            loss_row: (self.theta[3] / LOSS_UNIT).max(floor),
        }
    }

    pub fn observe(&mut self, w: &IterationWork, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        let x = Self::features(w);
        let px: [f64; N] = std::array::from_fn(|i| (0..N).map(|j| self.p[i][j] * x[j]).sum());
        let denom = self.lambda + (0..N).map(|i| x[i] * px[i]).sum::<f64>();
        let gain: [f64; N] = std::array::from_fn(|i| px[i] / denom);
        let err = seconds - (0..N).map(|i| self.theta[i] * x[i]).sum::<f64>();
        for (t, g) in self.theta.iter_mut().zip(gain) {
            *t += g * err;
        }
        let mut p = [[0.0; N]; N];
        for (i, row) in p.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (self.p[i][j] - gain[i] * px[j]) / self.lambda;
            }
        }
        self.p = p;
        self.observations += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_linear_cost() {
        let mut m = CostModel::new();
        let truth = |w: &IterationWork| {
            0.004
                + 0.0005 * w.tokens as f64
                + 0.00002 * w.bwd_layer_tokens as f64
                + 0.0003 * w.loss_rows as f64
        };
        for i in 0..300usize {
            // Loss rows come only now and then, as in the engine.
            let loss_rows = if i % 7 == 0 { (i * 29) % 256 } else { 0 };
            let w = IterationWork {
                tokens: (i * 37) % 300 + 1,
                bwd_layer_tokens: (i * 53) % 4000,
                loss_rows,
            };
            m.observe(&w, truth(&w));
        }
        assert!(m.is_warm());
        for (tokens, bwd_layer_tokens, loss_rows) in
            [(1, 0, 0), (64, 0, 0), (200, 3000, 0), (8, 0, 128)]
        {
            let w = IterationWork { tokens, bwd_layer_tokens, loss_rows };
            let (p, t) = (m.predict(&w), truth(&w));
            assert!((p - t).abs() < 0.02 * t, "{w:?}: {p} vs {t}");
        }
        let c = m.marginal_costs();
        assert!((c.token - 0.0005).abs() < 1e-5, "{c:?}");
        assert!((c.bwd_layer_token - 0.00002).abs() < 1e-6, "{c:?}");
        assert!((c.loss_row - 0.0003).abs() < 1e-5, "{c:?}");
    }
}
