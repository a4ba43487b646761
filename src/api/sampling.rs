//! Request fields shared by /v1/completions and /v1/chat/completions, and their validation
//! into the engine's `SamplingParams`. Ranges follow OpenAI; extensions follow vLLM.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::engine::SamplingParams;
use crate::lora::AdapterLease;
use crate::model::ModelInfo;

/// Most choices one request may ask for (`n`, times the prompts of a completions batch).
pub const MAX_CHOICES: usize = 128;
/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices; every other chunk carries `usage: null`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling fields both endpoints accept, as sent by the client.
#[derive(Debug, Clone, Default)]
pub struct SamplingInput<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop_token_ids: Option<&'a [u32]>,
    pub ignore_eos: Option<bool>,
}

/// Validates the shared fields; `max_tokens` and logprobs are set by the caller.
pub fn sampling_params(
    input: &SamplingInput<'_>,
    vocab_size: usize,
) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let temperature =
        in_range("temperature", input.temperature, 0.0, 2.0)?.map_or(d.temperature, |v| v as f32);
    let top_p = match input.top_p {
        Some(v) if !(v > 0.0 && v <= 1.0) => {
            return Err(ApiError::field("top_p", format!("top_p must be in (0, 1], got {v}.")))
        }
        Some(v) => v as f32,
        None => d.top_p,
    };
    let top_k = match input.top_k {
        // vLLM accepts -1 (and 0) for "disabled".
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("top_k must be -1 (disable), or at least 1, got {k}."),
            ))
        }
    };
    let min_p = in_range("min_p", input.min_p, 0.0, 1.0)?.map_or(d.min_p, |v| v as f32);
    let presence_penalty = in_range("presence_penalty", input.presence_penalty, -2.0, 2.0)?
        .map_or(d.presence_penalty, |v| v as f32);
    let frequency_penalty = in_range("frequency_penalty", input.frequency_penalty, -2.0, 2.0)?
        .map_or(d.frequency_penalty, |v| v as f32);
    let repetition_penalty = match input.repetition_penalty {
        Some(v) if !(v > 0.0 && v.is_finite()) => {
            return Err(ApiError::field(
                "repetition_penalty",
                format!("repetition_penalty must be greater than zero, got {v}."),
            ))
        }
        Some(v) => v as f32,
        None => d.repetition_penalty,
    };
    let stop_token_ids = input.stop_token_ids.unwrap_or_default().to_vec();
    check_token_ids("stop_token_ids", &stop_token_ids, vocab_size)?;
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        // Negative seeds are valid in OpenAI's API; reinterpret the bits.
        seed: input.seed.map(|s| s as u64),
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        stop_token_ids,
        ignore_eos: input.ignore_eos.unwrap_or(false),
        ..d
    })
}

fn in_range(name: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) => {
            Err(ApiError::field(name, format!("{name} must be in [{lo}, {hi}], got {v}.")))
        }
        v => Ok(v),
    }
}

/// `n`: at least 1, at most `MAX_CHOICES`.
pub fn validate_n(n: Option<i64>) -> Result<usize, ApiError> {
    match n {
        None => Ok(1),
        Some(n) if n < 1 => Err(ApiError::field("n", format!("n must be at least 1, got {n}."))),
        Some(n) if n > MAX_CHOICES as i64 => {
            Err(ApiError::field("n", format!("n must be at most {MAX_CHOICES}, got {n}.")))
        }
        Some(n) => Ok(n as usize),
    }
}

/// A token budget field (`max_tokens`, `max_completion_tokens`): at least 1 when given.
pub fn validate_max_tokens(name: &str, value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        Some(v) if v < 1 => {
            Err(ApiError::field(name, format!("{name} must be at least 1, got {v}.")))
        }
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

/// Stop strings: at most `MAX_STOP_STRINGS`; empty strings would match at once, so are dropped.
pub fn stop_strings(stop: Option<&Stop>) -> Result<Vec<String>, ApiError> {
    let all = match stop {
        None => return Ok(Vec::new()),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if all.len() > MAX_STOP_STRINGS {
        return Err(ApiError::field(
            "stop",
            format!("stop may hold at most {MAX_STOP_STRINGS} strings, got {}.", all.len()),
        ));
    }
    Ok(all.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Every id must exist in the vocabulary.
pub fn check_token_ids(param: &str, ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ApiError::field(
            param,
            format!("Token id {id} is out of vocabulary (the vocabulary has {vocab_size} tokens)."),
        )),
        None => Ok(()),
    }
}

/// The prompt plus the completion must fit the context (vLLM's messages). `what` names the
/// input ("prompt" or "messages") and `param` the field blamed when it alone is too long.
pub fn check_context(
    prompt_len: usize,
    max_tokens: usize,
    max_model_len: usize,
    what: &str,
    param: &str,
) -> Result<(), ApiError> {
    if prompt_len >= max_model_len {
        return Err(ApiError::field(
            param,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 request has {prompt_len} input tokens in the {what}, which leaves no room for \
                 the completion. Please reduce the length of the {what}."
            ),
        ));
    }
    let total = prompt_len.saturating_add(max_tokens);
    if total > max_model_len {
        return Err(ApiError::field(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {total} tokens ({prompt_len} in the {what}, {max_tokens} in the \
                 completion). Please reduce the length of the {what} or completion."
            ),
        ));
    }
    Ok(())
}

/// The request's `model` must name the served model; absent means the served model.
pub fn check_model(requested: Option<&str>, model: &ModelInfo) -> Result<(), ApiError> {
    match requested {
        Some(m) if m != model.id => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// The base model (`None`) or a lease on the served fine-tuned adapter `requested` names.
pub fn resolve_model(
    requested: Option<&str>,
    state: &AppState,
) -> Result<Option<AdapterLease>, ApiError> {
    match requested {
        Some(m) if m != state.model.id => match state.adapters.get(m) {
            Some(lease) => Ok(Some(lease)),
            None => Err(ApiError::ModelNotFound(m.to_string())),
        },
        _ => Ok(None),
    }
}

/// `stream_options` only makes sense with `stream: true`; returns `include_usage`.
pub fn include_usage(stream: bool, options: Option<&StreamOptions>) -> Result<bool, ApiError> {
    match options {
        Some(_) if !stream => Err(ApiError::field(
            "stream_options",
            "stream_options can only be set when stream is true.",
        )),
        Some(o) => Ok(o.include_usage.unwrap_or(false)),
        None => Ok(false),
    }
}

/// Choice `i` of a seeded request gets its own reproducible seed, so `n` choices differ.
pub fn seed_for_choice(seed: Option<u64>, choice: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(choice as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(e: ApiError) -> Option<String> {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    fn bad(input: SamplingInput<'_>) -> Option<String> {
        param_of(sampling_params(&input, 100).unwrap_err())
    }

    #[test]
    fn defaults_match_engine_defaults() {
        let p = sampling_params(&SamplingInput::default(), 100).unwrap();
        assert_eq!(p, SamplingParams::default());
    }

    #[test]
    fn ranges_are_enforced() {
        let s = SamplingInput::default;
        assert_eq!(bad(SamplingInput { temperature: Some(-0.1), ..s() }).unwrap(), "temperature");
        assert_eq!(bad(SamplingInput { temperature: Some(2.5), ..s() }).unwrap(), "temperature");
        assert_eq!(bad(SamplingInput { top_p: Some(0.0), ..s() }).unwrap(), "top_p");
        assert_eq!(bad(SamplingInput { top_p: Some(1.01), ..s() }).unwrap(), "top_p");
        assert_eq!(bad(SamplingInput { top_k: Some(-2), ..s() }).unwrap(), "top_k");
        assert_eq!(bad(SamplingInput { min_p: Some(1.5), ..s() }).unwrap(), "min_p");
        assert_eq!(
            bad(SamplingInput { presence_penalty: Some(-3.0), ..s() }).unwrap(),
            "presence_penalty"
        );
        assert_eq!(
            bad(SamplingInput { frequency_penalty: Some(2.1), ..s() }).unwrap(),
            "frequency_penalty"
        );
        assert_eq!(
            bad(SamplingInput { repetition_penalty: Some(0.0), ..s() }).unwrap(),
            "repetition_penalty"
        );
        assert_eq!(
            bad(SamplingInput { stop_token_ids: Some(&[5, 100]), ..s() }).unwrap(),
            "stop_token_ids"
        );
    }

    #[test]
    fn valid_values_pass_through() {
        let ids = [1u32, 99];
        let p = sampling_params(
            &SamplingInput {
                temperature: Some(0.0),
                top_p: Some(0.5),
                top_k: Some(-1),
                min_p: Some(0.1),
                seed: Some(-1),
                presence_penalty: Some(2.0),
                frequency_penalty: Some(-2.0),
                repetition_penalty: Some(1.2),
                stop_token_ids: Some(&ids),
                ignore_eos: Some(true),
            },
            100,
        )
        .unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_p, 0.5);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.stop_token_ids, vec![1, 99]);
        assert!(p.ignore_eos);
    }

    #[test]
    fn n_and_max_tokens() {
        assert_eq!(validate_n(None).unwrap(), 1);
        assert_eq!(param_of(validate_n(Some(0)).unwrap_err()).unwrap(), "n");
        assert_eq!(param_of(validate_n(Some(100_000)).unwrap_err()).unwrap(), "n");
        assert_eq!(validate_max_tokens("max_tokens", Some(5)).unwrap(), Some(5));
        let e = validate_max_tokens("max_completion_tokens", Some(0)).unwrap_err();
        assert_eq!(param_of(e).unwrap(), "max_completion_tokens");
    }

    #[test]
    fn stop_strings_are_limited() {
        assert!(stop_strings(None).unwrap().is_empty());
        assert_eq!(stop_strings(Some(&Stop::One("x".into()))).unwrap(), vec!["x"]);
        let five = Stop::Many(vec!["a".into(); 5]);
        assert_eq!(param_of(stop_strings(Some(&five)).unwrap_err()).unwrap(), "stop");
        let with_empty = Stop::Many(vec!["".into(), "b".into()]);
        assert_eq!(stop_strings(Some(&with_empty)).unwrap(), vec!["b"]);
    }

    #[test]
    fn context_length_messages() {
        assert!(check_context(10, 6, 16, "prompt", "prompt").is_ok());
        let e = check_context(10, 7, 16, "prompt", "prompt").unwrap_err();
        assert!(e.to_string().contains("maximum context length is 16 tokens"), "{e}");
        assert!(e.to_string().contains("17 tokens (10 in the prompt, 7 in the completion)"));
        assert_eq!(param_of(e).unwrap(), "max_tokens");
        let e = check_context(16, 1, 16, "messages", "messages").unwrap_err();
        assert_eq!(param_of(e).unwrap(), "messages");
        assert!(check_context(1, usize::MAX, 16, "prompt", "prompt").is_err());
    }

    #[test]
    fn model_and_stream_options() {
        let m = ModelInfo { id: "m".into(), created: 0, max_model_len: 8, owned_by: "o".into() };
        assert!(check_model(None, &m).is_ok());
        assert!(check_model(Some("m"), &m).is_ok());
        assert!(matches!(check_model(Some("x"), &m), Err(ApiError::ModelNotFound(_))));
        let o = StreamOptions { include_usage: Some(true) };
        assert!(include_usage(true, Some(&o)).unwrap());
        assert!(!include_usage(true, None).unwrap());
        assert_eq!(
            param_of(include_usage(false, Some(&o)).unwrap_err()).unwrap(),
            "stream_options"
        );
    }

    #[test]
    fn choice_seeds_differ() {
        assert_eq!(seed_for_choice(None, 3), None);
        assert_eq!(seed_for_choice(Some(7), 0), Some(7));
        assert_eq!(seed_for_choice(Some(u64::MAX), 1), Some(0));
    }
}
