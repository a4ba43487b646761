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
