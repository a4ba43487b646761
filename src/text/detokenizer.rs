//! Incremental detokenization that never emits broken UTF-8.
//!
//! Each step decodes a short window of tokens twice, without and with the new tokens, and
//! emits the difference (the prefix-offset/read-offset technique of TGI and vLLM). The window
//! gives decoders the context they need (SentencePiece strips a leading space only at the
//! start of a text), and text ending in U+FFFD waits for the rest of its UTF-8 sequence.

use std::sync::Arc;

use crate::model::tokenizer::Tokenizer;

/// Prompt tokens kept as context for the first generated tokens.
const PROMPT_CONTEXT: usize = 5;
/// Emitted tokens are dropped from the front once this many pile up.
const COMPACT_AFTER: usize = 64;

pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decode window: tokens before it are no longer needed.
    prefix_offset: usize,
    /// Tokens before this have been emitted.
    read_offset: usize,
}

impl Detokenizer {
    /// `prompt_ids` give the context so the first generated token decodes as it would mid-text.
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let ids = prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let read_offset = ids.len();
        Self { tokenizer, skip_special_tokens, ids, prefix_offset: 0, read_offset }
    }

    /// Adds one token; returns the newly completed text (may be empty while a UTF-8
    /// sequence is incomplete).
    pub fn push(&mut self, token_id: u32) -> String {
        self.ids.push(token_id);
        self.emit(false)
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        self.emit(true)
    }

    fn decode(&self, ids: &[u32]) -> String {
        // Out-of-vocabulary ids decode to nothing rather than failing the stream.
        self.tokenizer.decode(ids, self.skip_special_tokens).unwrap_or_default()
    }

    fn emit(&mut self, flush: bool) -> String {
        if self.read_offset >= self.ids.len() {
            return String::new();
        }
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        if full.len() <= prefix.len() || (!flush && full.ends_with('\u{FFFD}')) {
            if flush {
                self.read_offset = self.ids.len();
            }
            return String::new();
        }
        let new_text = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // A decoder that rewrote the context; emit from the same byte length onwards.
            None => {
                let mut start = prefix.len();
                while !full.is_char_boundary(start) {
                    start += 1;
                }
                full[start..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset >= COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        new_text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::testing;

    /// Pushes `gen` one token at a time after `prompt`; returns the chunks.
    fn stream(tok: &Arc<Tokenizer>, prompt: &[u32], gen: &[u32], skip: bool) -> Vec<String> {
        let mut d = Detokenizer::new(tok.clone(), prompt, skip);
        let mut chunks: Vec<String> = gen.iter().map(|&id| d.push(id)).collect();
        chunks.push(d.finish());
        chunks
    }

    /// The streamed text must equal the full decode, and no chunk may contain U+FFFD.
    fn check(tok: &Arc<Tokenizer>, prompt_text: &str, text: &str) {
        let prompt = tok.encode(prompt_text, true).expect("encode");
        let gen = tok.encode(text, false).expect("encode");
        let all: Vec<u32> = prompt.iter().chain(&gen).copied().collect();
        let full = tok.decode(&all, false).expect("decode");
        let prompt_decoded = tok.decode(&prompt, false).expect("decode");
        let want = full.strip_prefix(prompt_decoded.as_str()).expect("prompt is a prefix");
        let chunks = stream(tok, &prompt, &gen, false);
        assert_eq!(chunks.concat(), want, "prompt {prompt_text:?}, text {text:?}");
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    }

    const TEXTS: [&str; 6] = [
        "héllo 🚀🔥 wörld",
        "你好 漢字 the end",
        "  leading and trailing  ",
        "the\n\tthe  the   abc",
        "a é ab c bc",
        "👩‍👩‍👧 ok",
    ];

    #[test]
    fn byte_level_stream_equals_full_decode() {
        let tok = Arc::new(testing::tiny_gpt2());
        for text in TEXTS {
            check(&tok, "", text);
            check(&tok, "the", text);
        }
    }

    #[test]
    fn sentencepiece_stream_equals_full_decode() {
        let tok = Arc::new(testing::tiny_spm());
        for text in TEXTS {
            check(&tok, "", text);
            check(&tok, "ab", text);
        }
    }

    #[test]
    fn emoji_waits_for_its_last_byte() {
        let tok = Arc::new(testing::tiny_gpt2());
        let ids = tok.encode("🚀", false).expect("encode");
        assert_eq!(ids.len(), 4, "one byte token per byte");
        let chunks = stream(&tok, &[], &ids, false);
        assert_eq!(chunks, ["", "", "", "🚀", ""]);
    }

    #[test]
    fn sentencepiece_keeps_the_space_after_the_prompt() {
        let tok = Arc::new(testing::tiny_spm());
        let prompt = tok.encode("ab", true).expect("encode");
        let gen = tok.encode("c ab", false).expect("encode");
        // Without context "▁c" would decode as "c".
        assert_eq!(stream(&tok, &prompt, &gen, false).concat(), " c ab");
        // With no prompt at all the leading space goes, as in a full decode.
        assert_eq!(stream(&tok, &[], &gen, false).concat(), "c ab");
    }

    #[test]
    fn special_tokens_follow_skip_flag() {
        let tok = Arc::new(testing::tiny_gpt2());
        let eot = tok.token_to_id("<|endoftext|>").expect("eot");
        let the = tok.token_to_id("the").expect("the");
        assert_eq!(stream(&tok, &[], &[the, eot], true), ["the", "", ""]);
        assert_eq!(stream(&tok, &[], &[the, eot], false), ["the", "<|endoftext|>", ""]);
    }

    #[test]
    fn incomplete_bytes_are_flushed_at_finish() {
        let tok = Arc::new(testing::tiny_gpt2());
        // The first two bytes of "🚀" and nothing more.
        let chunks = stream(&tok, &[], &[0xF0, 0x9F], false);
        assert_eq!(chunks[..2], ["", ""]);
        assert_eq!(chunks[2], "\u{FFFD}");
    }

    #[test]
    fn long_streams_compact() {
        let tok = Arc::new(testing::tiny_gpt2());
        let text = "the 🚀 ".repeat(100);
        let gen = tok.encode(&text, false).expect("encode");
        let mut d = Detokenizer::new(tok.clone(), &[], false);
        let mut out = String::new();
        for &id in &gen {
            out.push_str(&d.push(id));
            assert!(d.ids.len() < COMPACT_AFTER + 8);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }
}
