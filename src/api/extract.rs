//! `ApiJson<T>`: a JSON body extractor whose failures are OpenAI-shaped 400/413 errors that
//! name the offending field, instead of axum's plain-text 415/422 rejections.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        // The body limit is enforced while buffering (DefaultBodyLimit on the router).
        // Content-Type is not checked: clients that forget it still send JSON.
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: state.max_body_bytes }
            } else {
                ApiError::invalid(None, format!("Could not read the request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a request body, turning serde's error into a 400 whose `param` is the field path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(path, &inner)
    })?;
    de.end().map_err(|e| json_error(".".into(), &e))?;
    Ok(value)
}

fn json_error(path: String, err: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::invalid(None, format!("The request body is not valid JSON: {err}"))
        }
        Category::Data => {
            let message = err.to_string();
            let param = missing_field_param(&path, &message)
                .or_else(|| (path != ".").then(|| path.clone()));
            let message = match &param {
                Some(p) => format!("Invalid value for `{p}`: {message}"),
                None => format!("Invalid request body: {message}"),
            };
            ApiError::invalid(param, message)
        }
    }
}

/// serde reports a missing field at the parent's path; name the field itself instead.
fn missing_field_param(path: &str, message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    let field = &rest[..rest.find('`')?];
    Some(if path == "." { field.to_string() } else { format!("{path}.{field}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        temperature: Option<f32>,
        messages: Option<Vec<Msg>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
    }

    fn err(body: &str) -> (Option<String>, String) {
        match parse_json::<Req>(body.as_bytes()) {
            Err(ApiError::InvalidRequest { param, message }) => (param, message),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn malformed_json_has_no_param() {
        let (param, message) = err("{\"model\": ");
        assert_eq!(param, None);
        assert!(message.contains("not valid JSON"), "{message}");
        assert_eq!(err("").0, None);
        assert_eq!(err("{\"model\":\"m\"} trailing").0, None);
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_eq!(err(r#"{"model":"m","temperature":"hot"}"#).0.as_deref(), Some("temperature"));
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":1}]}"#).0.as_deref(),
            Some("messages[0].role")
        );
    }

    #[test]
    fn missing_field_names_the_field() {
        assert_eq!(err(r#"{"temperature":1}"#).0.as_deref(), Some("model"));
        assert_eq!(err(r#"{"model":"m","messages":[{}]}"#).0.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn valid_body_parses() {
        let r: Req = parse_json(br#"{"model":"m","temperature":0.5,"extra":true}"#).unwrap();
        assert_eq!(r.model, "m");
    }
}
