//! HTTP API (axum): OpenAI-compatible routes, errors, SSE, metrics, OpenAPI.
//!
//! Handlers validate and tokenize, hand a `GenerateRequest` to the engine through
//! `EngineHandle`, and turn its events into one JSON body or SSE chunks. They never touch
//! model state; everything shared lives in `AppState`.

pub mod chat;
pub mod completions;
pub mod error;
pub mod extract;
pub mod files;
pub mod fine_tuning;
pub mod generation;
pub mod health;
pub mod logging;
pub mod logprobs;
pub mod models;
pub mod openapi;
pub mod prompt;
pub mod sampling;
pub mod sse;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;

use crate::engine::EngineHandle;
use crate::finetune::manager::JobManager;
use crate::lora::AdapterRegistry;
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelInfo;
use crate::store::Store;
pub use error::ApiError;
pub use openapi::{openapi, spec_json};

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// `None`: the model has no chat template and /v1/chat/completions answers 400.
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub model: ModelInfo,
    pub metrics: Arc<Metrics>,
    /// Larger request bodies get 413 (except uploads, see `max_upload_bytes`).
    pub max_body_bytes: usize,
    /// Fine-tuned adapters served next to the base model.
    pub adapters: Arc<AdapterRegistry>,
    /// Fine-tuning jobs: every change goes through the manager; reads use the store.
    pub jobs: JobManager,
    /// Durable state: files, jobs and their results.
    pub store: Arc<Store>,
    /// Larger uploaded files get 413.
    pub max_upload_bytes: usize,
    /// Why this server cannot fine-tune (its backend), if it cannot.
    pub no_training_reason: Option<String>,
}

/// The complete HTTP application: every route, the JSON 404/405 fallbacks, the body limit
/// and the per-request log line.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = DefaultBodyLimit::max(state.max_body_bytes);
    let upload_limit = DefaultBodyLimit::max(files::upload_body_limit(state.max_upload_bytes));
    Router::new()
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/models", get(models::list_models))
        // A catch-all, since model ids such as `org/name` contain slashes.
        .route("/v1/models/{*id}", get(models::retrieve_model).delete(models::delete_model))
        // Uploads stream to disk, so their body limit is the (much larger) upload limit.
        .route("/v1/files", post(files::upload_file).get(files::list_files).layer(upload_limit))
        .route("/v1/files/{id}", get(files::retrieve_file).delete(files::delete_file))
        .route("/v1/files/{id}/content", get(files::file_content))
        .route("/v1/fine_tuning/jobs", post(fine_tuning::create_job).get(fine_tuning::list_jobs))
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::retrieve_job))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(fine_tuning::cancel_job))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(fine_tuning::pause_job))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(fine_tuning::resume_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::list_events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(fine_tuning::list_checkpoints))
        .route("/health", get(health::health))
        .route("/version", get(health::version))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(health::openapi_json))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(body_limit)
        .layer(axum::middleware::from_fn(logging::log_requests))
        .with_state(state)
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownRoute { method: method.to_string(), path: uri.path().to_string() }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

/// Seconds since the Unix epoch (`created` fields).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
