//! A tiny random Llama (2 layers, GQA) with a byte-level tokenizer and a ChatML template,
//! written both as a GGUF file and as a Hugging Face directory, so most tests run in seconds.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

#[derive(Clone, Copy, Debug)]
pub struct TinyShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context: usize,
    pub tied: bool,
    pub seed: u64,
    /// Every weight a bf16 value (what a bf16 device holds exactly).
    pub bf16_weights: bool,
}

impl Default for TinyShape {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            context: 1024,
            tied: true,
            seed: 7,
            bf16_weights: false,
        }
    }
}

impl TinyShape {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    pub fn vocab(&self) -> usize {
        256 + SPECIALS.len()
    }
}

/// GPT-2's byte-to-printable-character map used by byte-level BPE vocabularies.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> =
        (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap_or('?');
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            printable.push(b);
        }
    }
    chars
}

fn vocab_tokens() -> Vec<String> {
    byte_chars()
        .into_iter()
        .map(|c| c.to_string())
        .chain(SPECIALS.iter().map(|s| s.to_string()))
        .collect()
}

/// Deterministic pseudo-random weights in [-scale, scale].
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Named tensors in HF naming and layout: (name, shape, data).
pub fn hf_tensors(s: &TinyShape) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (h, hd, v, i) = (s.hidden, s.head_dim(), s.vocab(), s.intermediate);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h], rng.vec(v * h, 0.5))];
    for l in 0..s.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let norm = |rng: &mut Rng| rng.vec(h, 0.2).into_iter().map(|x| 1.0 + x).collect::<Vec<_>>();
        t.push((p("input_layernorm.weight"), vec![h], norm(&mut rng)));
        t.push((
            p("self_attn.q_proj.weight"),
            vec![s.heads * hd, h],
            rng.vec(s.heads * hd * h, 0.25),
        ));
        t.push((
            p("self_attn.k_proj.weight"),
            vec![s.kv_heads * hd, h],
            rng.vec(s.kv_heads * hd * h, 0.25),
        ));
        t.push((
            p("self_attn.v_proj.weight"),
            vec![s.kv_heads * hd, h],
            rng.vec(s.kv_heads * hd * h, 0.25),
        ));
        t.push((
            p("self_attn.o_proj.weight"),
            vec![h, s.heads * hd],
            rng.vec(h * s.heads * hd, 0.15),
        ));
        t.push((p("post_attention_layernorm.weight"), vec![h], norm(&mut rng)));
        t.push((p("mlp.gate_proj.weight"), vec![i, h], rng.vec(i * h, 0.2)));
        t.push((p("mlp.up_proj.weight"), vec![i, h], rng.vec(i * h, 0.2)));
        t.push((p("mlp.down_proj.weight"), vec![h, i], rng.vec(h * i, 0.15)));
    }
    t.push(("model.norm.weight".to_string(), vec![h], vec![1.0; h]));
    if !s.tied {
        t.push(("lm_head.weight".to_string(), vec![v, h], rng.vec(v * h, 0.5)));
    }
    if s.bf16_weights {
        for (_, _, data) in &mut t {
            data.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
    }
    t
}

/// llama.cpp's converter permutation of q/k rows for its interleaved RoPE layout.
fn permute_rotary(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let hf = h * head_dim + s * half + i;
                let gg = h * head_dim + 2 * i + s;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.trim_start_matches("model.layers.");
    let (layer, name) = rest.split_once('.').unwrap_or(("0", rest));
    let suffix = map.iter().find(|(k, _)| *k == name).map(|(_, v)| *v).unwrap_or(name);
    format!("blk.{layer}.{suffix}")
}

/// Writes the tiny model as `dir/tiny.gguf` and returns its path.
pub fn write_gguf(dir: &Path, s: &TinyShape) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let mut qtensors = Vec::new();
    for (name, shape, mut data) in hf_tensors(s) {
        if name.ends_with("q_proj.weight") {
            data = permute_rotary(&data, s.heads, s.head_dim(), s.hidden);
        } else if name.ends_with("k_proj.weight") {
            data = permute_rotary(&data, s.kv_heads, s.head_dim(), s.hidden);
        }
        let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor");
        qtensors.push((gguf_name(&name), QTensor::quantize(&t, GgmlDType::F32).expect("quantize")));
    }
    let n = s.vocab();
    let arr = |v: Vec<Value>| Value::Array(v);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny-llama".into())),
        ("llama.context_length", Value::U32(s.context as u32)),
        ("llama.embedding_length", Value::U32(s.hidden as u32)),
        ("llama.block_count", Value::U32(s.layers as u32)),
        ("llama.feed_forward_length", Value::U32(s.intermediate as u32)),
        ("llama.attention.head_count", Value::U32(s.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(s.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32(s.head_dim() as u32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", arr(vocab_tokens().into_iter().map(Value::String).collect())),
        (
            "tokenizer.ggml.token_type",
            arr((0..n).map(|i| Value::I32(if i < 256 { 1 } else { 3 })).collect()),
        ),
        ("tokenizer.ggml.merges", arr(vec![])),
        ("tokenizer.ggml.bos_token_id", Value::U32(256)),
        ("tokenizer.ggml.eos_token_id", Value::U32(258)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).expect("create gguf");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    path
}

/// Writes the tiny model as a Hugging Face directory `dir/tiny-hf` and returns it.
pub fn write_hf_dir(dir: &Path, s: &TinyShape) -> PathBuf {
    let out = dir.join("tiny-hf");
    std::fs::create_dir_all(&out).expect("mkdir");
    let tensors: Vec<(String, Tensor)> = hf_tensors(s)
        .into_iter()
        .map(|(n, shape, d)| (n, Tensor::from_vec(d, shape, &Device::Cpu).expect("tensor")))
        .collect();
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, out.join("model.safetensors")).expect("save safetensors");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab(),
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": s.context,
        "tie_word_embeddings": s.tied,
        "bos_token_id": 256,
        "eos_token_id": 258,
    });
    std::fs::write(out.join("config.json"), config.to_string()).expect("write config");
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab_tokens().into_iter().enumerate().map(|(i, t)| (t, serde_json::json!(i))).collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_string()).expect("write tokenizer");
    let tok_config = serde_json::json!({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": CHATML,
    });
    std::fs::write(out.join("tokenizer_config.json"), tok_config.to_string())
        .expect("write tokenizer_config");
    out
}

/// The tiny model's tokenizer and chat template, read back from its GGUF metadata as the
/// loader reads them.
pub fn tiny_tokenizer_and_template(
) -> (coserve::model::tokenizer::Tokenizer, coserve::model::chat_template::ChatTemplate) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());
    let mut file = std::fs::File::open(&path).expect("open gguf");
    let content = gguf_file::Content::read(&mut file).expect("read gguf");
    let tok = coserve::model::tokenizer::Tokenizer::from_gguf(&content.metadata, &path)
        .expect("tiny tokenizer");
    let template = coserve::model::chat_template::ChatTemplate::from_gguf(
        &content.metadata,
        tok.bos_token().unwrap_or_default(),
        tok.eos_token().unwrap_or_default(),
    )
    .expect("tiny chat template")
    .expect("the tiny model has a chat template");
    (tok, template)
}
