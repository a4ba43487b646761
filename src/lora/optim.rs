//! AdamW, gradient clipping and the learning-rate schedule, each following its PyTorch /
//! transformers counterpart step for step so a run here matches the same run there.

use super::adapter::LoraWeights;

/// `torch.optim.AdamW` hyperparameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except weight decay, which transformers' Trainer also sets to 0.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW over an adapter, fp32 moments shaped like the adapter itself.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far (torch's `state["step"]`).
    pub step: u64,
    /// First moments (`exp_avg`).
    pub m: LoraWeights,
    /// Second moments (`exp_avg_sq`).
    pub v: LoraWeights,
}

impl AdamW {
    pub fn new(params: &LoraWeights, config: AdamWConfig) -> Self {
        let mut m = params.clone();
        m.fill_zero();
        let v = m.clone();
        Self { config, step: 0, m, v }
    }

    /// One update of `params` by `grads` at learning rate `lr`, as torch's single-tensor
    /// AdamW: decoupled decay first, then the moments, then the bias-corrected step.
    ///
    /// # Panics
    /// If `params`, `grads` and the moments do not have the same structure (a caller bug).
    pub fn step(&mut self, params: &mut LoraWeights, grads: &LoraWeights, lr: f32) {
        self.step += 1;
        let scalars = AdamWScalars::new(self.config, lr, self.step);
        let n = params.tensors().count();
        assert!(
            n == grads.tensors().count() && n == self.m.tensors().count(),
            "AdamW: params, grads and moments differ in structure"
        );
        let tensors = params
            .tensors_mut()
            .zip(grads.tensors())
            .zip(self.m.tensors_mut().zip(self.v.tensors_mut()));
        for ((p, g), (m, v)) in tensors {
            adamw_update(p, g, m, v, &scalars);
        }
    }
}

/// The per-step constants of one AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
}

impl AdamWScalars {
    /// The constants of update number `step` (from 1) at learning rate `lr`. torch computes
    /// the bias corrections as Python floats (f64) and passes f32 scalars; so does this.
    pub fn new(config: AdamWConfig, lr: f32, step: u64) -> Self {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = config;
        let t = step as f64;
        let bc1 = 1.0 - (beta1 as f64).powf(t);
        let bc2 = 1.0 - (beta2 as f64).powf(t);
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            decay: 1.0 - lr * weight_decay,
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
        }
    }
}

/// One AdamW update of a tensor, element by element (the CPU twin of the `adamw_f32` kernel).
///
/// # Panics
/// If the four slices differ in length (a caller bug).
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if s.weight_decay != 0.0 {
            *p *= s.decay;
        }
        *m = lerp(*m, g, 1.0 - s.beta1);
        *v = *v * s.beta2 + (1.0 - s.beta2) * g * g;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        *p += -s.step_size * (*m / denom);
    }
}

/// `torch.lerp`: the formula it uses depends on which half of [0, 1] the weight is in.
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`, and returns the norm before clipping. A non-finite norm
/// leaves the gradients untouched: the caller should skip that step.
pub fn clip_grad_norm(grads: &mut LoraWeights, max_norm: f32) -> f64 {
    let norm = grads.l2_norm();
    let coef = max_norm as f64 / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        grads.tensors_mut().for_each(|t| t.iter_mut().for_each(|g| *g *= coef));
    }
    norm
}

/// Linear warm-up from 0 to `base_lr` over `warmup_steps`, then linear decay to 0 at
/// `total_steps`: transformers' `get_linear_schedule_with_warmup`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// Learning rate of optimizer step `step`, counted from 0 (so with warm-up the first step
    /// has rate 0, exactly as LambdaLR gives it).
    pub fn lr(&self, step: u64) -> f32 {
        let factor = if step < self.warmup_steps {
            step as f64 / self.warmup_steps.max(1) as f64
        } else {
            let left = self.total_steps.saturating_sub(step) as f64;
            left / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64
        };
        (self.base_lr as f64 * factor) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, LoraPair, TargetModule};

    /// One pair of A `[1, 2]`, B `[2, 1]`: four parameters.
    fn weights(a: [f32; 2], b: [f32; 2]) -> LoraWeights {
        let config = LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            target_modules: vec![TargetModule::QProj],
        };
        let pair = LoraPair { in_dim: 2, out_dim: 2, a: a.to_vec(), b: b.to_vec() };
        let mut layer: [Option<LoraPair>; 7] = Default::default();
        layer[0] = Some(pair);
        LoraWeights { config, layers: vec![layer] }
    }

    fn flat(w: &LoraWeights) -> Vec<f32> {
        w.tensors().flatten().copied().collect()
    }

    /// The torch.optim.AdamW update written out in f64, independent of the code above.
    fn reference(
        p0: &[f64],
        grads: &[Vec<f64>],
        lrs: &[f64],
        (b1, b2, eps, wd): (f64, f64, f64, f64),
    ) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] -= lr * wd * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        p
    }

    fn run(config: AdamWConfig, grads: &[[f32; 4]], lrs: &[f32]) -> (Vec<f32>, Vec<f64>) {
        let mut params = weights([0.5, -1.0], [0.25, 2.0]);
        let p0: Vec<f64> = flat(&params).iter().map(|&x| x as f64).collect();
        let mut opt = AdamW::new(&params, config);
        for (g, &lr) in grads.iter().zip(lrs) {
            let gw = weights([g[0], g[1]], [g[2], g[3]]);
            opt.step(&mut params, &gw, lr);
        }
        assert_eq!(opt.step, grads.len() as u64);
        let g64: Vec<Vec<f64>> =
            grads.iter().map(|g| g.iter().map(|&x| x as f64).collect()).collect();
        let l64: Vec<f64> = lrs.iter().map(|&x| x as f64).collect();
        let c = config;
        let hp = (c.beta1 as f64, c.beta2 as f64, c.eps as f64, c.weight_decay as f64);
        (flat(&params), reference(&p0, &g64, &l64, hp))
    }

    fn assert_close(ours: &[f32], want: &[f64]) {
        for (i, (&o, &w)) in ours.iter().zip(want).enumerate() {
            assert!(((o as f64) - w).abs() <= 1e-6 * w.abs().max(1.0), "param {i}: {o} vs {w}");
        }
    }

    const GRADS: [[f32; 4]; 4] = [
        [0.1, -0.2, 0.0, 3.0],
        [0.05, 0.3, -1e-3, 2.5],
        [-0.4, 0.1, 2e-3, -1.0],
        [0.2, 0.0, 0.5, 0.7],
    ];

    #[test]
    fn adamw_matches_the_torch_formula() {
        let (ours, want) = run(AdamWConfig::default(), &GRADS, &[1e-2, 1e-2, 5e-3, 2e-2]);
        assert_close(&ours, &want);
        // First step moves every parameter with a non-zero gradient by about lr (Adam's sign
        // step), and leaves the zero-gradient one alone.
        let (one, _) = run(AdamWConfig::default(), &GRADS[..1], &[1e-2]);
        assert!((one[0] - (0.5 - 1e-2)).abs() < 1e-6);
        assert!((one[1] - (-1.0 + 1e-2)).abs() < 1e-6);
        assert_eq!(one[2], 0.25);
        assert!((one[3] - (2.0 - 1e-2)).abs() < 1e-6);
    }

    #[test]
    fn adamw_weight_decay_is_decoupled() {
        let config = AdamWConfig { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 };
        let (ours, want) = run(config, &GRADS, &[1e-2, 3e-2, 1e-2, 1e-2]);
        assert_close(&ours, &want);
        // With a zero gradient only the decay acts: p * (1 - lr * wd) per step.
        let (ours, _) = run(config, &[[0.0; 4], [0.0; 4]], &[0.5, 0.5]);
        let k = (1.0f32 - 0.5 * 0.1) * (1.0 - 0.5 * 0.1);
        for (o, p) in ours.iter().zip([0.5f32, -1.0, 0.25, 2.0]) {
            assert!((o - p * k).abs() < 1e-6, "{o} vs {}", p * k);
        }
    }

    #[test]
    fn clipping_scales_only_above_the_limit() {
        let mut g = weights([3.0, 0.0], [0.0, 4.0]);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert_eq!(norm, 5.0);
        let scale = (1.0 / (5.0 + 1e-6)) as f32;
        assert_eq!(flat(&g), vec![3.0 * scale, 0.0, 0.0, 4.0 * scale]);
        assert!((g.l2_norm() - 1.0).abs() < 1e-6);

        let mut g = weights([3.0, 0.0], [0.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(flat(&g), vec![3.0, 0.0, 0.0, 4.0]);

        let mut g = weights([f32::NAN, 0.0], [0.0, 4.0]);
        assert!(clip_grad_norm(&mut g, 1.0).is_nan());
        assert_eq!(g.pair(0, TargetModule::QProj).unwrap().b, vec![0.0, 4.0]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = LrSchedule { base_lr: 1e-3, warmup_steps: 10, total_steps: 110 };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(5), 5e-4);
        assert_eq!(s.lr(10), 1e-3);
        assert_eq!(s.lr(60), 5e-4);
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(s.lr(500), 0.0);
        assert!((1..110).all(|i| s.lr(i) > 0.0));

        let flat = LrSchedule { base_lr: 2e-4, warmup_steps: 0, total_steps: 4 };
        assert_eq!(flat.lr(0), 2e-4);
        assert_eq!(flat.lr(2), 1e-4);
        assert_eq!(flat.lr(4), 0.0);
        // Warm-up covering the whole run never divides by zero.
        let all = LrSchedule { base_lr: 1.0, warmup_steps: 4, total_steps: 4 };
        assert_eq!(all.lr(4), 0.0);
    }
}
