//! Shared by the HTTP API tests, which include it with `#[path = "api_support.rs"] mod support;`:
//! OpenAI's response schemas and a small validator, SSE parsing, error checks, /metrics
//! readings, and a runtime that keeps a server alive for all tests of one binary.
//!
//! Built alone it only runs the validator's own tests.
#![allow(dead_code)]

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Response schemas from OpenAI's published spec (`components/schemas` of openai-openapi.yaml,
/// github.com/openai/openai-openapi at commit f85dbe2, MIT license), with the schemas they
/// reference; descriptions, examples and vendor extensions removed.
const OPENAI_SCHEMAS: &str = r##"{
"ChatCompletionMessageCustomToolCall":{"properties":{"custom":{"properties":{"input":{"type":"string"},"name":{"type":"string"}},"required":["name","input"],"type":"object"},"id":{"type":"string"},"type":{"enum":["custom"],"type":"string"}},"required":["id","type","custom"],"type":"object"},
"ChatCompletionMessageToolCall":{"properties":{"function":{"properties":{"arguments":{"type":"string"},"name":{"type":"string"}},"required":["name","arguments"],"type":"object"},"id":{"type":"string"},"type":{"enum":["function"],"type":"string"}},"required":["id","type","function"],"type":"object"},
"ChatCompletionMessageToolCallChunk":{"properties":{"function":{"properties":{"arguments":{"type":"string"},"name":{"type":"string"}},"type":"object"},"id":{"type":"string"},"index":{"type":"integer"},"type":{"enum":["function"],"type":"string"}},"required":["index"],"type":"object"},
"ChatCompletionMessageToolCalls":{"items":{"discriminator":{"propertyName":"type"},"oneOf":[{"$ref":"#/components/schemas/ChatCompletionMessageToolCall"},{"$ref":"#/components/schemas/ChatCompletionMessageCustomToolCall"}]},"type":"array"},
"ChatCompletionModeration":{"properties":{"input":{"discriminator":{"propertyName":"type"},"oneOf":[{"$ref":"#/components/schemas/ChatCompletionModerationResults"},{"$ref":"#/components/schemas/ChatCompletionModerationError"}]},"output":{"discriminator":{"propertyName":"type"},"oneOf":[{"$ref":"#/components/schemas/ChatCompletionModerationResults"},{"$ref":"#/components/schemas/ChatCompletionModerationError"}]}},"required":["input","output"],"type":"object"},
"ChatCompletionModerationError":{"properties":{"code":{"type":"string"},"message":{"type":"string"},"type":{"enum":["error"],"type":"string"}},"required":["type","code","message"],"type":"object"},
"ChatCompletionModerationResults":{"properties":{"model":{"type":"string"},"results":{"items":{"$ref":"#/components/schemas/ModerationResultBody"},"type":"array"},"type":{"enum":["moderation_results"],"type":"string"}},"required":["type","model","results"],"type":"object"},
"ChatCompletionResponseMessage":{"properties":{"annotations":{"items":{"properties":{"type":{"enum":["url_citation"],"type":"string"},"url_citation":{"properties":{"end_index":{"type":"integer"},"start_index":{"type":"integer"},"url":{"type":"string"}},"required":["end_index","start_index","url","title"],"type":"object"}},"required":["type","url_citation"],"type":"object"},"type":"array"},"audio":{"anyOf":[{"properties":{"data":{"type":"string"},"expires_at":{"type":"integer"},"id":{"type":"string"},"transcript":{"type":"string"}},"required":["id","expires_at","data","transcript"],"type":"object"},{"type":"null"}]},"content":{"anyOf":[{"type":"string"},{"type":"null"}]},"function_call":{"properties":{"arguments":{"type":"string"},"name":{"type":"string"}},"required":["name","arguments"],"type":"object"},"refusal":{"anyOf":[{"type":"string"},{"type":"null"}]},"role":{"enum":["assistant"],"type":"string"},"tool_calls":{"$ref":"#/components/schemas/ChatCompletionMessageToolCalls"}},"required":["role","content","refusal"],"type":"object"},
"ChatCompletionStreamResponseDelta":{"properties":{"content":{"anyOf":[{"type":"string"},{"type":"null"}]},"function_call":{"properties":{"arguments":{"type":"string"},"name":{"type":"string"}},"type":"object"},"refusal":{"anyOf":[{"type":"string"},{"type":"null"}]},"role":{"enum":["developer","system","user","assistant","tool"],"type":"string"},"tool_calls":{"items":{"$ref":"#/components/schemas/ChatCompletionMessageToolCallChunk"},"type":"array"}},"type":"object"},
"ChatCompletionTokenLogprob":{"properties":{"bytes":{"anyOf":[{"items":{"type":"integer"},"type":"array"},{"type":"null"}]},"logprob":{"type":"number"},"token":{"type":"string"},"top_logprobs":{"items":{"properties":{"bytes":{"anyOf":[{"items":{"type":"integer"},"type":"array"},{"type":"null"}]},"logprob":{"type":"number"},"token":{"type":"string"}},"required":["token","logprob","bytes"],"type":"object"},"type":"array"}},"required":["token","logprob","bytes","top_logprobs"],"type":"object"},
"CompletionUsage":{"properties":{"completion_tokens":{"type":"integer"},"completion_tokens_details":{"properties":{"accepted_prediction_tokens":{"type":"integer"},"audio_tokens":{"type":"integer"},"reasoning_tokens":{"type":"integer"},"rejected_prediction_tokens":{"type":"integer"},"text_tokens":{"type":"integer"}},"type":"object"},"prompt_tokens":{"type":"integer"},"prompt_tokens_details":{"properties":{"audio_tokens":{"type":"integer"},"cache_write_tokens":{"type":"integer"},"cached_tokens":{"type":"integer"},"image_tokens":{"type":"integer"},"text_tokens":{"type":"integer"}},"type":"object"},"total_tokens":{"type":"integer"}},"required":["prompt_tokens","completion_tokens","total_tokens"],"type":"object"},
"CreateChatCompletionResponse":{"properties":{"choices":{"items":{"properties":{"finish_reason":{"enum":["stop","length","tool_calls","content_filter","function_call"],"type":"string"},"index":{"type":"integer"},"logprobs":{"anyOf":[{"properties":{"content":{"anyOf":[{"items":{"$ref":"#/components/schemas/ChatCompletionTokenLogprob"},"type":"array"},{"type":"null"}]},"refusal":{"anyOf":[{"items":{"$ref":"#/components/schemas/ChatCompletionTokenLogprob"},"type":"array"},{"type":"null"}]}},"required":["content","refusal"],"type":"object"},{"type":"null"}]},"message":{"$ref":"#/components/schemas/ChatCompletionResponseMessage"}},"required":["finish_reason","index","message","logprobs"],"type":"object"},"type":"array"},"created":{"type":"integer"},"id":{"type":"string"},"metadata":{"$ref":"#/components/schemas/Metadata"},"model":{"type":"string"},"moderation":{"anyOf":[{"$ref":"#/components/schemas/ChatCompletionModeration"},{"type":"null"}]},"object":{"enum":["chat.completion"],"type":"string"},"service_tier":{"$ref":"#/components/schemas/ServiceTier"},"system_fingerprint":{"type":"string"},"usage":{"$ref":"#/components/schemas/CompletionUsage"}},"required":["choices","created","id","model","object"],"type":"object"},
"CreateChatCompletionStreamResponse":{"properties":{"choices":{"items":{"properties":{"delta":{"$ref":"#/components/schemas/ChatCompletionStreamResponseDelta"},"finish_reason":{"enum":["stop","length","tool_calls","content_filter","function_call"],"nullable":true,"type":"string"},"index":{"type":"integer"},"logprobs":{"nullable":true,"properties":{"content":{"items":{"$ref":"#/components/schemas/ChatCompletionTokenLogprob"},"nullable":true,"type":"array"},"refusal":{"items":{"$ref":"#/components/schemas/ChatCompletionTokenLogprob"},"nullable":true,"type":"array"}},"required":["content","refusal"],"type":"object"}},"required":["delta","finish_reason","index"],"type":"object"},"type":"array"},"created":{"type":"integer"},"id":{"type":"string"},"model":{"type":"string"},"moderation":{"anyOf":[{"$ref":"#/components/schemas/ChatCompletionModeration"},{"type":"null"}]},"obfuscation":{"type":"string"},"object":{"enum":["chat.completion.chunk"],"type":"string"},"service_tier":{"$ref":"#/components/schemas/ServiceTier"},"system_fingerprint":{"type":"string"},"usage":{"$ref":"#/components/schemas/CompletionUsage","nullable":true}},"required":["choices","created","id","model","object"],"type":"object"},
"CreateCompletionResponse":{"properties":{"choices":{"items":{"properties":{"finish_reason":{"enum":["stop","length","content_filter"],"type":"string"},"index":{"type":"integer"},"logprobs":{"anyOf":[{"properties":{"text_offset":{"items":{"type":"integer"},"type":"array"},"token_logprobs":{"items":{"type":"number"},"type":"array"},"tokens":{"items":{"type":"string"},"type":"array"},"top_logprobs":{"items":{"additionalProperties":{"type":"number"},"type":"object"},"type":"array"}},"type":"object"},{"type":"null"}]},"text":{"type":"string"}},"required":["finish_reason","index","logprobs","text"],"type":"object"},"type":"array"},"created":{"type":"integer"},"id":{"type":"string"},"model":{"type":"string"},"object":{"enum":["text_completion"],"type":"string"},"system_fingerprint":{"type":"string"},"usage":{"$ref":"#/components/schemas/CompletionUsage"}},"required":["id","object","created","model","choices"],"type":"object"},
"DeleteFileResponse":{"properties":{"deleted":{"type":"boolean"},"id":{"type":"string"},"object":{"enum":["file"],"type":"string"}},"required":["id","object","deleted"],"type":"object"},
"Error":{"properties":{"code":{"anyOf":[{"type":"string"},{"type":"null"}]},"message":{"type":"string"},"param":{"anyOf":[{"type":"string"},{"type":"null"}]},"type":{"type":"string"}},"required":["type","message","param","code"],"type":"object"},
"ErrorResponse":{"properties":{"error":{"$ref":"#/components/schemas/Error"}},"required":["error"],"type":"object"},
"ListFilesResponse":{"properties":{"data":{"items":{"$ref":"#/components/schemas/OpenAIFile"},"type":"array"},"first_id":{"type":"string"},"has_more":{"type":"boolean"},"last_id":{"type":"string"},"object":{"type":"string"}},"required":["object","data","first_id","last_id","has_more"],"type":"object"},
"ListModelsResponse":{"properties":{"data":{"items":{"$ref":"#/components/schemas/Model"},"type":"array"},"object":{"enum":["list"],"type":"string"}},"required":["object","data"],"type":"object"},
"Metadata":{"anyOf":[{"additionalProperties":{"type":"string"},"type":"object"},{"type":"null"}]},
"Model":{"properties":{"created":{"type":"integer"},"id":{"type":"string"},"object":{"enum":["model"],"type":"string"},"owned_by":{"type":"string"},"shutdown_date":{"anyOf":[{"type":"string"},{"type":"null"}]}},"required":["id","object","created","owned_by"]},
"ModerationInputType":{"enum":["text","image"],"type":"string"},
"ModerationResultBody":{"properties":{"categories":{"additionalProperties":{"type":"boolean"},"type":"object"},"category_applied_input_types":{"additionalProperties":{"items":{"$ref":"#/components/schemas/ModerationInputType"},"type":"array"},"type":"object"},"category_scores":{"additionalProperties":{"type":"number"},"type":"object"},"flagged":{"type":"boolean"},"model":{"type":"string"},"type":{"enum":["moderation_result"],"type":"string"}},"required":["type","model","flagged","categories","category_scores","category_applied_input_types"],"type":"object"},
"OpenAIFile":{"properties":{"bytes":{"type":"integer"},"created_at":{"type":"integer"},"expires_at":{"type":"integer"},"filename":{"type":"string"},"id":{"type":"string"},"object":{"enum":["file"],"type":"string"},"purpose":{"enum":["assistants","assistants_output","batch","batch_output","fine-tune","fine-tune-results","vision","user_data"],"type":"string"},"status":{"enum":["uploaded","processed","error"],"type":"string"},"status_details":{"type":"string"}},"required":["id","object","bytes","created_at","filename","purpose","status"]},
"ServiceTier":{"anyOf":[{"enum":["auto","default","flex","scale","priority","fast"],"type":"string"},{"type":"null"}]}
}"##;

fn schemas() -> &'static Value {
    static S: OnceLock<Value> = OnceLock::new();
    S.get_or_init(|| serde_json::from_str(OPENAI_SCHEMAS).expect("embedded schemas are JSON"))
}

/// Panics unless `value` matches OpenAI's component schema `name`.
pub fn assert_schema(value: &Value, name: &str) {
    assert_schema_allowing_null(value, name, &[]);
}

/// Like `assert_schema`, but the properties (or array items of the properties) named in
/// `nullable` may also be `null`: streamed completion chunks carry `finish_reason: null`, and
/// echoed prompts start their `token_logprobs` and `top_logprobs` with `null`, which the spec
/// does not mark nullable.
pub fn assert_schema_allowing_null(value: &Value, name: &str, nullable: &[&str]) {
    let schema = &schemas()[name];
    assert!(!schema.is_null(), "no schema named {name}");
    let mut errors = Vec::new();
    validate(value, schema, "$", nullable, &mut errors);
    assert!(errors.is_empty(), "body does not match {name}: {errors:#?}\nbody: {value:#}");
}

fn type_matches(value: &Value, ty: &str) -> bool {
    match ty {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    }
}

/// The subset of JSON Schema the spec's response schemas use.
fn validate(
    value: &Value,
    schema: &Value,
    path: &str,
    nullable: &[&str],
    errors: &mut Vec<String>,
) {
    let segment = path.rsplit('.').next().unwrap_or("");
    let name = segment.split('[').next().unwrap_or(segment);
    if value.is_null() && (schema["nullable"] == true || nullable.contains(&name)) {
        return;
    }
    if let Some(r) = schema["$ref"].as_str() {
        let target = r.rsplit('/').next().unwrap_or(r);
        validate(value, &schemas()[target], path, nullable, errors);
        return;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = schema[key].as_array() {
            let fits = options.iter().any(|o| {
                let mut e = Vec::new();
                validate(value, o, path, nullable, &mut e);
                e.is_empty()
            });
            if !fits {
                errors.push(format!("{path}: matches none of {key}"));
            }
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.iter().any(|t| type_matches(value, t)) {
        errors.push(format!("{path}: expected {types:?}, got {value}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    if let Some(obj) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(key) {
                errors.push(format!("{path}: missing required `{key}`"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, v) in obj {
            let child = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(v, s, &child, nullable, errors),
                None if schema["additionalProperties"].is_object() => {
                    validate(v, &schema["additionalProperties"], &child, nullable, errors)
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(v, schema, &format!("{path}[{i}]"), nullable, errors);
        }
    }
}

/// The `data:` payloads of an SSE body, in order; panics unless the last one is `[DONE]`.
pub async fn sse_chunks(response: reqwest::Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap_or("").to_string();
    assert!(content_type.starts_with("text/event-stream"), "content-type {content_type}");
    let body = response.text().await.expect("SSE body");
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "body: {body}");
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("chunk {p}: {e}")))
        .collect()
}

/// Splits an SSE body into its events' data; every event must be `data: ...\n\n`.
pub fn sse_payloads(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "events end with a blank line: {body:?}");
    body.split_terminator("\n\n")
        .map(|event| {
            let data = event.strip_prefix("data: ");
            data.unwrap_or_else(|| panic!("not a data event: {event:?}")).to_string()
        })
        .collect()
}

/// Checks an OpenAI error response and returns its `error` object.
pub async fn assert_error(response: reqwest::Response, status: u16, param: Option<&str>) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers()["content-type"].to_str().unwrap_or("").to_string();
    assert!(content_type.starts_with("application/json"), "content-type {content_type}");
    let body: Value = response.json().await.expect("JSON error body");
    assert_schema(&body, "ErrorResponse");
    let error = body["error"].clone();
    assert_eq!(error["param"].as_str(), param, "param of {error}");
    assert!(!error["message"].as_str().unwrap_or("").is_empty(), "message of {error}");
    if status < 500 && status != 429 {
        assert_eq!(error["type"], "invalid_request_error", "{error}");
    }
    error
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

/// One sample of a metric, from the Prometheus text: the first line starting with `name`
/// (labels included, if given) and containing every `label`; 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split([' ', '{']).next() == Some(name) && labels.iter().all(|lab| l.contains(lab))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    let r = client.get(format!("{base}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics body")
}

/// Polls /metrics until `done` holds (true) or `limit` passes (false).
pub async fn wait_for_metrics(
    client: &reqwest::Client,
    base: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        if done(&metrics_text(client, base).await) {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `make` on a runtime that lives as long as the process, so what it starts (a server
/// shared by the tests of one binary) outlives each test's own runtime.
pub fn on_background_runtime<T, F, Fut>(make: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let out = runtime.block_on(make());
        // Never dropped: its workers keep serving until the process exits.
        std::mem::forget(runtime);
        out
    })
    .join()
    .expect("background runtime")
}

#[cfg(test)]
mod validator_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn spec_examples_validate() {
        let completion = json!({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"text": "x", "index": 0, "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        });
        assert_schema(&completion, "CreateCompletionResponse");
        let error = json!({"error": {"message": "m", "type": "t", "param": null, "code": null}});
        assert_schema(&error, "ErrorResponse");
    }

    #[test]
    #[should_panic(expected = "missing required `param`")]
    fn missing_required_fields_fail() {
        assert_schema(
            &json!({"error": {"message": "m", "type": "t", "code": null}}),
            "ErrorResponse",
        );
    }

    #[test]
    #[should_panic(expected = "is not one of")]
    fn enums_are_checked() {
        let chunk = json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]
        });
        assert_schema(&chunk, "CreateChatCompletionStreamResponse");
    }

    #[test]
    fn sse_payloads_split_events() {
        assert_eq!(sse_payloads("data: {}\n\ndata: [DONE]\n\n"), vec!["{}", "[DONE]"]);
    }

    #[test]
    fn metric_lines_are_found_by_name_and_labels() {
        let text = "# HELP x\nx_total{a=\"1\",b=\"2\"} 3\nx{b=\"2\"} 0.5\n";
        assert_eq!(metric(text, "x_total", &["a=\"1\""]), 3.0);
        assert_eq!(metric(text, "x", &[]), 0.5);
        assert_eq!(metric(text, "y", &[]), 0.0);
    }
}
