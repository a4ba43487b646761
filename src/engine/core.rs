//! The engine thread's loop: admit work, plan an iteration, run one forward over the flattened
//! batch, sample and emit tokens, record metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::handle::{EngineCommand, SharedCounters};
use super::request::{EngineEvent, FinishReason};
use super::sampler::{logprobs_of, sample};
use super::scheduler::{Chunk, Plan, Scheduler};
use super::sequence::Sequence;
use crate::backend::cpu::paged_attention::AttnSeq;
use crate::kv::KvCache;
use crate::metrics::Metrics;
use crate::model::llama::{ForwardBatch, Llama};

pub struct EngineCore {
    pub model: Llama,
    pub kv: KvCache,
    pub scheduler: Scheduler,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    pub metrics: Arc<Metrics>,
    pub counters: Arc<SharedCounters>,
    pub rx: flume::Receiver<EngineCommand>,
    pub pool: rayon::ThreadPool,
    /// Commands read ahead of their turn (see `hangup_reason`), handled before new ones.
    pub deferred: std::collections::VecDeque<EngineCommand>,
}

impl EngineCore {
    /// Runs until shutdown or until every handle is gone.
    pub fn run(mut self) {
        loop {
            // Block only when idle (no work, nothing read ahead); otherwise take what has
            // arrived and go on.
            if !self.scheduler.has_work() && self.deferred.is_empty() {
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut stop = false;
            while let Some(cmd) = self.deferred.pop_front().or_else(|| self.rx.try_recv().ok()) {
                if !self.handle(cmd) {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
            if self.scheduler.has_work() {
                self.step();
            }
        }
        // Tell whoever still waits that the engine is gone.
        for s in self.scheduler.running.drain(..).chain(self.scheduler.waiting.drain(..)) {
            let _ = s.events.send(EngineEvent::Error("the engine stopped".into()));
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: EngineCommand) -> bool {
        match cmd {
            EngineCommand::Submit { id, request, events } => {
                let vocab = self.model.config.vocab_size;
                let err =
                    if request.prompt_ids.is_empty() {
                        Some("the prompt is empty".to_string())
                    } else if request.prompt_ids.len() >= self.max_model_len {
                        Some(format!(
                            "the prompt has {} tokens; this model's maximum context length is {}",
                            request.prompt_ids.len(),
                            self.max_model_len
                        ))
                    } else {
                        request.prompt_ids.iter().find(|&&t| t as usize >= vocab).map(|t| {
                            format!("token id {t} is out of the vocabulary (size {vocab})")
                        })
                    };
                if let Some(e) = err {
                    self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
                    let _ = events.send(EngineEvent::Error(e));
                } else {
                    let seq = Sequence::new(
                        id,
                        request.prompt_ids,
                        request.params,
                        events,
                        request.arrival,
                    );
                    self.scheduler.waiting.push_back(seq);
                }
            }
            EngineCommand::Abort { id, reason } => {
                if let Some(s) = self.scheduler.remove(id) {
                    self.finish(s, reason, false);
                }
            }
            EngineCommand::Shutdown => return false,
        }
        true
    }

    fn step(&mut self) {
        let started = Instant::now();
        let plan = self.scheduler.schedule();
        self.metrics.num_preemptions_total.inc_by(plan.num_preempted as u64);
        let Plan { chunks, unschedulable, .. } = plan;
        for s in unschedulable {
            let _ = s
                .events
                .send(EngineEvent::Error("the sequence does not fit in the KV cache".into()));
            self.finish(s, FinishReason::Abort, false);
        }
        if chunks.is_empty() {
            self.update_gauges();
            return;
        }
        for c in &chunks {
            if let Some(s) = self.scheduler.running_mut(c.seq_id) {
                if !s.admitted_once {
                    s.admitted_once = true;
                    s.first_scheduled = Some(started);
                    self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.metrics
                        .request_queue_time_seconds
                        .observe((started - s.arrival).as_secs_f64());
                }
            }
        }

        let logits_per_chunk = self.logits_rows_per_chunk(&chunks);
        let logits = self.forward(&chunks, &logits_per_chunk);
        let vocab = self.model.lm_head().rows;

        let (mut n_decode, mut n_prefill) = (0usize, 0usize);
        let mut row = 0;
        let mut finished = Vec::new();
        for (c, &nrows) in chunks.iter().zip(&logits_per_chunk) {
            let rows = &logits[row * vocab..(row + nrows) * vocab];
            row += nrows;
            let Some(s) = self.scheduler.running_mut(c.seq_id) else { continue };
            if s.is_decode() {
                n_decode += c.len;
            } else {
                n_prefill += c.len;
            }
            s.num_computed += c.len;
            if s.wants_prompt_logprobs() {
                collect_prompt_logprobs(s, c, rows, vocab);
            }
            if !c.sample {
                continue;
            }
            if let Some(reason) = self.emit_token(c.seq_id, &rows[(nrows - 1) * vocab..]) {
                finished.push((c.seq_id, reason));
            }
        }
        for (id, mut reason) in finished {
            if reason == FinishReason::Abort {
                reason = self.hangup_reason(id);
            }
            if let Some(s) = self.scheduler.remove(id) {
                self.finish(s, reason, true);
            }
        }

        self.metrics.iteration_tokens.with_label_values(&["decode"]).observe(n_decode as f64);
        self.metrics.iteration_tokens.with_label_values(&["prefill"]).observe(n_prefill as f64);
        self.metrics.iteration_duration_seconds.observe(started.elapsed().as_secs_f64());
        self.update_gauges();
    }

    /// Logits rows each chunk needs: all its rows for prompt logprobs, else one if it samples.
    fn logits_rows_per_chunk(&mut self, chunks: &[Chunk]) -> Vec<usize> {
        chunks
            .iter()
            .map(|c| match self.scheduler.running_mut(c.seq_id) {
                Some(s) if s.wants_prompt_logprobs() => c.len,
                _ => usize::from(c.sample),
            })
            .collect()
    }

    fn forward(&mut self, chunks: &[Chunk], logits_per_chunk: &[usize]) -> Vec<f32> {
        let total: usize = chunks.iter().map(|c| c.len).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut logits_rows = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        for (c, &nrows) in chunks.iter().zip(logits_per_chunk) {
            let Some(s) = self.scheduler.running.iter().find(|s| s.id == c.seq_id) else {
                continue;
            };
            let Some(table) = s.blocks.as_ref() else { continue };
            let q_start = tokens.len();
            for p in c.start..c.start + c.len {
                tokens.push(s.tokens[p]);
                positions.push(p);
                slots.push(table.slot(p));
            }
            logits_rows.extend((q_start + c.len - nrows)..(q_start + c.len));
            spans.push((q_start, c.len, c.start + c.len, c.seq_id));
        }
        let running = &self.scheduler.running;
        let seqs: Vec<AttnSeq<'_>> = spans
            .iter()
            .filter_map(|&(q_start, q_len, context_len, id)| {
                let table = running.iter().find(|s| s.id == id)?.blocks.as_ref()?;
                Some(AttnSeq { q_start, q_len, context_len, block_table: table.block_ids() })
            })
            .collect();
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_rows: &logits_rows,
        };
        let (model, kv) = (&self.model, &mut self.kv);
        self.pool.install(|| model.forward(&batch, kv))
    }

    /// Samples the next token of a sequence from its logits row and sends it; returns why the
    /// sequence finished, if it did.
    fn emit_token(&mut self, id: u64, logits: &[f32]) -> Option<FinishReason> {
        let eos = &self.eos_token_ids;
        let max_model_len = self.max_model_len;
        let metrics = self.metrics.clone();
        let s = self.scheduler.running_mut(id)?;
        let mut row = logits.to_vec();
        let sampled = sample(&mut row, &s.params, &mut s.sampler);
        let now = Instant::now();
        if s.num_generated() == 0 {
            metrics.time_to_first_token_seconds.observe((now - s.arrival).as_secs_f64());
            metrics.prompt_tokens_total.inc_by(s.prompt_len as u64);
            if s.params.prompt_logprobs.is_some() {
                let lp = std::mem::take(&mut s.prompt_logprobs);
                if s.events.send(EngineEvent::PromptLogprobs(lp)).is_err() {
                    return Some(FinishReason::Abort);
                }
            }
        } else if let Some(last) = s.last_token_at {
            metrics.inter_token_latency_seconds.observe((now - last).as_secs_f64());
        }
        s.last_token_at = Some(now);
        metrics.generation_tokens_total.inc();
        let t = sampled.token_id;
        s.tokens.push(t);
        s.sampler.observe(t);
        if s.events.send(EngineEvent::Token { token_id: t, logprob: sampled.logprob }).is_err() {
            return Some(FinishReason::Abort);
        }
        if (!s.params.ignore_eos && eos.contains(&t)) || s.params.stop_token_ids.contains(&t) {
            Some(FinishReason::Stop)
        } else if s.num_generated() >= s.params.max_tokens || s.len() >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Why a client hung up. One that matched a stop string sends its stop command before it
    /// drops its channel, so look for that command before calling it an abort.
    fn hangup_reason(&mut self, id: u64) -> FinishReason {
        self.deferred.extend(self.rx.try_iter());
        self.deferred
            .iter()
            .find_map(|c| match c {
                EngineCommand::Abort { id: i, reason } if *i == id => Some(*reason),
                _ => None,
            })
            .unwrap_or(FinishReason::Abort)
    }

    /// Ends a sequence (already removed from the scheduler); its blocks free on drop.
    fn finish(&mut self, mut s: Sequence, reason: FinishReason, notify: bool) {
        if !s.admitted_once {
            self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        // Free the blocks and publish the gauges first, so a client that sees its request
        // finished also sees its resources released.
        s.blocks = None;
        self.update_gauges();
        self.metrics.request_success_total.with_label_values(&[reason.as_str()]).inc();
        self.metrics.e2e_request_latency_seconds.observe(s.arrival.elapsed().as_secs_f64());
        if notify {
            let _ = s.events.send(EngineEvent::Finished {
                reason,
                prompt_tokens: s.prompt_len,
                completion_tokens: s.num_generated(),
            });
        }
    }

    fn update_gauges(&self) {
        let a = self.scheduler.allocator();
        let used = a.num_blocks() - a.num_free();
        self.metrics.kv_cache_usage_perc.set(used as f64 / a.num_blocks().max(1) as f64);
        self.metrics.num_requests_running.set(self.scheduler.running.len() as i64);
        self.metrics.num_requests_waiting.set(self.scheduler.waiting.len() as i64);
    }
}

/// Logprobs of the prompt tokens this chunk's rows predict (row p predicts token p + 1).
fn collect_prompt_logprobs(s: &mut Sequence, c: &Chunk, rows: &[f32], vocab: usize) {
    let top = s.params.prompt_logprobs.unwrap_or(0);
    if c.start == 0 {
        s.prompt_logprobs.push(None);
    }
    for (r, p) in (c.start..c.start + c.len).enumerate() {
        if p + 1 >= s.prompt_len {
            break;
        }
        let lp = logprobs_of(&rows[r * vocab..(r + 1) * vocab], s.tokens[p + 1], top);
        s.prompt_logprobs.push(Some(lp));
    }
}
