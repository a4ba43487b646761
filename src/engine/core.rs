//! The engine thread's loop: admit work, plan an iteration, run one forward over the flattened
//! batch, sample and emit tokens, record metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub use super::compute::Compute;
use super::cost_model::CostModel;
use super::handle::{EngineCommand, SharedCounters};
use super::hybrid::{TrainWork, TrainingConfig};
use super::job::ActiveJob;
use super::request::TokenLogprob;
use super::request::{EngineEvent, FinishReason};
use super::sampler::{
    is_plain_greedy, logprobs_of, sample, sample_as_device, samples_on_device, Sampled,
};
use super::scheduler::{Chunk, Plan, Scheduler};
use super::sequence::Sequence;
use super::training::ChunkInputs;
use crate::backend::cpu::paged_attention::AttnSeq;
use crate::backend::cuda::decoder::runner::AdapterRows;
use crate::backend::cuda::decoder::{RowsOut, Want};
use crate::backend::cuda::sampling::{Penalties, RowSample, RowSampling};
use crate::metrics::Metrics;
use crate::model::backward::BackwardWeights;
use crate::model::llama::ForwardBatch;
use crate::model::lora_apply::LoraSlice;

pub struct EngineCore {
    pub compute: Compute,
    /// Token ids a prompt may hold.
    pub vocab_size: usize,
    /// Logits per row (the output head's rows).
    pub logits_width: usize,
    pub scheduler: Scheduler,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    pub metrics: Arc<Metrics>,
    pub counters: Arc<SharedCounters>,
    pub rx: flume::Receiver<EngineCommand>,
    pub pool: std::sync::Arc<rayon::ThreadPool>,
    /// Commands read ahead of their turn (see `hangup_reason`), handled before new ones.
    pub deferred: std::collections::VecDeque<EngineCommand>,
    pub training: TrainingConfig,
    /// Fine-tuning jobs being trained, served in turn one sample at a time.
    pub jobs: Vec<ActiveJob>,
    pub job_turn: usize,
    /// Built when the first job trains.
    pub backward_weights: Option<BackwardWeights>,
    pub cost: CostModel,
    /// Set when the device failed for good: the engine stops (and `/health` says so).
    pub stop_reason: Option<String>,
    /// The key the next fine-tuning job gets on a device model.
    pub next_job_key: u64,
}

/// How a sequence's next token is chosen: from its logits row, or as the device picked it.
enum Pick<'a> {
    Logits(&'a [f32]),
    Greedy(u32, f32),
    Device(&'a RowSample),
}

/// Who samples a forward's rows (see `EngineCore::picking`).
enum Picking {
    /// The host, from each row's logits.
    Host,
    /// The device, every row a plain argmax.
    Greedy,
    /// The device, as each row's entry asks, after the rows' penalties.
    Device(Vec<RowSampling>, Penalties),
}

/// The fine-tuning part of one iteration: which job and how much of its sample.
#[derive(Debug, Clone, Copy)]
pub(super) struct TrainSlot {
    pub(super) job: usize,
    pub(super) work: TrainWork,
}

impl EngineCore {
    /// Runs until shutdown or until every handle is gone.
    pub fn run(mut self) {
        loop {
            // Block only when idle (no work, nothing read ahead); otherwise take what has
            // arrived and go on.
            if !self.has_work() && self.deferred.is_empty() {
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
            if self.has_work() {
                self.step();
            }
            if self.stop_reason.is_some() {
                break;
            }
        }
        let jobs: Vec<ActiveJob> = self.jobs.drain(..).collect();
        for job in jobs {
            self.stop_job(job);
        }
        // Tell whoever still waits that the engine is gone.
        let why = match &self.stop_reason {
            Some(r) => format!("the engine stopped: {r}"),
            None => "the engine stopped".into(),
        };
        for s in self.scheduler.running.drain(..).chain(self.scheduler.waiting.drain(..)) {
            let _ = s.events.send(EngineEvent::Error(why.clone()));
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: EngineCommand) -> bool {
        match cmd {
            EngineCommand::Submit { id, request, events } => {
                let vocab = self.vocab_size;
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
                        request.adapter,
                    );
                    self.scheduler.waiting.push_back(seq);
                }
            }
            EngineCommand::Abort { id, reason } => {
                if let Some(s) = self.scheduler.remove(id) {
                    self.finish(s, reason, false);
                }
            }
            EngineCommand::StartJob(spec) => self.start_job(spec),
            EngineCommand::StopJob { id } => {
                if let Some(i) = self.jobs.iter().position(|j| j.id == id) {
                    let job = self.jobs.remove(i);
                    self.stop_job(job);
                }
            }
            EngineCommand::Shutdown => return false,
        }
        true
    }

    fn has_work(&self) -> bool {
        self.scheduler.has_work() || self.trains()
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
        let inference_tokens: usize = chunks.iter().map(|c| c.len).sum();
        let train = self.plan_train(inference_tokens);
        if chunks.is_empty() && train.is_none() {
            self.update_gauges();
            return;
        }
        if let (Some(_), None, Compute::Host { model, .. }) =
            (train, &self.backward_weights, &self.compute)
        {
            let dtype = self.training.train_dtype;
            self.backward_weights =
                Some(self.pool.install(|| BackwardWeights::with_dtype(model, dtype)));
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
        let picking = self.picking(&chunks, &logits_per_chunk);
        let want = match &picking {
            Picking::Host => Want::Logits,
            Picking::Greedy => Want::Greedy,
            Picking::Device(rows, penalties) => Want::Sample(rows, penalties),
        };
        let (out, fused) = match self.forward(&chunks, &logits_per_chunk, train, want) {
            Ok(out) => out,
            Err(e) => {
                self.fail_batch(&chunks, &e);
                return;
            }
        };
        let on = if matches!(picking, Picking::Host) { "host" } else { "device" };
        let sampled = chunks.iter().zip(&logits_per_chunk).filter(|(c, &n)| c.sample && n > 0);
        self.metrics.sampled_rows_total.with_label_values(&[on]).inc_by(sampled.count() as u64);
        let vocab = self.logits_width;

        let (mut n_decode, mut n_prefill) = (0usize, 0usize);
        let mut row = 0;
        let mut finished = Vec::new();
        for (c, &nrows) in chunks.iter().zip(&logits_per_chunk) {
            let first = row;
            row += nrows;
            let Some(s) = self.scheduler.running_mut(c.seq_id) else { continue };
            if s.is_decode() {
                n_decode += c.len;
            } else {
                n_prefill += c.len;
            }
            s.num_computed += c.len;
            if let (true, RowsOut::Logits(l)) = (s.wants_prompt_logprobs(), &out) {
                collect_prompt_logprobs(s, c, &l[first * vocab..row * vocab], vocab);
            }
            if !c.sample || nrows == 0 {
                continue;
            }
            let pick = match &out {
                RowsOut::Logits(l) => Pick::Logits(&l[(row - 1) * vocab..row * vocab]),
                RowsOut::Greedy(g) => match g.get(row - 1) {
                    Some(&(id, logprob)) => Pick::Greedy(id, logprob),
                    None => continue,
                },
                RowsOut::Sampled(picks) => match picks.get(row - 1) {
                    Some(p) => Pick::Device(p),
                    None => continue,
                },
            };
            if let Some(reason) = self.emit_token(c.seq_id, pick) {
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

        let mut ran = self.after_forward(train, fused);

        self.metrics.iteration_tokens.with_label_values(&["decode"]).observe(n_decode as f64);
        self.metrics.iteration_tokens.with_label_values(&["prefill"]).observe(n_prefill as f64);
        if let Some(t) = train {
            let m = &self.metrics;
            m.iteration_tokens.with_label_values(&["train_fwd"]).observe(ran.tokens as f64);
            m.iteration_tokens.with_label_values(&["train_loss"]).observe(ran.loss_rows as f64);
            m.iteration_bwd_layers.observe(t.work.backward_layers as f64);
        }
        let secs = started.elapsed().as_secs_f64();
        self.metrics.iteration_duration_seconds.observe(secs);
        ran.tokens += n_decode + n_prefill;
        tracing::trace!(
            n_decode,
            n_prefill,
            train_fwd = ran.tokens - n_decode - n_prefill,
            loss_rows = ran.loss_rows,
            bwd_layer_tokens = ran.bwd_layer_tokens,
            predicted_ms = self.cost.predict(&ran) * 1e3,
            ms = secs * 1e3,
            "iteration"
        );
        self.cost.observe(&ran, secs);
        self.update_gauges();
    }

    /// Where this forward's rows are sampled. On a device, when no row needs what only the
    /// host sampler does (penalties, prompt logprobs), the device samples and only ids and the
    /// requested logprobs come back instead of whole rows of logits; each sequence's uniform
    /// number for the step is drawn here, from its own generator. The CPU samples from its
    /// logits in place.
    fn picking(&mut self, chunks: &[Chunk], logits_per_chunk: &[usize]) -> Picking {
        if !self.compute.samples_on_device() {
            return Picking::Host;
        }
        let sampled: Vec<u64> = chunks
            .iter()
            .zip(logits_per_chunk)
            .filter(|(_, &n)| n > 0)
            .map(|(c, _)| c.seq_id)
            .collect();
        let running = &self.scheduler.running;
        let params = |id: u64| running.iter().find(|s| s.id == id).map(|s| &s.params);
        if sampled.iter().all(|&id| params(id).is_some_and(is_plain_greedy)) {
            return Picking::Greedy;
        }
        if !sampled.iter().all(|&id| params(id).is_some_and(samples_on_device)) {
            return Picking::Host;
        }
        let mut rows = Vec::with_capacity(sampled.len());
        let mut penalties = Penalties::default();
        for id in sampled {
            match self.scheduler.running_mut(id) {
                Some(s) => {
                    rows.push(s.sampler.device_row(&s.params));
                    penalties.push_row(s.sampler.device_penalties(&s.params));
                }
                None => return Picking::Host,
            }
        }
        Picking::Device(rows, penalties)
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

    /// Ends every sequence of a batch whose forward failed (a device error): each gets the error
    /// and frees its blocks; the engine goes on with the next iteration.
    /// If the device no longer works at all, the engine stops.
    fn fail_batch(&mut self, chunks: &[Chunk], error: &str) {
        tracing::error!(error, sequences = chunks.len(), "forward failed");
        for c in chunks {
            if let Some(s) = self.scheduler.remove(c.seq_id) {
                let _ = s.events.send(EngineEvent::Error(format!("the forward failed: {error}")));
                self.finish(s, FinishReason::Abort, false);
            }
        }
        self.update_gauges();
        if let Compute::Device { model, name, .. } = &mut self.compute {
            if let Err(e) = model.check() {
                tracing::error!(device = %name, error = %e, "the device failed; the engine stops");
                self.stop_reason = Some(format!("{name} failed: {e}"));
            }
        }
    }

    /// One forward over the iteration's rows: for the rows `logits_per_chunk` asks for, in
    /// chunk order, their logits or (on a device, when `want` says so) their greedy picks.
    fn forward(
        &mut self,
        chunks: &[Chunk],
        logits_per_chunk: &[usize],
        train: Option<TrainSlot>,
        want: Want<'_>,
    ) -> Result<(RowsOut, usize), String> {
        let total: usize = chunks.iter().map(|c| c.len).sum();
        let mut inputs = ChunkInputs {
            tokens: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
        };
        let mut logits_rows = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        for (c, &nrows) in chunks.iter().zip(logits_per_chunk) {
            let Some(s) = self.scheduler.running.iter().find(|s| s.id == c.seq_id) else {
                continue;
            };
            let Some(table) = s.blocks.as_ref() else { continue };
            let q_start = inputs.tokens.len();
            for p in c.start..c.start + c.len {
                inputs.tokens.push(s.tokens[p]);
                inputs.positions.push(p);
                inputs.slots.push(table.slot(p));
            }
            logits_rows.extend((q_start + c.len - nrows)..(q_start + c.len));
            spans.push((q_start, c.len, c.start + c.len, c.seq_id));
        }
        let running = &self.scheduler.running;
        let mut seqs: Vec<AttnSeq<'_>> = Vec::with_capacity(spans.len() + 1);
        let mut lora: Vec<LoraSlice<'_>> = Vec::new();
        let mut device_lora: Vec<AdapterRows<'_>> = Vec::new();
        for &(q_start, q_len, context_len, id) in &spans {
            let Some(s) = running.iter().find(|s| s.id == id) else { continue };
            let Some(table) = s.blocks.as_ref() else { continue };
            seqs.push(AttnSeq { q_start, q_len, context_len, block_table: table.block_ids() });
            if let Some(a) = &s.adapter {
                let rows = q_start..q_start + q_len;
                lora.push(LoraSlice { rows: rows.clone(), adapter: &a.weights, train: None });
                device_lora.push(AdapterRows { rows, adapter: a });
            }
        }
        // A device job's chunk that the serving forward may carry.
        let on_device = train.and_then(|t| {
            let key = self.jobs.get(t.job)?.device_forward_key()?;
            Some((key, t.work.forward_tokens))
        });
        // The training chunk goes after every inference row.
        let mut captures = Vec::new();
        let mut train_blocks = Vec::new();
        let mut train_seq = None;
        if let Some(TrainSlot { job, work }) = train.filter(|t| t.work.forward_tokens > 0) {
            if let Some(j) = self.jobs.get_mut(job) {
                if let Some(sample) = j.current.as_mut() {
                    let rows = sample.push_chunk(work.forward_tokens, &mut inputs);
                    let seq = sample.attn_seq(&rows);
                    train_blocks = seq.block_table.to_vec();
                    train_seq = Some((seq.q_start, seq.q_len, seq.context_len));
                    lora.push(sample.lora_slice(&rows, &j.adapter));
                    captures.push(sample.capture(&rows));
                }
            }
        }
        if let Some((q_start, q_len, context_len)) = train_seq {
            seqs.push(AttnSeq { q_start, q_len, context_len, block_table: &train_blocks });
        }
        let batch = ForwardBatch {
            tokens: &inputs.tokens,
            positions: &inputs.positions,
            slot_mapping: &inputs.slots,
            seqs: &seqs,
            logits_rows: &logits_rows,
        };
        let (logits, fused) = match &mut self.compute {
            Compute::Host { model, kv } => {
                let (model, bw) = (&*model, self.backward_weights.as_ref());
                let l =
                    self.pool.install(|| model.forward_with(&batch, kv, &lora, &mut captures, bw));
                (RowsOut::Logits(l), 0)
            }
            // An iteration of training alone: the device trains in forwards of its own.
            Compute::Device { .. } if inputs.tokens.is_empty() => (RowsOut::Logits(Vec::new()), 0),
            // A job's sample joins the serving forward where the device can take it.
            Compute::Device { model, .. } => model
                .forward_coserved(&batch, &device_lora, want, on_device)
                .map_err(|e| e.to_string())?,
        };
        drop(captures);
        if let Some(TrainSlot { job, work }) = train {
            if let Some(s) = self.jobs.get_mut(job).and_then(|j| j.current.as_mut()) {
                s.advance(work.forward_tokens);
            }
        }
        Ok((logits, fused))
    }

    /// Samples the next token of a sequence (or takes the device's greedy pick) and sends it;
    /// returns why the sequence finished, if it did.
    fn emit_token(&mut self, id: u64, pick: Pick<'_>) -> Option<FinishReason> {
        let eos = &self.eos_token_ids;
        let max_model_len = self.max_model_len;
        let metrics = self.metrics.clone();
        let on_device = self.compute.samples_on_device();
        let s = self.scheduler.running_mut(id)?;
        let sampled = match pick {
            Pick::Logits(logits) if on_device => {
                sample_as_device(&mut logits.to_vec(), &s.params, &mut s.sampler)
            }
            Pick::Logits(logits) => sample(&mut logits.to_vec(), &s.params, &mut s.sampler),
            // Only plain greedy sequences get here (see `picking`): the pick is the argmax.
            Pick::Greedy(token_id, logprob) => Sampled {
                token_id,
                logprob: s.params.logprobs.map(|_| TokenLogprob {
                    token_id,
                    logprob,
                    top: Vec::new(),
                }),
            },
            Pick::Device(p) => Sampled {
                token_id: p.id,
                logprob: s.params.logprobs.map(|k| TokenLogprob {
                    token_id: p.id,
                    logprob: p.logprob,
                    top: p.top.iter().take(k).copied().collect(),
                }),
            },
        };
        let now = Instant::now();
        if s.num_generated() == 0 {
            let lora = [s.lora_name()];
            metrics
                .time_to_first_token_seconds
                .with_label_values(&lora)
                .observe((now - s.arrival).as_secs_f64());
            metrics.prompt_tokens_total.with_label_values(&lora).inc_by(s.prompt_len as u64);
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
        metrics.generation_tokens_total.with_label_values(&[s.lora_name()]).inc();
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
        let lora = s.lora_name();
        self.metrics.request_success_total.with_label_values(&[reason.as_str(), lora]).inc();
        let e2e = s.arrival.elapsed().as_secs_f64();
        self.metrics.e2e_request_latency_seconds.with_label_values(&[lora]).observe(e2e);
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
