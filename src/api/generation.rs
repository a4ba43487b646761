//! Turns an engine `RequestStream` into text deltas: detokenizer -> stop matcher -> finish
//! reason, with the tokens (and their logprobs) behind each delta and the usage counts.
//! A stop-string match ends the request in the engine at once.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, BoxStream, SelectAll, StreamExt};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use crate::engine::{
    EngineEvent, EngineHandle, FinishReason, GenerateRequest, RequestStream, SamplingParams,
    TokenLogprob,
};
use crate::lora::AdapterLease;
use crate::model::tokenizer::Tokenizer;
use crate::text::detokenizer::Detokenizer;
use crate::text::stop::StopMatcher;

/// Why a choice ended, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

/// Token counts of a request (OpenAI's `CompletionUsage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// One generated token and, when asked for, its logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub token_id: u32,
    pub logprob: Option<TokenLogprob>,
}

/// What one step of a generation adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Text safe to show now (may be empty while UTF-8 or a possible stop string is pending).
    pub text: String,
    /// Tokens received in this step.
    pub tokens: Vec<GeneratedToken>,
    /// Prompt logprobs (first entry `None`), on the first delta only, when asked for.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// Set on the last delta.
    pub finish: Option<Finish>,
}

/// A generation's complete result (non-streaming responses).
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    pub text: String,
    pub tokens: Vec<GeneratedToken>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: Finish,
}

/// Incremental token-to-text decoding; the detokenizer in production, a table in tests.
pub trait TokenDecoder: Send + 'static {
    fn push(&mut self, token_id: u32) -> String;
    fn finish(&mut self) -> String;
}

impl TokenDecoder for Detokenizer {
    fn push(&mut self, token_id: u32) -> String {
        Detokenizer::push(self, token_id)
    }
    fn finish(&mut self) -> String {
        Detokenizer::finish(self)
    }
}

/// Detokenizer then stop matcher: the text side of a generation.
pub struct TextPipeline<D> {
    decoder: D,
    stop: StopMatcher,
}

impl<D: TokenDecoder> TextPipeline<D> {
    pub fn new(decoder: D, stops: Vec<String>) -> Self {
        Self { decoder, stop: StopMatcher::new(stops) }
    }

    /// Adds a token; returns the text to emit and whether a stop string matched.
    pub fn push(&mut self, token_id: u32) -> (String, bool) {
        let piece = self.decoder.push(token_id);
        let out = self.stop.push(&piece);
        (out.text, out.stopped)
    }

    /// The generation ended: flushes held-back text (which may still complete a stop string).
    pub fn finish(&mut self) -> (String, bool) {
        let tail = self.decoder.finish();
        let out = self.stop.push(&tail);
        if out.stopped {
            return (out.text, true);
        }
        let mut text = out.text;
        text.push_str(&self.stop.finish());
        (text, false)
    }
}

/// One request in the engine, seen as a sequence of deltas.
pub struct Generation<D = Detokenizer> {
    /// `None` once finished; dropping it early aborts the request in the engine.
    stream: Option<RequestStream>,
    text: TextPipeline<D>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    completion_tokens: usize,
}

/// What a generation needs besides its prompt and sampling parameters.
#[derive(Clone)]
pub struct TextOptions {
    pub stops: Vec<String>,
    pub skip_special_tokens: bool,
    /// The fine-tuned adapter the request's `model` names, if any.
    pub adapter: Option<AdapterLease>,
}

impl Generation<Detokenizer> {
    /// Submits a request to the engine.
    pub fn start(
        engine: &EngineHandle,
        tokenizer: &Arc<Tokenizer>,
        prompt_ids: &[u32],
        params: SamplingParams,
        options: &TextOptions,
        arrival: Instant,
    ) -> Result<Self, ApiError> {
        let request = GenerateRequest {
            prompt_ids: prompt_ids.to_vec(),
            params,
            arrival,
            adapter: options.adapter.clone(),
        };
        let stream = engine.submit(request)?;
        let decoder = Detokenizer::new(tokenizer.clone(), prompt_ids, options.skip_special_tokens);
        Ok(Self::from_parts(stream, decoder, options.stops.clone()))
    }
}

impl<D: TokenDecoder> Generation<D> {
    pub fn from_parts(stream: RequestStream, decoder: D, stops: Vec<String>) -> Self {
        Self {
            stream: Some(stream),
            text: TextPipeline::new(decoder, stops),
            prompt_logprobs: None,
            completion_tokens: 0,
        }
    }

    /// Tokens generated so far.
    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// The next delta; `None` after the last one (or after an error).
    pub async fn next(&mut self) -> Option<Result<Delta, ApiError>> {
        let stream = self.stream.as_mut()?;
        let mut delta = Delta::default();
        loop {
            match stream.next().await {
                Some(EngineEvent::PromptLogprobs(lps)) => self.prompt_logprobs = Some(lps),
                Some(EngineEvent::Token { token_id, logprob }) => {
                    self.completion_tokens += 1;
                    let (text, stopped) = self.text.push(token_id);
                    delta.text = text;
                    delta.tokens.push(GeneratedToken { token_id, logprob });
                    if stopped {
                        // The engine stops generating at once and counts it as a stop.
                        if let Some(s) = self.stream.take() {
                            s.finish_stopped();
                        }
                        delta.finish = Some(Finish::Stop);
                    }
                    break;
                }
                Some(EngineEvent::Finished { reason, .. }) => {
                    self.stream = None;
                    let finish = match reason {
                        FinishReason::Stop => Finish::Stop,
                        FinishReason::Length => Finish::Length,
                        FinishReason::Abort => return Some(Err(ApiError::Aborted)),
                    };
                    let (text, stopped) = self.text.finish();
                    delta.text = text;
                    delta.finish = Some(if stopped { Finish::Stop } else { finish });
                    break;
                }
                Some(EngineEvent::Error(message)) => {
                    self.stream = None;
                    return Some(Err(ApiError::Engine(message)));
                }
                None => {
                    self.stream = None;
                    return Some(Err(ApiError::EngineStopped));
                }
            }
        }
        delta.prompt_logprobs = self.prompt_logprobs.take();
        Some(Ok(delta))
    }

    /// Runs the generation to its end.
    pub async fn collect(mut self) -> Result<Completed, ApiError> {
        let mut done = Completed {
            text: String::new(),
            tokens: Vec::new(),
            prompt_logprobs: None,
            finish: Finish::Length,
        };
        while let Some(delta) = self.next().await {
            let delta = delta?;
            done.text.push_str(&delta.text);
            done.tokens.extend(delta.tokens);
            if delta.prompt_logprobs.is_some() {
                done.prompt_logprobs = delta.prompt_logprobs;
            }
            if let Some(finish) = delta.finish {
                done.finish = finish;
            }
        }
        Ok(done)
    }

    /// The deltas as a stream; it ends after the last delta or the first error.
    pub fn into_stream(self) -> BoxStream<'static, Result<Delta, ApiError>> {
        stream::unfold(self, |mut g| async move { g.next().await.map(|item| (item, g)) }).boxed()
    }
}

/// Several choices' deltas, interleaved as they come, tagged with the choice index.
pub fn merge<D: TokenDecoder>(
    generations: Vec<(usize, Generation<D>)>,
) -> SelectAll<BoxStream<'static, (usize, Result<Delta, ApiError>)>> {
    stream::select_all(
        generations.into_iter().map(|(index, g)| g.into_stream().map(move |d| (index, d)).boxed()),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::handle::SharedCounters;
    use crate::engine::EngineCommand;

    /// Decodes token `i` as `table[i]`; holds nothing back.
    pub struct TableDecoder(pub Vec<&'static str>);

    impl TokenDecoder for TableDecoder {
        fn push(&mut self, token_id: u32) -> String {
            self.0.get(token_id as usize).copied().unwrap_or("?").to_string()
        }
        fn finish(&mut self) -> String {
            String::new()
        }
    }

    /// A handle whose engine is this test: returns the handle and the command receiver.
    pub fn fake_engine() -> (EngineHandle, flume::Receiver<EngineCommand>) {
        let (tx, rx) = flume::unbounded();
        (EngineHandle::new(tx, Arc::new(SharedCounters::default()), 16), rx)
    }

    /// Submits a request and returns its stream plus the engine-side event sender.
    fn submitted() -> (RequestStream, flume::Sender<EngineEvent>, flume::Receiver<EngineCommand>) {
        let (engine, rx) = fake_engine();
        let request = GenerateRequest {
            prompt_ids: vec![1],
            params: SamplingParams::default(),
            arrival: Instant::now(),
            adapter: None,
        };
        let stream = engine.submit(request).unwrap();
        let events = match rx.try_recv().unwrap() {
            EngineCommand::Submit { events, .. } => events,
            other => panic!("expected Submit, got {other:?}"),
        };
        (stream, events, rx)
    }

    fn token(id: u32) -> EngineEvent {
        EngineEvent::Token { token_id: id, logprob: None }
    }

    fn finished(reason: FinishReason) -> EngineEvent {
        EngineEvent::Finished { reason, prompt_tokens: 1, completion_tokens: 0 }
    }

    const WORDS: [&str; 4] = ["Hello", " world", "!", " bye"];

    #[tokio::test]
    async fn text_and_finish_reason_come_through() {
        let (stream, events, _rx) = submitted();
        for id in [0, 1, 2] {
            events.send(token(id)).unwrap();
        }
        events.send(finished(FinishReason::Length)).unwrap();
        let g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        let done = g.collect().await.unwrap();
        assert_eq!(done.text, "Hello world!");
        assert_eq!(done.tokens.len(), 3);
        assert_eq!(done.finish, Finish::Length);
    }

    #[tokio::test]
    async fn prompt_logprobs_arrive_on_the_first_delta() {
        let (stream, events, _rx) = submitted();
        let lp = TokenLogprob { token_id: 1, logprob: -0.5, top: vec![] };
        events.send(EngineEvent::PromptLogprobs(vec![None, Some(lp.clone())])).unwrap();
        events.send(token(0)).unwrap();
        events.send(token(1)).unwrap();
        events.send(finished(FinishReason::Stop)).unwrap();
        let mut g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        let first = g.next().await.unwrap().unwrap();
        assert_eq!(first.prompt_logprobs, Some(vec![None, Some(lp)]));
        assert_eq!(first.text, "Hello");
        let second = g.next().await.unwrap().unwrap();
        assert_eq!(second.prompt_logprobs, None);
        let last = g.next().await.unwrap().unwrap();
        assert_eq!(last.finish, Some(Finish::Stop));
        assert!(g.next().await.is_none());
        assert_eq!(g.completion_tokens(), 2);
    }

    #[tokio::test]
    async fn stop_string_finishes_and_aborts_the_engine_request() {
        let (stream, events, rx) = submitted();
        for id in [0, 1, 2, 3] {
            events.send(token(id)).unwrap();
        }
        let g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec!["orl".into()]);
        // No Finished event is sent: only the stop string can end this generation.
        let done = tokio::time::timeout(Duration::from_secs(5), g.collect())
            .await
            .expect("the stop string ends the generation")
            .unwrap();
        assert_eq!(done.text, "Hello w");
        assert_eq!(done.finish, Finish::Stop);
        assert_eq!(done.tokens.len(), 2);
        assert!(matches!(
            rx.try_recv(),
            Ok(EngineCommand::Abort { reason: FinishReason::Stop, .. })
        ));
    }

    #[tokio::test]
    async fn engine_failures_become_errors() {
        let (stream, events, _rx) = submitted();
        events.send(EngineEvent::Error("boom".into())).unwrap();
        let g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        assert!(matches!(g.collect().await, Err(ApiError::Engine(m)) if m == "boom"));

        let (stream, events, _rx) = submitted();
        drop(events);
        let g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        assert!(matches!(g.collect().await, Err(ApiError::EngineStopped)));

        let (stream, events, _rx) = submitted();
        events.send(finished(FinishReason::Abort)).unwrap();
        let g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        assert!(matches!(g.collect().await, Err(ApiError::Aborted)));
    }

    #[tokio::test]
    async fn dropping_a_generation_aborts_it() {
        let (stream, events, rx) = submitted();
        events.send(token(0)).unwrap();
        let mut g = Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]);
        let _ = g.next().await;
        drop(g);
        assert!(matches!(
            rx.try_recv(),
            Ok(EngineCommand::Abort { reason: FinishReason::Abort, .. })
        ));
    }

    #[tokio::test]
    async fn merge_tags_choices() {
        let mut gens = Vec::new();
        let mut keep = Vec::new();
        for index in 0..2 {
            let (stream, events, rx) = submitted();
            events.send(token(index as u32)).unwrap();
            events.send(finished(FinishReason::Length)).unwrap();
            keep.push(rx);
            gens.push((
                index,
                Generation::from_parts(stream, TableDecoder(WORDS.to_vec()), vec![]),
            ));
        }
        let items: Vec<_> = merge(gens).collect().await;
        assert_eq!(items.len(), 4);
        for (index, word) in WORDS.iter().enumerate().take(2) {
            let text: String = items
                .iter()
                .filter(|(i, _)| *i == index)
                .map(|(_, d)| d.as_ref().unwrap().text.clone())
                .collect();
            assert_eq!(text, *word);
        }
    }

    #[test]
    fn usage_totals() {
        assert_eq!(Usage::new(3, 4).total_tokens, 7);
    }
}
