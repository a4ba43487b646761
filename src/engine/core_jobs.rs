//! The engine's fine-tuning jobs: starting, stopping and failing them, planning each
//! iteration's training work and running what follows the forward (loss rows, backward
//! layers, optimizer steps), on the CPU model or on a device model.

use super::core::{Compute, EngineCore, TrainSlot};
use super::cost_model::IterationWork;
use super::hybrid::{plan_training, FinetuneMode, TrainState, TrainWork};
use super::job::{ActiveJob, JobEvent, TrainJobSpec};

impl EngineCore {
    /// Starts a job; on a device its adapter and optimizer state move there.
    pub(super) fn start_job(&mut self, spec: Box<TrainJobSpec>) {
        let events = spec.events.clone();
        let config = match &self.compute {
            Compute::Host { model, .. } => model.config.clone(),
            Compute::Device { config, .. } => config.clone(),
        };
        match ActiveJob::new(*spec, &config) {
            Ok(mut job) if !job.finished => {
                if let Compute::Device { model, .. } = &mut self.compute {
                    // The adapter and its optimizer state move to the device.
                    let key = self.next_job_key;
                    self.next_job_key += 1;
                    if let Err(e) = model.train_open(key, &job.adapter, &job.optimizer) {
                        let _ = events.send(JobEvent::Failed(e.to_string()));
                        return;
                    }
                    job.device_key = Some(key);
                }
                self.jobs.push(job);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = events.send(JobEvent::Failed(e));
            }
        }
    }

    /// Stops a job at its last completed step. On a device its state comes back first; if it
    /// cannot, the job fails rather than save a state that does not match its step.
    pub(super) fn stop_job(&mut self, mut job: ActiveJob) {
        if let (Compute::Device { model, .. }, Some(key)) = (&mut self.compute, job.device_key) {
            let fetched = job.fetch_state(model.as_mut());
            model.train_close(key);
            if let Err(e) = fetched {
                job.finished = true;
                let _ = job.events.send(JobEvent::Failed(format!("saving the job's state: {e}")));
                return;
            }
        }
        job.stop();
    }

    /// Ends job `i` with an error (a device failure).
    pub(super) fn fail_job(&mut self, i: usize, why: String) {
        let job = self.jobs.remove(i);
        if let (Compute::Device { model, .. }, Some(key)) = (&mut self.compute, job.device_key) {
            model.train_close(key);
        }
        let _ = job.events.send(JobEvent::Failed(why));
    }

    /// Drops job `i` once it has finished (its device state too).
    pub(super) fn remove_finished(&mut self, i: usize) {
        let job = self.jobs.remove(i);
        if let (Compute::Device { model, .. }, Some(key)) = (&mut self.compute, job.device_key) {
            model.train_close(key);
        }
    }

    pub(super) fn trains(&self) -> bool {
        !self.jobs.is_empty() && self.training.mode != FinetuneMode::InferenceOnly
    }

    /// Picks the job whose turn it is (one with a sample that has KV blocks) and sizes its
    /// work for this iteration.
    pub(super) fn plan_train(&mut self, inference_tokens: usize) -> Option<TrainSlot> {
        if !self.trains() {
            return None;
        }
        let pending = self.scheduler.has_work();
        let n = self.jobs.len();
        for k in 0..n {
            let i = (self.job_turn + k) % n;
            let job = &mut self.jobs[i];
            let allocator = self.scheduler.allocator();
            let ready = match &mut self.compute {
                Compute::Host { model, .. } => job.ensure_sample(model, allocator),
                Compute::Device { model, .. } => {
                    match job.ensure_sample_on(model.as_mut(), allocator) {
                        Ok(r) => r,
                        Err(e) => {
                            self.fail_job(i, e);
                            return None;
                        }
                    }
                }
            };
            if !ready {
                continue;
            }
            let st = TrainState {
                forward_remaining: job.forward_remaining(),
                loss_remaining: job.loss_remaining(),
                backward_remaining: job.backward_remaining(),
                sample_len: job.sample_len(),
            };
            let work = plan_training(&self.training, &self.cost, inference_tokens, pending, st);
            if work == TrainWork::default() {
                return None;
            }
            self.job_turn = i;
            return Some(TrainSlot { job: i, work });
        }
        None
    }

    /// Runs the training work after the forward: loss rows once a sample's forward is
    /// complete, then backward layers; `fused`: the sample's tokens a device already forwarded
    /// among the serving rows. Returns the training work that ran (`tokens`: forward tokens).
    pub(super) fn after_forward(
        &mut self,
        train: Option<TrainSlot>,
        fused: usize,
    ) -> IterationWork {
        let none = IterationWork::default();
        let Some(TrainSlot { job, work }) = train else { return none };
        if let Compute::Device { model, config, .. } = &mut self.compute {
            let Some(j) = self.jobs.get_mut(job) else { return none };
            let ran = j.run_on_device(model.as_mut(), work, config.num_layers, fused);
            // Kernels run asynchronously: wait for this iteration's training work, so that the
            // cost model books its time here and not in the next iteration's forward.
            let ran = ran.and_then(|r| {
                if r != none {
                    model.check().map_err(|e| e.to_string())?;
                }
                Ok(r)
            });
            let (ran, done) = match ran {
                Ok(r) => (r, j.finished),
                Err(e) => {
                    self.fail_job(job, e);
                    return none;
                }
            };
            if !j.has_sample() {
                self.job_turn = job + 1;
            }
            if done {
                self.remove_finished(job);
            }
            return ran;
        }
        let Compute::Host { model, kv } = &self.compute else { return none };
        let Some(bw) = self.backward_weights.as_ref() else { return none };
        let Some(j) = self.jobs.get_mut(job) else { return none };
        let mut ran = IterationWork { tokens: work.forward_tokens, ..IterationWork::default() };
        self.pool.install(|| {
            // Starts the loss once the forward is complete (with no rows: it only starts, or
            // ends a sample without targets), or runs its rows.
            if work.forward_tokens > 0 || work.loss_rows > 0 {
                ran.loss_rows = j.run_loss(model, bw, work.loss_rows);
            }
            if work.backward_layers > 0 {
                let len = j.sample_len();
                ran.bwd_layer_tokens = len * j.backward(model, bw, kv, work.backward_layers);
            }
        });
        if !j.has_sample() {
            // Sample done: the next job's turn.
            self.job_turn = job + 1;
        }
        if j.finished {
            self.remove_finished(job);
        }
        ran
    }
}
