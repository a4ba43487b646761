//! LoRA adapter weights: per layer and adapted projection a pair `A [r, in]`, `B [out, r]`
//! (PEFT's `lora_A.weight` / `lora_B.weight` layout), applied as `y += scale · (x Aᵀ) Bᵀ`.
//!
//! The same structure holds gradients and optimizer moments, so they are walked in one order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{LoraConfig, TargetModule};
use crate::model::config::LlamaConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub in_dim: usize,
    pub out_dim: usize,
    /// `[r, in_dim]` row-major.
    pub a: Vec<f32>,
    /// `[out_dim, r]` row-major.
    pub b: Vec<f32>,
}

impl LoraPair {
    pub fn zeros(r: usize, in_dim: usize, out_dim: usize) -> Self {
        Self { in_dim, out_dim, a: vec![0.0; r * in_dim], b: vec![0.0; out_dim * r] }
    }

    pub fn rank(&self) -> usize {
        self.a.len().checked_div(self.in_dim).unwrap_or(0)
    }
}

/// One adapter for a whole model: `layers[l][m.index()]` is the pair of projection `m` in
/// layer `l`, `None` where it is not adapted.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub config: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraWeights {
    /// All zeros (gradient buffers, optimizer moments).
    pub fn zeros(config: &LoraConfig, model: &LlamaConfig) -> Self {
        let layers = (0..model.num_layers)
            .map(|_| {
                TargetModule::ALL.map(|m| {
                    config.targets(m).then(|| {
                        let (out, inp) = m.shape(model);
                        LoraPair::zeros(config.r, inp, out)
                    })
                })
            })
            .collect();
        Self { config: config.clone(), layers }
    }

    /// A fresh adapter as PEFT initialises one: `A` Kaiming-uniform (bound `1/sqrt(in)`),
    /// `B` zero, so the adapted model starts equal to the base. Deterministic in `seed`.
    pub fn init(config: &LoraConfig, model: &LlamaConfig, seed: u64) -> Self {
        let mut w = Self::zeros(config, model);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for pair in w.pairs_mut() {
            let bound = 1.0 / (pair.in_dim as f32).sqrt();
            pair.a.iter_mut().for_each(|v| *v = rng.random_range(-bound..bound));
        }
        w
    }

    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    pub fn pair(&self, layer: usize, m: TargetModule) -> Option<&LoraPair> {
        self.layers.get(layer)?[m.index()].as_ref()
    }

    /// Every pair in (layer, module) order.
    pub fn pairs(&self) -> impl Iterator<Item = &LoraPair> {
        self.layers.iter().flat_map(|l| l.iter().flatten())
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = &mut LoraPair> {
        self.layers.iter_mut().flat_map(|l| l.iter_mut().flatten())
    }

    /// Every parameter tensor (A then B of each pair) in a fixed order.
    pub fn tensors(&self) -> impl Iterator<Item = &[f32]> {
        self.pairs().flat_map(|p| [p.a.as_slice(), p.b.as_slice()])
    }

    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.pairs_mut().flat_map(|p| [&mut p.a, &mut p.b])
    }

    pub fn num_params(&self) -> usize {
        self.tensors().map(<[f32]>::len).sum()
    }

    pub fn fill_zero(&mut self) {
        self.tensors_mut().for_each(|t| t.iter_mut().for_each(|v| *v = 0.0));
    }

    /// Euclidean norm over every parameter (gradient clipping), accumulated in f64.
    pub fn l2_norm(&self) -> f64 {
        self.tensors().flatten().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }
}
