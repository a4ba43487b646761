//! Fine-tuning inside the engine, driven through `EngineHandle` on the tiny model: jobs learn,
//! co-served training leaves inference outputs unchanged, inference load leaves the trained
//! adapter unchanged, and a job stopped and resumed from its checkpoint ends exactly where an
//! uninterrupted run ends.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::engine::{collect, generate, request, TestEngine};
use common::finetune::{drain, examples, Run};
use common::tiny_model::{write_gguf, TinyShape};
use coserve::backend::cpu::frozen::TrainDtype;
use coserve::engine::hybrid::{FinetuneMode, TrainingConfig};
use coserve::engine::job::{JobEvent, ResumePoint, TrainHyper, TrainJobSpec};
use coserve::engine::{EngineConfig, SamplingParams};
use coserve::lora::{AdapterRegistry, LoraConfig, LoraWeights};

fn engine(mode: FinetuneMode, dir: &std::path::Path) -> TestEngine {
    engine_in(mode, dir, TrainDtype::F32)
}

fn engine_in(mode: FinetuneMode, dir: &std::path::Path, train_dtype: TrainDtype) -> TestEngine {
    let path = write_gguf(dir, &TinyShape::default());
    let cfg = EngineConfig {
        max_num_batched_tokens: 64,
        kv_cache_bytes: 8 << 20,
        threads: 2,
        training: TrainingConfig {
            mode,
            max_train_tokens_per_iter: 7,
            max_bwd_layers_per_iter: 1,
            train_dtype,
            ..TrainingConfig::default()
        },
        ..EngineConfig::default()
    };
    TestEngine::start(&path, cfg)
}

fn spec(
    id: &str,
    epochs: usize,
    resume: Option<ResumePoint>,
) -> (TrainJobSpec, flume::Receiver<JobEvent>) {
    let (tx, rx) = flume::unbounded();
    let spec = TrainJobSpec {
        id: id.into(),
        train: Arc::new(examples(6, 24)),
        validation: Arc::new(examples(2, 16)),
        lora: LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() },
        hyper: TrainHyper {
            n_epochs: epochs,
            batch_size: 4,
            learning_rate: 1e-2,
            seed: 42,
            checkpoint_every: 2,
        },
        resume,
        events: tx,
    };
    (spec, rx)
}

fn weights(p: &Option<ResumePoint>) -> &LoraWeights {
    &p.as_ref().expect("final state").adapter
}

#[test]
fn a_job_learns_and_reports_every_step() {
    learns_and_reports_every_step(TrainDtype::F32);
}

#[test]
fn a_job_in_bf16_learns_and_reports_every_step() {
    learns_and_reports_every_step(TrainDtype::Bf16);
}

fn learns_and_reports_every_step(dtype: TrainDtype) {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_in(FinetuneMode::Coserve, dir.path(), dtype);
    let (spec, rx) = spec("ftjob-learn", 8, None);
    e.handle.start_job(spec).unwrap();
    let run = drain(&rx, None);
    // 6 examples, batch 4: 2 steps per epoch.
    assert_eq!(run.steps.len(), 16);
    assert_eq!(run.steps.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
    let (first, last) = (run.steps[0].train_loss, run.steps[15].train_loss);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(run.checkpoints.len(), 7, "every 2 steps, the last one is the final state");
    assert!(run.steps.iter().all(|s| s.tokens > 0 && s.trained_tokens > 0));
    assert_eq!(run.end.as_ref().unwrap().step, 16);
}

#[test]
fn training_alongside_inference_changes_neither() {
    alongside_inference_changes_neither(TrainDtype::F32);
}

/// The bf16 products apply to the training rows alone: inference rows in the same forwards
/// keep their bits.
#[test]
fn training_in_bf16_alongside_inference_changes_neither() {
    alongside_inference_changes_neither(TrainDtype::Bf16);
}

fn alongside_inference_changes_neither(dtype: TrainDtype) {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..6).map(|i| (0..5 + 3 * i).map(|t| (t * 13 + i) as u32 % 250).collect()).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) };

    // Alone: inference, then training.
    let e = engine_in(FinetuneMode::Coserve, dir.path(), dtype);
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generate(&e.handle, p.clone(), params.clone()).tokens).collect();
    let (s, rx) = spec("ftjob-a", 2, None);
    e.handle.start_job(s).unwrap();
    let trained_alone = drain(&rx, None);
    drop(e);

    // Together: the job starts first, requests arrive while it trains.
    let e = engine_in(FinetuneMode::Coserve, dir.path(), dtype);
    let (s, rx) = spec("ftjob-b", 2, None);
    e.handle.start_job(s).unwrap();
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| e.handle.submit(request(p.clone(), params.clone())).unwrap())
        .collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    let trained_together = drain(&rx, None);

    assert_eq!(alone, together, "inference outputs changed by co-served training");
    assert_eq!(
        weights(&trained_alone.end),
        weights(&trained_together.end),
        "adapter changed by inference load"
    );
    let losses = |r: &Run| r.steps.iter().map(|s| s.train_loss).collect::<Vec<_>>();
    assert_eq!(losses(&trained_alone), losses(&trained_together));
}

#[test]
fn a_stopped_job_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(FinetuneMode::Temporal, dir.path());
    let (s, rx) = spec("ftjob-full", 3, None);
    e.handle.start_job(s).unwrap();
    let full = drain(&rx, None);

    let (s, rx) = spec("ftjob-part", 3, None);
    e.handle.start_job(s).unwrap();
    let part = drain(&rx, Some((3, &e, "ftjob-part")));
    let stopped = part.stopped.expect("stopped");
    assert_eq!(stopped.step, 3, "stops at its last completed step");
    let (s, rx) = spec("ftjob-part", 3, Some(stopped));
    e.handle.start_job(s).unwrap();
    let rest = drain(&rx, None);
    assert_eq!(rest.steps.first().map(|s| s.step), Some(4));
    assert_eq!(weights(&full.end), weights(&rest.end));
}

#[test]
fn inference_only_mode_never_trains() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(FinetuneMode::InferenceOnly, dir.path());
    let (s, rx) = spec("ftjob-idle", 1, None);
    e.handle.start_job(s).unwrap();
    assert!(matches!(rx.recv_timeout(Duration::from_secs(10)), Ok(JobEvent::Started { .. })));
    let g = generate(&e.handle, vec![1, 2, 3], SamplingParams::greedy(4));
    assert_eq!(g.tokens.len(), 4);
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "no step in inference-only mode");
}

#[test]
fn adapters_serve_in_a_mixed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(FinetuneMode::Coserve, dir.path());
    let (s, rx) = spec("ftjob-serve", 4, None);
    e.handle.start_job(s).unwrap();
    let tuned = weights(&drain(&rx, None).end).clone();
    let registry = AdapterRegistry::new();
    let lease = registry.insert("ft:tiny:serve".into(), tuned);
    let prompt: Vec<u32> = examples(6, 24)[0].tokens[..12].to_vec();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) };
    let with = |adapter: Option<_>| {
        let mut r = request(prompt.clone(), params.clone());
        r.adapter = adapter;
        r
    };
    let base_alone = collect(e.handle.submit(with(None)).unwrap()).tokens;
    let tuned_alone = collect(e.handle.submit(with(Some(lease.clone()))).unwrap()).tokens;
    assert_ne!(base_alone, tuned_alone, "the adapter changes the output");
    // Both in one batch, and two requests on the same adapter.
    let streams = [with(None), with(Some(lease.clone())), with(Some(lease.clone()))]
        .map(|r| e.handle.submit(r).unwrap());
    let outs: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    assert_eq!(outs, vec![base_alone, tuned_alone.clone(), tuned_alone]);
    // Removing the adapter does not disturb a lease already held.
    let r = with(registry.remove("ft:tiny:serve"));
    drop(lease);
    assert_eq!(collect(e.handle.submit(r).unwrap()).tokens.len(), 8);
}
