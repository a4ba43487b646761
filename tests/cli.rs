//! The command line: documented flags, env vars, and clear errors instead of panics.

use std::process::Command;

fn coserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coserve"))
}

#[test]
fn serve_help_documents_every_flag_and_its_env_var() {
    let out = coserve().args(["serve", "--help"]).output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--model", "COSERVE_MODEL"),
        ("--host", "COSERVE_HOST"),
        ("--port", "COSERVE_PORT"),
        ("--data-dir", "COSERVE_DATA_DIR"),
        ("--served-model-name", "COSERVE_SERVED_MODEL_NAME"),
        ("--device", "COSERVE_DEVICE"),
        ("--lora-modules", "COSERVE_LORA_MODULES"),
        ("--max-num-batched-tokens", "COSERVE_MAX_NUM_BATCHED_TOKENS"),
        ("--max-num-seqs", "COSERVE_MAX_NUM_SEQS"),
        ("--max-waiting", "COSERVE_MAX_WAITING"),
        ("--kv-cache-memory", "COSERVE_KV_CACHE_MEMORY"),
        ("--threads", "COSERVE_THREADS"),
        ("--max-upload-bytes", "COSERVE_MAX_UPLOAD_BYTES"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(help.contains(env), "{env} missing from --help:\n{help}");
    }
}

#[test]
fn bad_model_and_bad_flags_give_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF but not really").expect("write");
    let data = dir.path().join("data");
    let out = coserve()
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(&data)
        .arg("--model")
        .arg(&bogus)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus.gguf") && !err.contains("panicked"), "{err}");

    // A data dir that cannot be created is a startup error naming it.
    let out = coserve()
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(bogus.join("data"))
        .arg("--model")
        .arg(&bogus)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data directory") && !err.contains("panicked"), "{err}");

    let out = coserve().args(["serve", "--kv-cache-memory", "lots"]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lots") && !err.contains("panicked"), "{err}");

    let out = coserve().env("COSERVE_MAX_NUM_SEQS", "many").args(["serve"]).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("many"));
}

#[test]
fn bench_finetune_rejects_a_step_target_below_the_step_alone() {
    for target in ["0.5", "NaN", "-1"] {
        let out = coserve()
            .args(["bench-finetune", "--device", "cuda"])
            .arg(format!("--coserve-step-target={target}"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target}: {err}");
        assert!(
            err.contains("must be 0 (skip) or at least 1") && !err.contains("panicked"),
            "{err}"
        );
    }
}

#[test]
fn bench_decode_runs_dummy_weights_and_rejects_bad_sizes() {
    let out = coserve()
        .args(["bench-decode", "--dummy-weights", "smollm2-135m", "--batch", "1,3"])
        .args(["--context", "20", "--steps", "1", "--threads", "2", "--json"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["model"], "dummy smollm2-135m");
    assert_eq!(v["context"], 20);
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for (s, batch) in steps.iter().zip([1, 3]) {
        assert_eq!(s["batch"], batch);
        assert!(s["step_ms"].as_f64().is_some_and(|t| t > 0.0), "{s}");
        // Weights (f32, tied embeddings) plus 21 cached rows per sequence of K and V.
        let kv = batch * 21 * 30 * 2 * 3 * 64 * 4;
        assert_eq!(s["bytes_read"].as_u64(), Some(537_919_488 + kv as u64), "{s}");
    }

    for (args, msg) in [
        (&["--batch", "0"][..], "every --batch must be at least 1"),
        (&["--context", "100000"][..], "leaves no room for a decode"),
        (&["--steps", "0"][..], "--steps must be at least 1"),
    ] {
        let out = coserve()
            .args(["bench-decode", "--dummy-weights", "smollm2-135m"])
            .args(args)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(msg), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
