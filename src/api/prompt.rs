//! Prompt preparation off the async runtime: encoding text and rendering chat templates are
//! quick for short inputs but can take milliseconds for long ones, so inputs above a few KB run
//! on the blocking pool.

use std::sync::Arc;

use super::error::ApiError;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelError;

/// Inputs larger than this (bytes of text) are tokenized on the blocking pool.
pub const BLOCKING_THRESHOLD: usize = 4 * 1024;

/// Runs `f` inline for small inputs, else with `spawn_blocking`.
pub async fn run_sized<T, F>(size: usize, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if size <= BLOCKING_THRESHOLD {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))
}

fn tokenizer_error(e: ModelError) -> ApiError {
    // Any string a client can send is encodable; a failure here is the server's fault.
    ApiError::Internal(e.to_string())
}

/// Encodes several texts (completions prompts), adding BOS when the tokenizer asks for it.
pub async fn encode_texts(
    tokenizer: &Arc<Tokenizer>,
    texts: Vec<String>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let size = texts.iter().map(String::len).sum();
    let tokenizer = tokenizer.clone();
    run_sized(size, move || {
        texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<Vec<_>, _>>()
    })
    .await?
    .map_err(tokenizer_error)
}

/// Decodes token-id prompts for `echo` (nothing to do for text prompts).
pub async fn decode_ids(
    tokenizer: &Arc<Tokenizer>,
    prompts: Vec<Vec<u32>>,
    skip_special_tokens: bool,
) -> Result<Vec<String>, ApiError> {
    let size = prompts.iter().map(Vec::len).sum::<usize>() * 4;
    let tokenizer = tokenizer.clone();
    run_sized(size, move || {
        prompts
            .iter()
            .map(|ids| tokenizer.decode(ids, skip_special_tokens))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?
    .map_err(tokenizer_error)
}

/// Renders a chat with the generation prompt and encodes it. The template writes its own
/// BOS and special tokens, so none are added here.
pub async fn render_chat(
    template: &Arc<ChatTemplate>,
    tokenizer: &Arc<Tokenizer>,
    messages: Vec<ChatMessage>,
) -> Result<Vec<u32>, ApiError> {
    let size = messages.iter().map(|m| m.content.len()).sum();
    let template = template.clone();
    let tokenizer = tokenizer.clone();
    run_sized(size, move || {
        let text = template.render(&messages, true).map_err(|e| {
            // Templates reject conversations they cannot express (e.g. roles out of order).
            ApiError::field(
                "messages",
                format!("The chat template could not render the messages: {e}"),
            )
        })?;
        tokenizer.encode(&text, false).map_err(tokenizer_error)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_and_large_inputs_both_run() {
        assert_eq!(run_sized(10, || 1).await.unwrap(), 1);
        let thread = std::thread::current().id();
        let other =
            run_sized(BLOCKING_THRESHOLD + 1, move || std::thread::current().id() != thread)
                .await
                .unwrap();
        assert!(other, "large inputs run on the blocking pool");
    }
}
