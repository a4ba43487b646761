//! Llama tokenizer from GGUF metadata or tokenizer.json.
//! (Interface fixed; implementation in progress.)

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use super::ModelError;

pub struct Tokenizer {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Tokenizer {
    /// From GGUF metadata (`tokenizer.ggml.*`). `path` is only used in error messages.
    pub fn from_gguf(
        _metadata: &HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        Err(ModelError::unsupported(path, "GGUF tokenizer not implemented yet"))
    }

    /// From a Hugging Face `tokenizer.json` plus optional `tokenizer_config.json`.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        _tokenizer_config: Option<&Path>,
    ) -> Result<Self, ModelError> {
        Err(ModelError::unsupported(tokenizer_json, "tokenizer.json not implemented yet"))
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) map to their ids.
    /// `add_special_tokens` adds BOS when the model's tokenizer asks for it.
    pub fn encode(&self, _text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        Err(ModelError::Tokenizer("not implemented yet".into()))
    }

    pub fn decode(&self, _ids: &[u32], _skip_special_tokens: bool) -> Result<String, ModelError> {
        Err(ModelError::Tokenizer("not implemented yet".into()))
    }

    /// The text of one token as shown in logprobs (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        format!("<{id}>")
    }

    pub fn vocab_size(&self) -> usize {
        0
    }
}
