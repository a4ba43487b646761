//! `GET /health`, `GET /version`, `GET /metrics`, `GET /openapi.json`.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;

#[utoipa::path(
    get,
    path = "/health",
    tag = "server",
    responses(
        (status = 200, description = "The server and its engine are up"),
        (status = 503, description = "The engine has stopped", body = super::error::ErrorResponse)
    )
)]
pub async fn health(State(state): State<Arc<AppState>>) -> Result<(), ApiError> {
    if state.engine.is_running() {
        Ok(())
    } else {
        Err(ApiError::EngineStopped)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Version {
    /// The coserve version.
    pub version: String,
}

#[utoipa::path(
    get,
    path = "/version",
    tag = "server",
    responses((status = 200, description = "The server version", body = Version))
)]
pub async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION").to_string() })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "server",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain; version=0.0.4", body = String))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], state.metrics.render())
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "server",
    responses((status = 200, description = "This OpenAPI document", body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    // The spec is fixed at build time; serialize it once.
    static SPEC: OnceLock<String> = OnceLock::new();
    let spec = SPEC.get_or_init(|| super::openapi::spec_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], spec.as_str())
}
