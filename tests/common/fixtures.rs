//! The real-model fixture (`tests/fixtures/smollm2-135m-instruct.json`, Hugging Face
//! transformers outputs) and the default model's GGUF metadata.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Fixture {
    pub prompts: Vec<PromptCase>,
    pub tokenize: Vec<TokenizeCase>,
    pub chats: Vec<ChatCase>,
}

#[derive(Debug, Deserialize)]
pub struct PromptCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    /// (token id, logprob) of the 5 most likely tokens at each of the first 8 positions.
    pub top5_logprobs: Vec<Vec<(u32, f64)>>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizeCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCase {
    pub messages: Vec<coserve::model::chat_template::ChatMessage>,
    pub rendered: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
}

pub fn smollm2_fixture() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The default model's path (downloaded on first use) and its GGUF metadata.
pub fn default_model_metadata() -> (PathBuf, HashMap<String, gguf_file::Value>) {
    let path = super::default_model_path();
    let mut file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut file)
        .unwrap_or_else(|e| panic!("reading GGUF {}: {e}", path.display()));
    (path, content.metadata)
}

/// The default model's tokenizer and chat template, read from its GGUF metadata.
pub fn default_tokenizer_and_template(
) -> (coserve::model::tokenizer::Tokenizer, coserve::model::chat_template::ChatTemplate) {
    let (path, metadata) = default_model_metadata();
    let tok = coserve::model::tokenizer::Tokenizer::from_gguf(&metadata, &path)
        .unwrap_or_else(|e| panic!("tokenizer: {e}"));
    let template = coserve::model::chat_template::ChatTemplate::from_gguf(
        &metadata,
        tok.bos_token().unwrap_or_default(),
        tok.eos_token().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("template: {e}"))
    .expect("the default model has a chat template");
    (tok, template)
}
