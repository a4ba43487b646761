//! HTTP API (axum): OpenAI-compatible routes, errors, SSE, metrics, OpenAPI.
//! (Placeholder until the routes land: only health and metrics.)

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelInfo;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub model: ModelInfo,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|State(s): State<Arc<AppState>>| async move { s.metrics.render() }))
        .with_state(state)
}
