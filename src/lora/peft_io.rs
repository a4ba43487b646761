//! The Hugging Face PEFT layout (`adapter_config.json` + `adapter_model.safetensors`), so our
//! adapters load in PEFT and vLLM unchanged and theirs load here, plus the optimizer state
//! saved next to a checkpoint so an interrupted job resumes exactly.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use serde_json::{json, Map, Value};

use super::adapter::LoraWeights;
use super::config::{LoraConfig, TargetModule};
use super::optim::{AdamW, AdamWConfig};
use crate::model::config::LlamaConfig;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Every error names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: not a valid safetensors file: {source}", path.display())]
    Safetensors { path: PathBuf, source: SafeTensorError },
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io { path: path.to_path_buf(), source }
}

fn invalid(path: &Path, what: impl Into<String>) -> PeftError {
    PeftError::Invalid { path: path.to_path_buf(), what: what.into() }
}

fn unsupported(path: &Path, what: impl Into<String>) -> PeftError {
    PeftError::Unsupported { path: path.to_path_buf(), what: what.into() }
}

/// The key PEFT gives a LoRA matrix of a `LlamaForCausalLM` (the `PeftModel` wraps the causal
/// LM, which wraps the decoder `model`); `which` is `lora_A` or `lora_B`.
pub fn tensor_name(layer: usize, module: TargetModule, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{which}.weight", module.path())
}

/// Writes `bytes` to `dir/name` so that a crash leaves either the old file or the new one:
/// temp file, fsync, rename, fsync of the directory (which makes the rename durable).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), PeftError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Serialises named f32 tensors (little-endian, as safetensors stores them).
fn serialize_f32(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, &[f32])>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, PeftError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, d)| (n, s, d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let st_err = |source| PeftError::Safetensors { path: path.to_path_buf(), source };
    let views = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.as_str(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(st_err)?;
    safetensors::serialize(views, Some(metadata)).map_err(st_err)
}

/// Every tensor of `w` as (name + suffix, shape, data), A before B, in (layer, module) order.
fn named_tensors<'a>(w: &'a LoraWeights, suffix: &str) -> Vec<(String, Vec<usize>, &'a [f32])> {
    let r = w.config.r;
    let mut out = Vec::new();
    for (l, layer) in w.layers.iter().enumerate() {
        for m in TargetModule::ALL {
            let Some(p) = &layer[m.index()] else { continue };
            let a = (tensor_name(l, m, "lora_A") + suffix, vec![r, p.in_dim], p.a.as_slice());
            let b = (tensor_name(l, m, "lora_B") + suffix, vec![p.out_dim, r], p.b.as_slice());
            out.extend([a, b]);
        }
    }
    out
}

/// A float as PEFT's Python config holds it: integral values as ints (`lora_alpha: 32`), the
/// rest by their shortest decimal form (0.05, not 0.05000000074505806).
fn py_number(x: f32, integral_as_int: bool) -> Value {
    if integral_as_int && x.fract() == 0.0 && x.abs() < 1e9 {
        return Value::from(x as i64);
    }
    Value::from(x.to_string().parse::<f64>().unwrap_or(x as f64))
}

fn adapter_config_json(c: &LoraConfig, base_model: &str) -> Value {
    let mut targets: Vec<&str> = c.target_modules.iter().map(|m| m.name()).collect();
    targets.sort_unstable();
    targets.dedup();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": c.r,
        "lora_alpha": py_number(c.alpha, true),
        "lora_dropout": py_number(c.dropout, false),
        "target_modules": targets,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Writes `adapter` in the PEFT layout into `dir` (created if needed). The weights go first,
/// so a directory holding a config always holds the matching weights.
pub fn save_peft(dir: &Path, adapter: &LoraWeights, base_model: &str) -> Result<(), PeftError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    // transformers and PEFT mark their safetensors files with this; some loaders check it.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = serialize_f32(&weights_path, named_tensors(adapter, ""), metadata)?;
    write_atomic(dir, ADAPTER_WEIGHTS, &bytes)?;
    // PEFT writes its config with sorted keys and a 2-space indent; serde_json's map is sorted.
    let config = adapter_config_json(&adapter.config, base_model);
    let text = serde_json::to_string_pretty(&config)
        .map_err(|source| PeftError::Json { path: dir.join(ADAPTER_CONFIG), source })?;
    write_atomic(dir, ADAPTER_CONFIG, text.as_bytes())
}

/// True when an option is absent or at its "off" value (null, false, empty).
fn is_unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Options that change what the adapter computes or which weights it has; any of them set
/// means we would serve something other than what was trained.
const UNSUPPORTED_OPTIONS: [(&str, &str); 11] = [
    ("use_rslora", "rank-stabilised scaling"),
    ("use_dora", "DoRA"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("modules_to_save", "fully trained extra modules"),
    ("layers_to_transform", "adapting only some layers"),
    ("exclude_modules", "excluded modules"),
    ("layer_replication", "layer replication"),
    ("lora_bias", "LoRA bias terms"),
    ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ("trainable_token_indices", "trainable token embeddings"),
];

/// PEFT's `target_modules` may be a regex string matched against full module paths. Accept the
/// simple ones that only name projections (`q_proj`, `.*\.(q_proj|v_proj)$`, `all-linear`).
fn targets_from_pattern(s: &str) -> Option<Vec<TargetModule>> {
    if s == "all-linear" {
        return Some(TargetModule::ALL.to_vec());
    }
    let mut p = s.strip_suffix('$').unwrap_or(s);
    for prefix in [r".*\.", ".*"] {
        if let Some(rest) = p.strip_prefix(prefix) {
            p = rest;
            break;
        }
    }
    if let Some(inner) = p.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        p = inner;
    }
    p.split('|').map(TargetModule::from_name).collect()
}

fn parse_targets(path: &Path, v: Option<&Value>) -> Result<Vec<TargetModule>, PeftError> {
    let known = || TargetModule::ALL.map(|m| m.name()).join(", ");
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let name = item.as_str().ok_or_else(|| {
                    invalid(path, format!("target_modules must hold strings, found {item}"))
                })?;
                TargetModule::from_name(name).ok_or_else(|| {
                    unsupported(path, format!("target module {name:?} (supported: {})", known()))
                })
            })
            .collect(),
        Some(Value::String(s)) => targets_from_pattern(s).ok_or_else(|| {
            let what = format!(
                "target_modules pattern {s:?}: only patterns that just list module names ({})",
                known()
            );
            unsupported(path, what)
        }),
        None | Some(Value::Null) => Err(invalid(path, "target_modules is missing")),
        Some(other) => {
            Err(invalid(path, format!("target_modules must be a list or a string, found {other}")))
        }
    }
}

/// Reads and checks `adapter_config.json`; returns the adapter's hyperparameters.
fn read_config(path: &Path) -> Result<LoraConfig, PeftError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|source| PeftError::Json { path: path.to_path_buf(), source })?;
    let obj: &Map<String, Value> =
        v.as_object().ok_or_else(|| invalid(path, "expected a JSON object"))?;
    match obj.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(Value::String(t)) => {
            return Err(unsupported(path, format!("peft_type {t:?} (only \"LORA\")")))
        }
        None => return Err(invalid(path, "peft_type is missing")),
        Some(other) => return Err(invalid(path, format!("peft_type must be a string: {other}"))),
    }
    for (key, what) in UNSUPPORTED_OPTIONS {
        if !is_unset(obj.get(key)) {
            let value = obj.get(key).map(Value::to_string).unwrap_or_default();
            return Err(unsupported(path, format!("{key} = {value} ({what})")));
        }
    }
    // These initialisations also rewrite the base weights, so the adapter is only valid
    // against a base model we do not have (PEFT can convert them to plain LoRA on save).
    if let Some(Value::String(init)) = obj.get("init_lora_weights") {
        if ["pissa", "olora", "corda"].iter().any(|p| init.to_lowercase().starts_with(p)) {
            let what = format!("init_lora_weights = {init:?} (needs a modified base model)");
            return Err(unsupported(path, what));
        }
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(other) => return Err(unsupported(path, format!("bias = {other} (only \"none\")"))),
    }
    // Absent numbers take PEFT's defaults, as PEFT itself would when loading this file.
    let number = |key: &str, default: f64| -> Result<f64, PeftError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| invalid(path, format!("{key} must be a number, found {v}"))),
        }
    };
    let r = match obj.get("r") {
        None | Some(Value::Null) => 8,
        Some(v) => v
            .as_u64()
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| invalid(path, format!("r must be a positive integer, found {v}")))?,
    };
    let config = LoraConfig {
        r,
        alpha: number("lora_alpha", 8.0)? as f32,
        dropout: number("lora_dropout", 0.0)? as f32,
        target_modules: parse_targets(path, obj.get("target_modules"))?,
    };
    config.validated().map_err(|e| invalid(path, e.to_string()))
}

fn read_safetensors(path: &Path) -> Result<Vec<u8>, PeftError> {
    fs::read(path).map_err(io_err(path))
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, PeftError> {
    SafeTensors::deserialize(bytes)
        .map_err(|source| PeftError::Safetensors { path: path.to_path_buf(), source })
}

/// Converts one stored tensor to f32 after checking its shape and dtype.
fn tensor_f32(
    path: &Path,
    name: &str,
    view: &TensorView<'_>,
    shape: [usize; 2],
    allow_half: bool,
) -> Result<Vec<f32>, PeftError> {
    if view.shape() != shape {
        let what = format!("tensor {name}: shape {:?}, expected {shape:?}", view.shape());
        return Err(invalid(path, what));
    }
    let width = match view.dtype() {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 if allow_half => 2,
        other => {
            let allowed = if allow_half { "F32, F16 or BF16" } else { "F32" };
            let what = format!("tensor {name}: dtype {other:?} (expected {allowed})");
            return Err(unsupported(path, what));
        }
    };
    let data = view.data();
    if data.len() != shape[0] * shape[1] * width {
        let what = format!("tensor {name}: {} bytes for shape {shape:?}", data.len());
        return Err(invalid(path, what));
    }
    Ok(match view.dtype() {
        Dtype::F16 => {
            data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        Dtype::BF16 => {
            data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        _ => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    })
}

/// Why a tensor name is not one we expect, as precisely as the name allows.
fn unexpected_tensor(name: &str, w: &LoraWeights) -> String {
    let layer = name
        .strip_prefix("base_model.model.model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let module = TargetModule::ALL.into_iter().find(|m| name.contains(&format!(".{}.", m.path())));
    match (layer, module) {
        (Some(l), _) if l >= w.layers.len() => {
            format!("tensor {name} is for layer {l}, but the model has {} layers", w.layers.len())
        }
        (Some(_), Some(m)) if !w.config.targets(m) => {
            format!("tensor {name} adapts {}, which is not in target_modules", m.name())
        }
        _ => format!("unexpected tensor {name}"),
    }
}

/// Fills every matrix of each `(suffix, weights)` from `st`, then rejects any tensor in the
/// file that none of them expects.
fn fill_from(
    path: &Path,
    st: &SafeTensors<'_>,
    outs: &mut [(&str, &mut LoraWeights)],
    allow_half: bool,
) -> Result<(), PeftError> {
    let mut known = HashSet::new();
    for (suffix, w) in outs.iter_mut() {
        let r = w.config.r;
        for (l, layer) in w.layers.iter_mut().enumerate() {
            for m in TargetModule::ALL {
                let Some(p) = layer[m.index()].as_mut() else { continue };
                let (in_dim, out_dim) = (p.in_dim, p.out_dim);
                for (which, shape, dst) in
                    [("lora_A", [r, in_dim], &mut p.a), ("lora_B", [out_dim, r], &mut p.b)]
                {
                    let name = tensor_name(l, m, which) + suffix;
                    let view = st.tensor(&name).map_err(|_| {
                        invalid(path, format!("tensor {name} is missing (shape {shape:?})"))
                    })?;
                    *dst = tensor_f32(path, &name, &view, shape, allow_half)?;
                    known.insert(name);
                }
            }
        }
    }
    let mut names = st.names();
    names.sort_unstable();
    match (names.into_iter().find(|n| !known.contains(*n)), outs.first()) {
        (Some(extra), Some((_, w))) => Err(invalid(path, unexpected_tensor(extra, w))),
        _ => Ok(()),
    }
}

/// Loads a PEFT LoRA adapter for a model of shape `model`, checking every tensor. f16 and
/// bf16 weights are widened to f32.
pub fn load_peft(dir: &Path, model: &LlamaConfig) -> Result<LoraWeights, PeftError> {
    let config = read_config(&dir.join(ADAPTER_CONFIG))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.exists() && dir.join("adapter_model.bin").exists() {
        let what = "adapter_model.bin (pickled PyTorch); save the adapter with safetensors";
        return Err(unsupported(&dir.join("adapter_model.bin"), what));
    }
    let bytes = read_safetensors(&path)?;
    let st = parse_safetensors(&path, &bytes)?;
    let mut w = LoraWeights::zeros(&config, model);
    fill_from(&path, &st, &mut [("", &mut w)], true)?;
    Ok(w)
}

const STEP_KEY: &str = "step";
const ADAMW_KEY: &str = "adamw";
const EXTRA_KEY: &str = "extra";

/// Saves the optimizer moments (`<adapter tensor>.exp_avg` / `.exp_avg_sq`, f32), its step
/// and hyperparameters and the caller's `extra` JSON (data position, RNG state ...) in one
/// safetensors file, atomically.
pub fn save_training_state(path: &Path, opt: &AdamW, extra: &Value) -> Result<(), PeftError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(invalid(path, "not a file path"));
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let c = opt.config;
    // f32 -> f64 is exact and serde_json round-trips f64 exactly, so resuming is bit-exact.
    let adamw = json!({
        "beta1": c.beta1 as f64,
        "beta2": c.beta2 as f64,
        "eps": c.eps as f64,
        "weight_decay": c.weight_decay as f64,
    });
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (STEP_KEY.to_string(), opt.step.to_string()),
        (ADAMW_KEY.to_string(), adamw.to_string()),
        (EXTRA_KEY.to_string(), extra.to_string()),
    ]);
    let mut tensors = named_tensors(&opt.m, ".exp_avg");
    tensors.extend(named_tensors(&opt.v, ".exp_avg_sq"));
    let bytes = serialize_f32(path, tensors, metadata)?;
    write_atomic(dir, name, &bytes)
}

/// Loads what [`save_training_state`] wrote, for an adapter shaped like `adapter_like`.
pub fn load_training_state(
    path: &Path,
    adapter_like: &LoraWeights,
) -> Result<(AdamW, Value), PeftError> {
    let bytes = read_safetensors(path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|source| PeftError::Safetensors { path: path.to_path_buf(), source })?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| invalid(path, format!("metadata has no {key:?} entry")))
    };
    let step_text = get(STEP_KEY)?;
    let step = step_text.parse::<u64>().map_err(|_| {
        invalid(path, format!("metadata step {step_text:?} is not a non-negative integer"))
    })?;
    let json_err = |source| PeftError::Json { path: path.to_path_buf(), source };
    let adamw: Value = serde_json::from_str(get(ADAMW_KEY)?).map_err(json_err)?;
    let hp =
        |key: &str| {
            adamw.get(key).and_then(Value::as_f64).map(|x| x as f32).ok_or_else(|| {
                invalid(path, format!("metadata adamw has no number {key:?}: {adamw}"))
            })
        };
    let config = AdamWConfig {
        beta1: hp("beta1")?,
        beta2: hp("beta2")?,
        eps: hp("eps")?,
        weight_decay: hp("weight_decay")?,
    };
    let extra: Value = serde_json::from_str(get(EXTRA_KEY)?).map_err(json_err)?;

    let st = parse_safetensors(path, &bytes)?;
    let mut opt = AdamW::new(adapter_like, config);
    opt.step = step;
    let AdamW { m, v, .. } = &mut opt;
    fill_from(path, &st, &mut [(".exp_avg", m), (".exp_avg_sq", v)], false)?;
    Ok((opt, extra))
}
