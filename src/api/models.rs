//! `GET /v1/models` and `GET /v1/models/{id}`: the served model.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::AppState;
use crate::model::ModelInfo;

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelObjectKind {
    Model,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListObjectKind {
    List,
}

/// OpenAI's `Model`, plus vLLM's `max_model_len`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: ModelObjectKind,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
    /// Prompt plus completion tokens at most.
    pub max_model_len: usize,
}

impl From<&ModelInfo> for ModelObject {
    fn from(m: &ModelInfo) -> Self {
        Self {
            id: m.id.clone(),
            object: ModelObjectKind::Model,
            created: m.created,
            owned_by: m.owned_by.clone(),
            max_model_len: m.max_model_len,
        }
    }
}

/// OpenAI's `ListModelsResponse`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: ListObjectKind,
    pub data: Vec<ModelObject>,
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses((status = 200, description = "The served models", body = ModelList))
)]
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList { object: ListObjectKind::List, data: vec![ModelObject::from(&state.model)] })
}

#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "Model id (may contain `/`)")),
    responses(
        (status = 200, description = "The model", body = ModelObject),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    )
)]
pub async fn retrieve_model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::field("id", e.body_text()))?;
    if id != state.model.id {
        return Err(ApiError::ModelNotFound(id));
    }
    Ok(Json(ModelObject::from(&state.model)))
}
