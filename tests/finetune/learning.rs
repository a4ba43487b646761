//! The default model learns 20 made-up facts: a job over `facts-train.jsonl` (and its chat
//! variant) with 10 epochs, batch 4 and learning-rate multiplier 5 brings the train loss
//! below 10% of its first value, and the fine-tuned model then completes at least 18 of the
//! 20 prompts with the trained answer (greedy) while the base model completes at most 2; in
//! f32 and with bf16 products.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::multipart::upload;
use common::server::TestServer;
use coserve::backend::cpu::frozen::TrainDtype;

async fn post(s: &TestServer, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new().post(s.url(path)).json(&body).send().await.expect("request");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("json")
}

async fn get(s: &TestServer, path: &str) -> Value {
    reqwest::get(s.url(path)).await.expect("request").json().await.expect("json")
}

/// (prompt, expected answer) of each fact.
fn facts() -> Vec<(String, String)> {
    include_str!("../fixtures/facts-train.jsonl")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["completion"].as_str().unwrap().trim().to_string(),
            )
        })
        .collect()
}

async fn answers(s: &TestServer, model: &str, chat: bool) -> usize {
    let mut right = 0;
    for (prompt, answer) in facts() {
        let text = if chat {
            let body = json!({"model": model, "temperature": 0, "max_tokens": 12,
                              "messages": [{"role": "user", "content": format!("{prompt} ...")}]});
            let r = post(s, "/v1/chat/completions", body).await;
            r["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        } else {
            let body =
                json!({"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 12});
            post(s, "/v1/completions", body).await["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        };
        if text.trim().starts_with(&answer) {
            right += 1;
        }
    }
    right
}

async fn learn(file: &str, chat: bool, train_dtype: TrainDtype) {
    let s = TestServer::start_path(None, |c| {
        c.train_dtype = train_dtype;
        c.max_train_tokens_per_iter = 512;
        c.max_bwd_layers_per_iter = 30;
        c.checkpoint_every = 0;
    })
    .await;
    let content =
        std::fs::read(format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let f = upload(s.base_url(), file, "fine-tune", &content).await;
    let body = json!({
        "model": s.model_id(), "training_file": f["id"], "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters":
            {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 5}}},
    });
    let job = post(&s, "/v1/fine_tuning/jobs", body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let done = loop {
        let j = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(Instant::now() < deadline, "job too slow: {j}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let losses: Vec<f64> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter_map(|e| e["data"]["train_loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 50, "5 steps per epoch for 10 epochs");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!("{file}: train loss {first:.4} -> {last:.4}");
    assert!(last < 0.1 * first, "{file}: train loss {first} -> {last}");

    let tuned = answers(&s, done["fine_tuned_model"].as_str().unwrap(), chat).await;
    let base = answers(&s, s.model_id(), chat).await;
    eprintln!("{file}: fine-tuned {tuned}/20, base {base}/20");
    assert!(tuned >= 18, "{file}: the fine-tuned model answers {tuned} of 20");
    assert!(base <= 2, "{file}: the base model answers {base} of 20");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_facts_from_prompt_completion_pairs() {
    learn("facts-train.jsonl", false, TrainDtype::F32).await;
}

/// bf16 products with the frozen weights (`--train-dtype bf16`) learn the same facts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_facts_with_bf16_products() {
    learn("facts-train.jsonl", false, TrainDtype::Bf16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_facts_from_chats() {
    learn("facts-train-chat.jsonl", true, TrainDtype::F32).await;
}
