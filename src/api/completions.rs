//! `POST /v1/completions`: text prompts (or token ids) in, `text_completion` objects out.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::extract::ApiJson;
use super::generation::{merge, Delta, Finish, Generation, TextOptions, Usage};
use super::logging::RequestLog;
use super::logprobs::{CompletionLogprobs, CompletionLogprobsWriter, TokenNames};
use super::prompt::{decode_ids, encode_texts};
use super::sampling::{
    check_context, check_token_ids, include_usage, resolve_model, sampling_params, seed_for_choice,
    stop_strings, validate_max_tokens, validate_n, SamplingInput, Stop, StreamOptions,
};
use super::sse::{json_event, stream_choices, ChunkFormat};
use super::{unix_now, AppState};
use crate::model::tokenizer::Tokenizer;

/// `max_tokens` when the request does not say (OpenAI's default).
const DEFAULT_MAX_TOKENS: usize = 16;
/// Most alternatives per position for completions `logprobs` (OpenAI's limit).
const MAX_LOGPROBS: i64 = 5;

/// `prompt`: a string, strings, token ids, or lists of token ids; one choice set per prompt.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for Prompt {
    // By hand, so a wrong shape gets one clear message instead of "no variant matched".
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const SHAPE: &str = "prompt must be a string, an array of strings, an array of token \
                             ids, or an array of arrays of token ids";
        fn token(v: &Value) -> Option<u32> {
            v.as_u64().and_then(|t| u32::try_from(t).ok())
        }
        fn tokens(items: &[Value]) -> Option<Vec<u32>> {
            items.iter().map(token).collect()
        }
        let items = match Value::deserialize(deserializer)? {
            Value::String(s) => return Ok(Prompt::Text(s)),
            Value::Array(items) => items,
            _ => return Err(D::Error::custom(SHAPE)),
        };
        let parsed = match items.first() {
            None => Some(Prompt::Texts(Vec::new())),
            Some(Value::String(_)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .map(Prompt::Texts),
            Some(Value::Number(_)) => tokens(&items).map(Prompt::Tokens),
            Some(Value::Array(_)) => items
                .iter()
                .map(|v| v.as_array().and_then(|a| tokens(a)))
                .collect::<Option<_>>()
                .map(Prompt::TokenLists),
            Some(_) => None,
        };
        parsed.ok_or_else(|| {
            D::Error::custom(format!("{SHAPE}; token ids are integers in [0, 2^32)"))
        })
    }
}

/// OpenAI's `CreateCompletionRequest`, plus vLLM's sampling extensions.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Must be the served model's id when given.
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Not supported: a request with a non-empty suffix is rejected.
    pub suffix: Option<String>,
    /// Tokens to generate at most (default 16).
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy (default 1).
    pub temperature: Option<f64>,
    /// In (0, 1] (default 1).
    pub top_p: Option<f64>,
    /// Choices per prompt (default 1).
    pub n: Option<i64>,
    /// Only `n` (or absent) is supported.
    pub best_of: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// 0 to 5: return the chosen tokens' logprobs and this many alternatives.
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text (and its logprobs, when asked for).
    pub echo: Option<bool>,
    /// Up to 4 strings; generation stops before any of them.
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    /// -2 to 2.
    pub presence_penalty: Option<f64>,
    /// -2 to 2.
    pub frequency_penalty: Option<f64>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// vLLM: -1 or 0 disables, else sample among the top k tokens.
    pub top_k: Option<i64>,
    /// vLLM: 0 to 1.
    pub min_p: Option<f64>,
    /// vLLM: > 0; 1 disables.
    pub repetition_penalty: Option<f64>,
    /// vLLM: also stop at these token ids.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM: keep generating past EOS.
    pub ignore_eos: Option<bool>,
    /// vLLM: leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM: name tokens in logprobs `token_id:{id}` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum TextCompletionObject {
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// OpenAI's `CreateCompletionResponse`; stream chunks have the same shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// On responses; on stream chunks `null` with `include_usage` (absent otherwise), except
    /// the last chunk which has the totals and no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    /// Runs over prompts x n: choice `j` of prompt `p` is `p * n + j`.
    pub index: usize,
    #[schema(required = true)]
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` on stream chunks until the choice's last one.
    #[schema(required = true)]
    pub finish_reason: Option<Finish>,
}

/// A tokenized prompt and, with `echo`, the text to prepend.
struct PreparedPrompt {
    ids: Vec<u32>,
    echo: String,
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or with `stream` SSE chunks of the same \
            shape ending with `data: [DONE]`",
            content((CompletionResponse = "application/json"),
                    (CompletionResponse = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 429, description = "Waiting queue full; see Retry-After", body = ErrorResponse),
        (status = 503, description = "Engine stopped", body = ErrorResponse),
    )
)]
pub async fn create_completion(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<RequestLog>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let adapter = resolve_model(req.model.as_deref(), &state)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field("suffix", "suffix is not supported."));
    }
    let n = validate_n(req.n)?;
    match req.best_of {
        Some(b) if b != n as i64 => {
            return Err(ApiError::field(
                "best_of",
                format!("best_of must equal n ({n}) when given, got {b}."),
            ))
        }
        _ => {}
    }
    let max_tokens =
        validate_max_tokens("max_tokens", req.max_tokens)?.unwrap_or(DEFAULT_MAX_TOKENS);
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::field(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}."),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    let stream = req.stream.unwrap_or(false);
    let include_usage = include_usage(stream, req.stream_options.as_ref())?;
    let options = TextOptions {
        stops: stop_strings(req.stop.as_ref())?,
        skip_special_tokens: req.skip_special_tokens.unwrap_or(true),
        adapter,
    };
    let vocab_size = state.tokenizer.vocab_size();
    let mut params = sampling_params(
        &SamplingInput {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            seed: req.seed,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            stop_token_ids: req.stop_token_ids.as_deref(),
            ignore_eos: req.ignore_eos,
        },
        vocab_size,
    )?;
    params.max_tokens = max_tokens;
    params.logprobs = logprobs;
    params.prompt_logprobs = if echo { logprobs } else { None };

    let prompts = prepare_prompts(&state.tokenizer, req.prompt, echo, &options).await?;
    for p in &prompts {
        check_context(p.ids.len(), max_tokens, state.model.max_model_len, "prompt", "prompt")?;
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    log.set_prompt_tokens(prompt_tokens);

    // Submit every choice before awaiting any: if one is refused, dropping the others aborts them.
    let mut generations = Vec::with_capacity(prompts.len() * n);
    for (p, prompt) in prompts.iter().enumerate() {
        for j in 0..n {
            let mut params = params.clone();
            params.seed = seed_for_choice(params.seed, j);
            let g = Generation::start(
                &state.engine,
                &state.tokenizer,
                &prompt.ids,
                params,
                &options,
                arrival,
            )?;
            generations.push((p * n + j, g));
        }
    }

    let format = CompletionChunks {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: options.adapter.as_ref().map_or_else(|| state.model.id.clone(), |a| a.id.clone()),
        tokenizer: state.tokenizer.clone(),
        tokens_as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        prompts,
        n,
        echo,
        logprobs,
        writers: Vec::new(),
        started: vec![false; generations.len()],
        include_usage,
    };
    if stream {
        return Ok(stream_choices(merge(generations), format, prompt_tokens, include_usage, log));
    }

    let results = futures::future::try_join_all(
        generations
            .into_iter()
            .map(|(index, g)| async move { Ok::<_, ApiError>((index, g.collect().await?)) }),
    )
    .await?;
    let completion_tokens: usize = results.iter().map(|(_, c)| c.tokens.len()).sum();
    log.add_completion_tokens(completion_tokens);
    let mut format = format;
    let choices = results
        .into_iter()
        .map(|(index, c)| {
            let delta = Delta {
                text: c.text,
                tokens: c.tokens,
                prompt_logprobs: c.prompt_logprobs,
                finish: Some(c.finish),
            };
            format.choice(index, delta)
        })
        .collect();
    let body = format.response(choices, Some(Some(Usage::new(prompt_tokens, completion_tokens))));
    Ok(Json(body).into_response())
}

/// Validates and tokenizes the prompts; keeps the echo text of each.
async fn prepare_prompts(
    tokenizer: &Arc<Tokenizer>,
    prompt: Prompt,
    echo: bool,
    options: &TextOptions,
) -> Result<Vec<PreparedPrompt>, ApiError> {
    let empty = || ApiError::field("prompt", "The prompt must not be empty.");
    let prompts = match prompt {
        Prompt::Text(t) => Err(vec![t]),
        Prompt::Texts(t) => Err(t),
        Prompt::Tokens(ids) => Ok(vec![ids]),
        Prompt::TokenLists(lists) => Ok(lists),
    };
    let prepared: Vec<PreparedPrompt> = match prompts {
        Err(texts) => {
            if texts.is_empty() || texts.iter().any(String::is_empty) {
                return Err(empty());
            }
            let ids = encode_texts(tokenizer, texts.clone()).await?;
            let echoes = if echo { texts } else { vec![String::new(); ids.len()] };
            ids.into_iter().zip(echoes).map(|(ids, echo)| PreparedPrompt { ids, echo }).collect()
        }
        Ok(lists) => {
            if lists.is_empty() || lists.iter().any(Vec::is_empty) {
                return Err(empty());
            }
            for ids in &lists {
                check_token_ids("prompt", ids, tokenizer.vocab_size())?;
            }
            let echoes = if echo {
                decode_ids(tokenizer, lists.clone(), options.skip_special_tokens).await?
            } else {
                vec![String::new(); lists.len()]
            };
            lists.into_iter().zip(echoes).map(|(ids, echo)| PreparedPrompt { ids, echo }).collect()
        }
    };
    if prepared.iter().any(|p| p.ids.is_empty()) {
        return Err(empty());
    }
    Ok(prepared)
}

/// Formats choices and chunks of one completions request.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    /// Name logprobs tokens by id (`return_tokens_as_token_ids`).
    tokens_as_ids: bool,
    prompts: Vec<PreparedPrompt>,
    n: usize,
    echo: bool,
    logprobs: Option<usize>,
    /// Per choice, created on its first delta (text offsets carry across chunks).
    writers: Vec<Option<CompletionLogprobsWriter>>,
    /// Whether a choice's first delta (which carries the echo) was written.
    started: Vec<bool>,
    include_usage: bool,
}

impl CompletionChunks {
    /// One choice from a delta; the first delta of a choice carries the echoed prompt.
    fn choice(&mut self, index: usize, delta: Delta) -> CompletionChoice {
        let first = !std::mem::replace(&mut self.started[index], true);
        let prompt = &self.prompts[index / self.n];
        let mut text = String::new();
        if first && self.echo {
            text.push_str(&prompt.echo);
        }
        text.push_str(&delta.text);
        let logprobs = self.logprobs.map(|k| {
            if self.writers.len() <= index {
                self.writers.resize_with(index + 1, || None);
            }
            let writer =
                self.writers[index].get_or_insert_with(|| CompletionLogprobsWriter::new(k));
            let tokens_of = TokenNames { tokenizer: &self.tokenizer, as_ids: self.tokens_as_ids };
            let mut out = CompletionLogprobs::default();
            if first && self.echo {
                let lps = delta.prompt_logprobs.as_deref().unwrap_or_default();
                writer.prompt(&tokens_of, &prompt.ids, lps, &mut out);
            }
            writer.tokens(&tokens_of, &delta.tokens, &mut out);
            out
        });
        CompletionChoice { text, index, logprobs, finish_reason: delta.finish }
    }

    fn response(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<Usage>>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: TextCompletionObject::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }
}

impl ChunkFormat for CompletionChunks {
    fn delta(&mut self, index: usize, delta: Delta) -> Vec<axum::response::sse::Event> {
        let choice = self.choice(index, delta);
        let says_something = !choice.text.is_empty()
            || choice.finish_reason.is_some()
            || choice.logprobs.as_ref().is_some_and(|l| !l.is_empty());
        if !says_something {
            return Vec::new();
        }
        vec![json_event(&self.response(vec![choice], self.chunk_usage()))]
    }

    fn usage(&mut self, usage: Usage) -> axum::response::sse::Event {
        json_event(&self.response(Vec::new(), Some(Some(usage))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse_json;

    fn prompt(json: &str) -> Result<Prompt, ApiError> {
        parse_json::<CompletionRequest>(format!(r#"{{"prompt": {json}}}"#).as_bytes())
            .map(|r| r.prompt)
    }

    #[test]
    fn prompt_shapes() {
        assert!(matches!(prompt(r#""hi""#), Ok(Prompt::Text(t)) if t == "hi"));
        assert!(matches!(prompt(r#"["a","b"]"#), Ok(Prompt::Texts(t)) if t.len() == 2));
        assert!(matches!(prompt("[1,2,3]"), Ok(Prompt::Tokens(t)) if t == [1, 2, 3]));
        assert!(matches!(prompt("[[1],[2,3]]"), Ok(Prompt::TokenLists(t)) if t.len() == 2));
        assert!(matches!(prompt("[]"), Ok(Prompt::Texts(t)) if t.is_empty()));
    }

    #[test]
    fn bad_prompts_name_the_prompt() {
        for bad in [
            "1",
            "null",
            "{}",
            r#"["a",1]"#,
            "[-1]",
            "[1.5]",
            "[4294967296]",
            "[[1],\"a\"]",
            "[true]",
        ] {
            match prompt(bad) {
                Err(ApiError::InvalidRequest { param, .. }) => {
                    assert_eq!(param.as_deref(), Some("prompt"), "{bad}")
                }
                other => panic!("{bad}: expected a 400, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_prompt_is_named() {
        match parse_json::<CompletionRequest>(br#"{"model":"m"}"#) {
            Err(ApiError::InvalidRequest { param, .. }) => {
                assert_eq!(param.as_deref(), Some("prompt"))
            }
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn response_shape() {
        let r = CompletionResponse {
            id: "cmpl-1".into(),
            object: TextCompletionObject::TextCompletion,
            created: 1,
            model: "m".into(),
            choices: vec![CompletionChoice {
                text: "x".into(),
                index: 0,
                logprobs: None,
                finish_reason: Some(Finish::Length),
            }],
            usage: Some(Some(Usage::new(1, 1))),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(v["choices"][0]["logprobs"].is_null());
        assert_eq!(v["usage"]["total_tokens"], 2);
        let chunk = CompletionResponse { usage: Some(None), ..r };
        assert!(serde_json::to_value(&chunk).unwrap()["usage"].is_null());
        let chunk = CompletionResponse { usage: None, ..chunk };
        assert!(serde_json::to_value(&chunk).unwrap().get("usage").is_none());
    }
}
