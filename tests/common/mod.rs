//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod dense_llama;
pub mod engine;
pub mod fixtures;
pub mod server;
pub mod tiny_model;

use std::path::PathBuf;

/// The embedded default model, fetched exactly as `coserve serve` does.
pub fn default_model_path() -> PathBuf {
    let cfg = coserve::config::ServerConfig::for_model(None);
    coserve::server::resolve_model_path(&cfg).expect("default model available")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("smollm2-135m-instruct.json")).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}
