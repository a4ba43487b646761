//! Which projections an adapter adapts, its rank and scaling: the `lora` hyperparameters of a
//! job and the `adapter_config.json` of the PEFT layout.

use serde::{Deserialize, Serialize};

use crate::model::config::LlamaConfig;

/// A linear projection of a Llama layer, named as in Hugging Face checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetModule::QProj => "q_proj",
            TargetModule::KProj => "k_proj",
            TargetModule::VProj => "v_proj",
            TargetModule::OProj => "o_proj",
            TargetModule::GateProj => "gate_proj",
            TargetModule::UpProj => "up_proj",
            TargetModule::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The submodule path inside a decoder layer (`self_attn.q_proj`, `mlp.down_proj` ...).
    pub fn path(self) -> String {
        let parent = match self {
            TargetModule::QProj
            | TargetModule::KProj
            | TargetModule::VProj
            | TargetModule::OProj => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `(out_features, in_features)` of the projection in a model of this shape.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (hs, q, kv, i) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        match self {
            TargetModule::QProj => (q, hs),
            TargetModule::KProj | TargetModule::VProj => (kv, hs),
            TargetModule::OProj => (hs, q),
            TargetModule::GateProj | TargetModule::UpProj => (i, hs),
            TargetModule::DownProj => (hs, i),
        }
    }
}

/// LoRA hyperparameters. `scale = alpha / r` multiplies the low-rank update, as in PEFT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub target_modules: Vec<TargetModule>,
}

impl Default for LoraConfig {
    /// r 16, alpha 32, no dropout, every linear projection of every layer.
    fn default() -> Self {
        Self { r: 16, alpha: 32.0, dropout: 0.0, target_modules: TargetModule::ALL.to_vec() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraConfigError {
    #[error("r must be between 1 and 256, got {0}")]
    Rank(usize),
    #[error("alpha must be a positive finite number, got {0}")]
    Alpha(f32),
    #[error("dropout must be in [0, 1), got {0}")]
    Dropout(f32),
    #[error("target_modules must name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")]
    NoTargets,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }

    pub fn targets(&self, m: TargetModule) -> bool {
        self.target_modules.contains(&m)
    }

    /// Checks ranges and puts the target list in canonical order without duplicates.
    pub fn validated(mut self) -> Result<Self, LoraConfigError> {
        if self.r == 0 || self.r > 256 {
            return Err(LoraConfigError::Rank(self.r));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraConfigError::Alpha(self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraConfigError::Dropout(self.dropout));
        }
        self.target_modules.sort();
        self.target_modules.dedup();
        if self.target_modules.is_empty() {
            return Err(LoraConfigError::NoTargets);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_orders_targets_and_rejects_bad_values() {
        let c = LoraConfig {
            target_modules: vec![TargetModule::DownProj, TargetModule::QProj, TargetModule::QProj],
            ..LoraConfig::default()
        };
        let c = c.validated().unwrap();
        assert_eq!(c.target_modules, vec![TargetModule::QProj, TargetModule::DownProj]);
        assert_eq!(c.scale(), 2.0);
        let bad = LoraConfig { r: 0, ..LoraConfig::default() };
        assert_eq!(bad.validated(), Err(LoraConfigError::Rank(0)));
        let bad = LoraConfig { dropout: 1.0, ..LoraConfig::default() };
        assert_eq!(bad.validated(), Err(LoraConfigError::Dropout(1.0)));
        let bad = LoraConfig { target_modules: vec![], ..LoraConfig::default() };
        assert_eq!(bad.validated(), Err(LoraConfigError::NoTargets));
    }

    #[test]
    fn names_round_trip() {
        for m in TargetModule::ALL {
            assert_eq!(TargetModule::from_name(m.name()), Some(m));
        }
        assert_eq!(TargetModule::DownProj.path(), "mlp.down_proj");
    }
}
