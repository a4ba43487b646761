//! Hugging Face model directories: config.json, *.safetensors, tokenizer.json,
//! tokenizer_config.json (chat template) and generation_config.json (EOS ids).

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde_json::Value;

use super::gguf::chat_template_for;
use super::{stem, LoadedModel};
use crate::model::chat_template::source_from_tokenizer_config;
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::model::llama::{Llama, LlamaLayer};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{WeightMatrix, WeightsDtype};
use crate::model::ModelError;

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| ModelError::invalid(path, format!("invalid JSON: {e}")))
}

struct Cfg<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Cfg<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                ModelError::invalid(self.path, format!("`{key}` is not a non-negative integer"))
            }),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::invalid(self.path, format!("missing `{key}`")))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ModelError::invalid(self.path, format!("`{key}` is not a number"))),
        }
    }
}

pub fn parse_config(path: &Path, v: &Value) -> Result<LlamaConfig, ModelError> {
    let c = Cfg { path, v };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
    if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(ModelError::unsupported(
            path,
            format!("model_type `{model_type}` (supported: llama, mistral, qwen2)"),
        ));
    }
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(ModelError::invalid(
            path,
            format!("{num_heads} attention heads cannot be grouped over {num_kv_heads} KV heads"),
        ));
    }
    let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(ModelError::invalid(path, format!("head dimension {head_dim} is not even")));
    }
    let rope_scaling = match v.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(s) => {
            let kind =
                s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("");
            let sc = Cfg { path, v: s };
            let factor = sc.opt_f64("factor")?.unwrap_or(1.0) as f32;
            match kind {
                "llama3" => Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: sc.opt_f64("low_freq_factor")?.unwrap_or(1.0) as f32,
                    high_freq_factor: sc.opt_f64("high_freq_factor")?.unwrap_or(4.0) as f32,
                    original_max_position_embeddings: sc
                        .opt_usize("original_max_position_embeddings")?
                        .unwrap_or(8192),
                }),
                "linear" => Some(RopeScaling::Linear { factor }),
                "default" | "" => None,
                other => {
                    return Err(ModelError::unsupported(
                        path,
                        format!("rope_scaling type `{other}`"),
                    ))
                }
            }
        }
    };
    Ok(LlamaConfig {
        architecture: model_type.clone(),
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta: c.opt_f64("rope_theta")?.unwrap_or(10_000.0) as f32,
        rope_scaling,
        max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        attention_bias: v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(model_type == "qwen2"),
    })
}

struct Tensors {
    st: MmapedSafetensors,
    dir: PathBuf,
    dtype: WeightsDtype,
}

impl Tensors {
    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    fn load(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self
            .st
            .load(name, &Device::Cpu)
            .map_err(|_| ModelError::invalid(&self.dir, format!("missing tensor `{name}`")))?;
        let dims = t.dims().to_vec();
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::invalid(&self.dir, format!("tensor `{name}`: {e}")))?;
        if data.len() != len {
            return Err(ModelError::invalid(
                &self.dir,
                format!(
                    "tensor `{name}` has shape {dims:?} ({} elements), expected {len}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, ModelError> {
        let data = self.load(name, rows * cols)?;
        // ok: load() checked the element count.
        Ok(WeightMatrix::from_f32_as(data, rows, cols, self.dtype).expect("checked length"))
    }
}

pub fn load_hf_dir(dir: &Path, dtype: WeightsDtype) -> Result<LoadedModel, ModelError> {
    let dtype = if dtype == WeightsDtype::Gguf {
        tracing::warn!(
            model = %dir.display(),
            "--weights-dtype gguf keeps a GGUF file's quantization; this is a Hugging Face \
             directory, so weights are quantized to q8_0 instead"
        );
        WeightsDtype::Q8_0
    } else {
        dtype
    };
    let config_path = dir.join("config.json");
    let config = parse_config(&config_path, &read_json(&config_path)?)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::invalid(dir, "no *.safetensors files"));
    }
    // SAFETY: the files are memory-mapped read-only; we do not modify them while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| ModelError::invalid(dir, format!("invalid safetensors: {e}")))?;
    let t = Tensors { st, dir: dir.to_path_buf(), dtype };

    let (hs, nh, nkv, hd, inter) = (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
    );
    let embed = t.matrix("model.embed_tokens.weight", config.vocab_size, hs)?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let qkv = vec![
            t.matrix(&p("self_attn.q_proj.weight"), nh * hd, hs)?,
            t.matrix(&p("self_attn.k_proj.weight"), nkv * hd, hs)?,
            t.matrix(&p("self_attn.v_proj.weight"), nkv * hd, hs)?,
        ];
        let qkv_bias = if config.attention_bias {
            Some(
                [
                    t.load(&p("self_attn.q_proj.bias"), nh * hd)?,
                    t.load(&p("self_attn.k_proj.bias"), nkv * hd)?,
                    t.load(&p("self_attn.v_proj.bias"), nkv * hd)?,
                ]
                .concat(),
            )
        } else {
            None
        };
        let gate_up = vec![
            t.matrix(&p("mlp.gate_proj.weight"), inter, hs)?,
            t.matrix(&p("mlp.up_proj.weight"), inter, hs)?,
        ];
        layers.push(LlamaLayer {
            attn_norm: t.load(&p("input_layernorm.weight"), hs)?,
            wqkv: WeightMatrix::concat_rows(qkv)
                .ok_or_else(|| ModelError::invalid(dir, "q/k/v shapes differ"))?,
            qkv_bias,
            wo: t.matrix(&p("self_attn.o_proj.weight"), hs, nh * hd)?,
            ffn_norm: t.load(&p("post_attention_layernorm.weight"), hs)?,
            w_gate_up: WeightMatrix::concat_rows(gate_up)
                .ok_or_else(|| ModelError::invalid(dir, "gate/up shapes differ"))?,
            w_down: t.matrix(&p("mlp.down_proj.weight"), hs, inter)?,
        });
    }
    let norm = t.load("model.norm.weight", hs)?;
    let lm_head = if !config.tie_word_embeddings && t.has("lm_head.weight") {
        Some(t.matrix("lm_head.weight", config.vocab_size, hs)?)
    } else {
        None
    };

    let tok_config = dir.join("tokenizer_config.json");
    let tok_config = tok_config.is_file().then_some(tok_config);
    let tokenizer = Tokenizer::from_hf_files(&dir.join("tokenizer.json"), tok_config.as_deref())?;
    let template_src = match &tok_config {
        Some(p) => source_from_tokenizer_config(&read_json(p)?),
        None => None,
    }
    .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let chat_template = match template_src {
        Some(src) => Some(chat_template_for(&tokenizer, &src)?),
        None => None,
    };
    let mut eos_token_ids = tokenizer.eos_token_ids.clone();
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        match read_json(&gen_path)?.get("eos_token_id") {
            Some(Value::Number(n)) => eos_token_ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => {
                eos_token_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            _ => {}
        }
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();

    Ok(LoadedModel {
        model: Llama::new(config, embed, layers, norm, lm_head, None),
        tokenizer,
        chat_template,
        eos_token_ids,
        default_name: stem(dir),
        source: dir.to_path_buf(),
    })
}
