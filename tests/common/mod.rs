//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod dense_llama;
pub mod dense_lora;
pub mod device;
pub mod emulation;
pub mod engine;
pub mod finetune;
pub mod fixtures;
pub mod multipart;
pub mod server;
pub mod tiny_model;
pub mod token_level;

use std::path::PathBuf;

/// The embedded default model, fetched exactly as `coserve serve` does.
pub fn default_model_path() -> PathBuf {
    let cfg = coserve::config::ServerConfig::for_model(None);
    coserve::server::resolve_model_path(&cfg).expect("default model available")
}
