//! Tiny hand-built vocabularies as GGUF metadata, so both tokenizer paths are tested without
//! model files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::{Tokenizer, BYTE_TO_CHAR};

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Array(items.into_iter().map(|s| Value::String(s.to_string())).collect())
}

/// Byte-level BPE: the 256 byte chars (id = byte), then `th`, `the`, `Ġthe`, `12`,
/// `<|endoftext|>` (control, EOS). Pre-tokenizer `smollm` (digits split one by one).
pub(crate) fn tiny_gpt2_metadata() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = BYTE_TO_CHAR.iter().map(|c| c.to_string()).collect();
    tokens.extend(["th", "the", "Ġthe", "12", "<|endoftext|>"].map(String::from));
    let mut types = vec![Value::I32(1); tokens.len()];
    types[tokens.len() - 1] = Value::I32(3);
    let eos = tokens.len() as u32 - 1;
    HashMap::from([
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens.iter().map(String::as_str))),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), strings(["t h", "th e", "Ġ the", "1 2"])),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ])
}

pub(crate) fn tiny_gpt2() -> Tokenizer {
    // ok: fixed test vocabulary.
    Tokenizer::from_gguf(&tiny_gpt2_metadata(), Path::new("tiny-gpt2.gguf")).expect("tiny gpt2")
}

/// SentencePiece: `<unk>`, `<s>`, `</s>`, the 256 `<0xNN>` byte tokens, then a few pieces
/// whose scores decide the merge order.
pub(crate) fn tiny_spm_metadata() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces: [(&str, f32); 12] = [
        ("▁", -5.0),
        ("a", -6.0),
        ("b", -6.0),
        ("c", -6.0),
        ("▁ab", -0.5),
        ("ab", -1.0),
        ("▁c", -1.5),
        ("▁a", -2.0),
        ("bc", -3.0),
        ("▁b", -4.0),
        ("▁the", -2.5),
        ("▁th", -3.5),
    ];
    for (p, s) in pieces {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(s);
    }
    // Pieces that "▁the" needs.
    for (p, s) in [("th", -4.5), ("t", -6.0), ("h", -6.0), ("e", -6.0), ("你", -6.0), ("好", -6.0)]
    {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(s);
    }
    HashMap::from([
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens.iter().map(String::as_str))),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
    ])
}

pub(crate) fn tiny_spm() -> Tokenizer {
    // ok: fixed test vocabulary.
    Tokenizer::from_gguf(&tiny_spm_metadata(), Path::new("tiny-spm.gguf")).expect("tiny spm")
}
