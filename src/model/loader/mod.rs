//! Model loading from GGUF files and Hugging Face directories.

pub mod gguf;
pub mod safetensors;

use std::path::{Path, PathBuf};

use super::chat_template::ChatTemplate;
use super::llama::Llama;
use super::tokenizer::Tokenizer;
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

/// Loads a GGUF file or a Hugging Face model directory.
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    if meta.is_dir() {
        safetensors::load_hf_dir(path)
    } else {
        gguf::load_gguf(path)
    }
}

/// The rows of a q or k projection as llama.cpp's converter stores them for its interleaved
/// rotary layout, put back in the Hugging Face (half-split) layout the forward pass uses.
pub(crate) fn unpermute_rotary_rows(
    data: &[f32],
    num_heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    let half = head_dim / 2;
    for h in 0..num_heads {
        for i in 0..half {
            for s in 0..2 {
                let src = h * head_dim + 2 * i + s;
                let dst = h * head_dim + s * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
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
