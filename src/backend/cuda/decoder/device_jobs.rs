//! Fine-tuning jobs on a [`DeviceDecoder`]: per job, the adapter being trained with its
//! gradients and AdamW state (`TrainAdapter`), and its sample in flight (`TrainScratch`, sized
//! to the longest sample seen). A sample's chunks forward among the serving rows of an
//! iteration, or in forwards of their own; its K and V go to the engine's blocks of the device
//! cache. With rows of served adapters in the forward, the job's adapter takes the slot after
//! theirs in tables joined from both (`JoinedTables`).

use super::forward::{forward_rows_capturing, Capture};
use super::lora::LoraSet;
use super::runner::DeviceDecoder;
use super::train::{
    backward_layers, forward_chunk, loss_rows, TrainAdapter, TrainOps, TrainSample, TrainScratch,
};
use super::{RowsOut, SeqRows, Want};
use crate::backend::cuda::gpu::n32;
use crate::backend::cuda::CudaError;
use crate::lora::optim::AdamW;
use crate::lora::LoraWeights;
use crate::model::loss::LossStats;

/// The served adapters' tables with a job's adapter in the slot after them, as of the
/// resident set and the job's optimizer step they were joined at.
pub struct JoinedTables<T> {
    job: u64,
    step: u64,
    served: usize,
    set: LoraSet<T>,
}

pub struct DeviceJob<O: TrainOps> {
    adapter: TrainAdapter<O::Logits>,
    scratch: Option<TrainScratch<O>>,
}

fn no_job(key: u64) -> CudaError {
    CudaError::Shape(format!("no fine-tuning job {key} on the device"))
}

impl<O: TrainOps> DeviceDecoder<O> {
    pub(super) fn job_open(
        &mut self,
        key: u64,
        adapter: &LoraWeights,
        opt: &AdamW,
    ) -> Result<(), CudaError> {
        // A job opened again (resumed) starts from the state given; tables pointing into its
        // old adapter go first.
        self.drop_joined(key);
        self.jobs.remove(&key);
        self.ops.prepare_weights(&self.weights)?;
        let adapter = TrainAdapter::resume(&mut self.ops, &self.shape, adapter, opt)?;
        self.jobs.insert(key, DeviceJob { adapter, scratch: None });
        Ok(())
    }

    pub(super) fn job_begin(&mut self, key: u64, sample: TrainSample) -> Result<(), CudaError> {
        let blocks = sample.block_table.iter().map(|&b| b as usize + 1).max().unwrap_or(0);
        if blocks > self.num_blocks {
            return Err(CudaError::Shape(format!(
                "a sample reaching block {} of a {}-block cache",
                blocks - 1,
                self.num_blocks
            )));
        }
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        if job.scratch.as_ref().is_none_or(|sc| sc.len < sample.len()) {
            // Old buffers first; room for samples up to the next power of two.
            job.scratch = None;
            let len = sample.len().next_power_of_two();
            job.scratch = Some(TrainScratch::new(&mut self.ops, &self.shape, &job.adapter, len)?);
        }
        match job.scratch.as_mut() {
            Some(sc) => sc.begin(sample),
            None => Err(no_job(key)),
        }
    }

    pub(super) fn job_forward(&mut self, key: u64, max_tokens: usize) -> Result<usize, CudaError> {
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        let sc =
            job.scratch.as_mut().ok_or_else(|| CudaError::Shape("no sample in flight".into()))?;
        let (s, w, f) = (&self.shape, &self.weights, &self.inv_freq);
        forward_chunk(&mut self.ops, s, w, f, &mut self.caches, &job.adapter, sc, max_tokens)
    }

    /// The rows of `seqs` and the next chunk of job `key`'s sample (at most `max_tokens`) in one
    /// forward; returns what `want` asks of `logits_rows` (rows of `seqs`) and the chunk's
    /// length. Rows of `seqs` with an adapter name its slot among the resident ones; the job's
    /// adapter then takes the slot after them.
    pub(super) fn job_forward_with(
        &mut self,
        mut seqs: Vec<SeqRows>,
        logits_rows: &[u32],
        want: Want<'_>,
        key: u64,
        max_tokens: usize,
    ) -> Result<(RowsOut, usize), CudaError> {
        let served = seqs.iter().any(|r| r.adapter.is_some()).then_some(self.resident.len());
        let slot = served.unwrap_or(0);
        let job = self.jobs.get(&key).ok_or_else(|| no_job(key))?;
        let sc =
            job.scratch.as_ref().ok_or_else(|| CudaError::Shape("no sample in flight".into()))?;
        let Some(chunk) = sc.next_chunk(max_tokens, n32(slot)) else {
            let out = self.forward_seqs(seqs, logits_rows, want)?;
            return Ok((out, 0));
        };
        let first: usize = seqs.iter().map(|r| r.tokens.len()).sum();
        let n = chunk.tokens.len();
        seqs.push(chunk);
        let mut batch = self.batch_of(seqs)?;
        if let Some(t) = batch.train.last_mut() {
            *t = true;
        }
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        let sc =
            job.scratch.as_mut().ok_or_else(|| CudaError::Shape("no sample in flight".into()))?;
        sc.prepare_tables(&mut self.ops, &job.adapter)?;
        if let Some(served) = served {
            let current = self.joined.as_ref().is_some_and(|j| {
                (j.job, j.served) == (key, served) && Some(j.step) == sc.tables().map(|t| t.0)
            });
            if !current {
                self.joined = None;
                let Some((step, train)) = sc.tables() else {
                    return Err(CudaError::Shape("the adapter's tables were not prepared".into()));
                };
                let parts = [(self.lora.as_ref(), served), (Some(train), 1)];
                let set = LoraSet::join(&mut self.ops, &parts)?;
                self.joined = Some(JoinedTables { job: key, step, served, set });
            }
        }
        let Some(fsc) = self.scratch.as_mut() else {
            return Err(CudaError::Shape("no scratch".into()));
        };
        let (lora, mut cap) = match (served, self.joined.as_ref()) {
            (Some(_), Some(j)) => (&j.set, sc.chunk_capture(&self.shape, first..first + n)?),
            _ => sc.chunk_forward(&self.shape, first..first + n)?,
        };
        let cap: &mut dyn Capture<O> = &mut cap;
        let (s, w, f, c) = (&self.shape, &self.weights, &self.inv_freq, &mut self.caches);
        let out = forward_rows_capturing(
            &mut self.ops,
            s,
            w,
            f,
            c,
            &batch,
            fsc,
            logits_rows,
            want,
            Some(lora),
            Some(cap),
        )?;
        sc.advance(n);
        Ok((out, n))
    }

    pub(super) fn job_loss(
        &mut self,
        key: u64,
        grad_scale: f32,
        max_rows: usize,
    ) -> Result<(usize, LossStats), CudaError> {
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        let sc =
            job.scratch.as_mut().ok_or_else(|| CudaError::Shape("no sample in flight".into()))?;
        let (s, w, f) = (&self.shape, &self.weights, &self.inv_freq);
        loss_rows(&mut self.ops, s, w, f, sc, grad_scale, max_rows)
    }

    pub(super) fn job_backward(&mut self, key: u64, max_layers: usize) -> Result<usize, CudaError> {
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        let sc =
            job.scratch.as_mut().ok_or_else(|| CudaError::Shape("no sample in flight".into()))?;
        let (s, w) = (&self.shape, &self.weights);
        backward_layers(&mut self.ops, s, w, &mut self.caches, &mut job.adapter, sc, max_layers)
    }

    pub(super) fn job_step(&mut self, key: u64, lr: f32, max_norm: f32) -> Result<f64, CudaError> {
        let job = self.jobs.get_mut(&key).ok_or_else(|| no_job(key))?;
        job.adapter.clip_and_step(&mut self.ops, lr, Some(max_norm))
    }

    pub(super) fn job_state(&mut self, key: u64) -> Result<(LoraWeights, AdamW), CudaError> {
        let job = self.jobs.get(&key).ok_or_else(|| no_job(key))?;
        Ok((job.adapter.weights(&mut self.ops)?, job.adapter.optimizer(&mut self.ops)?))
    }

    pub(super) fn job_close(&mut self, key: u64) {
        self.drop_joined(key);
        self.jobs.remove(&key);
    }

    /// Drops the joined tables if they point into job `key`'s adapter.
    fn drop_joined(&mut self, key: u64) {
        if self.joined.as_ref().is_some_and(|j| j.job == key) {
            self.joined = None;
        }
    }
}
