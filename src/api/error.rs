//! `ApiError`: every failure a handler can return, and the one place that maps it to an HTTP
//! status and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::SubmitError;
use crate::finetune::manager::ManagerError;
use crate::store::{Entity, StoreError};

/// Seconds a client should wait before retrying when the waiting queue is full.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input: a field out of range, malformed JSON, a prompt that does not fit, ...
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String> },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("The request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("The server is busy: its waiting queue is full ({0} requests). Retry later.")]
    QueueFull(usize),
    #[error("The engine has stopped; the server cannot take requests")]
    EngineStopped,
    #[error("The request was aborted by the engine")]
    Aborted,
    /// The engine reported a failure for this request.
    #[error("Generation failed: {0}")]
    Engine(String),
    /// A server-side fault that is not the client's doing (e.g. the tokenizer failed).
    #[error("Internal error: {0}")]
    Internal(String),
    /// Durable state: not found, a bad cursor, an upload too large, or an I/O or database fault.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::Invalid { param, message } => ApiError::InvalidRequest { message, param },
            ManagerError::Store(s) => ApiError::Store(s),
            ManagerError::Stopped => ApiError::EngineStopped,
        }
    }
}

impl ApiError {
    /// A 400 naming the offending request field (`None` when no single field is at fault).
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest { message: message.into(), param: param.into() }
    }

    /// Shorthand for a 400 about one named field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(Some(param.to_string()), message)
    }

    /// Status, OpenAI error `type`, and `code` of each variant: the single mapping.
    fn classify(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            ApiError::ModelNotFound(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"))
            }
            ApiError::UnknownRoute { .. } => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("unknown_url"))
            }
            ApiError::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("request_too_large"))
            }
            ApiError::QueueFull(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full"))
            }
            ApiError::EngineStopped | ApiError::Aborted => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("engine_unavailable"))
            }
            ApiError::Engine(_) | ApiError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None)
            }
            ApiError::Store(e) => match e {
                StoreError::NotFound { kind, .. } => {
                    (StatusCode::NOT_FOUND, "invalid_request_error", Some(not_found_code(*kind)))
                }
                StoreError::UnknownCursor { .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", None)
                }
                StoreError::TooLarge { .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    Some("request_too_large"),
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".to_string()),
            ApiError::Store(StoreError::NotFound { kind, .. }) => {
                Some(not_found_param(*kind).to_string())
            }
            ApiError::Store(StoreError::UnknownCursor { .. }) => Some("after".to_string()),
            _ => None,
        }
    }

    /// What the client reads: storage faults are described in the log, not to the client,
    /// since their text holds server paths.
    fn message(&self) -> String {
        match self {
            ApiError::Store(_) if self.status().is_server_error() => {
                "The server could not access its storage".to_string()
            }
            _ => self.to_string(),
        }
    }

    /// The OpenAI error body; also sent as the last event of a stream that fails midway.
    pub fn body(&self) -> ErrorResponse {
        let (_, kind, code) = self.classify();
        ErrorResponse {
            error: ErrorBody {
                message: self.message(),
                kind: kind.to_string(),
                param: self.param(),
                code: code.map(str::to_string),
            },
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(n) => ApiError::QueueFull(n),
            SubmitError::EngineStopped => ApiError::EngineStopped,
        }
    }
}

/// OpenAI's `code` for an unknown object of each kind.
fn not_found_code(kind: Entity) -> &'static str {
    match kind {
        Entity::File => "file_not_found",
        Entity::FineTuningJob => "fine_tuning_job_not_found",
        Entity::JobEvent => "event_not_found",
        Entity::Checkpoint => "checkpoint_not_found",
        Entity::Model => "model_not_found",
    }
}

/// The request parameter that named the unknown object.
fn not_found_param(kind: Entity) -> &'static str {
    match kind {
        Entity::File => "file_id",
        Entity::FineTuningJob => "fine_tuning_job_id",
        Entity::JobEvent => "after",
        Entity::Checkpoint => "checkpoint_id",
        Entity::Model => "model",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

/// OpenAI's `ErrorResponse`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// OpenAI's `Error`: `param` and `code` are always present, `null` when not applicable.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[schema(required = true)]
    pub param: Option<String>,
    #[schema(required = true)]
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(e: &ApiError) -> serde_json::Value {
        serde_json::to_value(e.body()).unwrap()
    }

    #[test]
    fn invalid_request_names_param() {
        let e = ApiError::field("temperature", "bad");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let v = json(&e);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["message"], "bad");
        assert!(v["error"]["code"].is_null());
    }

    #[test]
    fn every_field_is_present_even_when_null() {
        let v = json(&ApiError::EngineStopped);
        let obj = v["error"].as_object().unwrap();
        for k in ["message", "type", "param", "code"] {
            assert!(obj.contains_key(k), "missing {k}");
        }
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn model_not_found_is_404_with_code() {
        let e = ApiError::ModelNotFound("x".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v = json(&e);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
    }

    #[test]
    fn store_errors_map_to_openai_errors() {
        let e = ApiError::from(StoreError::not_found(Entity::File, "file-x"));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v = json(&e);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "file_not_found");
        assert_eq!(v["error"]["param"], "file_id");
        assert_eq!(v["error"]["message"], "No such File object: file-x");

        let e = ApiError::from(StoreError::UnknownCursor { kind: Entity::File, id: "f".into() });
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(&e)["error"]["param"], "after");

        let e = ApiError::from(StoreError::TooLarge { limit: 10 });
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);

        let io = std::io::Error::other("disk on fire");
        let e = ApiError::from(StoreError::io("write /secret/path", io));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let v = json(&e);
        assert_eq!(v["error"]["type"], "server_error");
        assert!(!v["error"]["message"].as_str().unwrap().contains("/secret"), "{v}");
    }

    #[test]
    fn queue_full_sets_retry_after() {
        let r = ApiError::from(SubmitError::QueueFull(3)).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let r = ApiError::from(SubmitError::EngineStopped).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
