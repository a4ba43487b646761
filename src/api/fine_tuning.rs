//! The OpenAI fine-tuning API: create, list, retrieve, cancel, pause, resume, events and
//! checkpoints. Changes go through the `JobManager`; reads come straight from the store.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::extract::ApiJson;
use super::models::ListObjectKind;
use super::AppState;
use crate::finetune::job_object::{
    CheckpointObject, FineTuningJob, JobEventObject, RequestedHyperparameters,
};
use crate::finetune::manager::CreateJob;
use crate::lora::{LoraConfig, TargetModule};
use crate::store::StoreError;

/// `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    /// The base model: the served model's id.
    pub model: String,
    /// Id of an uploaded file with purpose `fine-tune` (JSONL, chat or prompt/completion).
    pub training_file: String,
    pub validation_file: Option<String>,
    /// Up to 64 characters, added to the fine-tuned model's name.
    pub suffix: Option<String>,
    pub seed: Option<i64>,
    #[schema(value_type = Object)]
    pub metadata: Option<Value>,
    pub method: Option<MethodRequest>,
    /// Deprecated by OpenAI in favour of `method`; accepted when `method` does not set them.
    pub hyperparameters: Option<RequestedHyperparameters>,
    #[schema(value_type = Object)]
    pub integrations: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodRequest {
    /// Only `supervised` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    pub supervised: Option<SupervisedRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SupervisedRequest {
    pub hyperparameters: Option<RequestedHyperparameters>,
    /// Extension: the LoRA adapter trained (default r 16, alpha 32, every linear projection).
    pub lora: Option<LoraRequest>,
    /// Extension: cut examples longer than the model's context instead of failing the job.
    pub truncate: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    pub r: Option<usize>,
    pub alpha: Option<f32>,
    pub dropout: Option<f32>,
    /// Any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub object: ListObjectKind,
    pub data: Vec<FineTuningJob>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub object: ListObjectKind,
    pub data: Vec<JobEventObject>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckpointList {
    pub object: ListObjectKind,
    pub data: Vec<CheckpointObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

fn lora_config(req: Option<LoraRequest>) -> Result<LoraConfig, ApiError> {
    let d = LoraConfig::default();
    let Some(req) = req else { return Ok(d) };
    let target_modules = match req.target_modules {
        None => d.target_modules,
        Some(names) => names
            .iter()
            .map(|n| {
                TargetModule::from_name(n).ok_or_else(|| {
                    ApiError::field(
                        "method.supervised.lora.target_modules",
                        format!(
                            "Unknown module {n:?}; use q_proj, k_proj, v_proj, o_proj, gate_proj, \
                             up_proj or down_proj."
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    LoraConfig {
        r: req.r.unwrap_or(d.r),
        alpha: req.alpha.unwrap_or(d.alpha),
        dropout: req.dropout.unwrap_or(d.dropout),
        target_modules,
    }
    .validated()
    .map_err(|e| ApiError::field("method.supervised.lora", e.to_string()))
}

fn create_job_request(req: CreateJobRequest) -> Result<CreateJob, ApiError> {
    if req
        .integrations
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::field("integrations", "Integrations are not supported."));
    }
    if let Some(m) = &req.metadata {
        let ok = m.is_null()
            || m.as_object().is_some_and(|o| o.len() <= 16 && o.values().all(Value::is_string));
        if !ok {
            return Err(ApiError::field(
                "metadata",
                "metadata must be an object of at most 16 string values.",
            ));
        }
    }
    let (hyper, lora, truncate) = match req.method {
        None => (req.hyperparameters.unwrap_or_default(), LoraConfig::default(), false),
        Some(m) => {
            if m.kind != "supervised" {
                return Err(ApiError::field(
                    "method.type",
                    format!("Method {:?} is not supported; use \"supervised\".", m.kind),
                ));
            }
            let sup = m.supervised.unwrap_or(SupervisedRequest {
                hyperparameters: None,
                lora: None,
                truncate: None,
            });
            let hyper =
                match (sup.hyperparameters, req.hyperparameters) {
                    (Some(_), Some(_)) => return Err(ApiError::field(
                        "hyperparameters",
                        "Set hyperparameters in method.supervised.hyperparameters or at the top \
                         level (deprecated), not both.",
                    )),
                    (Some(h), None) | (None, Some(h)) => h,
                    (None, None) => RequestedHyperparameters::default(),
                };
            (hyper, lora_config(sup.lora)?, sup.truncate.unwrap_or(false))
        }
    };
    Ok(CreateJob {
        model: req.model,
        training_file: req.training_file,
        validation_file: req.validation_file,
        suffix: req.suffix,
        seed: req.seed,
        metadata: req.metadata.filter(|m| !m.is_null()),
        hyperparameters: hyper,
        lora,
        truncate,
    })
}

#[utoipa::path(
    post,
    path = "/v1/fine_tuning/jobs",
    tag = "fine-tuning",
    request_body = CreateJobRequest,
    responses(
        (status = 200, description = "The job, validating its files", body = FineTuningJob),
        (status = 400, description = "Invalid request", body = ErrorResponse),
    )
)]
pub async fn create_job(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateJobRequest>,
) -> Result<Json<FineTuningJob>, ApiError> {
    let req = create_job_request(req)?;
    if let Some(why) = &state.no_training_reason {
        return Err(ApiError::invalid(None, why.clone()));
    }
    Ok(Json(state.jobs.create(req).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<i64>,
}

fn page(
    q: Result<Query<PageQuery>, QueryRejection>,
    default: usize,
) -> Result<(Option<String>, usize), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(None, e.body_text()))?;
    let limit = match q.limit {
        None => default,
        Some(l) if (1..=100).contains(&l) => l as usize,
        Some(l) => {
            return Err(ApiError::field("limit", format!("limit must be 1 to 100, got {l}.")))
        }
    };
    Ok((q.after, limit))
}

fn job_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id).map_err(|e| ApiError::field("fine_tuning_job_id", e.body_text()))
}

fn job_object(body: Value) -> Result<FineTuningJob, ApiError> {
    serde_json::from_value(body).map_err(|e| {
        ApiError::Store(StoreError::Json { column: "fine_tuning_jobs.body", source: e })
    })
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs",
    tag = "fine-tuning",
    params(
        ("after" = Option<String>, Query, description = "Id of the last job of the previous page"),
        ("limit" = Option<i64>, Query, description = "Jobs per page, 1 to 100 (default 20)"),
    ),
    responses((status = 200, description = "Jobs, newest first", body = JobList))
)]
pub async fn list_jobs(
    State(state): State<Arc<AppState>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let (after, limit) = page(q, 20)?;
    let p = state.store.call(move |s| s.list_jobs(after.as_deref(), limit)).await?;
    let data = p.data.into_iter().map(|r| job_object(r.body)).collect::<Result<_, _>>()?;
    Ok(Json(JobList { object: ListObjectKind::List, data, has_more: p.has_more }))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = FineTuningJob),
        (status = 404, description = "No such job", body = ErrorResponse),
    )
)]
pub async fn retrieve_job(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<FineTuningJob>, ApiError> {
    let id = job_id(id)?;
    let row = state.store.call(move |s| s.get_job(&id)).await?;
    Ok(Json(job_object(row.body)?))
}

macro_rules! job_action {
    ($name:ident, $path:literal, $call:ident, $what:literal) => {
        #[utoipa::path(
            post,
            path = $path,
            tag = "fine-tuning",
            params(("id" = String, Path, description = "Job id")),
            responses(
                (status = 200, description = $what, body = FineTuningJob),
                (status = 400, description = "Not possible in the job's state", body = ErrorResponse),
                (status = 404, description = "No such job", body = ErrorResponse),
            )
        )]
        pub async fn $name(
            State(state): State<Arc<AppState>>,
            id: Result<Path<String>, PathRejection>,
        ) -> Result<Json<FineTuningJob>, ApiError> {
            let id = job_id(id)?;
            Ok(Json(state.jobs.$call(&id).await?))
        }
    };
}

job_action!(cancel_job, "/v1/fine_tuning/jobs/{id}/cancel", cancel, "The cancelled job");
job_action!(pause_job, "/v1/fine_tuning/jobs/{id}/pause", pause, "The paused job");
job_action!(resume_job, "/v1/fine_tuning/jobs/{id}/resume", resume, "The resumed (queued) job");

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}/events",
    tag = "fine-tuning",
    params(
        ("id" = String, Path, description = "Job id"),
        ("after" = Option<String>, Query, description = "Id of the last event of the previous page"),
        ("limit" = Option<i64>, Query, description = "Events per page, 1 to 100 (default 20)"),
    ),
    responses(
        (status = 200, description = "Events, newest first", body = EventList),
        (status = 404, description = "No such job", body = ErrorResponse),
    )
)]
pub async fn list_events(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let id = job_id(id)?;
    let (after, limit) = page(q, 20)?;
    let p = state
        .store
        .call(move |s| {
            s.get_job(&id)?;
            s.list_events(&id, after.as_deref(), limit)
        })
        .await?;
    let data = p
        .data
        .into_iter()
        .map(|e| JobEventObject {
            id: e.id,
            object: "fine_tuning.job.event".into(),
            created_at: e.created_at,
            level: e.level,
            message: e.message,
            kind: if e.data.is_some() { "metrics".into() } else { "message".into() },
            data: e.data,
        })
        .collect();
    Ok(Json(EventList { object: ListObjectKind::List, data, has_more: p.has_more }))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}/checkpoints",
    tag = "fine-tuning",
    params(
        ("id" = String, Path, description = "Job id"),
        ("after" = Option<String>, Query, description = "Id of the last checkpoint of the previous page"),
        ("limit" = Option<i64>, Query, description = "Checkpoints per page, 1 to 100 (default 10)"),
    ),
    responses(
        (status = 200, description = "Checkpoints, latest step first", body = CheckpointList),
        (status = 404, description = "No such job", body = ErrorResponse),
    )
)]
pub async fn list_checkpoints(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<CheckpointList>, ApiError> {
    let id = job_id(id)?;
    let (after, limit) = page(q, 10)?;
    let p = state
        .store
        .call(move |s| {
            s.get_job(&id)?;
            s.list_checkpoints(&id, after.as_deref(), limit)
        })
        .await?;
    let data: Vec<CheckpointObject> = p
        .data
        .into_iter()
        .map(|c| CheckpointObject {
            id: c.id,
            object: "fine_tuning.job.checkpoint".into(),
            created_at: c.created_at,
            fine_tuned_model_checkpoint: c.fine_tuned_model_checkpoint,
            fine_tuning_job_id: c.job_id,
            step_number: c.step,
            metrics: c.metrics,
        })
        .collect();
    Ok(Json(CheckpointList {
        object: ListObjectKind::List,
        first_id: data.first().map(|c| c.id.clone()),
        last_id: data.last().map(|c| c.id.clone()),
        data,
        has_more: p.has_more,
    }))
}
