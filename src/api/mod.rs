//! HTTP API (axum): OpenAI-compatible routes, errors, SSE, metrics, OpenAPI.
//!
//! Handlers validate and tokenize, hand a `GenerateRequest` to the engine through
//! `EngineHandle`, and turn its events into one JSON body or SSE chunks. They never touch
//! model state; everything shared lives in `AppState`.

pub mod error;
pub mod extract;
pub mod generation;
pub mod logging;
pub mod logprobs;
pub mod prompt;
pub mod sampling;
pub mod sse;

use std::sync::Arc;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelInfo;
pub use error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// `None`: the model has no chat template and /v1/chat/completions answers 400.
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub model: ModelInfo,
    pub metrics: Arc<Metrics>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
}
