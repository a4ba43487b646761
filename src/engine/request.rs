//! What a handler sends to the engine and what comes back, per request.

use std::time::Instant;

use crate::lora::AdapterLease;

/// Sampling and stopping parameters of one sequence, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// In [0, 1]; 0 disables min-p.
    pub min_p: f32,
    /// Per-request seed: the same seed, prompt and parameters give the same tokens.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 disables it; > 1 discourages tokens already in prompt or output.
    pub repetition_penalty: f32,
    /// Generated tokens at most.
    pub max_tokens: usize,
    /// Generation also stops at these ids (EOS ids are added by the engine unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `Some(k)`: report the sampled token's logprob plus the top `k` alternatives.
    pub logprobs: Option<usize>,
    /// `Some(k)`: report logprobs of the prompt tokens too (completions `echo` + `logprobs`).
    pub prompt_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }
}

/// One generation request: a tokenized prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// When the HTTP request arrived (for queue-time and TTFT metrics).
    pub arrival: Instant,
    /// The fine-tuned adapter to run through; `None` for the base model.
    pub adapter: Option<AdapterLease>,
}

/// Log-probability of one token and, if asked, the most likely alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Sorted by descending logprob.
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence stopped (as the engine sees it; stop strings are matched by the handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token id.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// Aborted by the client.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Events the engine sends back on a request's own channel, in order.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Logprobs of the prompt tokens (sent once, before the first token, only if asked for).
    /// The first entry is `None`: the first prompt token has no context.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// One generated token.
    Token { token_id: u32, logprob: Option<TokenLogprob> },
    /// The sequence ended; no more events follow.
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// The request failed inside the engine; no more events follow.
    Error(String),
}
