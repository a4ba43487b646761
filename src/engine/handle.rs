//! `EngineHandle`: the only way handlers reach the engine thread (flume channels, no locks).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::job::TrainJobSpec;
use super::request::{EngineEvent, FinishReason, GenerateRequest};

/// Commands the engine thread receives.
#[derive(Debug)]
pub enum EngineCommand {
    Submit {
        id: u64,
        request: GenerateRequest,
        events: flume::Sender<EngineEvent>,
    },
    /// Ends a request early: `Abort` when its client left, `Stop` when the client matched a
    /// stop string (so metrics count it as a normal stop).
    Abort {
        id: u64,
        reason: FinishReason,
    },
    /// Starts (or resumes) training a fine-tuning job.
    StartJob(Box<TrainJobSpec>),
    /// Stops a job after its last completed optimizer step; it answers `JobEvent::Stopped`.
    StopJob {
        id: String,
    },
    /// Stops every job (each answers `Stopped` with its state) and then the engine.
    Shutdown,
}

impl std::fmt::Debug for TrainJobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainJobSpec").field("id", &self.id).field("hyper", &self.hyper).finish()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    EngineStopped,
}

/// State shared between the handle and the engine thread: counters only, owned by nobody.
#[derive(Debug, Default)]
pub struct SharedCounters {
    /// Requests submitted but not yet scheduled for the first time.
    pub waiting: AtomicUsize,
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: flume::Sender<EngineCommand>,
    counters: Arc<SharedCounters>,
    next_id: Arc<AtomicU64>,
    max_waiting: usize,
}

impl EngineHandle {
    pub fn new(
        tx: flume::Sender<EngineCommand>,
        counters: Arc<SharedCounters>,
        max_waiting: usize,
    ) -> Self {
        Self { tx, counters, next_id: Arc::new(AtomicU64::new(1)), max_waiting }
    }

    /// Queues a request. Its events arrive on the returned stream; dropping the stream
    /// before it finishes aborts the request and frees its KV blocks.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, SubmitError> {
        // Reserve a waiting slot atomically so concurrent submits cannot overshoot the cap.
        let reserved =
            self.counters.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.max_waiting).then_some(w + 1)
            });
        if reserved.is_err() {
            return Err(SubmitError::QueueFull(self.max_waiting));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = flume::unbounded();
        if self.tx.send(EngineCommand::Submit { id, request, events: events_tx }).is_err() {
            self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::EngineStopped);
        }
        Ok(RequestStream { id, rx: events_rx, tx: self.tx.clone(), done: false })
    }

    /// False once the engine thread has stopped.
    pub fn is_running(&self) -> bool {
        !self.tx.is_disconnected()
    }

    pub fn num_waiting(&self) -> usize {
        self.counters.waiting.load(Ordering::Acquire)
    }

    /// Hands a fine-tuning job to the engine; its progress comes back on `spec.events`.
    pub fn start_job(&self, spec: TrainJobSpec) -> Result<(), SubmitError> {
        self.tx
            .send(EngineCommand::StartJob(Box::new(spec)))
            .map_err(|_| SubmitError::EngineStopped)
    }

    /// Asks the engine to stop training a job (pause, cancel); it answers on the job's events.
    pub fn stop_job(&self, id: &str) {
        let _ = self.tx.send(EngineCommand::StopJob { id: id.to_string() });
    }

    /// Asks the engine thread to stop after its current iteration.
    pub fn shutdown(&self) {
        let _ = self.tx.send(EngineCommand::Shutdown);
    }
}

/// The events of one request. Dropping it early aborts the request.
pub struct RequestStream {
    id: u64,
    rx: flume::Receiver<EngineEvent>,
    tx: flume::Sender<EngineCommand>,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Next event, or `None` once the request has finished (or the engine stopped).
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv_async().await.ok();
        self.observe(&ev);
        ev
    }

    /// Blocking variant for non-async callers (tests, benchmarks).
    pub fn next_blocking(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().ok();
        self.observe(&ev);
        ev
    }

    /// Ends the request because its client found a stop string: the engine frees it at once
    /// and counts it as finished by `stop`.
    pub fn finish_stopped(mut self) {
        if !self.done {
            self.done = true;
            let _ = self.tx.send(EngineCommand::Abort { id: self.id, reason: FinishReason::Stop });
        }
    }

    fn observe(&mut self, ev: &Option<EngineEvent>) {
        match ev {
            None | Some(EngineEvent::Finished { .. }) | Some(EngineEvent::Error(_)) => {
                self.done = true
            }
            _ => {}
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(EngineCommand::Abort { id: self.id, reason: FinishReason::Abort });
        }
    }
}
