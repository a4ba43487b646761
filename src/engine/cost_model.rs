//! Online model of iteration time, used to decide how much fine-tuning work fits in an
//! iteration without pushing inference past its latency target.
//!
//! `seconds ≈ θ0 + θ1·forward_tokens + θ2·backward_layer_tokens`, fitted by recursive least
//! squares with a forgetting factor, so it follows the machine as load and thermals change.

/// Features are scaled to similar magnitudes to keep the fit well conditioned.
const TOKEN_UNIT: f64 = 100.0;
const BWD_UNIT: f64 = 1000.0;
/// Iterations observed before predictions are trusted.
const WARM_AFTER: u64 = 8;

#[derive(Debug, Clone)]
pub struct CostModel {
    theta: [f64; 3],
    p: [[f64; 3]; 3],
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
        let mut p = [[0.0; 3]; 3];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = 100.0;
        }
        Self { theta: [0.0; 3], p, lambda: 0.98, observations: 0 }
    }

    fn features(fwd_tokens: usize, bwd_layer_tokens: usize) -> [f64; 3] {
        [1.0, fwd_tokens as f64 / TOKEN_UNIT, bwd_layer_tokens as f64 / BWD_UNIT]
    }

    pub fn is_warm(&self) -> bool {
        self.observations >= WARM_AFTER
    }

    /// Predicted seconds for an iteration of this much work.
    pub fn predict(&self, fwd_tokens: usize, bwd_layer_tokens: usize) -> f64 {
        let x = Self::features(fwd_tokens, bwd_layer_tokens);
        (0..3).map(|i| self.theta[i] * x[i]).sum::<f64>().max(0.0)
    }

    /// Seconds per forward token and per backward layer-token (never below a tiny positive
    /// floor, so budgets stay finite before the fit has seen any training work).
    pub fn marginal_costs(&self) -> (f64, f64) {
        let floor = 1e-6;
        ((self.theta[1] / TOKEN_UNIT).max(floor), (self.theta[2] / BWD_UNIT).max(floor))
    }

    pub fn observe(&mut self, fwd_tokens: usize, bwd_layer_tokens: usize, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        let x = Self::features(fwd_tokens, bwd_layer_tokens);
        let px: [f64; 3] = std::array::from_fn(|i| (0..3).map(|j| self.p[i][j] * x[j]).sum());
        let denom = self.lambda + (0..3).map(|i| x[i] * px[i]).sum::<f64>();
        let gain: [f64; 3] = std::array::from_fn(|i| px[i] / denom);
        let err = seconds - (0..3).map(|i| self.theta[i] * x[i]).sum::<f64>();
        for (t, g) in self.theta.iter_mut().zip(gain) {
            *t += g * err;
        }
        let mut p = [[0.0; 3]; 3];
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
        let truth = |f: usize, b: usize| 0.004 + 0.0005 * f as f64 + 0.00002 * b as f64;
        for i in 0..200usize {
            let (f, b) = ((i * 37) % 300 + 1, (i * 53) % 4000);
            m.observe(f, b, truth(f, b));
        }
        assert!(m.is_warm());
        for (f, b) in [(1, 0), (64, 0), (200, 3000)] {
            let (p, t) = (m.predict(f, b), truth(f, b));
            assert!((p - t).abs() < 0.02 * t, "{f} {b}: {p} vs {t}");
        }
        let (tok, bwd) = m.marginal_costs();
        assert!((tok - 0.0005).abs() < 1e-5 && (bwd - 0.00002).abs() < 1e-6);
    }
}
