//! Model loading from GGUF files and Hugging Face directories.

pub mod dummy;
pub mod gguf;
pub mod safetensors;

use std::path::{Path, PathBuf};

use super::chat_template::ChatTemplate;
use super::llama::Llama;
use super::tokenizer::Tokenizer;
use super::weights::WeightsDtype;
use super::ModelError;

/// Everything a served model needs, as loaded from disk.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Ids that end generation (EOS and end-of-turn tokens).
    pub eos_token_ids: Vec<u32>,
    /// A name for the model when none is configured (the file or directory name).
    pub default_name: String,
    pub source: PathBuf,
}

/// Loads a GGUF file or a Hugging Face model directory, storing linear weights as `dtype`.
pub fn load_model(path: &Path, dtype: WeightsDtype) -> Result<LoadedModel, ModelError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let loaded = if meta.is_dir() {
        safetensors::load_hf_dir(path, dtype)?
    } else {
        gguf::load_gguf(path, dtype)?
    };
    tracing::info!(
        weights_dtype = %dtype,
        lm_head = loaded.model.lm_head().format(),
        decode_bytes = loaded.model.weight_bytes(),
        "weights loaded"
    );
    Ok(loaded)
}

/// The rows of a q or k projection as llama.cpp's converter stores them for its interleaved
/// rotary layout, put back in the Hugging Face (half-split) layout the forward pass uses.
/// `row_len` elements make one row: f32 values, or the raw bytes of a quantized row (rows of
/// ggml blocks are independent, so moving whole rows keeps them valid).
pub(crate) fn unpermute_rotary_rows<T: Clone>(
    data: &[T],
    num_heads: usize,
    head_dim: usize,
    row_len: usize,
) -> Vec<T> {
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for dst in 0..num_heads * head_dim {
        let (h, within) = (dst / head_dim, dst % head_dim);
        let (s, i) = (within / half, within % half);
        let src = h * head_dim + 2 * i + s;
        out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
    }
    out
}

/// File name without extension, for the default served model name.
pub(crate) fn stem(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
