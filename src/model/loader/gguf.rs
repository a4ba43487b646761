//! GGUF: metadata -> `LlamaConfig`, linear weights dequantized and stored as the chosen
//! `WeightsDtype` (or kept in the file's own encoding for `gguf`), tokenizer and chat template
//! from `tokenizer.*` metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::{stem, unpermute_rotary_rows, LoadedModel};
use crate::backend::cpu::quant_ggml::ggml_row_bytes;
use crate::model::chat_template::ChatTemplate;
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::model::llama::{Llama, LlamaLayer};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{WeightMatrix, WeightsDtype};
use crate::model::ModelError;

struct Reader<'a> {
    path: &'a Path,
    file: File,
    content: Content,
    dtype: WeightsDtype,
}

/// q/k projections stored in llama.cpp's interleaved rotary order: (heads, head_dim).
type Rotary = Option<(usize, usize)>;

fn value_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => value_usize(other).map(|x| x as f64),
    }
}

impl Reader<'_> {
    fn md(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::invalid(self.path, format!("missing metadata key `{key}`")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.md().get(key) {
            None => Ok(None),
            Some(v) => value_usize(v).map(Some).ok_or_else(|| {
                ModelError::invalid(self.path, format!("metadata `{key}` is not an integer"))
            }),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.md().get(key) {
            None => Ok(None),
            Some(v) => value_f64(v).map(Some).ok_or_else(|| {
                ModelError::invalid(self.path, format!("metadata `{key}` is not a number"))
            }),
        }
    }

    fn opt_str(&self, key: &str) -> Option<String> {
        match self.md().get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor as stored in the file.
    fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(ModelError::invalid(self.path, format!("missing tensor `{name}`")));
        }
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| ModelError::invalid(self.path, format!("tensor `{name}`: {e}")))
    }

    fn dequantize(&self, name: &str, q: &QTensor) -> Result<Vec<f32>, ModelError> {
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::invalid(self.path, format!("tensor `{name}`: {e}")))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let q = self.qtensor(name)?;
        let data = self.dequantize(name, &q)?;
        if data.len() != len {
            return Err(ModelError::invalid(
                self.path,
                format!("tensor `{name}` has {} elements, expected {len}", data.len()),
            ));
        }
        Ok(data)
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, ModelError> {
        self.matrix_rotary(name, rows, cols, None)
    }

    /// A `[rows, cols]` weight in the reader's storage format; `rotary` rows are put back in
    /// the half-split layout.
    fn matrix_rotary(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        rotary: Rotary,
    ) -> Result<WeightMatrix, ModelError> {
        let q = self.qtensor(name)?;
        let shape = q.shape().dims().to_vec();
        if shape != [rows, cols] {
            return Err(ModelError::invalid(
                self.path,
                format!("tensor `{name}` has shape {shape:?}, expected [{rows}, {cols}]"),
            ));
        }
        if self.dtype == WeightsDtype::Gguf {
            let bad =
                |e: String| ModelError::unsupported(self.path, format!("tensor `{name}`: {e}"));
            let row_bytes = ggml_row_bytes(q.dtype(), cols).map_err(bad)?;
            let raw = q
                .data()
                .map_err(|e| ModelError::invalid(self.path, format!("tensor `{name}`: {e}")))?;
            let bytes = match rotary {
                Some((heads, hd)) => unpermute_rotary_rows(&raw, heads, hd, row_bytes),
                None => raw.into_owned(),
            };
            return WeightMatrix::from_ggml(q.dtype(), &bytes, rows, cols).map_err(bad);
        }
        let mut data = self.dequantize(name, &q)?;
        if let Some((heads, hd)) = rotary {
            data = unpermute_rotary_rows(&data, heads, hd, cols);
        }
        // ok: the shape was checked above, so the element count matches.
        Ok(WeightMatrix::from_f32_as(data, rows, cols, self.dtype).expect("checked shape"))
    }
}

pub fn load_gguf(path: &Path, dtype: WeightsDtype) -> Result<LoadedModel, ModelError> {
    let mut file =
        File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let content = Content::read(&mut file)
        .map_err(|e| ModelError::invalid(path, format!("not a valid GGUF file: {e}")))?;
    let mut r = Reader { path, file, content, dtype };

    let arch = r
        .opt_str("general.architecture")
        .ok_or_else(|| ModelError::invalid(path, "missing metadata key `general.architecture`"))?;
    // llama.cpp stores q/k rows of these architectures permuted for its interleaved RoPE.
    let permuted_rotary = match arch.as_str() {
        "llama" | "mistral" => true,
        "qwen2" => false,
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("architecture `{other}` (supported: llama, mistral, qwen2)"),
            ))
        }
    };
    let config = read_config(&r, &arch)?;
    let (hs, nh, nkv, hd) =
        (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim);

    let embed = r.matrix("token_embd.weight", config.vocab_size, hs)?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let rotary = |heads: usize| permuted_rotary.then_some((heads, hd));
        let q = r.matrix_rotary(&p("attn_q.weight"), nh * hd, hs, rotary(nh))?;
        let k = r.matrix_rotary(&p("attn_k.weight"), nkv * hd, hs, rotary(nkv))?;
        let v = r.matrix(&p("attn_v.weight"), nkv * hd, hs)?;
        let qkv_bias = if config.attention_bias {
            let mut bq = r.vector(&p("attn_q.bias"), nh * hd)?;
            let mut bk = r.vector(&p("attn_k.bias"), nkv * hd)?;
            if permuted_rotary {
                bq = unpermute_rotary_rows(&bq, nh, hd, 1);
                bk = unpermute_rotary_rows(&bk, nkv, hd, 1);
            }
            let bv = r.vector(&p("attn_v.bias"), nkv * hd)?;
            Some([bq, bk, bv].concat())
        } else {
            None
        };
        let gate = r.matrix(&p("ffn_gate.weight"), config.intermediate_size, hs)?;
        let up = r.matrix(&p("ffn_up.weight"), config.intermediate_size, hs)?;
        layers.push(LlamaLayer {
            attn_norm: r.vector(&p("attn_norm.weight"), hs)?,
            wqkv: concat(path, vec![q, k, v])?,
            qkv_bias,
            wo: r.matrix(&p("attn_output.weight"), hs, nh * hd)?,
            ffn_norm: r.vector(&p("ffn_norm.weight"), hs)?,
            w_gate_up: concat(path, vec![gate, up])?,
            w_down: r.matrix(&p("ffn_down.weight"), hs, config.intermediate_size)?,
        });
    }
    let norm = r.vector("output_norm.weight", hs)?;
    let lm_head = if r.has_tensor("output.weight") {
        Some(r.matrix("output.weight", config.vocab_size, hs)?)
    } else {
        None
    };
    let rope_factors = if r.has_tensor("rope_freqs.weight") {
        Some(r.vector("rope_freqs.weight", hd / 2)?)
    } else {
        None
    };
    let mut config = config;
    config.tie_word_embeddings = lm_head.is_none();

    let tokenizer = Tokenizer::from_gguf(r.md(), path)?;
    let chat_template = match r.opt_str("tokenizer.chat_template") {
        Some(src) => Some(chat_template_for(&tokenizer, &src)?),
        None => None,
    };
    let mut eos_token_ids = tokenizer.eos_token_ids.clone();
    if let Some(eot) = r.opt_usize("tokenizer.ggml.eot_token_id")? {
        eos_token_ids.push(eot as u32);
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();

    Ok(LoadedModel {
        model: Llama::new(config, embed, layers, norm, lm_head, rope_factors),
        tokenizer,
        chat_template,
        eos_token_ids,
        default_name: r
            .opt_str("general.name")
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| stem(path)),
        source: path.to_path_buf(),
    })
}

pub(crate) fn chat_template_for(
    tokenizer: &Tokenizer,
    src: &str,
) -> Result<ChatTemplate, ModelError> {
    ChatTemplate::new(src, tokenizer.bos_token().unwrap_or(""), tokenizer.eos_token().unwrap_or(""))
}

fn concat(path: &Path, parts: Vec<WeightMatrix>) -> Result<WeightMatrix, ModelError> {
    WeightMatrix::concat_rows(parts)
        .ok_or_else(|| ModelError::invalid(path, "projection weights have mismatched input sizes"))
}

fn read_config(r: &Reader<'_>, arch: &str) -> Result<LlamaConfig, ModelError> {
    let k = |s: &str| format!("{arch}.{s}");
    let hidden_size = r.usize(&k("embedding_length"))?;
    let num_heads = r.usize(&k("attention.head_count"))?;
    let num_kv_heads = r.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(ModelError::invalid(
            r.path,
            format!("{num_heads} attention heads cannot be grouped over {num_kv_heads} KV heads"),
        ));
    }
    let head_dim = r.opt_usize(&k("attention.key_length"))?.unwrap_or(hidden_size / num_heads);
    if head_dim % 2 != 0 || head_dim == 0 {
        return Err(ModelError::invalid(r.path, format!("head dimension {head_dim} is not even")));
    }
    let vocab_size = match r.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => match r.md().get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => r
                .content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| ModelError::invalid(r.path, "cannot tell the vocabulary size"))?,
        },
    };
    let rope_scaling = match r.opt_str(&k("rope.scaling.type")).as_deref() {
        Some("linear") => {
            r.opt_f64(&k("rope.scaling.factor"))?.map(|f| RopeScaling::Linear { factor: f as f32 })
        }
        _ => None,
    };
    Ok(LlamaConfig {
        architecture: arch.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: r.usize(&k("feed_forward_length"))?,
        num_layers: r.usize(&k("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: r.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: r.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
        rope_scaling,
        max_position_embeddings: r.opt_usize(&k("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: false,
        attention_bias: r.has_tensor("blk.0.attn_q.bias"),
    })
}
