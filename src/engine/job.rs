//! A fine-tuning job as the engine runs it: data order, gradient accumulation over a batch of
//! samples (each forwarded in chunks and back-propagated a few layers at a time, see
//! `training.rs`), AdamW steps, validation at each epoch end and checkpoints.
//!
//! Everything is a function of the seed and the step counter, so a job resumed from a
//! checkpoint (adapter, optimizer state, step) continues exactly as if never interrupted.

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::training::TrainingSample;
use crate::finetune::TrainingExample;
use crate::kv::{BlockAllocator, KvCache};
use crate::lora::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::lora::{LoraConfig, LoraWeights};
use crate::model::activations::SavedActivations;
use crate::model::backward::BackwardWeights;
use crate::model::config::LlamaConfig;
use crate::model::llama::Llama;
use crate::model::loss::LossStats;

/// Global gradient-norm clip, as transformers' Trainer defaults to.
pub const MAX_GRAD_NORM: f32 = 1.0;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainHyper {
    pub n_epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after the multiplier).
    pub learning_rate: f32,
    pub seed: u64,
    /// Optimizer steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
}

/// Where a job resumes: the state saved with a checkpoint.
#[derive(Clone)]
pub struct ResumePoint {
    pub adapter: LoraWeights,
    pub optimizer: AdamW,
    /// Optimizer steps already taken.
    pub step: u64,
    pub trained_tokens: u64,
}

/// What the job manager hands the engine.
pub struct TrainJobSpec {
    pub id: String,
    pub train: Arc<Vec<TrainingExample>>,
    pub validation: Arc<Vec<TrainingExample>>,
    pub lora: LoraConfig,
    pub hyper: TrainHyper,
    pub resume: Option<ResumePoint>,
    pub events: flume::Sender<JobEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    /// 1-based epoch the step belongs to.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub learning_rate: f32,
    pub grad_norm: f64,
    /// Tokens forwarded for this step (every token of its samples).
    pub tokens: u64,
    /// Trained (loss) tokens so far, the OpenAI `trained_tokens`.
    pub trained_tokens: u64,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
}

/// A snapshot to save: enough to serve the adapter and to resume training.
#[derive(Clone)]
pub struct Checkpoint {
    pub resume: ResumePoint,
    pub metrics: Option<StepMetrics>,
}

/// What the engine reports about a job, in order.
pub enum JobEvent {
    Started {
        total_steps: u64,
    },
    Step(StepMetrics),
    Validation {
        step: u64,
        epoch: usize,
        valid_loss: f64,
        valid_accuracy: f64,
    },
    Checkpoint(Box<Checkpoint>),
    /// The last step ran; the checkpoint holds the final adapter.
    Succeeded(Box<Checkpoint>),
    /// Stopped on request (pause or shutdown) after saving this state.
    Stopped(Box<Checkpoint>),
    Failed(String),
}

/// The permutation of `0..n` used in `epoch` (0-based).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

enum Phase {
    Train,
    /// Forward-only loss over the validation set after an epoch.
    Validate {
        next: usize,
        stats: LossStats,
        epoch: usize,
    },
}

pub struct ActiveJob {
    pub id: String,
    train: Arc<Vec<TrainingExample>>,
    validation: Arc<Vec<TrainingExample>>,
    hyper: TrainHyper,
    pub events: flume::Sender<JobEvent>,
    pub adapter: LoraWeights,
    grads: LoraWeights,
    pub optimizer: AdamW,
    schedule: LrSchedule,
    pub step: u64,
    pub total_steps: u64,
    steps_per_epoch: u64,
    /// Example indices of the current step's batch and how many have finished.
    batch: Vec<usize>,
    batch_done: usize,
    batch_target_tokens: usize,
    batch_stats: LossStats,
    batch_tokens: u64,
    pub(super) step_started: Option<Instant>,
    trained_tokens: u64,
    /// The sample in flight (forward or backward).
    pub current: Option<TrainingSample>,
    /// The last finished sample's activation buffers, for the next sample to fill.
    spare_acts: Option<SavedActivations>,
    /// On a device: the engine's key for the job there, and its sample in flight
    /// (`job_device.rs`). The device holds the adapter, gradients and optimizer state;
    /// `adapter` and `optimizer` are refreshed from it before a checkpoint.
    pub device_key: Option<u64>,
    pub(super) device_sample: Option<super::job_device::DeviceSample>,
    phase: Phase,
    last_metrics: Option<StepMetrics>,
    pub finished: bool,
}

impl ActiveJob {
    pub fn new(spec: TrainJobSpec, model: &LlamaConfig) -> Result<Self, String> {
        let TrainJobSpec { id, train, validation, lora, hyper, resume, events } = spec;
        if train.is_empty() {
            return Err("the training file has no examples".into());
        }
        let batch_size = hyper.batch_size.max(1);
        let steps_per_epoch = train.len().div_ceil(batch_size) as u64;
        let total_steps = steps_per_epoch * hyper.n_epochs.max(1) as u64;
        let (adapter, optimizer, step, trained_tokens) = match resume {
            Some(r) => (r.adapter, r.optimizer, r.step, r.trained_tokens),
            None => {
                let a = LoraWeights::init(&lora, model, hyper.seed);
                let o = AdamW::new(&a, AdamWConfig::default());
                (a, o, 0, 0)
            }
        };
        let mut grads = adapter.clone();
        grads.fill_zero();
        let schedule = LrSchedule { base_lr: hyper.learning_rate, warmup_steps: 0, total_steps };
        let mut job = Self {
            id,
            train,
            validation,
            hyper,
            events,
            adapter,
            grads,
            optimizer,
            schedule,
            step,
            total_steps,
            steps_per_epoch,
            batch: Vec::new(),
            batch_done: 0,
            batch_target_tokens: 0,
            batch_stats: LossStats::default(),
            batch_tokens: 0,
            step_started: None,
            trained_tokens,
            current: None,
            spare_acts: None,
            device_key: None,
            device_sample: None,
            phase: Phase::Train,
            last_metrics: None,
            finished: false,
        };
        job.load_batch();
        let _ = job.events.send(JobEvent::Started { total_steps });
        if job.step >= job.total_steps {
            job.succeed();
        }
        Ok(job)
    }

    /// The examples of the current step, from the step counter alone.
    fn load_batch(&mut self) {
        self.batch.clear();
        self.batch_done = 0;
        self.batch_stats = LossStats::default();
        self.batch_tokens = 0;
        self.step_started = None;
        if self.step >= self.total_steps {
            return;
        }
        let epoch = (self.step / self.steps_per_epoch) as usize;
        let within = (self.step % self.steps_per_epoch) as usize;
        let order = epoch_order(self.train.len(), self.hyper.seed, epoch);
        let bs = self.hyper.batch_size.max(1);
        let end = ((within + 1) * bs).min(order.len());
        self.batch = order[within * bs..end].to_vec();
        // The loss is a mean over every trained token of the batch, as one big micro-batch.
        self.batch_target_tokens =
            self.batch.iter().map(|&i| self.train[i].trained_tokens()).sum::<usize>().max(1);
    }

    pub(super) fn example(&self) -> Option<&TrainingExample> {
        match &self.phase {
            Phase::Train => self.batch.get(self.batch_done).map(|&i| &self.train[i]),
            Phase::Validate { next, .. } => self.validation.get(*next),
        }
    }

    /// The seed of the LoRA dropout masks of the sample in flight.
    pub(super) fn dropout_seed(&self) -> u64 {
        let mut h = self.hyper.seed ^ 0xD1B5_4A32_D192_ED03;
        for v in [self.step, self.batch_done as u64] {
            h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            h ^= h >> 29;
        }
        h
    }

    /// Makes sure a sample is in flight; false when there is nothing to do or no KV blocks
    /// for it yet (it waits: training never takes blocks from running inference).
    pub fn ensure_sample(&mut self, model: &Llama, allocator: &BlockAllocator) -> bool {
        if self.finished {
            return false;
        }
        if self.current.is_some() {
            return true;
        }
        let seed = self.dropout_seed();
        let Some(ex) = self.example() else { return false };
        let (tokens, trained) = (ex.tokens.clone(), ex.trained.clone());
        let spare = self.spare_acts.take();
        match TrainingSample::reusing(tokens, trained, allocator, model, &self.adapter, seed, spare)
        {
            Ok(s) => {
                let s = if self.is_validating() { s.for_eval() } else { s };
                self.step_started.get_or_insert_with(Instant::now);
                self.current = Some(s);
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_validating(&self) -> bool {
        matches!(self.phase, Phase::Validate { .. })
    }

    /// Runs up to `max_rows` rows of the loss of the sample in flight once its forward is
    /// complete (in training, with its gradient); books the loss when it ends. Returns the
    /// rows run.
    pub fn run_loss(&mut self, model: &Llama, bw: &BackwardWeights, max_rows: usize) -> usize {
        let scale = self.loss_scale();
        let Some(s) = self.current.as_mut() else { return 0 };
        let len = s.len();
        let (ran, ended) = s.run_loss(model, bw, scale.unwrap_or(0.0), max_rows);
        if let Some(stats) = ended {
            self.record_loss(len, stats);
        }
        ran
    }

    /// Rows of the loss the sample in flight still needs.
    pub fn loss_remaining(&self) -> usize {
        match &self.device_sample {
            Some(d) => d.loss_remaining(),
            None => self.current.as_ref().map_or(0, TrainingSample::loss_remaining),
        }
    }

    /// The gradient scale of a training sample's loss (a mean over the batch's trained
    /// tokens); `None` in validation (loss only).
    pub(super) fn loss_scale(&self) -> Option<f32> {
        match self.phase {
            Phase::Train => Some(1.0 / self.batch_target_tokens as f32),
            Phase::Validate { .. } => None,
        }
    }

    /// Books the loss of the sample in flight (`len` tokens); a validation sample is done then.
    pub(super) fn record_loss(&mut self, len: usize, loss: LossStats) {
        self.batch_tokens += len as u64;
        match &mut self.phase {
            Phase::Train => self.batch_stats.add(&loss),
            Phase::Validate { next, stats, .. } => {
                stats.add(&loss);
                *next += 1;
                self.end_sample();
                self.device_sample = None;
                self.after_validation_sample();
            }
        }
    }

    /// The sample in flight finished its backward: true when the batch is complete and an
    /// optimizer step is due.
    pub(super) fn sample_done(&mut self) -> bool {
        self.end_sample();
        self.device_sample = None;
        self.batch_done += 1;
        self.batch_done >= self.batch.len()
    }

    /// Drops the sample in flight, keeping its activation buffers.
    fn end_sample(&mut self) {
        if let Some(s) = self.current.take() {
            self.spare_acts = Some(s.into_activations());
        }
    }

    /// Whether the next optimizer step ends with a checkpoint (so its state must be at hand).
    pub(super) fn next_step_checkpoints(&self) -> bool {
        let next = self.step + 1;
        let every = self.hyper.checkpoint_every;
        next >= self.total_steps || (every > 0 && next.is_multiple_of(every))
    }

    /// The learning rate of the next optimizer step.
    pub(super) fn next_lr(&self) -> f32 {
        self.schedule.lr(self.step)
    }

    /// Runs up to `layers` backward layers of the sample in flight; returns how many ran.
    pub fn backward(
        &mut self,
        model: &Llama,
        bw: &BackwardWeights,
        kv: &KvCache,
        layers: usize,
    ) -> usize {
        let Some(s) = self.current.as_mut() else { return 0 };
        let ran = s.backward_layers(model, bw, kv, &self.adapter, &mut self.grads, layers);
        if s.is_done() && self.sample_done() {
            self.optimizer_step();
        }
        ran
    }

    fn optimizer_step(&mut self) {
        let lr = self.next_lr();
        let grad_norm = clip_grad_norm(&mut self.grads, MAX_GRAD_NORM);
        self.optimizer.step(&mut self.adapter, &self.grads, lr);
        self.grads.fill_zero();
        self.after_step(lr, grad_norm);
    }

    /// The bookkeeping of an optimizer step taken at `lr` (metrics, events, checkpoints, the
    /// next batch), wherever it ran.
    pub(super) fn after_step(&mut self, lr: f32, grad_norm: f64) {
        let secs = self.step_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.trained_tokens += self.batch_stats.count as u64;
        let epoch = (self.step / self.steps_per_epoch) as usize + 1;
        self.step += 1;
        let m = StepMetrics {
            step: self.step,
            total_steps: self.total_steps,
            epoch,
            train_loss: self.batch_stats.mean_loss(),
            train_accuracy: self.batch_stats.accuracy(),
            learning_rate: lr,
            grad_norm,
            tokens: self.batch_tokens,
            trained_tokens: self.trained_tokens,
            step_seconds: secs,
            tokens_per_second: if secs > 0.0 { self.batch_tokens as f64 / secs } else { 0.0 },
        };
        let _ = self.events.send(JobEvent::Step(m.clone()));
        self.last_metrics = Some(m);
        let epoch_end = self.step.is_multiple_of(self.steps_per_epoch);
        if self.step >= self.total_steps {
            // The last epoch's validation runs before the job reports success.
            if epoch_end && !self.validation.is_empty() {
                self.phase = Phase::Validate { next: 0, stats: LossStats::default(), epoch };
            } else {
                self.succeed();
            }
            return;
        }
        if self.hyper.checkpoint_every > 0 && self.step.is_multiple_of(self.hyper.checkpoint_every)
        {
            let _ = self.events.send(JobEvent::Checkpoint(Box::new(self.checkpoint())));
        }
        if epoch_end && !self.validation.is_empty() {
            self.phase = Phase::Validate { next: 0, stats: LossStats::default(), epoch };
        }
        self.load_batch();
    }

    fn after_validation_sample(&mut self) {
        let Phase::Validate { next, stats, epoch } = &self.phase else { return };
        if *next < self.validation.len() {
            return;
        }
        let _ = self.events.send(JobEvent::Validation {
            step: self.step,
            epoch: *epoch,
            valid_loss: stats.mean_loss(),
            valid_accuracy: stats.accuracy(),
        });
        self.phase = Phase::Train;
        if self.step >= self.total_steps {
            self.succeed();
        }
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            resume: ResumePoint {
                adapter: self.adapter.clone(),
                optimizer: self.optimizer.clone(),
                step: self.step,
                trained_tokens: self.trained_tokens,
            },
            metrics: self.last_metrics.clone(),
        }
    }

    fn succeed(&mut self) {
        self.finished = true;
        self.current = None;
        self.device_sample = None;
        let _ = self.events.send(JobEvent::Succeeded(Box::new(self.checkpoint())));
    }

    /// Stops the job at its last completed step (the partial batch is redone on resume).
    pub fn stop(&mut self) {
        self.finished = true;
        self.current = None;
        self.device_sample = None;
        let _ = self.events.send(JobEvent::Stopped(Box::new(self.checkpoint())));
    }

    /// Forward tokens the sample in flight still needs (0 when it is in its backward).
    pub fn forward_remaining(&self) -> usize {
        match &self.device_sample {
            Some(d) => d.forward_remaining(),
            None => self.current.as_ref().map_or(0, TrainingSample::forward_remaining),
        }
    }

    pub fn backward_remaining(&self) -> usize {
        match &self.device_sample {
            Some(d) => d.backward_remaining(),
            None => self.current.as_ref().map_or(0, TrainingSample::backward_remaining),
        }
    }

    /// Whether a sample is in flight.
    pub fn has_sample(&self) -> bool {
        self.current.is_some() || self.device_sample.is_some()
    }

    /// Tokens of the sample in flight (the cost of one backward layer scales with it).
    pub fn sample_len(&self) -> usize {
        match &self.device_sample {
            Some(d) => d.tokens(),
            None => self.current.as_ref().map_or(0, TrainingSample::len),
        }
    }
}
