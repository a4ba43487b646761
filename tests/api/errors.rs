//! Every error class of the HTTP API, over real HTTP: status, OpenAI error body, `type`,
//! `param`, Retry-After. Engine states that a real engine cannot be put in on demand (stopped,
//! failing) use the real router in front of a stand-in engine.

use crate::common;
use crate::support;

use coserve::engine::hybrid::FinetuneMode;
use coserve::finetune::manager::{JobManager, ManagerConfig, ManagerDeps};
use coserve::lora::AdapterRegistry;
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use serde_json::{json, Value};

use common::server::TestServer;
use common::tiny_model::{write_gguf, write_hf_dir, TinyShape};
use coserve::api::{router, AppState};
use coserve::engine::handle::SharedCounters;
use coserve::engine::{EngineCommand, EngineEvent, EngineHandle};
use coserve::metrics::Metrics;
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;
use coserve::model::ModelInfo;
use coserve::store::Store;
use support::{assert_error, client, sse_payloads};

struct Shared {
    base: String,
    model: String,
    max_model_len: usize,
}

/// One server for the validation tests.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        support::on_background_runtime(|| async {
            let server = TestServer::start_tiny(|c| c.kv_cache_memory = 64 << 20).await;
            let model: Value = client()
                .get(server.url(&format!("/v1/models/{}", server.model_id())))
                .send()
                .await
                .expect("GET model")
                .json()
                .await
                .expect("model JSON");
            let shared = Shared {
                base: server.base_url().to_string(),
                model: server.model_id().to_string(),
                max_model_len: model["max_model_len"].as_u64().expect("max_model_len") as usize,
            };
            std::mem::forget(server);
            shared
        })
    })
}

async fn post_raw(path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    client()
        .post(format!("{}{path}", shared().base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request")
}

/// Posts `body` (with the served model unless it names one) and expects a 400 naming `param`.
async fn expect_400(path: &str, mut body: Value, param: Option<&str>) -> Value {
    if body.get("model").is_none() {
        body["model"] = json!(shared().model);
    }
    let r = post_raw(path, body.to_string()).await;
    assert_error(r, 400, param).await
}

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn out_of_range_sampling_fields_name_the_param() {
    let cases = [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 100000}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": -3}), "max_tokens"),
        (json!({"top_k": -5}), "top_k"),
        (json!({"min_p": 2}), "min_p"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stop_token_ids": [1000000]}), "stop_token_ids"),
        (json!({"stream_options": {"include_usage": true}}), "stream_options"),
    ];
    for (fields, param) in cases {
        for path in [COMPLETIONS, CHAT] {
            let mut body = if path == CHAT {
                json!({"messages": user("hi")})
            } else {
                json!({"prompt": "hi"})
            };
            for (k, v) in fields.as_object().unwrap() {
                body[k] = v.clone();
            }
            expect_400(path, body, Some(param)).await;
        }
    }
}

#[tokio::test]
async fn completions_specific_fields() {
    for (body, param) in [
        (json!({"prompt": "hi", "logprobs": 6}), "logprobs"),
        (json!({"prompt": "hi", "logprobs": -1}), "logprobs"),
        (json!({"prompt": "hi", "suffix": "end"}), "suffix"),
        (json!({"prompt": "hi", "best_of": 3}), "best_of"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": ["ok", ""]}), "prompt"),
        (json!({"prompt": [[]]}), "prompt"),
        (json!({"prompt": [1, 100000]}), "prompt"),
        (json!({"prompt": [[1], [-1]]}), "prompt"),
        (json!({"prompt": {"text": "hi"}}), "prompt"),
        (json!({"max_tokens": 3}), "prompt"),
    ] {
        expect_400(COMPLETIONS, body, Some(param)).await;
    }
    // best_of equal to n is accepted.
    let ok =
        json!({"model": shared().model, "prompt": "hi", "n": 2, "best_of": 2, "max_tokens": 1});
    assert_eq!(post_raw(COMPLETIONS, ok.to_string()).await.status(), 200);
}

#[tokio::test]
async fn chat_specific_fields() {
    for (body, param) in [
        (json!({"messages": []}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "http://x/y.png"}}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"messages": user("hi"), "top_logprobs": 21, "logprobs": true}), "top_logprobs"),
        (json!({"messages": user("hi"), "top_logprobs": 2}), "top_logprobs"),
        (json!({"messages": user("hi"), "max_completion_tokens": 0}), "max_completion_tokens"),
    ] {
        expect_400(CHAT, body, Some(param)).await;
    }
}

#[tokio::test]
async fn context_length_is_enforced_with_vllm_messages() {
    let max = shared().max_model_len;
    let long = "a".repeat(max);
    let e = expect_400(COMPLETIONS, json!({"prompt": long}), Some("prompt")).await;
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains(&format!("maximum context length is {max} tokens")));

    let prompt = "a".repeat(max - 10);
    let e =
        expect_400(COMPLETIONS, json!({"prompt": prompt, "max_tokens": 20}), Some("max_tokens"))
            .await;
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "you requested {} tokens ({} in the prompt, 20 in the completion)",
            max + 10,
            max - 10
        )),
        "{message}"
    );

    expect_400(CHAT, json!({"messages": user(&long)}), Some("messages")).await;
    expect_400(CHAT, json!({"messages": user("hi"), "max_tokens": max}), Some("max_tokens")).await;
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400s() {
    for body in ["{\"prompt\": ", "", "not json", "{\"prompt\": \"x\"} {}"] {
        assert_error(post_raw(COMPLETIONS, body.to_string()).await, 400, None).await;
    }
    let e =
        expect_400(COMPLETIONS, json!({"prompt": "x", "temperature": "hot"}), Some("temperature"))
            .await;
    assert!(e["message"].as_str().unwrap().contains("temperature"));
    expect_400(COMPLETIONS, json!({"prompt": "x", "stream": "yes"}), Some("stream")).await;
    expect_400(
        CHAT,
        json!({"messages": [{"role": "user", "content": 5}]}),
        Some("messages[0].content"),
    )
    .await;
    expect_400(CHAT, json!({"messages": user("x"), "n": 1.5}), Some("n")).await;
}

#[tokio::test]
async fn odd_bodies_never_get_a_server_error() {
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bodies = [
        "[]".to_string(),
        "null".into(),
        "\"prompt\"".into(),
        nested,
        r#"{"prompt": "x", "max_tokens": 1e400}"#.into(),
        r#"{"prompt": "x", "n": 9223372036854775808}"#.into(),
        r#"{"prompt": "x", "max_tokens": 9223372036854775807}"#.into(),
        r#"{"prompt": "x", "temperature": 1e308}"#.into(),
        r#"{"prompt": [4294967295]}"#.into(),
        r#"{"prompt": "\ud800"}"#.into(),
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}"#.into(),
        r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#.into(),
        r#"{"messages": [{"role": "assistant", "content": null}], "max_tokens": 1}"#.into(),
    ];
    for body in &bodies {
        for path in [COMPLETIONS, CHAT] {
            let r = post_raw(path, body.clone()).await;
            let status = r.status().as_u16();
            assert!((400..500).contains(&status) || status == 200, "{path} {body:.80}: {status}");
            if status != 200 {
                let v: Value = r.json().await.expect("JSON error body");
                support::assert_schema(&v, "ErrorResponse");
            }
        }
    }
    let invalid_utf8: Vec<u8> = vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'];
    assert_error(post_raw(COMPLETIONS, invalid_utf8).await, 400, None).await;
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    for (path, body) in
        [(COMPLETIONS, json!({"prompt": "x"})), (CHAT, json!({"messages": user("x")}))]
    {
        let mut body = body;
        body["model"] = json!("no-such-model");
        let r = post_raw(path, body.to_string()).await;
        let e = assert_error(r, 404, Some("model")).await;
        assert_eq!(e["code"], "model_not_found");
        assert!(e["message"].as_str().unwrap().contains("no-such-model"));
    }
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_json() {
    let c = client();
    let base = &shared().base;
    let r = c.get(format!("{base}/v1/nope")).send().await.unwrap();
    assert_error(r, 404, None).await;
    let r = c.post(format!("{base}/v2/completions")).body("{}").send().await.unwrap();
    assert_error(r, 404, None).await;
    let r = c.get(format!("{base}/v1/completions")).send().await.unwrap();
    assert_error(r, 405, None).await;
    let r = c.post(format!("{base}/v1/models")).send().await.unwrap();
    assert_error(r, 405, None).await;
    let r = c.delete(format!("{base}/health")).send().await.unwrap();
    assert_error(r, 405, None).await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = TestServer::start_tiny(|c| {
        c.kv_cache_memory = 64 << 20;
        c.max_num_seqs = 1;
        c.max_waiting = 1;
    })
    .await;
    let c = client();
    let long = json!({"model": server.model_id(), "prompt": "a", "max_tokens": 1000,
        "ignore_eos": true, "stream": true});
    let url = server.url(COMPLETIONS);
    // A runs (its first chunk arrived), B waits, C finds the queue full.
    let a = c.post(&url).json(&long).send().await.unwrap();
    let mut a_body = a.bytes_stream();
    a_body.next().await.expect("first chunk of A").expect("bytes");
    let b = c.post(&url).json(&long).send().await.unwrap();
    assert_eq!(b.status(), 200);
    let short = json!({"model": server.model_id(), "prompt": "a", "max_tokens": 1});
    let r = c.post(&url).json(&short).send().await.unwrap();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let e = assert_error(r, 429, None).await;
    assert_eq!(e["code"], "queue_full");
    let retry: u64 = retry.expect("Retry-After header").parse().expect("seconds");
    assert!(retry >= 1);
    drop((a_body, b));
    server.stop().await;
}

#[tokio::test]
async fn a_model_without_chat_template_refuses_chat_only() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_hf_dir(dir.path(), &TinyShape::default());
    let config_path = model_dir.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let server = TestServer::start_model(&model_dir, |c| c.kv_cache_memory = 64 << 20).await;
    let c = client();
    let body = json!({"model": server.model_id(), "messages": user("hi")});
    let r = c.post(server.url(CHAT)).json(&body).send().await.unwrap();
    let e = assert_error(r, 400, None).await;
    assert!(e["message"].as_str().unwrap().contains("chat template"), "{e}");
    let body = json!({"model": server.model_id(), "prompt": "hi", "max_tokens": 2});
    assert_eq!(c.post(server.url(COMPLETIONS)).json(&body).send().await.unwrap().status(), 200);
    server.stop().await;
}

/// The real router over the tiny model's tokenizer, with `engine` as its engine.
async fn stand_in_server(engine: EngineHandle, max_body_bytes: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&write_gguf(dir.path(), &TinyShape::default()), WeightsDtype::F32)
        .expect("tiny model");
    let store = Arc::new(Store::open(&dir.path().join("data")).expect("store"));
    let tokenizer = Arc::new(loaded.tokenizer);
    let chat_template = loaded.chat_template.map(Arc::new);
    let adapters: Arc<AdapterRegistry> = Default::default();
    let metrics = Arc::new(Metrics::new("tiny"));
    let jobs = JobManager::start(
        ManagerDeps {
            store: store.clone(),
            engine: engine.clone(),
            tokenizer: tokenizer.clone(),
            chat_template: chat_template.clone(),
            base_model: "tiny".into(),
            model_config: loaded.model.config.clone(),
            adapters: adapters.clone(),
            metrics: metrics.clone(),
        },
        ManagerConfig {
            checkpoint_every: 0,
            max_concurrent_jobs: 1,
            mode: FinetuneMode::Coserve,
            max_len: 1024,
        },
    )
    .await
    .expect("job manager");
    let state = AppState {
        engine,
        tokenizer,
        chat_template,
        model: ModelInfo {
            id: "tiny".into(),
            created: 0,
            max_model_len: 1024,
            owned_by: "t".into(),
        },
        metrics,
        max_body_bytes,
        adapters,
        jobs,
        store,
        max_upload_bytes: 1 << 20,
        no_training_reason: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(state))).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_stopped_engine_answers_503() {
    let (tx, rx) = flume::unbounded();
    drop(rx);
    let base =
        stand_in_server(EngineHandle::new(tx, Arc::new(SharedCounters::default()), 8), 1 << 20)
            .await;
    let c = client();
    let r =
        c.post(format!("{base}{COMPLETIONS}")).json(&json!({"prompt": "hi"})).send().await.unwrap();
    let e = assert_error(r, 503, None).await;
    assert_eq!(e["type"], "server_error");
    let r = c
        .post(format!("{base}{CHAT}"))
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_error(r, 503, None).await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_json() {
    let (tx, _rx) = flume::unbounded();
    let base =
        stand_in_server(EngineHandle::new(tx, Arc::new(SharedCounters::default()), 8), 1024).await;
    let body = json!({"prompt": "x".repeat(4096)}).to_string();
    let r = client().post(format!("{base}{COMPLETIONS}")).body(body).send().await.unwrap();
    let e = assert_error(r, 413, None).await;
    assert!(e["message"].as_str().unwrap().contains("1024"));
}

#[tokio::test]
async fn engine_failures_are_server_errors_or_stream_error_events() {
    let (tx, rx) = flume::unbounded::<EngineCommand>();
    std::thread::spawn(move || {
        while let Ok(cmd) = rx.recv() {
            if let EngineCommand::Submit { events, .. } = cmd {
                let _ = events.send(EngineEvent::Error("the device fell over".into()));
            }
        }
    });
    let base =
        stand_in_server(EngineHandle::new(tx, Arc::new(SharedCounters::default()), 8), 1 << 20)
            .await;
    let c = client();
    let r =
        c.post(format!("{base}{COMPLETIONS}")).json(&json!({"prompt": "hi"})).send().await.unwrap();
    let e = assert_error(r, 500, None).await;
    assert!(e["message"].as_str().unwrap().contains("the device fell over"));

    let r = c
        .post(format!("{base}{CHAT}"))
        .json(&json!({"messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let payloads = sse_payloads(&r.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    support::assert_schema(&error, "ErrorResponse");
    assert_eq!(error["error"]["type"], "server_error");
}
