//! The two logprobs shapes: completions' parallel arrays and chat's list of token objects.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use utoipa::ToSchema;

use super::generation::GeneratedToken;
use crate::engine::TokenLogprob;
use crate::model::tokenizer::Tokenizer;

/// How tokens are shown in logprobs; the tokenizer in production, a table in tests.
pub trait TokenTexts {
    /// The token's text (U+FFFD where it holds only part of a UTF-8 sequence).
    fn text(&self, id: u32) -> String;
    /// The exact bytes the token stands for.
    fn bytes(&self, id: u32) -> Option<Vec<u8>>;
    /// How the token is named in logprobs (its text unless asked otherwise).
    fn label(&self, id: u32) -> String {
        self.text(id)
    }
}

impl TokenTexts for Tokenizer {
    fn text(&self, id: u32) -> String {
        self.token_text(id)
    }
    fn bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.token_bytes(id)
    }
}

/// The tokenizer's texts, with tokens named `token_id:{id}` when a request asks for ids
/// (vLLM's `return_tokens_as_token_ids`: exact ids where texts are ambiguous).
pub struct TokenNames<'a> {
    pub tokenizer: &'a Tokenizer,
    pub as_ids: bool,
}

impl TokenTexts for TokenNames<'_> {
    fn text(&self, id: u32) -> String {
        self.tokenizer.token_text(id)
    }
    fn bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.tokenizer.token_bytes(id)
    }
    fn label(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.text(id)
        }
    }
}

/// OpenAI's stand-in for "too unlikely to report"; JSON has no -inf.
const MIN_LOGPROB: f32 = -9999.0;

fn clamp(logprob: f32) -> f32 {
    if logprob.is_nan() || logprob < MIN_LOGPROB {
        MIN_LOGPROB
    } else {
        logprob
    }
}

/// Token text -> logprob in rank order, serialized as a JSON object. Distinct ids with the same
/// text would repeat a key; the more likely one is kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopMap(pub Vec<(String, f32)>);

impl TopMap {
    fn insert(&mut self, text: String, logprob: f32) {
        if !self.0.iter().any(|(t, _)| *t == text) {
            self.0.push((text, clamp(logprob)));
        }
    }
}

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Completions-style logprobs (`logprobs: k` on /v1/completions).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for the first prompt token when the prompt is echoed.
    pub token_logprobs: Vec<Option<f32>>,
    /// Up to `k` alternatives plus the chosen token, per position.
    #[schema(value_type = Vec<Option<std::collections::HashMap<String, f32>>>)]
    pub top_logprobs: Vec<Option<TopMap>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Builds `CompletionLogprobs` for one choice, across stream chunks (it keeps the text offset).
pub struct CompletionLogprobsWriter {
    top_k: usize,
    offset: usize,
}

impl CompletionLogprobsWriter {
    pub fn new(top_k: usize) -> Self {
        Self { top_k, offset: 0 }
    }

    /// The echoed prompt's tokens; `logprobs[i]` belongs to `prompt_ids[i]` (the first is None).
    pub fn prompt(
        &mut self,
        tokens_of: &impl TokenTexts,
        prompt_ids: &[u32],
        logprobs: &[Option<TokenLogprob>],
        out: &mut CompletionLogprobs,
    ) {
        for (i, &id) in prompt_ids.iter().enumerate() {
            self.push(tokens_of, id, logprobs.get(i).and_then(Option::as_ref), out);
        }
    }

    pub fn tokens(
        &mut self,
        tokens_of: &impl TokenTexts,
        tokens: &[GeneratedToken],
        out: &mut CompletionLogprobs,
    ) {
        for t in tokens {
            self.push(tokens_of, t.token_id, t.logprob.as_ref(), out);
        }
    }

    fn push(
        &mut self,
        tokens_of: &impl TokenTexts,
        token_id: u32,
        logprob: Option<&TokenLogprob>,
        out: &mut CompletionLogprobs,
    ) {
        let label = tokens_of.label(token_id);
        out.token_logprobs.push(logprob.map(|lp| clamp(lp.logprob)));
        out.top_logprobs.push(logprob.map(|lp| {
            let mut top = TopMap::default();
            for &(id, value) in lp.top.iter().take(self.top_k) {
                top.insert(tokens_of.label(id), value);
            }
            // vLLM also lists the chosen token, so its entry is never missing.
            top.insert(label.clone(), lp.logprob);
            top
        }));
        // Offsets count the text itself, however tokens are named.
        out.text_offset.push(self.offset);
        self.offset += tokens_of.text(token_id).chars().count();
        out.tokens.push(label);
    }
}

/// Chat-style logprobs (`logprobs: true`, `top_logprobs: k`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    #[schema(required = true)]
    pub content: Option<Vec<ChatTokenLogprob>>,
    /// Always `null`: no refusals are generated.
    #[schema(required = true)]
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

/// OpenAI's `ChatCompletionTokenLogprob`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// UTF-8 bytes of `token`.
    #[schema(required = true)]
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    #[schema(required = true)]
    pub bytes: Option<Vec<u8>>,
}

/// Chat logprobs of some generated tokens, with at most `top_k` alternatives each.
pub fn chat_logprobs(
    tokens_of: &impl TokenTexts,
    tokens: &[GeneratedToken],
    top_k: usize,
) -> ChatLogprobs {
    let content = tokens
        .iter()
        .filter_map(|t| {
            let lp = t.logprob.as_ref()?;
            let top_logprobs = lp
                .top
                .iter()
                .take(top_k)
                .map(|&(id, logprob)| TopLogprob {
                    token: tokens_of.label(id),
                    logprob: clamp(logprob),
                    bytes: tokens_of.bytes(id),
                })
                .collect();
            Some(ChatTokenLogprob {
                token: tokens_of.label(t.token_id),
                logprob: clamp(lp.logprob),
                bytes: tokens_of.bytes(t.token_id),
                top_logprobs,
            })
        })
        .collect();
    ChatLogprobs { content: Some(content), refusal: None }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What a client parses: f32 values go over the wire in their shortest f32 form.
    fn wire<T: Serialize>(value: &T) -> serde_json::Value {
        serde_json::from_str(&serde_json::to_string(value).unwrap()).unwrap()
    }

    /// Token 4 is the first byte of a two-byte character.
    struct Table;

    impl TokenTexts for Table {
        fn text(&self, id: u32) -> String {
            String::from_utf8_lossy(&self.bytes(id).unwrap_or_default()).into_owned()
        }
        fn bytes(&self, id: u32) -> Option<Vec<u8>> {
            let table: [&[u8]; 5] = [b"a", b"bc", "é".as_bytes(), b"d", &[0xC3]];
            Some(table.get(id as usize).copied().unwrap_or(b"?").to_vec())
        }
    }

    fn lp(id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob { token_id: id, logprob, top: top.to_vec() }
    }

    fn gen(id: u32, l: TokenLogprob) -> GeneratedToken {
        GeneratedToken { token_id: id, logprob: Some(l) }
    }

    #[test]
    fn completion_shape_with_echo() {
        let mut out = CompletionLogprobs::default();
        let mut w = CompletionLogprobsWriter::new(1);
        w.prompt(&Table, &[0, 1], &[None, Some(lp(1, -1.0, &[(3, -0.5), (1, -1.0)]))], &mut out);
        w.tokens(&Table, &[gen(2, lp(2, f32::NEG_INFINITY, &[(0, -0.1)]))], &mut out);
        let v = wire(&out);
        assert_eq!(
            v,
            json!({
                "tokens": ["a", "bc", "é"],
                "token_logprobs": [null, -1.0, -9999.0],
                "top_logprobs": [null, {"d": -0.5, "bc": -1.0}, {"a": -0.1, "é": -9999.0}],
                "text_offset": [0, 1, 3],
            })
        );
    }

    #[test]
    fn completion_offsets_continue_across_chunks() {
        let mut w = CompletionLogprobsWriter::new(0);
        let mut first = CompletionLogprobs::default();
        w.tokens(&Table, &[gen(1, lp(1, -0.2, &[]))], &mut first);
        let mut second = CompletionLogprobs::default();
        w.tokens(&Table, &[gen(2, lp(2, -0.3, &[])), gen(0, lp(0, -0.4, &[]))], &mut second);
        assert_eq!(first.text_offset, vec![0]);
        assert_eq!(second.text_offset, vec![2, 3]);
        // With k = 0 only the chosen token is listed.
        assert_eq!(second.top_logprobs[0], Some(TopMap(vec![("é".into(), -0.3)])));
    }

    #[test]
    fn top_map_keeps_the_first_of_equal_texts() {
        let mut out = CompletionLogprobs::default();
        let mut w = CompletionLogprobsWriter::new(3);
        w.tokens(&Table, &[gen(0, lp(0, -0.1, &[(0, -0.1), (9, -2.0), (10, -3.0)]))], &mut out);
        assert_eq!(out.top_logprobs[0], Some(TopMap(vec![("a".into(), -0.1), ("?".into(), -2.0)])));
    }

    #[test]
    fn chat_shape() {
        let tokens = [gen(2, lp(2, -0.25, &[(2, -0.25), (0, -1.5), (1, -2.0)]))];
        let v = wire(&chat_logprobs(&Table, &tokens, 2));
        assert_eq!(
            v,
            json!({
                "content": [{
                    "token": "é",
                    "logprob": -0.25,
                    "bytes": [195, 169],
                    "top_logprobs": [
                        {"token": "é", "logprob": -0.25, "bytes": [195, 169]},
                        {"token": "a", "logprob": -1.5, "bytes": [97]},
                    ],
                }],
                "refusal": null,
            })
        );
    }

    #[test]
    fn chat_bytes_are_the_token_bytes() {
        let tokens = [gen(4, lp(4, -0.5, &[]))];
        let out = chat_logprobs(&Table, &tokens, 0).content.unwrap();
        assert_eq!(out[0].token, "\u{FFFD}");
        assert_eq!(out[0].bytes, Some(vec![0xC3]));
    }

    #[test]
    fn chat_top_zero_has_empty_alternatives() {
        let tokens = [gen(0, lp(0, -0.5, &[(0, -0.5)]))];
        let out = chat_logprobs(&Table, &tokens, 0);
        assert!(out.content.unwrap()[0].top_logprobs.is_empty());
    }
}
