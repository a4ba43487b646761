//! The PEFT adapter layout and the training state: exact tensor names, shapes and config
//! fields as Hugging Face PEFT writes them, bit-exact round trips, and a clear error for each
//! kind of bad adapter directory.

use crate::common;

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use common::tiny_model::{write_gguf, TinyShape};
use coserve::lora::{
    load_peft, load_training_state, save_peft, save_training_state, AdamW, AdamWConfig, LoraConfig,
    LoraWeights, PeftError, TargetModule, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use coserve::model::config::LlamaConfig;
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Map, Value};

/// The tiny model's shape (2 layers, hidden 64, 4 heads of 16, 2 KV heads, MLP 128).
fn model() -> &'static LlamaConfig {
    static CONFIG: OnceLock<LlamaConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_gguf(dir.path(), &TinyShape::default());
        load_model(&path, WeightsDtype::F32).unwrap().model.config
    })
}

/// A trained-looking adapter: B non-zero too, so a round trip that lost B would show.
fn adapter(config: LoraConfig, seed: u64) -> LoraWeights {
    let config = config.validated().unwrap();
    let mut w = LoraWeights::init(&config, model(), seed);
    let other = LoraWeights::init(&config, model(), seed + 1);
    for (p, o) in w.pairs_mut().zip(other.pairs()) {
        p.b.iter_mut().zip(o.a.iter().cycle()).for_each(|(b, a)| *b = 0.3 * a);
    }
    w
}

fn all_modules() -> LoraConfig {
    LoraConfig { r: 4, alpha: 16.0, dropout: 0.05, target_modules: TargetModule::ALL.to_vec() }
}

fn some_modules() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec![TargetModule::VProj, TargetModule::QProj, TargetModule::DownProj],
    }
}

type Stored = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> (Stored, Option<std::collections::HashMap<String, String>>) {
    let bytes = fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Stored = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, header.metadata().clone())
}

/// Rewrites a safetensors file after `edit` changes its tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Stored)) {
    let (mut tensors, _) = read_tensors(path);
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join(ADAPTER_CONFIG);
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn saved(config: LoraConfig) -> (tempfile::TempDir, LoraWeights) {
    let dir = tempfile::tempdir().unwrap();
    let w = adapter(config, 3);
    save_peft(&dir.path().join("adapter"), &w, "tiny-llama").unwrap();
    (dir, w)
}

fn load_err(dir: &Path) -> String {
    match load_peft(dir, model()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

const A_Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

#[test]
fn tensor_names_and_shapes_are_peft_s() {
    let (tmp, _) = saved(all_modules());
    let dir = tmp.path().join("adapter");
    let (tensors, meta) = read_tensors(&dir.join(ADAPTER_WEIGHTS));
    assert_eq!(meta.unwrap().get("format").map(String::as_str), Some("pt"));
    // (path, out, in) of each projection in the tiny model, written out by hand.
    let projections = [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 32, 64),
        ("self_attn.v_proj", 32, 64),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 128, 64),
        ("mlp.up_proj", 128, 64),
        ("mlp.down_proj", 64, 128),
    ];
    let mut want = Vec::new();
    for l in 0..2 {
        for (p, out, inp) in projections {
            let base = format!("base_model.model.model.layers.{l}.{p}");
            want.push((format!("{base}.lora_A.weight"), vec![4, inp]));
            want.push((format!("{base}.lora_B.weight"), vec![out, 4]));
        }
    }
    want.sort();
    let got: Vec<(String, Vec<usize>)> =
        tensors.iter().map(|(n, _, s, _)| (n.clone(), s.clone())).collect();
    assert_eq!(got, want);
    assert!(tensors.iter().all(|(_, d, _, _)| *d == Dtype::F32));
    // Nothing but the two files: the temp files were renamed into place.
    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
}

#[test]
fn adapter_config_has_peft_s_fields() {
    let (tmp, _) = saved(some_modules());
    let text = fs::read_to_string(tmp.path().join("adapter").join(ADAPTER_CONFIG)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let want = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["down_proj", "q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
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
    });
    assert_eq!(v, want);
    // Python reads 0.05, not 0.05000000074505806.
    let (tmp, _) = saved(all_modules());
    let text = fs::read_to_string(tmp.path().join("adapter").join(ADAPTER_CONFIG)).unwrap();
    assert!(text.contains("\"lora_dropout\": 0.05,"), "{text}");
    assert!(text.contains("\"lora_alpha\": 16,"), "{text}");
}

#[test]
fn round_trip_is_bit_exact() {
    for config in [all_modules(), some_modules()] {
        let (tmp, w) = saved(config);
        let back = load_peft(&tmp.path().join("adapter"), model()).unwrap();
        assert_eq!(back.config, w.config);
        let bits =
            |w: &LoraWeights| -> Vec<u32> { w.tensors().flatten().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&back), bits(&w));
        assert_eq!(back, w);
        // Saving again over the same directory replaces it cleanly.
        save_peft(&tmp.path().join("adapter"), &back, "tiny-llama").unwrap();
        assert_eq!(load_peft(&tmp.path().join("adapter"), model()).unwrap(), w);
    }
}

#[test]
fn half_precision_tensors_load() {
    for (dtype, to_half) in [
        (Dtype::F16, (|x: f32| half::f16::from_f32(x).to_le_bytes()) as fn(f32) -> [u8; 2]),
        (Dtype::BF16, |x: f32| half::bf16::from_f32(x).to_le_bytes()),
    ] {
        let (tmp, w) = saved(some_modules());
        let dir = tmp.path().join("adapter");
        rewrite(&dir.join(ADAPTER_WEIGHTS), |ts| {
            for (_, d, _, b) in ts.iter_mut() {
                let vals: Vec<f32> =
                    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                *b = vals.iter().flat_map(|&v| to_half(v)).collect();
                *d = dtype;
            }
        });
        let back = load_peft(&dir, model()).unwrap();
        for (x, y) in back.tensors().flatten().zip(w.tensors().flatten()) {
            let h = to_half(*y);
            let want = match dtype {
                Dtype::F16 => half::f16::from_le_bytes(h).to_f32(),
                _ => half::bf16::from_le_bytes(h).to_f32(),
            };
            assert_eq!(x.to_bits(), want.to_bits());
        }
        assert!(back.num_params() == w.num_params() && back.l2_norm() > 0.0);
    }
}

#[test]
fn missing_wrong_shape_and_unknown_tensors_are_rejected() {
    let (tmp, _) = saved(some_modules());
    let dir = tmp.path().join("adapter");
    let weights = dir.join(ADAPTER_WEIGHTS);
    let good = fs::read(&weights).unwrap();

    let b_down1 = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
    rewrite(&weights, |ts| ts.retain(|t| t.0 != b_down1));
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, b_down1, "missing", "[64, 8]"]);

    fs::write(&weights, &good).unwrap();
    rewrite(&weights, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == A_Q0).unwrap();
        t.2 = vec![8, 32];
        t.3.truncate(8 * 32 * 4);
    });
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, A_Q0, "shape [8, 32]", "[8, 64]"]);

    let cases = [
        ("base_model.model.lm_head.lora_A.weight", "unexpected tensor"),
        ("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", "model has 2 layers"),
        ("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "not in target_modules"),
    ];
    for (extra, why) in cases {
        fs::write(&weights, &good).unwrap();
        rewrite(&weights, |ts| ts.push((extra.into(), Dtype::F32, vec![1, 2], vec![0; 8])));
        assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, extra, why]);
    }

    fs::write(&weights, &good).unwrap();
    rewrite(&weights, |ts| ts.iter_mut().filter(|t| t.0 == A_Q0).for_each(|t| t.1 = Dtype::I32));
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, "unsupported", A_Q0, "I32"]);

    // A rank in the config that the tensors do not have.
    fs::write(&weights, &good).unwrap();
    edit_config(&dir, |c| {
        c.insert("r".into(), json!(4));
    });
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, "shape [8, 64], expected [4, 64]"]);
}

#[test]
fn bad_files_are_rejected() {
    let (tmp, _) = saved(some_modules());
    let dir = tmp.path().join("adapter");
    let config_text = fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    let good = fs::read(dir.join(ADAPTER_WEIGHTS)).unwrap();

    fs::write(dir.join(ADAPTER_WEIGHTS), &good[..good.len() / 2]).unwrap();
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, "not a valid safetensors file"]);
    fs::write(dir.join(ADAPTER_WEIGHTS), b"").unwrap();
    assert_mentions(&load_err(&dir), &[ADAPTER_WEIGHTS, "not a valid safetensors file"]);

    fs::remove_file(dir.join(ADAPTER_WEIGHTS)).unwrap();
    let err = load_peft(&dir, model()).unwrap_err();
    assert!(matches!(err, PeftError::Io { .. }), "{err:?}");
    assert_mentions(&err.to_string(), &[ADAPTER_WEIGHTS]);
    fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    assert_mentions(&load_err(&dir), &["adapter_model.bin", "unsupported", "safetensors"]);
    fs::write(dir.join(ADAPTER_WEIGHTS), &good).unwrap();

    fs::write(dir.join(ADAPTER_CONFIG), "{ \"peft_type\": \"LORA\", ").unwrap();
    assert_mentions(&load_err(&dir), &[ADAPTER_CONFIG, "invalid JSON"]);
    fs::write(dir.join(ADAPTER_CONFIG), "[1, 2]").unwrap();
    assert_mentions(&load_err(&dir), &[ADAPTER_CONFIG, "JSON object"]);

    fs::remove_file(dir.join(ADAPTER_CONFIG)).unwrap();
    let err = load_peft(&dir, model()).unwrap_err();
    assert!(matches!(err, PeftError::Io { .. }), "{err:?}");
    assert_mentions(&err.to_string(), &[ADAPTER_CONFIG]);
    let missing = load_err(&tmp.path().join("nowhere"));
    assert_mentions(&missing, &["nowhere", ADAPTER_CONFIG]);

    fs::write(dir.join(ADAPTER_CONFIG), &config_text).unwrap();
    load_peft(&dir, model()).unwrap();
}

#[test]
fn unsupported_and_invalid_options_are_rejected() {
    let (tmp, _) = saved(some_modules());
    let dir = tmp.path().join("adapter");
    let original = fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    let unsupported = [
        ("peft_type", json!("PREFIX_TUNING"), "PREFIX_TUNING"),
        ("use_rslora", json!(true), "use_rslora"),
        ("use_dora", json!(true), "DoRA"),
        ("rank_pattern", json!({"q_proj": 16}), "rank_pattern"),
        ("alpha_pattern", json!({"q_proj": 16}), "alpha_pattern"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        ("layers_to_transform", json!([0]), "layers_to_transform"),
        ("bias", json!("all"), "bias"),
        ("lora_bias", json!(true), "lora_bias"),
        ("init_lora_weights", json!("pissa"), "pissa"),
        ("target_modules", json!(".*attn.*"), ".*attn.*"),
        ("target_modules", json!(["q_proj", "lm_head"]), "lm_head"),
    ];
    for (key, value, why) in unsupported {
        fs::write(dir.join(ADAPTER_CONFIG), &original).unwrap();
        edit_config(&dir, |c| {
            c.insert(key.into(), value);
        });
        assert_mentions(&load_err(&dir), &[ADAPTER_CONFIG, "unsupported", why]);
    }
    let invalid = [
        ("peft_type", None, "peft_type is missing"),
        ("r", Some(json!("eight")), "r must be a positive integer"),
        ("r", Some(json!(0)), "r must be between"),
        ("lora_alpha", Some(json!([])), "lora_alpha must be a number"),
        ("target_modules", None, "target_modules is missing"),
        ("target_modules", Some(json!([])), "target_modules must name"),
        ("target_modules", Some(json!([1])), "target_modules must hold strings"),
    ];
    for (key, value, why) in invalid {
        fs::write(dir.join(ADAPTER_CONFIG), &original).unwrap();
        edit_config(&dir, |c| match value {
            Some(v) => {
                c.insert(key.into(), v);
            }
            None => {
                c.remove(key);
            }
        });
        assert_mentions(&load_err(&dir), &[ADAPTER_CONFIG, why]);
    }
}

#[test]
fn options_peft_writes_that_change_nothing_are_accepted() {
    let (tmp, w) = saved(some_modules());
    let dir = tmp.path().join("adapter");
    let original = fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    // Newer PEFT versions write more keys; at their defaults they are harmless.
    edit_config(&dir, |c| {
        c.insert("lora_bias".into(), json!(false));
        c.insert("exclude_modules".into(), Value::Null);
        c.insert("layer_replication".into(), Value::Null);
        c.insert("megatron_core".into(), json!("megatron.core"));
        c.insert("init_lora_weights".into(), json!("gaussian"));
        c.insert("task_type".into(), Value::Null);
    });
    assert_eq!(load_peft(&dir, model()).unwrap(), w);
    for pattern in
        ["down_proj|q_proj|v_proj", r".*\.(q_proj|v_proj|down_proj)$", "(q_proj|v_proj|down_proj)"]
    {
        fs::write(dir.join(ADAPTER_CONFIG), &original).unwrap();
        edit_config(&dir, |c| {
            c.insert("target_modules".into(), json!(pattern));
        });
        assert_eq!(load_peft(&dir, model()).unwrap(), w, "{pattern}");
    }
    // A pattern naming fewer modules than the file holds leaves tensors unexplained.
    edit_config(&dir, |c| {
        c.insert("target_modules".into(), json!("q_proj"));
    });
    assert_mentions(&load_err(&dir), &["not in target_modules"]);
}

#[test]
fn training_state_round_trips_and_resumes_exactly() {
    let config = AdamWConfig { beta1: 0.85, beta2: 0.995, eps: 1e-7, weight_decay: 0.01 };
    let mut params = adapter(all_modules(), 5);
    let grads: Vec<LoraWeights> = (0..4).map(|s| adapter(all_modules(), 100 + s)).collect();
    let mut opt = AdamW::new(&params, config);
    for g in &grads[..2] {
        opt.step(&mut params, g, 1e-3);
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("optimizer.safetensors");
    let extra = json!({"samples_seen": 12, "epoch": 0, "rng": [1, 2, 3], "loss": 1.25});
    save_training_state(&path, &opt, &extra).unwrap();

    let (tensors, meta) = read_tensors(&path);
    assert_eq!(tensors.len(), 4 * params.pairs().count());
    assert!(tensors.iter().any(|t| t.0 == format!("{A_Q0}.exp_avg")));
    assert!(tensors.iter().any(|t| t.0 == format!("{A_Q0}.exp_avg_sq")));
    assert_eq!(meta.unwrap().get("step").map(String::as_str), Some("2"));

    let (mut back, back_extra) = load_training_state(&path, &params).unwrap();
    assert_eq!(back, opt);
    assert_eq!(back.config, config);
    assert_eq!(back_extra, extra);
    let files: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "no temp file left behind");

    // Continuing from the saved state gives exactly the uninterrupted run.
    let mut resumed = params.clone();
    for g in &grads[2..] {
        opt.step(&mut params, g, 1e-3);
        back.step(&mut resumed, g, 1e-3);
    }
    assert_eq!(resumed, params);

    // State for another adapter shape, and a damaged file, are refused with the file named.
    let other = adapter(some_modules(), 5);
    let msg = load_training_state(&path, &other).unwrap_err().to_string();
    assert_mentions(&msg, &["optimizer.safetensors", "exp_avg"]);
    rewrite(&path, |_| {});
    let msg = load_training_state(&path, &params).unwrap_err().to_string();
    assert_mentions(&msg, &["optimizer.safetensors", "no \"step\""]);
    fs::write(&path, b"\x08\0\0\0\0\0\0\0{}").unwrap();
    assert!(load_training_state(&path, &params).is_err());
}
