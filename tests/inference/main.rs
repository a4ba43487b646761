//! Inference without HTTP: model loading, tokenizers and chat templates, outputs against the HF
//! references, weight formats, paged attention and the engine's batching.

#[path = "../common/mod.rs"]
mod common;

mod batch_invariance;
mod chat_template;
mod engine;
mod loader;
mod paged_attention;
mod reference_generation;
mod seam;
mod tokenizer;
mod weights_dtype;
