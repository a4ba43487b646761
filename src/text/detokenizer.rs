//! Incremental detokenization that never emits broken UTF-8.
//! (Interface fixed; implementation in progress.)

use std::sync::Arc;

use crate::model::tokenizer::Tokenizer;

pub struct Detokenizer {
    _tokenizer: Arc<Tokenizer>,
}

impl Detokenizer {
    /// `prompt_ids` give the context so the first generated token decodes as it would mid-text.
    pub fn new(tokenizer: Arc<Tokenizer>, _prompt_ids: &[u32], _skip_special_tokens: bool) -> Self {
        Self { _tokenizer: tokenizer }
    }

    /// Adds one token; returns the newly completed text (may be empty while a UTF-8
    /// sequence is incomplete).
    pub fn push(&mut self, _token_id: u32) -> String {
        String::new()
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        String::new()
    }
}
