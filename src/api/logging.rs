//! One info line per request: method, path, status, token counts and latency. For a streamed
//! response the line is written when its body ends (or the client goes away), so the counts
//! and latency cover the whole generation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

/// Token counts a handler reports for the log line (shared with a streaming body).
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Counts>);

#[derive(Default)]
struct Counts {
    prompt_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
}

impl RequestLog {
    pub fn set_prompt_tokens(&self, n: usize) {
        self.0.prompt_tokens.store(n, Ordering::Relaxed);
    }

    pub fn add_completion_tokens(&self, n: usize) {
        self.0.completion_tokens.fetch_add(n, Ordering::Relaxed);
    }
}

/// Writes the line when dropped.
struct LogLine {
    method: Method,
    path: String,
    status: StatusCode,
    counts: RequestLog,
    start: Instant,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        tracing::info!(
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            prompt_tokens = self.counts.0.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens = self.counts.0.completion_tokens.load(Ordering::Relaxed),
            latency_ms = self.start.elapsed().as_secs_f64() * 1e3,
            "request"
        );
    }
}

/// Middleware: gives handlers a `RequestLog` extension and logs the request when it is done.
pub async fn log_requests(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let counts = RequestLog::default();
    req.extensions_mut().insert(counts.clone());
    let response = next.run(req).await;
    let line = LogLine { method, path, status: response.status(), counts, start };
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        drop(line);
        return response;
    }
    // The line lives in the body stream and is written when hyper drops it.
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _keep = &line;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}
