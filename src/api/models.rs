//! `GET /v1/models` and `GET /v1/models/{id}`: the served model.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::AppState;
use crate::lora::ServedAdapter;
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
    /// For a fine-tuned model: the base model it adapts (vLLM's `parent` of a LoRA module).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl From<&ModelInfo> for ModelObject {
    fn from(m: &ModelInfo) -> Self {
        Self {
            id: m.id.clone(),
            object: ModelObjectKind::Model,
            created: m.created,
            owned_by: m.owned_by.clone(),
            max_model_len: m.max_model_len,
            parent: None,
        }
    }
}

fn adapter_object(a: &ServedAdapter, base: &ModelInfo) -> ModelObject {
    ModelObject {
        id: a.id.clone(),
        object: ModelObjectKind::Model,
        created: a.created,
        owned_by: base.owned_by.clone(),
        max_model_len: base.max_model_len,
        parent: Some(base.id.clone()),
    }
}

/// `DELETE /v1/models/{id}` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedModel {
    pub id: String,
    pub object: ModelObjectKind,
    pub deleted: bool,
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
    let mut data = vec![ModelObject::from(&state.model)];
    data.extend(state.adapters.all().iter().map(|a| adapter_object(a, &state.model)));
    Json(ModelList { object: ListObjectKind::List, data })
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
    if id == state.model.id {
        return Ok(Json(ModelObject::from(&state.model)));
    }
    match state.adapters.get(&id) {
        Some(a) => Ok(Json(adapter_object(&a, &state.model))),
        None => Err(ApiError::ModelNotFound(id)),
    }
}

#[utoipa::path(
    delete,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "A fine-tuned model's id")),
    responses(
        (status = 200, description = "Deleted; requests already running on it finish", body = DeletedModel),
        (status = 400, description = "The base model cannot be deleted", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    )
)]
pub async fn delete_model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeletedModel>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::field("id", e.body_text()))?;
    if id == state.model.id {
        return Err(ApiError::field("model", "The base model cannot be deleted."));
    }
    match state.jobs.delete_model(&id).await {
        Ok(()) => {}
        // A checkpoint is served but has no model row: it stays with its job.
        Err(crate::finetune::manager::ManagerError::Store(
            crate::store::StoreError::NotFound { .. },
        )) => {
            return Err(match state.adapters.get(&id) {
                Some(_) => ApiError::field(
                    "model",
                    "Checkpoints are kept with their job and cannot be deleted on their own.",
                ),
                None => ApiError::ModelNotFound(id),
            })
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Json(DeletedModel { id, object: ModelObjectKind::Model, deleted: true }))
}
