//! Models: configuration, loading (GGUF, HF safetensors), tokenizer, chat template, forward.

pub mod activations;
pub mod attention_backward;
pub mod attention_train;
pub mod backward;
pub mod chat_template;
pub mod config;
pub mod fetch;
pub mod llama;
pub mod loader;
pub mod lora_apply;
pub mod lora_backward;
pub mod loss;
pub mod tokenizer;
pub mod weights;

use std::path::PathBuf;

pub use config::{LlamaConfig, RopeScaling};

/// Anything wrong with a model file or directory. Messages name the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: unsupported model: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Compute(#[from] candle_core::Error),
}

impl ModelError {
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Invalid { path: path.into(), message: message.into() }
    }
    pub fn unsupported(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Unsupported { path: path.into(), message: message.into() }
    }
}

/// What the API layer needs to know about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id clients use in `model` (the served model name).
    pub id: String,
    /// Unix seconds when the model was loaded.
    pub created: u64,
    pub max_model_len: usize,
    pub owned_by: String,
}
