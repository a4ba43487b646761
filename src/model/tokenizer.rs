//! Llama-family tokenizers from GGUF metadata or a Hugging Face `tokenizer.json`.
//!
//! Both sources end up as a `tokenizers::Tokenizer`; GGUF vocabularies are rebuilt into the
//! equivalent byte-level BPE (`gpt2`) or byte-fallback BPE (`llama`, SentencePiece) pipeline
//! so that encoding matches llama.cpp and the Hugging Face reference.

mod gguf;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use candle_core::quantized::gguf_file;

use super::ModelError;

/// How a vocabulary entry maps to the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// GPT-2 byte-level alphabet: every byte is a printable char (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` tokens are raw bytes.
    SentencePiece,
    /// Tokens are plain text.
    Plain,
}

#[derive(Clone)]
pub struct Tokenizer {
    pub bos_token_id: Option<u32>,
    /// Ids that end generation; the first is the model's EOS token.
    pub eos_token_ids: Vec<u32>,
    inner: tokenizers::Tokenizer,
    kind: TokenKind,
    add_bos: bool,
    add_eos: bool,
    /// Vocabulary strings by id (empty where the id is unused).
    tokens: Vec<String>,
    /// Per id: 0 = vocabulary token, 1 = added token, 2 = special added token.
    added: Vec<u8>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

impl Tokenizer {
    /// From GGUF metadata (`tokenizer.ggml.*`). `path` is only used in error messages.
    pub fn from_gguf(
        metadata: &HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let built = gguf::build(metadata, path)?;
        let mut tok = Self::assemble(built.inner, built.kind, path)?;
        tok.bos_token_id = built.bos;
        tok.eos_token_ids = built.eos.into_iter().collect();
        tok.add_bos = built.add_bos;
        tok.add_eos = built.add_eos;
        Ok(tok)
    }

    /// From a Hugging Face `tokenizer.json` plus optional `tokenizer_config.json`.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, ModelError> {
        let bytes = std::fs::read(tokenizer_json)
            .map_err(|source| ModelError::Io { path: tokenizer_json.to_path_buf(), source })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            ModelError::invalid(tokenizer_json, format!("not a valid tokenizer.json: {e}"))
        })?;
        let config = match tokenizer_config {
            Some(p) => Some(read_json(p)?),
            None => None,
        };
        let kind = hf_token_kind(&inner);
        let mut tok = Self::assemble(inner, kind, tokenizer_json)?;

        let named_id = |key: &str| -> Option<u32> {
            let name = special_token_name(config.as_ref()?.get(key)?)?;
            let id = tok.inner.token_to_id(name);
            if id.is_none() {
                tracing::warn!(
                    "{}: {key} {name:?} is not in the vocabulary",
                    tokenizer_json.display()
                );
            }
            id
        };
        let bos = named_id("bos_token");
        let eos = named_id("eos_token");
        let flag = |key: &str| config.as_ref()?.get(key)?.as_bool();
        let (add_bos_flag, add_eos_flag) = (flag("add_bos_token"), flag("add_eos_token"));

        // What the tokenizer.json post-processor adds, for configs that do not say.
        let enc = |special: bool| {
            tok.inner.encode_fast("a", special).map(|e| e.get_ids().to_vec()).map_err(|e| {
                ModelError::invalid(tokenizer_json, format!("cannot encode a test string: {e}"))
            })
        };
        let (with, without) = (enc(true)?, enc(false)?);
        let prepended = (with.len() > without.len() && with.first() != without.first())
            .then(|| with.first().copied())
            .flatten();
        let appended = (with.len() > without.len() && with.last() != without.last())
            .then(|| with.last().copied())
            .flatten();

        tok.bos_token_id = bos.or(prepended);
        tok.eos_token_ids = eos.into_iter().collect();
        tok.add_bos = add_bos_flag.unwrap_or(prepended.is_some() && prepended == tok.bos_token_id);
        tok.add_eos = add_eos_flag.unwrap_or(appended.is_some() && appended == eos);
        Ok(tok)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        kind: TokenKind,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let vocab = inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if size > 16 * vocab.len() + 1024 {
            return Err(ModelError::invalid(
                path,
                format!("token ids up to {size} are too sparse"),
            ));
        }
        let mut tokens = vec![String::new(); size];
        for (text, id) in vocab {
            tokens[id as usize] = text;
        }
        let mut added = vec![0u8; size];
        for (id, token) in inner.get_added_tokens_decoder() {
            if let Some(slot) = added.get_mut(id as usize) {
                *slot = if token.special { 2 } else { 1 };
            }
        }
        Ok(Self {
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            inner,
            kind,
            add_bos: false,
            add_eos: false,
            tokens,
            added,
        })
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) map to their ids.
    /// `add_special_tokens` adds BOS when the model's tokenizer asks for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        // The post-processor is bypassed: BOS/EOS follow the model's own flags instead.
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 2);
        if add_special_tokens && self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special_tokens && self.add_eos {
            ids.extend(self.eos_token_ids.first());
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The text of one token as shown in logprobs (special tokens included). Tokens that are
    /// only part of a UTF-8 sequence show U+FFFD; [`Tokenizer::token_bytes`] has their bytes.
    pub fn token_text(&self, id: u32) -> String {
        match self.token_bytes(id) {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => String::new(),
        }
    }

    /// The bytes one token stands for; `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let text = self.token_str(id)?;
        if self.added.get(id as usize).is_some_and(|&a| a > 0) {
            return Some(text.as_bytes().to_vec());
        }
        Some(match self.kind {
            TokenKind::ByteLevel => byte_level_decode(text),
            TokenKind::SentencePiece => match parse_byte_token(text) {
                Some(b) => vec![b],
                None => text.replace('▁', " ").into_bytes(),
            },
            TokenKind::Plain => text.as_bytes().to_vec(),
        })
    }

    /// The vocabulary string of a token as stored (e.g. `Ġthe`, `▁the`, `<0x0A>`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str).filter(|t| !t.is_empty())
    }

    /// The id of a vocabulary string or added token, e.g. `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.added.get(id as usize) == Some(&2)
    }

    /// Number of token ids (highest id + 1), added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// BOS as text, for chat templates (`{{ bos_token }}`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token_id.and_then(|id| self.token_str(id))
    }

    /// EOS as text, for chat templates (`{{ eos_token }}`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token_ids.first().and_then(|&id| self.token_str(id))
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos_token_id.is_some()
    }

    /// The wrapped `tokenizers` tokenizer (e.g. to save it as tokenizer.json).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let bytes = std::fs::read(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::invalid(path, format!("not valid JSON: {e}")))
}

/// `"<s>"` or `{"content": "<s>", ...}` as tokenizer_config.json writes special tokens.
fn special_token_name(v: &serde_json::Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content")?.as_str())
}

fn hf_token_kind(inner: &tokenizers::Tokenizer) -> TokenKind {
    let decoder = inner.get_decoder().and_then(|d| serde_json::to_string(d).ok());
    let pre = inner.get_pre_tokenizer().and_then(|p| serde_json::to_string(p).ok());
    let has = |s: &Option<String>, what: &str| s.as_deref().is_some_and(|s| s.contains(what));
    if has(&decoder, "\"ByteLevel\"") || (decoder.is_none() && has(&pre, "\"ByteLevel\"")) {
        TokenKind::ByteLevel
    } else if has(&decoder, "\"ByteFallback\"")
        || has(&decoder, "\"Metaspace\"")
        || has(&decoder, "▁")
    {
        TokenKind::SentencePiece
    } else {
        TokenKind::Plain
    }
}

/// GPT-2's byte-to-char table: printable Latin-1 bytes map to themselves, the other bytes to
/// U+0100 upwards in byte order, so every byte has a visible, non-space char.
pub(crate) static BYTE_TO_CHAR: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        // ok: codes are below 0x144, all valid scalar values.
        *slot = char::from_u32(code).expect("valid char");
    }
    table
});

fn byte_level_char(c: char) -> Option<u8> {
    static CHAR_TO_BYTE: LazyLock<HashMap<char, u8>> =
        LazyLock::new(|| BYTE_TO_CHAR.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect());
    CHAR_TO_BYTE.get(&c).copied()
}

/// Byte-level token text to bytes; a token with chars outside the alphabet is taken as
/// plain text, as the Hugging Face ByteLevel decoder does.
fn byte_level_decode(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(byte_level_char)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

/// `<0x0A>` -> 0x0A.
pub(crate) fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_matches_gpt2() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'\t' as usize], 'ĉ');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        assert_eq!(byte_level_decode("Ġthe"), b" the");
        assert_eq!(byte_level_decode("ðŁ"), vec![0xF0, 0x9F]);
        // Not in the alphabet: plain text.
        assert_eq!(byte_level_decode("a b"), b"a b");
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(0x0A));
        assert_eq!(parse_byte_token("<0xff>"), Some(0xFF));
        assert_eq!(parse_byte_token("<0x0A"), None);
        assert_eq!(parse_byte_token("<0x123>"), None);
    }

    #[test]
    fn token_text_of_each_kind() {
        let t = testing::tiny_gpt2();
        let id = t.token_to_id("Ġthe").expect("in vocab");
        assert_eq!(t.token_text(id), " the");
        assert_eq!(t.token_str(id), Some("Ġthe"));
        let eot = t.token_to_id("<|endoftext|>").expect("in vocab");
        assert_eq!(t.token_text(eot), "<|endoftext|>");
        assert!(t.is_special(eot));
        assert_eq!(t.token_text(u32::MAX), "");

        let s = testing::tiny_spm();
        let id = s.token_to_id("▁ab").expect("in vocab");
        assert_eq!(s.token_text(id), " ab");
        let nl = s.token_to_id("<0x0A>").expect("in vocab");
        assert_eq!(s.token_text(nl), "\n");
        let bos = s.bos_token_id.expect("bos");
        assert_eq!(s.token_text(bos), "<s>");
        assert_eq!(s.bos_token(), Some("<s>"));
        assert_eq!(s.eos_token(), Some("</s>"));
    }

    #[test]
    fn hf_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (src, config) in [
            (
                testing::tiny_spm(),
                r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                    "add_bos_token": true}"#,
            ),
            (testing::tiny_gpt2(), r#"{"eos_token": "<|endoftext|>"}"#),
        ] {
            let json = dir.path().join("tokenizer.json");
            let cfg = dir.path().join("tokenizer_config.json");
            std::fs::write(&json, src.inner().to_string(false).expect("serialize")).expect("write");
            std::fs::write(&cfg, config).expect("write");
            let hf = Tokenizer::from_hf_files(&json, Some(&cfg)).expect("loads");
            assert_eq!(hf.kind(), src.kind());
            assert_eq!(hf.bos_token_id, src.bos_token_id);
            assert_eq!(hf.eos_token_ids, src.eos_token_ids);
            assert_eq!(hf.vocab_size(), src.vocab_size());
            for text in ["the cab abc", " a\nb", "héllo <s>x</s>", "<|endoftext|>the"] {
                let ids = src.encode(text, true).expect("encode");
                assert_eq!(hf.encode(text, true).expect("encode"), ids, "{text:?}");
                assert_eq!(
                    hf.decode(&ids, false).expect("decode"),
                    src.decode(&ids, false).expect("decode")
                );
            }
        }
    }

    #[test]
    fn hf_files_report_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("tokenizer.json");
        let missing = Tokenizer::from_hf_files(&json, None).expect_err("missing file");
        assert!(missing.to_string().contains("tokenizer.json"), "{missing}");
        std::fs::write(&json, "{not json").expect("write");
        let bad = Tokenizer::from_hf_files(&json, None).expect_err("bad file");
        assert!(bad.to_string().contains("not a valid tokenizer.json"), "{bad}");
    }
}
