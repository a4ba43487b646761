//! LoRA adapters: hyperparameters, weights, dropout masks, the optimizer, the PEFT layout and
//! the registry of served adapters.

pub mod adapter;
pub mod config;
pub mod dropout;
pub mod optim;
pub mod peft_io;
pub mod registry;

pub use adapter::{LoraPair, LoraWeights};
pub use config::{LoraConfig, LoraConfigError, TargetModule};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
pub use peft_io::{
    load_peft, load_training_state, save_peft, save_training_state, PeftError, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};
pub use registry::{AdapterLease, AdapterRegistry, ServedAdapter};
