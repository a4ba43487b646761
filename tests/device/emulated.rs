//! The CUDA backend's host side run whole without a GPU: `coserve selftest --device cuda`
//! against a stand-in driver and cuBLASLt (`tests/emulation/fake_cuda.cpp`) whose kernel
//! launches run the kernels' own code on the CPU (`tests/emulation/cuda_on_cpu.h`) and whose
//! products follow cuBLASLt's column-major definition. So the launches of `CudaOps` (argument
//! lists, grids, buffer sizes), the cuBLASLt operand mapping, the CUDA-graph capture and the
//! training step on the device are checked against the twins on every machine.
//!
//! Needs the NVRTC toolkit (the kernels are still compiled to PTX first, as on a GPU) and a
//! C++20 compiler; `.ci/run` provides both and sets `COSERVE_REQUIRE_CUDA_TOOLKIT=1`.

use crate::common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use coserve::backend::cuda::kernels::KERNEL_FILES;
use coserve::backend::cuda::toolkit::Toolkit;

use common::device::toolkit_or_skip;
use serde_json::{json, Value};

use common::emulation::{build_fake_driver, build_kernel_library};
use common::multipart::upload;
use common::tiny_model::{write_gguf, TinyShape};

/// The emulated device's folders: (toolkit home, driver, kernel libraries).
struct Emulated {
    home: PathBuf,
    driver: PathBuf,
    kernels: PathBuf,
}

/// Built once per test run under Cargo's scratch folder and shared by the tests: a toolkit
/// folder with the real headers and NVRTC and the stand-in cuBLASLt, the stand-in driver, and
/// every kernel file's emulated library.
fn emulated_device(toolkit: &Toolkit) -> &'static Emulated {
    static BUILT: OnceLock<Emulated> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulated-cuda");
        let _ = std::fs::remove_dir_all(&root);
        let e = Emulated {
            home: root.join("toolkit"),
            driver: root.join("driver"),
            kernels: root.join("kernels"),
        };
        for d in [&e.home.join("lib"), &e.driver, &e.kernels] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        symlink(&toolkit.include, e.home.join("include")).expect("symlink include");
        // NVRTC with every library beside it (it loads its siblings by name).
        let nvrtc_dir = toolkit.nvrtc.parent().expect("NVRTC's folder");
        for entry in std::fs::read_dir(nvrtc_dir).expect("NVRTC's folder").flatten() {
            let name = entry.file_name();
            let n = name.to_string_lossy();
            if n.contains(".so") && !n.contains("cublas") {
                symlink(entry.path(), e.home.join("lib").join(&name)).expect("link");
            }
        }
        build_fake_driver(&e.driver);
        symlink(e.driver.join("libcublasLt.so.13"), e.home.join("lib/libcublasLt.so.13"))
            .expect("link cuBLASLt");
        for f in KERNEL_FILES {
            build_kernel_library(f.name, &e.kernels);
        }
        e
    })
}

/// `coserve` with the emulated device in its environment.
fn coserve_on(e: &Emulated, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_coserve"));
    c.env("LD_LIBRARY_PATH", &e.driver)
        .env("CUDA_HOME", &e.home)
        .env_remove("CUDA_PATH")
        .env("COSERVE_EMULATED_KERNELS", &e.kernels)
        .env("COSERVE_HOME", cache);
    c
}

#[test]
fn the_selftest_passes_on_the_emulated_device() {
    let Some(toolkit) = toolkit_or_skip() else { return };
    let e = emulated_device(&toolkit);
    let root = tempfile::tempdir().expect("tempdir");
    let json = root.path().join("selftest.json");
    let out = coserve_on(e, &root.path().join("cache"))
        // Every suite but the attention kernels' own (paged, tiled chunk, backward: over seven
        // minutes here at their real-model shapes; tests/device/kernels_on_cpu/ checks those
        // kernels at small shapes, and the decoder and training step run them).
        .args(["selftest", "--device", "cuda", "--json"])
        .arg(&json)
        .args([
            "--only",
            "rms_norm_bf16,rope_kv_write_bf16,silu_mul_bf16,embedding_bf16,argmax_logprob_f32,\
             cross_entropy_f32,lora_bf16,lora_dropout,adamw_f32,training utilities,backward_f32,\
             fill_uniform,gemm,decoder_end_to_end,training_step,sample_rows,apply_penalties,\
             mixed step,joined,decoder_graph_replay",
        ])
        .output()
        .expect("run coserve selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "selftest failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON summary")).expect("JSON");
    assert!(report["device"].as_str().unwrap_or("").contains("emulated"), "{report}");
    assert_eq!(report["failed"], 0, "{stdout}");
    let checks = report["checks"].as_array().expect("checks");
    for suite in [
        "add_rms_norm_bf16 (residual)",
        "rope_kv_write_bf16 (k cache)",
        "silu_mul_bf16",
        "embedding_bf16",
        "argmax_logprob_f32 (ids)",
        "cross_entropy_f32 (grad)",
        "lora_shrink_expand_bf16",
        "lora_dropout_bf16",
        "lora_dropout_add_f32",
        "adamw_f32 (exp_avg_sq)",
        "sum_squares_f32",
        "rms_norm_backward_f32",
        "rope_backward_f32",
        "fill_uniform_bf16",
        "sample_rows_f32 (picks)",
        "gemm_bf16",
        "gemm product dY·B (bf16)",
        "decoder_end_to_end (greedy ids)",
        "decoder_cuda_graph (logits)",
        "decoder_graph_replay (logits)",
        "decoder_graph_replay (steps replayed)",
        "decoder_graph_replay (tuned rows)",
        "training_step (weights after AdamW)",
        "attention of a mixed step",
        "LoRA over joined tables",
        "apply_penalties_f32",
    ] {
        assert!(checks.iter().any(|c| c["kernel"] == suite), "no {suite:?} check:\n{stdout}");
    }
}

/// `bench-decode` and `bench-finetune` on the device, as `scripts/gpu-check.sh` runs them, on
/// a device with 3 GiB of memory: what one batch or the co-serving part cannot get fails
/// alone, reported next to the numbers measured.
#[test]
fn the_gpu_benchmarks_run_and_keep_what_they_measured_past_a_failure() {
    let Some(toolkit) = toolkit_or_skip() else { return };
    let e = emulated_device(&toolkit);
    let root = tempfile::tempdir().expect("tempdir");
    let model =
        write_gguf(root.path(), &TinyShape { heads: 2, kv_heads: 1, ..TinyShape::default() });
    let bench = |args: &[&str]| {
        let out = coserve_on(e, &root.path().join("cache"))
            .env("COSERVE_EMULATED_MEMORY", (3u64 << 30).to_string())
            .args(args)
            .args(["--device", "cuda", "--json", "--model"])
            .arg(&model)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: one JSON object on stdout\n{err}"));
        (out.status.success(), json, err)
    };

    // A batch of two million sequences needs 4 GiB for one layer's keys.
    let (ok, v, err) =
        bench(&["bench-decode", "--batch", "1,2000000,2", "--context", "20", "--steps", "1"]);
    assert!(!ok, "a failed batch fails the command:\n{err}");
    assert!(v["device"].as_str().is_some_and(|d| d.contains("3.0 GiB")), "{v}");
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.iter().map(|s| s["batch"].as_u64()).collect::<Vec<_>>(), [Some(1), Some(2)]);
    for s in steps {
        assert!(s["cuda_graph_step_ms"].is_number() && s["tuned_products"].is_object(), "{s}");
        assert!(s["gpu_ms_by_op"].as_array().is_some_and(|o| o.len() > 5), "{s}");
    }
    let errors = v["errors"].as_array().expect("errors");
    assert!(
        errors.len() == 1 && errors[0].as_str().is_some_and(|e| e.starts_with("batch 2000000:")),
        "{v}"
    );
    assert!(err.contains("out of memory"), "{err}");
    // Each batch's line is on stderr as soon as it is measured.
    assert!(err.contains("batch 1: step ") && err.contains("batch 2: step "), "{err}");

    let finetune = [
        "bench-finetune",
        "--seq-len",
        "24",
        "--batch-size",
        "1",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
    ];
    let coserve = ["--context", "20", "--train-tokens-per-iter", "8", "--bwd-layers-per-iter", "1"];
    // A step target far above the step alone: the planner gives each iteration much of the
    // sample, so the planned sizing ends well before its time limit on the emulation.
    let one_sample = ["--coserve-decode-batch", "2", "--coserve-samples", "1"];
    let planned = ["--coserve-step-target", "50"];
    let (ok, v, err) = bench(&[&finetune[..], &coserve, &one_sample, &planned].concat());
    assert!(ok, "{err}");
    assert!(v["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    assert!(err.contains("fine-tuning alone: step "), "{err}");
    let by_op: Vec<&str> = v["gpu_ms_by_op"]
        .as_array()
        .expect("the training step by kind of operation")
        .iter()
        .filter_map(|o| o[0].as_str())
        .collect();
    let ops = ["upload + embedding", "qkv gemm", "lora", "loss (lm_head, cross-entropy)"];
    for op in ops.into_iter().chain(["bwd grad to bf16", "bwd attention", "bwd lora"]) {
        assert!(by_op.contains(&op), "no {op:?} in {by_op:?}");
    }
    assert_eq!(by_op.last(), Some(&"adamw"), "{by_op:?}");
    let coserved = v["coserve_on_device"].as_array().expect("co-serving");
    let sizings: Vec<_> = coserved.iter().map(|c| c["sizing"].as_str()).collect();
    assert_eq!(sizings, [Some("fixed"), Some("step target")], "{v}");
    assert!(v.get("errors").is_none(), "{v}");

    // The co-serving part cannot get its decode batch's caches: the standalone numbers stay.
    let (ok, v, err) =
        bench(&[&finetune[..], &coserve, &["--coserve-decode-batch", "2000000"]].concat());
    assert!(!ok, "{err}");
    assert!(v["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    assert!(v["chunk_attention_on_device"].is_object(), "{v}");
    let errors = v["errors"].as_array().expect("errors");
    assert!(
        errors.len() == 1 && errors[0].as_str().is_some_and(|e| e.starts_with("co-serving:")),
        "{v}"
    );
}

/// `coserve serve --device cuda` on the emulated device, stopped on drop.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_the_emulated_device_samples_and_fine_tunes() {
    let Some(toolkit) = toolkit_or_skip() else { return };
    let e = emulated_device(&toolkit);
    let root = tempfile::tempdir().expect("tempdir");
    // Heads of 32, as the kernels take.
    let model =
        write_gguf(root.path(), &TinyShape { heads: 2, kv_heads: 1, ..TinyShape::default() });
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(root.path().join("serve.log")).expect("log");
    let child = coserve_on(e, &root.path().join("cache"))
        .args(["serve", "--device", "cuda", "--port", &port.to_string()])
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("coserve serve starts");
    let _served = Served(child);
    let base = format!("http://127.0.0.1:{port}");
    let log = || std::fs::read_to_string(root.path().join("serve.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while reqwest::get(format!("{base}/health")).await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the server did not come up:\n{}", log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let c = reqwest::Client::new();
    let models: Value =
        c.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    let model_id = models["data"][0]["id"].as_str().expect("a model").to_string();
    let complete = |body: Value| {
        let c = c.clone();
        let url = format!("{base}/v1/completions");
        async move {
            let r = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };

    // Greedy, sampled with every filter (twice with one seed), and with a penalty: all on the
    // device's forward and picked there.
    let greedy = complete(json!({"model": model_id, "prompt": "hello", "max_tokens": 6,
                                  "temperature": 0, "ignore_eos": true, "logprobs": 2,
                                  "return_tokens_as_token_ids": true}))
    .await;
    assert_eq!(greedy["usage"]["completion_tokens"], 6, "{greedy}");
    let top = &greedy["choices"][0]["logprobs"]["top_logprobs"];
    assert!(
        top.as_array().is_some_and(
            |t| t.len() == 6 && t.iter().all(|m| m.as_object().is_some_and(|o| o.len() == 2))
        ),
        "{greedy}"
    );
    let sampled = json!({"model": model_id, "prompt": "hello", "max_tokens": 8, "seed": 5,
                         "temperature": 0.9, "top_k": 20, "top_p": 0.9, "min_p": 0.02,
                         "ignore_eos": true, "logprobs": 3});
    let (a, b) = (complete(sampled.clone()).await, complete(sampled).await);
    assert_eq!(a["usage"]["completion_tokens"], 8, "{a}");
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "the seed fixes the tokens");
    let penalised = complete(json!({"model": model_id, "prompt": "hello", "max_tokens": 4,
                                     "temperature": 0.7, "presence_penalty": 0.5,
                                     "ignore_eos": true}))
    .await;
    assert_eq!(penalised["usage"]["completion_tokens"], 4, "{penalised}");

    // A fine-tuning job trains on the device, and its model serves at once.
    let lines: String = (0..4)
        .map(|i| {
            json!({"prompt": format!("Q{i}?"), "completion": format!(" A{i}.")}).to_string() + "\n"
        })
        .collect();
    let file = upload(&base, "train.jsonl", "fine-tune", lines.as_bytes()).await;
    let job = json!({"model": model_id, "training_file": file["id"],
                     "method": {"type": "supervised", "supervised": {
                         "hyperparameters": {"n_epochs": 2, "batch_size": 2},
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}}});
    let r = c.post(format!("{base}/v1/fine_tuning/jobs")).json(&job).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    let url = format!("{base}/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let done = loop {
        let j: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {j}\n{}", log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}\n{}", log());
    assert!(done["trained_tokens"].as_i64().unwrap_or(0) > 0, "{done}");
    let tuned = done["fine_tuned_model"].as_str().expect("a fine-tuned model");
    let v =
        complete(json!({"model": tuned, "prompt": "Q1?", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(v["model"], tuned, "{v}");
}
