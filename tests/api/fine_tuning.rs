//! The fine-tuning API over real HTTP on the tiny model: a job's whole life (validation,
//! training, events, checkpoints, result file, the fine-tuned model served at once), bad
//! training files, cancel / pause / resume mid-run, paging, deleting a fine-tuned model.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::multipart::upload;
use common::server::TestServer;
use coserve::config::ServerConfig;
use coserve::engine::hybrid::FinetuneMode;

fn training_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"prompt": format!("Q{i}: what is item {i}?"), "completion": format!(" item {i} is {}", i * 7)})
                .to_string()
                + "\n"
        })
        .collect()
}

/// Slow enough to act on mid-run: one token or backward layer per iteration.
fn slow(cfg: &mut ServerConfig) {
    cfg.finetune_mode = FinetuneMode::Temporal;
    cfg.max_train_tokens_per_iter = 1;
    cfg.max_bwd_layers_per_iter = 1;
    cfg.checkpoint_every = 2;
}

async fn get(s: &TestServer, path: &str) -> (u16, Value) {
    let r = reqwest::get(s.url(path)).await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(s.url(path)).json(&body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn create(s: &TestServer, file: &str, hyper: Value) -> Value {
    let body = json!({
        "model": s.model_id(), "training_file": file, "seed": 7, "suffix": "tiny",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper,
                   "lora": {"r": 4, "alpha": 8}}},
    });
    let (st, job) = post(s, "/v1/fine_tuning/jobs", body).await;
    assert_eq!(st, 200, "{job}");
    job
}

async fn wait_for(s: &TestServer, id: &str, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (st, job) = get(s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        assert_eq!(st, 200);
        if what(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "timed out; job is {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |j| j["status"] == s
}

async fn all_events(s: &TestServer, id: &str) -> Vec<Value> {
    let (_, page) = get(s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    page["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_job_trains_and_its_model_serves_at_once() {
    let s = TestServer::start_tiny(|c| c.checkpoint_every = 3).await;
    let file = upload(s.base_url(), "train.jsonl", "fine-tune", training_jsonl(6).as_bytes()).await;
    let fid = file["id"].as_str().unwrap();
    let job =
        create(&s, fid, json!({"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 20}))
            .await;
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    assert!(job["id"].as_str().unwrap().starts_with("ftjob-"));
    assert_eq!(job["hyperparameters"]["n_epochs"], 4);
    assert_eq!(job["method"]["supervised"]["lora"]["r"], 4);
    let id = job["id"].as_str().unwrap();

    let done = wait_for(&s, id, |j| j["status"] == "succeeded" || j["status"] == "failed").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap().to_string();
    assert!(model.starts_with(&format!("ft:{}:coserve:tiny:", s.model_id())), "{model}");
    assert!(done["trained_tokens"].as_i64().unwrap() > 0);
    assert!(done["finished_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());

    // Events: newest first, 12 steps (3 per epoch) each with metrics, in order.
    let events = all_events(&s, id).await;
    assert_eq!(events[0]["message"], "The job has successfully completed");
    let steps: Vec<i64> = events
        .iter()
        .rev()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| e["data"]["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let messages: Vec<&str> = events.iter().rev().map(|e| e["message"].as_str().unwrap()).collect();
    let pos = |m: &str| {
        messages
            .iter()
            .position(|x| x.starts_with(m))
            .unwrap_or_else(|| panic!("{m}: {messages:?}"))
    };
    assert!(pos("Created fine-tuning job") < pos("Validating training file"));
    assert!(pos("Validating training file") < pos("Files validated"));
    assert!(pos("Files validated") < pos("Fine-tuning job started"));
    assert!(pos("Fine-tuning job started") < pos("Step 1/12"));

    // Paging through events two at a time gives the same list.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let q =
            if after.is_empty() { "limit=2".to_string() } else { format!("limit=2&after={after}") };
        let (_, page) = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?{q}")).await;
        let data = page["data"].as_array().unwrap();
        paged.extend(data.iter().cloned());
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = data.last().unwrap()["id"].as_str().unwrap().to_string();
    }
    assert_eq!(paged, events);

    // Checkpoints every 3 steps, latest first, each servable.
    let (_, cks) = get(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let steps: Vec<i64> = cks["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![12, 9, 6, 3]);
    let ck3 = cks["data"][3]["fine_tuned_model_checkpoint"].as_str().unwrap();
    assert_eq!(ck3, format!("{model}:ckpt-step-3"));

    // The result file: the CSV of step metrics.
    let rf = done["result_files"][0].as_str().unwrap();
    let (_, meta) = get(&s, &format!("/v1/files/{rf}")).await;
    assert_eq!(meta["purpose"], "fine-tune-results");
    let csv = reqwest::get(s.url(&format!("/v1/files/{rf}/content")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("step,train_loss,"), "{csv}");
    assert_eq!(csv.lines().count(), 13);

    // Served at once: listed with its parent, and usable for completions and chat.
    let (_, models) = get(&s, "/v1/models").await;
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&model.as_str()) && ids.contains(&ck3), "{ids:?}");
    let (st, m) = get(&s, &format!("/v1/models/{model}")).await;
    assert_eq!((st, m["parent"].as_str()), (200, Some(s.model_id())));
    let ask = |m: &str| json!({"model": m, "prompt": "Q3: what is item 3?", "max_tokens": 8, "temperature": 0});
    let (st, base) = post(&s, "/v1/completions", ask(s.model_id())).await;
    assert_eq!(st, 200);
    let (st, tuned) = post(&s, "/v1/completions", ask(&model)).await;
    assert_eq!(st, 200, "{tuned}");
    assert_eq!(tuned["model"], model.as_str());
    assert_ne!(
        tuned["choices"][0]["text"], base["choices"][0]["text"],
        "the adapter has an effect"
    );
    let chat =
        json!({"model": ck3, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    assert_eq!(post(&s, "/v1/chat/completions", chat).await.0, 200);
    // Traffic per adapter is visible in the metrics.
    let metrics = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    for lora in [model.as_str(), ck3, ""] {
        let needle = format!("coserve_generation_tokens_total{{lora_name=\"{lora}\"");
        assert!(metrics.contains(&needle), "{needle} not in\n{metrics}");
    }
    assert!(metrics.contains("coserve_finetune_loss{job=\""), "{metrics}");
    assert!(metrics.contains("coserve_iteration_tokens_count{kind=\"train_fwd\""), "{metrics}");

    // Deleting the fine-tuned model: gone from use and listing; the base cannot be deleted.
    let c = reqwest::Client::new();
    let r = c.delete(s.url(&format!("/v1/models/{model}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], true);
    assert_eq!(post(&s, "/v1/completions", ask(&model)).await.0, 404);
    assert_eq!(get(&s, &format!("/v1/models/{model}")).await.0, 404);
    let r = c.delete(s.url(&format!("/v1/models/{}", s.model_id()))).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Listing jobs.
    let (_, jobs) = get(&s, "/v1/fine_tuning/jobs?limit=5").await;
    assert_eq!(jobs["object"], "list");
    assert_eq!(jobs["data"][0]["id"], id);
    s.stop().await;
}

#[tokio::test]
async fn bad_training_files_fail_the_job_with_line_numbers() {
    let s = TestServer::start_tiny(|_| {}).await;
    let bad = format!(
        "{}not json\n{}\n{}\n",
        training_jsonl(1),
        json!({"prompt": "a", "completion": "b", "extra": 1}),
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    );
    let file = upload(s.base_url(), "bad.jsonl", "fine-tune", bad.as_bytes()).await;
    let job = create(&s, file["id"].as_str().unwrap(), json!({})).await;
    let id = job["id"].as_str().unwrap();
    let done = wait_for(&s, id, status_is("failed")).await;
    assert_eq!(done["error"]["code"], "invalid_training_file");
    assert_eq!(done["error"]["param"], "training_file");
    let events = all_events(&s, id).await;
    let text: Vec<&str> = events.iter().map(|e| e["message"].as_str().unwrap()).collect();
    for line in ["line 2", "line 3", "line 4"] {
        assert!(text.iter().any(|m| m.contains(line)), "{line} not reported: {text:?}");
    }
    assert!(!text.iter().any(|m| m.contains("line 1:")), "{text:?}");
    s.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected() {
    let s = TestServer::start_tiny(|_| {}).await;
    let file = upload(s.base_url(), "t.jsonl", "fine-tune", training_jsonl(2).as_bytes()).await;
    let fid = file["id"].as_str().unwrap();
    let model = s.model_id().to_string();
    let cases = [
        (json!({"model": "other", "training_file": fid}), "model"),
        (json!({"model": model, "training_file": "file-nope"}), "training_file"),
        (
            json!({"model": model, "training_file": fid, "validation_file": "file-nope"}),
            "validation_file",
        ),
        (
            json!({"model": model, "training_file": fid, "hyperparameters": {"n_epochs": 0}}),
            "n_epochs",
        ),
        (json!({"model": model, "training_file": fid, "method": {"type": "dpo"}}), "method.type"),
        (json!({"model": model, "training_file": fid, "suffix": "x".repeat(65)}), "suffix"),
        (
            json!({"model": model, "training_file": fid,
                "method": {"type": "supervised", "supervised": {"lora": {"target_modules": ["fc1"]}}}}),
            "method.supervised.lora.target_modules",
        ),
        (
            json!({"model": model, "training_file": fid,
                "method": {"type": "supervised", "supervised": {"lora": {"r": 0}}}}),
            "method.supervised.lora",
        ),
    ];
    for (body, param) in cases {
        let (st, e) = post(&s, "/v1/fine_tuning/jobs", body.clone()).await;
        if param == "n_epochs" {
            // "auto" or a value is only resolved against the file: the job fails instead.
            assert_eq!(st, 200, "{body}");
            let done = wait_for(&s, e["id"].as_str().unwrap(), status_is("failed")).await;
            assert_eq!(done["error"]["param"], "n_epochs");
            continue;
        }
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let (st, e) = get(&s, "/v1/fine_tuning/jobs/ftjob-nope").await;
    assert_eq!(st, 404, "{e}");
    assert_eq!(post(&s, "/v1/fine_tuning/jobs/ftjob-nope/cancel", json!({})).await.0, 404);
    assert_eq!(get(&s, "/v1/fine_tuning/jobs/ftjob-nope/events").await.0, 404);
    assert_eq!(get(&s, "/v1/fine_tuning/jobs?limit=0").await.0, 400);
    s.stop().await;
}

#[tokio::test]
async fn cancel_pause_and_resume_mid_run() {
    let s = TestServer::start_tiny(slow).await;
    let file = upload(s.base_url(), "t.jsonl", "fine-tune", training_jsonl(4).as_bytes()).await;
    let fid = file["id"].as_str().unwrap();
    let hyper = json!({"n_epochs": 40, "batch_size": 2});

    // Cancel mid-run: no model, stays cancelled.
    let job = create(&s, fid, hyper.clone()).await;
    let id = job["id"].as_str().unwrap();
    wait_for(&s, id, |j| j["trained_tokens"].as_i64().unwrap_or(0) > 0).await;
    let (st, c) = post(&s, &format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({})).await;
    assert_eq!((st, c["status"].as_str()), (200, Some("cancelled")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, after) = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(after["status"], "cancelled");
    assert!(after["fine_tuned_model"].is_null());
    assert_eq!(post(&s, &format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({})).await.0, 400);

    // Pause mid-run, resume, and it completes.
    let job = create(&s, fid, hyper).await;
    let id = job["id"].as_str().unwrap();
    wait_for(&s, id, |j| j["trained_tokens"].as_i64().unwrap_or(0) > 0).await;
    let (st, p) = post(&s, &format!("/v1/fine_tuning/jobs/{id}/pause"), json!({})).await;
    assert_eq!((st, p["status"].as_str()), (200, Some("paused")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, paused) = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(paused["status"], "paused");
    let (_, cks) = get(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    assert!(!cks["data"].as_array().unwrap().is_empty(), "pausing saves a checkpoint");
    assert_eq!(post(&s, &format!("/v1/fine_tuning/jobs/{id}/pause"), json!({})).await.0, 400);
    let (st, r) = post(&s, &format!("/v1/fine_tuning/jobs/{id}/resume"), json!({})).await;
    assert_eq!((st, r["status"].as_str()), (200, Some("queued")));
    let done = wait_for(&s, id, status_is("succeeded")).await;
    assert!(done["fine_tuned_model"].is_string());
    let messages: Vec<String> = all_events(&s, id)
        .await
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint")),
        "{messages:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn over_long_examples_fail_unless_truncation_is_asked_for() {
    let s = TestServer::start_tiny(|c| c.kv_cache_memory = 1 << 20).await;
    let (_, m) = get(&s, &format!("/v1/models/{}", s.model_id())).await;
    let context = m["max_model_len"].as_u64().unwrap() as usize;
    // The tiny tokenizer is byte level: one token per byte. Cut, the completion still trains.
    let long = json!({"prompt": "Q", "completion": "y".repeat(context)}).to_string();
    let file = format!("{}{long}\n", training_jsonl(2));
    let f = upload(s.base_url(), "long.jsonl", "fine-tune", file.as_bytes()).await;
    let fid = f["id"].as_str().unwrap();
    let job = create(&s, fid, json!({"n_epochs": 1})).await;
    let failed = wait_for(&s, job["id"].as_str().unwrap(), status_is("failed")).await;
    assert!(failed["error"]["message"].as_str().unwrap().contains("line 3"), "{failed}");

    let body = json!({"model": s.model_id(), "training_file": fid,
                      "method": {"type": "supervised", "supervised": {
                          "hyperparameters": {"n_epochs": 1}, "truncate": true}}});
    let (st, job) = post(&s, "/v1/fine_tuning/jobs", body).await;
    assert_eq!(st, 200, "{job}");
    assert_eq!(job["method"]["supervised"]["truncate"], true);
    let done = wait_for(&s, job["id"].as_str().unwrap(), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    s.stop().await;
}
