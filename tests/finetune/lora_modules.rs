//! `serve --lora-modules NAME=DIR`: adapters in the PEFT layout served from the start, as
//! vLLM's flag of the same name does.

use crate::common;

use coserve::config::ServerConfig;
use coserve::lora::{save_peft, LoraConfig, LoraWeights};
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;
use serde_json::{json, Value};

use common::server::TestServer;
use common::tiny_model::{write_gguf, TinyShape};

/// A PEFT adapter for the tiny model whose B is not zero, so that it changes the outputs.
fn write_adapter(model_path: &std::path::Path, dir: &std::path::Path) {
    let config = load_model(model_path, WeightsDtype::F32).expect("tiny model").model.config;
    let mut w =
        LoraWeights::init(&LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }, &config, 3);
    for (i, p) in w.pairs_mut().enumerate() {
        p.b = (0..p.b.len()).map(|j| ((i * 7 + j) as f32 * 0.61).sin()).collect();
    }
    save_peft(dir, &w, "tiny").expect("adapter saved");
}

async fn greedy(server: &TestServer, model: &str) -> Value {
    let body = json!({"model": model, "prompt": "abc", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true});
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    r.json().await.expect("json")
}

#[tokio::test]
async fn adapters_given_at_start_are_listed_and_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_gguf(dir.path(), &TinyShape::default());
    let adapter = dir.path().join("adapter");
    write_adapter(&model, &adapter);
    let server = TestServer::start_model(&model, |c| {
        c.lora_modules = vec![("mine".into(), adapter.clone())];
    })
    .await;

    let models: Value = reqwest::get(server.url("/v1/models")).await.unwrap().json().await.unwrap();
    let entry = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "mine").cloned();
    let entry = entry.unwrap_or_else(|| panic!("mine is listed: {models}"));
    assert_eq!(entry["parent"], server.model_id());

    let (base, tuned) = (greedy(&server, server.model_id()).await, greedy(&server, "mine").await);
    assert_eq!(tuned["model"], "mine");
    assert_ne!(base["choices"][0]["text"], tuned["choices"][0]["text"], "the adapter is applied");
    server.stop().await;
}

#[tokio::test]
async fn a_bad_adapter_is_a_startup_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_gguf(dir.path(), &TinyShape::default());
    let missing = dir.path().join("no-such-adapter");
    let mut cfg = ServerConfig::for_model(Some(model.clone()));
    cfg.port = 0;
    cfg.data_dir = Some(dir.path().join("data"));
    cfg.lora_modules = vec![("mine".into(), missing.clone())];
    let err = coserve::server::start(cfg.clone()).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("mine") && msg.contains("no-such-adapter"), "{msg}");

    // A name taken twice is refused too.
    let adapter = dir.path().join("adapter");
    write_adapter(&model, &adapter);
    cfg.lora_modules = vec![("a".into(), adapter.clone()), ("a".into(), adapter)];
    let err = coserve::server::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("already served"), "{err}");
}
