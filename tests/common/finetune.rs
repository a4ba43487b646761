//! Helpers of the engine-level fine-tuning tests: examples and a job's events collected.

use std::time::Duration;

use coserve::engine::job::{JobEvent, ResumePoint, StepMetrics};
use coserve::finetune::TrainingExample;

use super::engine::TestEngine;

/// `n` examples of `len` tokens, the second half of each trained.
pub fn examples(n: usize, len: usize) -> Vec<TrainingExample> {
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..len).map(|p| ((i * 31 + p * 7) % 200 + 10) as u32).collect();
            let trained = (0..len).map(|p| p >= len / 2).collect();
            TrainingExample { tokens, trained, line: i + 1 }
        })
        .collect()
}

#[derive(Default)]
pub struct Run {
    pub steps: Vec<StepMetrics>,
    /// Validation losses, in order.
    pub valid: Vec<f64>,
    pub checkpoints: Vec<ResumePoint>,
    pub end: Option<ResumePoint>,
    pub stopped: Option<ResumePoint>,
}

/// Collects a job's events until it succeeds or stops (a failure panics); with `stop_after`,
/// asks the engine to stop the job once that step is reported.
pub fn drain(rx: &flume::Receiver<JobEvent>, stop_after: Option<(u64, &TestEngine, &str)>) -> Run {
    let mut run = Run::default();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("job event") {
            JobEvent::Started { .. } => {}
            JobEvent::Validation { valid_loss, .. } => run.valid.push(valid_loss),
            JobEvent::Step(m) => {
                if let Some((s, e, id)) = stop_after {
                    if m.step == s {
                        e.handle.stop_job(id);
                    }
                }
                run.steps.push(m);
            }
            JobEvent::Checkpoint(c) => run.checkpoints.push(c.resume),
            JobEvent::Succeeded(c) => {
                run.end = Some(c.resume);
                return run;
            }
            JobEvent::Stopped(c) => {
                run.stopped = Some(c.resume);
                return run;
            }
            JobEvent::Failed(e) => panic!("job failed: {e}"),
        }
    }
}
