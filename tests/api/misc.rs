//! Models, health, version, metrics and the OpenAPI document over real HTTP; and clients
//! that go away mid-request, whose requests must be aborted and their KV blocks freed.

use crate::common;
use crate::support;

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use common::server::TestServer;
use common::tiny_model::{write_gguf, TinyShape};
use support::{assert_error, assert_schema, client, metric, metrics_text, wait_for_metrics};

/// A model id with a slash, as Hugging Face names are.
const MODEL_ID: &str = "test-org/tiny-llama";

fn shared_base() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    S.get_or_init(|| {
        support::on_background_runtime(|| async {
            let server = TestServer::start_tiny(|c| {
                c.kv_cache_memory = 64 << 20;
                c.served_model_name = Some(MODEL_ID.into());
            })
            .await;
            let base = server.base_url().to_string();
            std::mem::forget(server);
            base
        })
    })
}

async fn get(path: &str) -> reqwest::Response {
    client().get(format!("{}{path}", shared_base())).send().await.expect("request")
}

fn check_model(m: &Value) {
    assert_schema(m, "Model");
    assert_eq!(m["id"], MODEL_ID);
    assert_eq!(m["object"], "model");
    let created = m["created"].as_u64().unwrap();
    // Seconds, not milliseconds.
    assert!(created > 1_600_000_000 && created < 10_000_000_000, "created {created}");
    assert!(m["max_model_len"].as_u64().unwrap() > 0);
    assert!(m["owned_by"].is_string());
}

#[tokio::test]
async fn models_list_and_retrieve() {
    let r = get("/v1/models").await;
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    assert_schema(&list, "ListModelsResponse");
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    check_model(&data[0]);

    let r = get(&format!("/v1/models/{MODEL_ID}")).await;
    assert_eq!(r.status(), 200);
    let model: Value = r.json().await.unwrap();
    check_model(&model);
    assert_eq!(model, data[0]);

    let e = assert_error(get("/v1/models/test-org/other").await, 404, Some("model")).await;
    assert_eq!(e["code"], "model_not_found");
}

#[tokio::test]
async fn health_and_version() {
    assert_eq!(get("/health").await.status(), 200);
    let r = get("/version").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"version": env!("CARGO_PKG_VERSION")}));
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let r = get("/metrics").await;
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = r.text().await.unwrap();
    for name in [
        "coserve_kv_cache_usage_perc",
        "coserve_num_requests_running",
        "coserve_num_requests_waiting",
    ] {
        assert!(text.contains(&format!("# TYPE {name} gauge")), "{name} in {text}");
    }
    assert!(text.contains(&format!("model_name=\"{MODEL_ID}\"")));
}

#[tokio::test]
async fn openapi_document_is_served() {
    let r = get("/openapi.json").await;
    assert_eq!(r.status(), 200);
    let served: Value = r.json().await.unwrap();
    let generated = serde_json::to_value(coserve::api::openapi()).unwrap();
    assert_eq!(served, generated);
    assert!(served["paths"]["/v1/chat/completions"]["post"].is_object());
}

/// A server whose context is long enough that a full-length generation takes far longer than
/// the tests wait for it, so a freed cache can only come from an abort.
async fn long_context_server(dir: &tempfile::TempDir) -> (TestServer, u64) {
    let shape = TinyShape { context: 8192, ..TinyShape::default() };
    let path = write_gguf(dir.path(), &shape);
    let server = TestServer::start_model(&path, |c| c.kv_cache_memory = 64 << 20).await;
    let model: Value = client()
        .get(server.url(&format!("/v1/models/{}", server.model_id())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let max = model["max_model_len"].as_u64().unwrap();
    (server, max)
}

const KV: &str = "coserve_kv_cache_usage_perc";
const FINISHED: &str = "coserve_request_success_total";

/// After the client left: the cache empties, and the request ended as aborted, not by length.
async fn assert_aborted_and_freed(server: &TestServer) {
    let c = client();
    let freed = wait_for_metrics(&c, server.base_url(), Duration::from_secs(10), |t| {
        metric(t, KV, &[]) == 0.0 && metric(t, FINISHED, &["finished_reason=\"abort\""]) == 1.0
    })
    .await;
    let text = metrics_text(&c, server.base_url()).await;
    assert!(freed, "KV cache not freed after the client left:\n{text}");
    assert_eq!(metric(&text, FINISHED, &["finished_reason=\"length\""]), 0.0, "{text}");
}

fn long_request(model: &str, max: u64, stream: bool) -> Value {
    json!({"model": model, "prompt": "Go on", "max_tokens": max - 5, "ignore_eos": true,
        "stream": stream})
}

#[tokio::test]
async fn a_client_leaving_a_stream_aborts_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let (server, max) = long_context_server(&dir).await;
    let c = client();
    let r = c
        .post(server.url("/v1/completions"))
        .json(&long_request(server.model_id(), max, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    for _ in 0..3 {
        body.next().await.expect("a chunk").expect("bytes");
    }
    let text = metrics_text(&c, server.base_url()).await;
    assert!(metric(&text, KV, &[]) > 0.0, "the request holds KV blocks while it runs");
    drop(body);
    assert_aborted_and_freed(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_leaving_a_non_streamed_request_aborts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = long_context_server(&dir).await;
    let c = client();
    let url = server.url("/v1/chat/completions");
    let body = json!({"model": server.model_id(), "messages": [{"role": "user", "content": "Go"}],
        "ignore_eos": true});
    let request = tokio::spawn(async move { client().post(url).json(&body).send().await });
    let running = wait_for_metrics(&c, server.base_url(), Duration::from_secs(10), |t| {
        metric(t, KV, &[]) > 0.0
    })
    .await;
    assert!(running, "the request started");
    // Dropping the in-flight request closes its connection.
    request.abort();
    let _ = request.await;
    assert_aborted_and_freed(&server).await;
    server.stop().await;
}
