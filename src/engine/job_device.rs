//! A fine-tuning job's samples on a device model: the device keeps the adapter, its gradients
//! and AdamW state and the sample's activations (`decoder::device_jobs`); the job keeps the
//! sample's KV blocks (freed when it drops), its progress and all the bookkeeping of `job.rs`.
//! Each sample forwards inside the engine's iterations (among the serving rows where the device
//! takes it, else alone), then its loss runs a share of rows per iteration, then its backward a
//! few layers per iteration, as `plan_training` sizes them.

use std::time::Instant;

use super::cost_model::IterationWork;
use super::hybrid::TrainWork;
use super::job::{ActiveJob, MAX_GRAD_NORM};
use crate::backend::cuda::decoder::runner::DeviceModel;
use crate::backend::cuda::decoder::train::TrainSample;
use crate::kv::{BlockAllocator, BlockTable};
use crate::model::loss::LossStats;

/// A sample in flight on the device.
pub struct DeviceSample {
    _blocks: BlockTable,
    len: usize,
    forwarded: usize,
    /// Rows with a target (the loss's rows), those scored, and their stats.
    targeted: usize,
    loss_done: usize,
    loss: LossStats,
    /// Set once the loss has run: layers of backward left.
    backward_left: Option<usize>,
}

impl DeviceSample {
    pub fn forward_remaining(&self) -> usize {
        self.len - self.forwarded
    }

    /// Rows of the loss left (those with a target), once the forward is complete.
    pub fn loss_remaining(&self) -> usize {
        match self.backward_left {
            None if self.forwarded == self.len => self.targeted - self.loss_done,
            _ => 0,
        }
    }

    pub fn backward_remaining(&self) -> usize {
        self.backward_left.unwrap_or(0)
    }

    pub fn tokens(&self) -> usize {
        self.len
    }
}

impl ActiveJob {
    /// [`ensure_sample`](ActiveJob::ensure_sample) on a device: reserves the sample's blocks
    /// and starts it there. `Ok(false)`: nothing to do, or no blocks free yet (it waits).
    pub fn ensure_sample_on(
        &mut self,
        dev: &mut dyn DeviceModel,
        allocator: &BlockAllocator,
    ) -> Result<bool, String> {
        let Some(key) = self.device_key else { return Ok(false) };
        if self.finished {
            return Ok(false);
        }
        if self.device_sample.is_some() {
            return Ok(true);
        }
        let Some(ex) = self.example() else { return Ok(false) };
        let (tokens, trained) = (ex.tokens.clone(), ex.trained.clone());
        let mut blocks = BlockTable::new(allocator.clone());
        if blocks.reserve(tokens.len()).is_err() {
            return Ok(false);
        }
        let len = tokens.len();
        let sample = TrainSample::new(tokens, &trained, blocks.block_ids().to_vec());
        let targeted = sample.targets.iter().flatten().count();
        // Validation forwards without dropout, as on the CPU.
        let sample = if self.is_validating() {
            sample
        } else {
            sample.with_dropout_seed(self.dropout_seed())
        };
        dev.train_begin(key, sample).map_err(|e| e.to_string())?;
        self.step_started.get_or_insert_with(Instant::now);
        self.device_sample = Some(DeviceSample {
            _blocks: blocks,
            len,
            forwarded: 0,
            targeted,
            loss_done: 0,
            loss: LossStats::default(),
            backward_left: None,
        });
        Ok(true)
    }

    /// The key to forward this job's sample under, while it has tokens left to forward.
    pub fn device_forward_key(&self) -> Option<u64> {
        let ds = self.device_sample.as_ref()?;
        (ds.forwarded < ds.len).then_some(self.device_key?)
    }

    /// This iteration's training work on the device: `forward_tokens` more of the sample (the
    /// `fused` of them the serving forward already ran, or all in a forward of their own; the
    /// iteration that completes the forward starts the loss, as on the CPU, which ends that of
    /// a sample without targets), or `loss_rows` of its loss, or up to `backward_layers` of its
    /// backward, and the optimizer step when the batch is complete. Returns the work that ran
    /// (`bwd_layer_tokens`: backward layers times the sample's tokens).
    pub fn run_on_device(
        &mut self,
        dev: &mut dyn DeviceModel,
        work: TrainWork,
        layers: usize,
        fused: usize,
    ) -> Result<IterationWork, String> {
        let mut ran = IterationWork::default();
        let Some(key) = self.device_key else { return Ok(ran) };
        let err = |e: crate::backend::cuda::CudaError| e.to_string();
        let scale = self.loss_scale();
        let Some(ds) = self.device_sample.as_mut() else { return Ok(ran) };
        let mut fwd = fused.min(ds.len - ds.forwarded);
        ds.forwarded += fwd;
        if fwd == 0 && work.forward_tokens > 0 && ds.forwarded < ds.len {
            fwd = dev.train_forward(key, work.forward_tokens).map_err(err)?;
            ds.forwarded += fwd;
        }
        ran.tokens = fwd;
        let loss_pending = ds.forwarded == ds.len && ds.backward_left.is_none();
        let loss_budget = match (fwd > 0, loss_pending) {
            (true, true) => Some(0),
            (true, false) => return Ok(ran),
            (false, true) if work.loss_rows == 0 => return Ok(ran),
            (false, true) => Some(work.loss_rows),
            (false, false) => None,
        };
        if let Some(rows) = loss_budget {
            let (scored, stats) = dev.train_loss(key, scale.unwrap_or(0.0), rows).map_err(err)?;
            ran.loss_rows = scored;
            ds.loss_done += scored;
            ds.loss.add(&stats);
            if ds.loss_done == ds.targeted {
                let (len, stats) = (ds.len, ds.loss);
                // A validation sample is done with its loss (record_loss drops it).
                ds.backward_left = Some(if scale.is_some() { layers } else { 0 });
                self.record_loss(len, stats);
            }
            return Ok(ran);
        }
        let Some(left) = ds.backward_left.filter(|&l| l > 0) else { return Ok(ran) };
        if work.backward_layers == 0 {
            return Ok(ran);
        }
        let done = dev.train_backward(key, work.backward_layers.min(left)).map_err(err)?;
        ds.backward_left = Some(left - done);
        ran.bwd_layer_tokens = done * ds.len;
        if left - done == 0 && self.sample_done() {
            let lr = self.next_lr();
            let grad_norm = dev.train_step(key, lr, MAX_GRAD_NORM).map_err(err)?;
            if self.next_step_checkpoints() {
                self.fetch_state(dev)?;
            }
            self.after_step(lr, grad_norm);
        }
        Ok(ran)
    }

    /// Copies the adapter and optimizer state from the device (before a checkpoint).
    pub fn fetch_state(&mut self, dev: &mut dyn DeviceModel) -> Result<(), String> {
        let Some(key) = self.device_key else { return Ok(()) };
        let (adapter, optimizer) = dev.train_state(key).map_err(|e| e.to_string())?;
        self.adapter = adapter;
        self.optimizer = optimizer;
        Ok(())
    }
}
