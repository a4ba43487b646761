//! LoRA adapters: hyperparameters, weights, dropout masks, the optimizer and the PEFT layout.

pub mod adapter;
pub mod config;
pub mod dropout;
pub mod optim;

pub use adapter::{LoraPair, LoraWeights};
pub use config::{LoraConfig, LoraConfigError, TargetModule};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
