//! Durability of fine-tuning across process deaths, with the real binary: after SIGKILL the
//! restarted server finishes the job from its last checkpoint to exactly the adapter an
//! uninterrupted run produces; after SIGTERM the server checkpoints the running job and exits
//! within 30 s; uploaded files, events and models survive both.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::multipart::upload;
use common::tiny_model::{write_gguf, TinyShape};

struct Server {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start(model: &Path, data: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_coserve"))
        .args(["serve", "--port", &port.to_string(), "--threads", "2"])
        .args(["--finetune-mode", "temporal", "--max-train-tokens-per-iter", "1"])
        .args(["--max-bwd-layers-per-iter", "1", "--checkpoint-every", "3"])
        .arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("coserve starts");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{base}/health")).await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, base }
}

async fn get(s: &Server, path: &str) -> Value {
    reqwest::get(format!("{}{path}", s.base)).await.unwrap().json().await.unwrap()
}

async fn create(s: &Server, model: &str, file: &str) -> String {
    let body = json!({"model": model, "training_file": file, "seed": 3,
                      "hyperparameters": {"n_epochs": 12, "batch_size": 2}});
    let r = reqwest::Client::new().post(format!("{}/v1/fine_tuning/jobs", s.base)).json(&body);
    let job: Value = r.send().await.unwrap().json().await.unwrap();
    job["id"].as_str().expect("job id").to_string()
}

async fn wait_for(s: &Server, id: &str, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let j = get(s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        if what(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "timed out: {j}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn latest_step(s: &Server, id: &str) -> i64 {
    let cks = get(s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    cks["data"].get(0).and_then(|c| c["step_number"].as_i64()).unwrap_or(0)
}

fn adapter_bytes(data: &Path, model: &str) -> Vec<u8> {
    let dir: PathBuf = data.join("blobs/models").join(model.replace([':', '/'], "_"));
    std::fs::read(dir.join("adapter_model.safetensors")).expect("saved adapter")
}

fn training_file() -> String {
    (0..4)
        .map(|i| {
            json!({"prompt": format!("fact {i} is"), "completion": format!(" {}", i * 11)})
                .to_string()
                + "\n"
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_sigkill_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_gguf(dir.path(), &TinyShape::default());
    let data = dir.path().join("data");
    let mut s = start(&model, &data).await;
    let model_id = get(&s, "/v1/models").await["data"][0]["id"].as_str().unwrap().to_string();
    let file = upload(&s.base, "facts.jsonl", "fine-tune", training_file().as_bytes()).await;
    let fid = file["id"].as_str().unwrap().to_string();

    // The reference: the same job, never interrupted.
    let reference = create(&s, &model_id, &fid).await;
    let reference = wait_for(&s, &reference, |j| j["status"] == "succeeded").await;

    // SIGKILL after a checkpoint, mid-step.
    let id = create(&s, &model_id, &fid).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while latest_step(&s, &id).await < 6 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let mut s = start(&model, &data).await;
    let done = wait_for(&s, &id, |j| j["status"] == "succeeded" || j["status"] == "failed").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let messages: Vec<&str> =
        events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.starts_with("Server restarted")), "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint at step")),
        "{messages:?}"
    );
    assert!(
        adapter_bytes(&data, done["fine_tuned_model"].as_str().unwrap())
            == adapter_bytes(&data, reference["fine_tuned_model"].as_str().unwrap()),
        "a job resumed after SIGKILL ends with a different adapter than an uninterrupted one"
    );
    // Files and the reference model survived.
    assert_eq!(get(&s, &format!("/v1/files/{fid}")).await["id"], fid.as_str());
    let models = get(&s, "/v1/models").await;
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&reference["fine_tuned_model"].as_str().unwrap()), "{ids:?}");

    // SIGTERM mid-job: a checkpoint at the step it stopped, exit within 30 s, then it completes.
    let id = create(&s, &model_id, &fid).await;
    wait_for(&s, &id, |j| j["trained_tokens"].as_i64().unwrap_or(0) > 0).await;
    let pid = s.child.id().to_string();
    let t = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = s.child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "SIGTERM exit took {:?}", t.elapsed());
    assert!(status.success(), "{status}");
    let s = start(&model, &data).await;
    let done = wait_for(&s, &id, |j| j["status"] == "succeeded" || j["status"] == "failed").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        adapter_bytes(&data, done["fine_tuned_model"].as_str().unwrap())
            == adapter_bytes(&data, reference["fine_tuned_model"].as_str().unwrap()),
        "a job resumed after SIGTERM ends with a different adapter than an uninterrupted one"
    );
    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("coserve_finetune_jobs{model_name="), "{metrics}");
    drop(s);
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
