//! Rebuilds a tokenizer from GGUF `tokenizer.ggml.*` metadata, following llama.cpp
//! (`src/llama-vocab.cpp`): `gpt2` is byte-level BPE with a pre-tokenizer chosen by
//! `tokenizer.ggml.pre`; `llama` is SentencePiece BPE whose merges come from token scores.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::TokenKind;
use crate::model::ModelError;

// llama.cpp token types (`llama_token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

pub(super) struct Built {
    pub inner: tokenizers::Tokenizer,
    pub kind: TokenKind,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// Typed access to metadata, with errors that name the file and the key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn err(&self, key: &str, problem: impl std::fmt::Display) -> ModelError {
        ModelError::invalid(self.path, format!("{key}: {problem}"))
    }

    fn wrong_type(&self, key: &str, want: &str, v: &Value) -> ModelError {
        self.err(key, format!("expected {want}, found {:?}", v.value_type()))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => {
                int(v).map(|i| Some(i != 0)).ok_or_else(|| self.wrong_type(key, "a bool", v))
            }
        }
    }

    fn id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>, ModelError> {
        let Some(v) = self.md.get(key) else { return Ok(None) };
        let id = int(v).ok_or_else(|| self.wrong_type(key, "an integer", v))?;
        if id < 0 || id as usize >= n_tokens {
            // llama.cpp ignores such ids too; a broken optional id should not stop loading.
            tracing::warn!("{}: {key} = {id} is not a token id; ignored", self.path.display());
            return Ok(None);
        }
        Ok(Some(id as u32))
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, ModelError> {
        let Some(a) = self.array(key)? else { return Ok(None) };
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.wrong_type(key, "an array of strings", v)),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let Some(a) = self.array(key)? else { return Ok(None) };
        a.iter()
            .map(|v| int(v).ok_or_else(|| self.wrong_type(key, "an array of integers", v)))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(a) = self.array(key)? else { return Ok(None) };
        a.iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                v => Err(self.wrong_type(key, "an array of floats", v)),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

fn int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

pub(super) fn build(md: &HashMap<String, Value>, path: &Path) -> Result<Built, ModelError> {
    let m = Meta { md, path };
    let model = m
        .str("tokenizer.ggml.model")?
        .ok_or_else(|| m.err("tokenizer.ggml.model", "missing: the file has no tokenizer"))?;
    let tokens = m
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| m.err("tokenizer.ggml.tokens", "missing"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(m.err("tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types = match m.ints("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != n => {
            return Err(
                m.err("tokenizer.ggml.token_type", format!("{} entries for {n} tokens", t.len()))
            )
        }
        Some(t) => t,
        None => vec![NORMAL; n],
    };

    let mut vocab = Vocab::with_capacity(n);
    for (id, &t) in tokens.iter().enumerate() {
        if vocab.contains_key(t) {
            // The first id keeps the text; the later one stays reachable by id only.
            tracing::warn!("{}: token {t:?} appears twice in the vocabulary", path.display());
            continue;
        }
        vocab.insert(t.to_string(), id as u32);
    }

    let pre = m.str("tokenizer.ggml.pre")?;
    let (mut inner, kind, default_add_bos) = match model {
        "gpt2" => {
            let pre = pre.unwrap_or_else(|| {
                // llama.cpp's choice for old files; their text may tokenize slightly off.
                tracing::warn!("{}: no tokenizer.ggml.pre; using \"default\"", path.display());
                "default"
            });
            let spec = pre_tokenizer(pre).unwrap_or_else(|| {
                tracing::warn!(
                    "{}: unknown tokenizer.ggml.pre {pre:?}; using the GPT-2 pre-tokenizer",
                    path.display()
                );
                PreSpec { regexes: &[GPT2], ignore_merges: false, add_bos: false }
            });
            let inner = byte_level_bpe(&m, vocab, &spec)?;
            (inner, TokenKind::ByteLevel, spec.add_bos)
        }
        "llama" => {
            let add_space_prefix = m.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let inner = sentencepiece_bpe(&m, &tokens, &types, vocab, add_space_prefix)?;
            (inner, TokenKind::SentencePiece, true)
        }
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("tokenizer.ggml.model {other:?} (supported: gpt2, llama)"),
            ))
        }
    };

    // Control, unknown and user-defined tokens are matched in raw text before the model runs,
    // as llama.cpp does, so that `<|im_start|>` in a prompt is one token.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| matches!(t, UNKNOWN | CONTROL | USER_DEFINED))
        .map(|(&text, &t)| AddedToken::from(text, t != USER_DEFINED).normalized(false))
        .collect();
    inner
        .add_special_tokens(added)
        .map_err(|e| m.err("tokenizer.ggml.token_type", format!("special tokens: {e}")))?;

    Ok(Built {
        inner,
        kind,
        bos: m.id("tokenizer.ggml.bos_token_id", n)?,
        eos: m.id("tokenizer.ggml.eos_token_id", n)?,
        add_bos: m.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos),
        add_eos: m.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    })
}

fn build_err(m: &Meta<'_>, key: &str, e: impl std::fmt::Display) -> ModelError {
    m.err(key, format!("cannot build the tokenizer: {e}"))
}

fn byte_level_bpe(
    m: &Meta<'_>,
    vocab: Vocab,
    spec: &PreSpec,
) -> Result<tokenizers::Tokenizer, ModelError> {
    const KEY: &str = "tokenizer.ggml.merges";
    let merge_texts = m.strings(KEY)?.ok_or_else(|| m.err(KEY, "missing (needed by gpt2)"))?;
    let merges: Merges = merge_texts
        .iter()
        .map(|s| {
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| m.err(KEY, format!("{s:?} is not two tokens")))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| build_err(m, KEY, e))?;

    let mut steps = regex_splits(spec).map_err(|e| build_err(m, "tokenizer.ggml.pre", e))?;
    // The regexes above do the splitting; ByteLevel only maps bytes to its alphabet.
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)));

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(inner)
}

fn sentencepiece_bpe(
    m: &Meta<'_>,
    tokens: &[&str],
    types: &[i64],
    vocab: Vocab,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, ModelError> {
    const KEY: &str = "tokenizer.ggml.scores";
    let scores = m.floats(KEY)?.ok_or_else(|| m.err(KEY, "missing (needed by llama)"))?;
    if scores.len() != tokens.len() {
        return Err(m.err(KEY, format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let merges = merges_from_scores(tokens, types, &scores, &vocab);
    let unk = m.id("tokenizer.ggml.unknown_token_id", tokens.len())?.map(|id| tokens[id as usize]);
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder.build().map_err(|e| build_err(m, KEY, e))?;

    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| build_err(m, "tokenizer.ggml.model", e))
    };
    let mut norm = Vec::new();
    if add_space_prefix {
        norm.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    norm.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
    let mut dec = vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        dec.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(NormalizerSequence::new(norm)))
        .map_err(|e| build_err(m, "tokenizer.ggml.model", e))?;
    inner.with_decoder(Some(DecoderSequence::new(dec)));
    Ok(inner)
}

/// SentencePiece BPE merges, as llama.cpp's SPM tokenizer applies them: two adjacent pieces
/// merge when their concatenation is a normal token, highest score first. BPE ranks follow
/// the score order (ties: lower merged id, then lower left id).
fn merges_from_scores(tokens: &[&str], types: &[i64], scores: &[f32], vocab: &Vocab) -> Merges {
    let piece = |s: &str| vocab.get(s).copied().filter(|&id| types[id as usize] == NORMAL);
    let mut found: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, &text) in tokens.iter().enumerate() {
        if types[id] != NORMAL || vocab.get(text) != Some(&(id as u32)) {
            continue;
        }
        for (pos, _) in text.char_indices().skip(1) {
            let (l, r) = text.split_at(pos);
            if let (Some(li), Some(ri)) = (piece(l), piece(r)) {
                found.push((scores[id], id as u32, li, ri));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    found
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].to_string(), tokens[r as usize].to_string()))
        .collect()
}

/// A pre-tokenizer: regexes applied in turn, each splitting every piece so far (matches and
/// the text between them both become pieces), as llama.cpp's `unicode_regex_split` does.
struct PreSpec {
    regexes: &'static [&'static str],
    ignore_merges: bool,
    add_bos: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const CJK: &str = "[\u{4e00}-\u{9fa5}\u{0800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
// Cased letters (Lu, Ll, Lt); written as escapes so no editor can normalise them.
const DEEPSEEK_LLM_LETTERS: &str = concat!(
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}",
    "\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}",
    "\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}",
    "\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}",
    "\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}",
    "\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}",
    "\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}",
    "\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}",
    "\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}",
    "\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}",
    "\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}",
    "\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}",
    "\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}",
    "\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}",
    "\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}",
    "\u{1e900}-\u{1e943}]+",
);
// Tekken and GPT-4o: the original tokenizer.json patterns, which fancy-regex can run as is
// (llama.cpp rewrites them only because std::regex lacks \p{Lu} and friends).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILING: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

fn regex_splits(spec: &PreSpec) -> tokenizers::Result<Vec<PreTokenizerWrapper>> {
    spec.regexes
        .iter()
        .map(|re| {
            let pattern = SplitPattern::Regex(re.to_string());
            Split::new(pattern, SplitDelimiterBehavior::Isolated, false).map(Into::into)
        })
        .collect()
}

/// `tokenizer.ggml.pre` to its pre-tokenizer, with llama.cpp's per-family defaults.
fn pre_tokenizer(pre: &str) -> Option<PreSpec> {
    type Regexes = &'static [&'static str];
    let spec = |regexes: Regexes| PreSpec { regexes, ignore_merges: false, add_bos: false };
    let llama3_like = |regexes: Regexes| PreSpec { regexes, ignore_merges: true, add_bos: true };
    Some(match pre {
        "default" => spec(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => llama3_like(&[LLAMA3]),
        "tekken" => llama3_like(&[TEKKEN]),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => spec(&[LLAMA3]),
        "deepseek-llm" => spec(&[
            "[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
            r"\s+$",
            CJK,
            r"\p{N}+",
        ]),
        "deepseek-coder" => spec(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"]),
        "deepseek-v3" | "hunyuan-dense" => spec(&[
            r"\p{N}{1,3}",
            "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
            DEEPSEEK3,
        ]),
        "falcon" => spec(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(&[r"\p{N}", GPT2])
        }
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "exaone4" | "trillion" | "granite-docling" => spec(&[GPT2]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" | "stablelm2" | "hunyuan" | "grok-2" => {
            spec(&[QWEN2])
        }
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(&[PORO]),
        "viking" => spec(&[PORO, r"\p{N}"]),
        "gpt-4o" | "llama4" | "minimax-m2" => spec(&[GPT4O]),
        "seed-coder" => spec(&[SEED_CODER]),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => spec(&[BAILING]),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::testing;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// Every known pre-tokenizer must compile under fancy-regex.
    #[test]
    fn all_pre_tokenizer_regexes_compile() {
        for pre in [
            "default",
            "llama3",
            "tekken",
            "dbrx",
            "glm4",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "smollm",
            "gpt-2",
            "qwen2",
            "bloom",
            "viking",
            "gpt-4o",
            "seed-coder",
            "bailingmoe",
        ] {
            let spec = pre_tokenizer(pre).expect("known");
            regex_splits(&spec).unwrap_or_else(|e| panic!("{pre}: {e}"));
        }
        assert!(pre_tokenizer("no-such-pre").is_none());
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let spec = pre_tokenizer(pre).expect("known pre-tokenizer");
        let chain = PreTokenizerSequence::new(regex_splits(&spec).expect("compiles"));
        let mut s = PreTokenizedString::from(text);
        chain.pre_tokenize(&mut s).expect("splits");
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_like_their_regexes() {
        let text = "Hello world!!! 12345\n\n  x's I'M";
        assert_eq!(
            pieces("llama3", text),
            ["Hello", " world", "!!!", " ", "123", "45", "\n\n", " ", " x", "'s", " I", "'M"]
        );
        assert_eq!(
            pieces("qwen2", text),
            [
                "Hello", " world", "!!!", " ", "1", "2", "3", "4", "5", "\n\n", " ", " x", "'s",
                " I", "'M"
            ]
        );
        // GPT-2 matches contractions in lower case only, and keeps numbers whole.
        assert_eq!(
            pieces("gpt-2", text),
            ["Hello", " world", "!!!", " 12345", "\n\n ", " x", "'s", " I", "'", "M"]
        );
        // smollm: digits one by one first, then GPT-2.
        assert_eq!(pieces("smollm", "a12 b"), ["a", "1", "2", " b"]);
        // llama.cpp's "default": punctuation, GPT-2, numbers, then groups of three digits.
        assert_eq!(
            pieces("default", "Hello, world! 1234"),
            ["Hello", ",", " world", "!", " ", "123", "4"]
        );
    }

    #[test]
    fn tiny_gpt2_encodes_like_bpe() {
        let t = testing::tiny_gpt2();
        let id = |s: &str| t.token_to_id(s).expect(s);
        // "the" merges fully; " the" uses the Ġ merges; digits split one by one (smollm).
        assert_eq!(t.encode("the", true).expect("encode"), vec![id("the")]);
        assert_eq!(t.encode("the the", true).expect("encode"), vec![id("the"), id("Ġthe")]);
        assert_eq!(t.encode("12", false).expect("encode"), vec![id("1"), id("2")]);
        // Special tokens in text are single ids; add_special_tokens adds nothing (no BOS).
        let eot = id("<|endoftext|>");
        assert_eq!(t.encode("<|endoftext|>the", true).expect("encode"), vec![eot, id("the")]);
        // Bytes outside the merges stay bytes and decode back.
        let text = "héllo 🚀\n\tthe  end";
        let ids = t.encode(text, false).expect("encode");
        assert_eq!(t.decode(&ids, false).expect("decode"), text);
        assert_eq!(t.decode(&[eot, id("the")], true).expect("decode"), "the");
    }

    #[test]
    fn tiny_spm_encodes_by_score() {
        let t = testing::tiny_spm();
        let id = |s: &str| t.token_to_id(s).expect(s);
        let bos = t.bos_token_id.expect("bos");
        // "▁ab" outscores "ab"+"c"... the highest-scoring merge goes first.
        assert_eq!(t.encode("ab", true).expect("encode"), vec![bos, id("▁ab")]);
        assert_eq!(t.encode("abc", false).expect("encode"), vec![id("▁ab"), id("c")]);
        assert_eq!(t.encode("bc", false).expect("encode"), vec![id("▁"), id("bc")]);
        assert_eq!(t.encode("cab ab", false).expect("encode"), vec![id("▁c"), id("ab"), id("▁ab")]);
        // Unknown chars fall back to bytes; the leading space is stripped when decoding.
        let ids = t.encode("a é", false).expect("encode");
        assert_eq!(ids, vec![id("▁a"), id("▁"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(t.decode(&ids, false).expect("decode"), "a é");
        // A special token restarts the space prefix, as llama.cpp does.
        let ids = t.encode("a</s>b", false).expect("encode");
        assert_eq!(ids, vec![id("▁a"), id("</s>"), id("▁b")]);
        assert_eq!(t.decode(&ids, true).expect("decode"), "a b");
    }

    #[test]
    fn metadata_errors_name_file_and_key() {
        let path = Path::new("/models/x.gguf");
        let mut md = testing::tiny_gpt2_metadata();
        md.remove("tokenizer.ggml.merges");
        let e = build(&md, path).err().expect("no merges");
        let msg = e.to_string();
        assert!(msg.contains("/models/x.gguf") && msg.contains("tokenizer.ggml.merges"), "{msg}");

        let mut md = testing::tiny_gpt2_metadata();
        md.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        let msg = build(&md, path).err().expect("unsupported").to_string();
        assert!(msg.contains("unsupported") && msg.contains("t5"), "{msg}");

        let mut md = testing::tiny_gpt2_metadata();
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(1)]));
        let msg = build(&md, path).err().expect("short types").to_string();
        assert!(msg.contains("token_type"), "{msg}");

        let mut md = testing::tiny_gpt2_metadata();
        md.insert("tokenizer.ggml.tokens".into(), Value::U32(3));
        let msg = build(&md, path).err().expect("bad type").to_string();
        assert!(msg.contains("tokenizer.ggml.tokens") && msg.contains("array"), "{msg}");

        let mut md = testing::tiny_gpt2_metadata();
        md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("Ġ zz".into())]));
        let msg = build(&md, path).err().expect("bad merge").to_string();
        assert!(msg.contains("tokenizer.ggml.merges"), "{msg}");

        // Unknown pre-tokenizers fall back to GPT-2 rather than failing.
        let mut md = testing::tiny_gpt2_metadata();
        md.insert("tokenizer.ggml.pre".into(), Value::String("brand-new".into()));
        assert!(build(&md, path).is_ok());
    }
}
