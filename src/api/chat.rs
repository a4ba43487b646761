//! `POST /v1/chat/completions`: messages rendered through the model's chat template.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::extract::ApiJson;
use super::generation::{merge, Delta, Finish, Generation, TextOptions, Usage};
use super::logging::RequestLog;
use super::logprobs::{chat_logprobs, ChatLogprobs, TokenNames};
use super::prompt::render_chat;
use super::sampling::{
    check_context, include_usage, resolve_model, sampling_params, seed_for_choice, stop_strings,
    validate_max_tokens, validate_n, SamplingInput, Stop, StreamOptions,
};
use super::sse::{json_event, stream_choices, ChunkFormat};
use super::{unix_now, AppState};
use crate::model::chat_template::ChatMessage;
use crate::model::tokenizer::Tokenizer;

/// Most alternatives per token for `top_logprobs` (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// A message's `content`: a string or a list of parts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A content part; only `{"type": "text", "text": ...}` is supported.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// May be omitted (or null) for assistant messages only.
    pub content: Option<MessageContent>,
    /// Accepted and ignored.
    pub name: Option<String>,
}

/// OpenAI's `CreateChatCompletionRequest` (text only), plus vLLM's sampling extensions.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Must be the served model's id when given.
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; either works.
    pub max_tokens: Option<i64>,
    /// Tokens to generate at most (default: what the context leaves).
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Return the chosen tokens' logprobs.
    pub logprobs: Option<bool>,
    /// 0 to 20 alternatives per token; needs `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// Accepted and ignored.
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// vLLM: name tokens in logprobs `token_id:{id}` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum ChatCompletionObject {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum ChatCompletionChunkObject {
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AssistantRole {
    Assistant,
}

/// OpenAI's `ChatCompletionResponseMessage` (text only).
#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseMessage {
    pub role: AssistantRole,
    #[schema(required = true)]
    pub content: Option<String>,
    #[schema(required = true)]
    pub refusal: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ResponseMessage,
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Finish,
}

/// OpenAI's `CreateChatCompletionResponse`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: ChatCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// OpenAI's `ChatCompletionStreamResponseDelta` (text only).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<AssistantRole>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    /// `null` until the choice's last chunk.
    #[schema(required = true)]
    pub finish_reason: Option<Finish>,
}

/// OpenAI's `CreateChatCompletionStreamResponse`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// `null` with `include_usage` (absent otherwise), except the last chunk which has the
    /// totals and no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "chat",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A chat completion, or with `stream` SSE \
            `chat.completion.chunk` objects ending with `data: [DONE]`",
            content((ChatCompletionResponse = "application/json"),
                    (ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "Invalid request, or no chat template", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 429, description = "Waiting queue full; see Retry-After", body = ErrorResponse),
        (status = 503, description = "Engine stopped", body = ErrorResponse),
    )
)]
pub async fn create_chat_completion(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<RequestLog>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let adapter = resolve_model(req.model.as_deref(), &state)?;
    let Some(template) = state.chat_template.clone() else {
        return Err(ApiError::invalid(
            None,
            "This model has no chat template, so /v1/chat/completions cannot be used; use \
             /v1/completions, or serve the model with a chat template.",
        ));
    };
    let n = validate_n(req.n)?;
    let max_completion = validate_max_tokens("max_completion_tokens", req.max_completion_tokens)?;
    let max_tokens = validate_max_tokens("max_tokens", req.max_tokens)?;
    let top_logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::field(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}."),
            ))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::field(
                "top_logprobs",
                "logprobs must be set to true when top_logprobs is used.",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    let stream = req.stream.unwrap_or(false);
    let include_usage = include_usage(stream, req.stream_options.as_ref())?;
    let options = TextOptions {
        stops: stop_strings(req.stop.as_ref())?,
        skip_special_tokens: req.skip_special_tokens.unwrap_or(true),
        adapter,
    };
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
        state.tokenizer.vocab_size(),
    )?;
    let messages = template_messages(req.messages)?;
    let prompt_ids = render_chat(&template, &state.tokenizer, messages).await?;
    if prompt_ids.is_empty() {
        return Err(ApiError::field("messages", "The rendered chat is empty."));
    }
    let max_model_len = state.model.max_model_len;
    // Like vLLM: without a limit, generate up to what the context leaves.
    let max_tokens = max_completion
        .or(max_tokens)
        .unwrap_or_else(|| max_model_len.saturating_sub(prompt_ids.len()));
    check_context(prompt_ids.len(), max_tokens, max_model_len, "messages", "messages")?;
    params.max_tokens = max_tokens;
    params.logprobs = top_logprobs;
    log.set_prompt_tokens(prompt_ids.len());

    let mut generations = Vec::with_capacity(n);
    for index in 0..n {
        let mut params = params.clone();
        params.seed = seed_for_choice(params.seed, index);
        let g = Generation::start(
            &state.engine,
            &state.tokenizer,
            &prompt_ids,
            params,
            &options,
            arrival,
        )?;
        generations.push((index, g));
    }
    let mut format = ChatChunks {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: options.adapter.as_ref().map_or_else(|| state.model.id.clone(), |a| a.id.clone()),
        tokenizer: state.tokenizer.clone(),
        tokens_as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        top_logprobs,
        n,
        include_usage,
    };
    if stream {
        return Ok(stream_choices(
            merge(generations),
            format,
            prompt_ids.len(),
            include_usage,
            log,
        ));
    }

    let results = futures::future::try_join_all(
        generations
            .into_iter()
            .map(|(index, g)| async move { Ok::<_, ApiError>((index, g.collect().await?)) }),
    )
    .await?;
    let completion_tokens: usize = results.iter().map(|(_, c)| c.tokens.len()).sum();
    log.add_completion_tokens(completion_tokens);
    let choices = results
        .into_iter()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: format.logprobs(&c.tokens),
            message: ResponseMessage {
                role: AssistantRole::Assistant,
                content: Some(c.text),
                refusal: None,
            },
            finish_reason: c.finish,
        })
        .collect();
    let body = ChatCompletionResponse {
        id: std::mem::take(&mut format.id),
        object: ChatCompletionObject::ChatCompletion,
        created: format.created,
        model: std::mem::take(&mut format.model),
        choices,
        usage: Usage::new(prompt_ids.len(), completion_tokens),
    };
    Ok(Json(body).into_response())
}

/// Checks roles and flattens content parts into the template's plain messages.
fn template_messages(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::field("messages", "messages must not be empty."));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::field(
                    &format!("messages[{i}].role"),
                    format!(
                        "Unsupported role `{}`: only system, user and assistant messages are \
                         supported.",
                        m.role
                    ),
                ));
            }
            let content = match m.content {
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => part_texts(i, parts)?,
                None if m.role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].content"),
                        format!("A {} message must have content.", m.role),
                    ))
                }
            };
            Ok(ChatMessage { role: m.role, content })
        })
        .collect()
}

/// Text parts joined by newlines (as vLLM does); any other part type is refused.
fn part_texts(message: usize, parts: Vec<ContentPart>) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.into_iter().enumerate() {
        let param = format!("messages[{message}].content[{j}]");
        if part.kind != "text" {
            return Err(ApiError::field(
                &format!("{param}.type"),
                format!("Content parts of type `{}` are not supported; only `text` is.", part.kind),
            ));
        }
        let Some(text) = part.text else {
            return Err(ApiError::field(&format!("{param}.text"), "A text part must have `text`."));
        };
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

/// Formats the chunks of one chat request.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    /// Name logprobs tokens by id (`return_tokens_as_token_ids`).
    tokens_as_ids: bool,
    top_logprobs: Option<usize>,
    n: usize,
    include_usage: bool,
}

impl ChatChunks {
    fn logprobs(&self, tokens: &[super::generation::GeneratedToken]) -> Option<ChatLogprobs> {
        let names = TokenNames { tokenizer: &self.tokenizer, as_ids: self.tokens_as_ids };
        self.top_logprobs.map(|k| chat_logprobs(&names, tokens, k))
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: ChatCompletionChunkObject::ChatCompletionChunk,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }
}

impl ChunkFormat for ChatChunks {
    fn start(&mut self) -> Vec<Event> {
        // Like OpenAI: each choice opens with the role and empty content.
        (0..self.n)
            .map(|index| {
                let delta = ChatDelta {
                    role: Some(AssistantRole::Assistant),
                    content: Some(String::new()),
                };
                let choice = ChatChunkChoice { index, delta, logprobs: None, finish_reason: None };
                self.chunk(vec![choice], self.chunk_usage())
            })
            .collect()
    }

    fn delta(&mut self, index: usize, delta: Delta) -> Vec<Event> {
        let logprobs = self.logprobs(&delta.tokens);
        let has_logprobs =
            logprobs.as_ref().is_some_and(|l| l.content.as_ref().is_some_and(|c| !c.is_empty()));
        if delta.text.is_empty() && delta.finish.is_none() && !has_logprobs {
            return Vec::new();
        }
        let content = (!delta.text.is_empty() || delta.finish.is_none()).then_some(delta.text);
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta { role: None, content },
            logprobs,
            finish_reason: delta.finish,
        };
        vec![self.chunk(vec![choice], self.chunk_usage())]
    }

    fn usage(&mut self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(Some(usage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse_json;

    fn messages(json: &str) -> Result<Vec<ChatMessage>, ApiError> {
        let req: ChatCompletionRequest =
            parse_json(format!(r#"{{"messages": {json}}}"#).as_bytes())?;
        template_messages(req.messages)
    }

    fn param(r: Result<Vec<ChatMessage>, ApiError>) -> String {
        match r {
            Err(ApiError::InvalidRequest { param: Some(p), .. }) => p,
            other => panic!("expected a 400 with a param, got {other:?}"),
        }
    }

    #[test]
    fn string_and_text_parts() {
        let m = messages(
            r#"[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}]"#,
        )
        .unwrap();
        assert_eq!(m[0], ChatMessage { role: "system".into(), content: "be brief".into() });
        assert_eq!(m[1].content, "a\nb");
        assert_eq!(m[2].content, "");
    }

    #[test]
    fn bad_messages_name_the_field() {
        assert_eq!(param(messages("[]")), "messages");
        assert_eq!(param(messages(r#"[{"role":"tool","content":"x"}]"#)), "messages[0].role");
        assert_eq!(param(messages(r#"[{"role":"user"}]"#)), "messages[0].content");
        assert_eq!(
            param(messages(
                r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}]"#
            )),
            "messages[0].content[1].type"
        );
        assert_eq!(
            param(messages(r#"[{"role":"user","content":[{"type":"text"}]}]"#)),
            "messages[0].content[0].text"
        );
        assert_eq!(param(messages(r#"[{"role":"user","content":5}]"#)), "messages[0].content");
        assert_eq!(param(messages(r#"[{"content":"x"}]"#)), "messages[0].role");
    }

    #[test]
    fn delta_shapes() {
        let v = serde_json::to_value(ChatDelta {
            role: Some(AssistantRole::Assistant),
            content: Some(String::new()),
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"role": "assistant", "content": ""}));
        assert_eq!(serde_json::to_value(ChatDelta::default()).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn response_message_has_required_fields() {
        let m = ResponseMessage {
            role: AssistantRole::Assistant,
            content: Some("hi".into()),
            refusal: None,
        };
        let v = serde_json::to_value(m).unwrap();
        assert_eq!(v, serde_json::json!({"role": "assistant", "content": "hi", "refusal": null}));
    }
}
