//! Server-sent events: `data: {json}\n\n` chunks ending with `data: [DONE]\n\n`.
//!
//! `stream_choices` drives the choices of one request: it formats each delta with the
//! endpoint's `ChunkFormat`, adds the usage chunk, and stops at the first error with an
//! OpenAI error event. Everything lives in the response body, so when the client goes away
//! axum drops the body and with it every `RequestStream`, aborting the requests.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, SelectAll, StreamExt};
use serde::Serialize;

use super::error::ApiError;
use super::generation::{Delta, Usage};
use super::logging::RequestLog;

/// An event carrying one JSON object.
pub fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        // Our chunk types always serialize; report rather than panic if that ever changes.
        Err(e) => error_event(&ApiError::Internal(format!("could not serialize a chunk: {e}"))),
    }
}

/// An OpenAI error object as an event (a stream that fails after its headers were sent).
pub fn error_event(error: &ApiError) -> Event {
    let json = serde_json::to_string(&error.body()).unwrap_or_default();
    Event::default().data(json)
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// How an endpoint writes its chunks.
pub trait ChunkFormat: Send + 'static {
    /// Chunks before any token (chat's `role: assistant` deltas).
    fn start(&mut self) -> Vec<Event> {
        Vec::new()
    }
    /// Chunks for one delta of choice `index` (none when there is nothing to say).
    fn delta(&mut self, index: usize, delta: Delta) -> Vec<Event>;
    /// The last chunk with `usage` and no choices (`stream_options.include_usage`).
    fn usage(&mut self, usage: Usage) -> Event;
}

type Choices = SelectAll<BoxStream<'static, (usize, Result<Delta, ApiError>)>>;

enum Phase {
    Start,
    Running,
    Done,
}

struct Driver<F> {
    choices: Option<Choices>,
    format: F,
    phase: Phase,
    pending: VecDeque<Event>,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
    log: RequestLog,
}

impl<F: ChunkFormat> Driver<F> {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match self.phase {
                Phase::Start => {
                    self.pending.extend(self.format.start());
                    self.phase = Phase::Running;
                }
                Phase::Running => {
                    let next = match self.choices.as_mut() {
                        Some(choices) => choices.next().await,
                        None => None,
                    };
                    match next {
                        Some((index, Ok(delta))) => {
                            self.completion_tokens += delta.tokens.len();
                            self.log.add_completion_tokens(delta.tokens.len());
                            self.pending.extend(self.format.delta(index, delta));
                        }
                        Some((_, Err(error))) => {
                            // Abort the other choices now rather than when the body is dropped.
                            self.choices = None;
                            self.pending.push_back(error_event(&error));
                            self.pending.push_back(done_event());
                            self.phase = Phase::Done;
                        }
                        None => {
                            if self.include_usage {
                                let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                                self.pending.push_back(self.format.usage(usage));
                            }
                            self.pending.push_back(done_event());
                            self.phase = Phase::Done;
                        }
                    }
                }
                Phase::Done => return None,
            }
        }
    }
}

/// The SSE response for a request's choices.
pub fn stream_choices<F: ChunkFormat>(
    choices: Choices,
    format: F,
    prompt_tokens: usize,
    include_usage: bool,
    log: RequestLog,
) -> Response {
    let driver = Driver {
        choices: Some(choices),
        format,
        phase: Phase::Start,
        pending: VecDeque::new(),
        prompt_tokens,
        completion_tokens: 0,
        include_usage,
        log,
    };
    let events = stream::unfold(driver, |mut d| async move {
        d.next_event().await.map(|e| (Ok::<_, Infallible>(e), d))
    });
    Sse::new(events).into_response()
}
