//! Fine-tuning jobs on the device backend (`serve --device cuda`), driven here by the CUDA
//! decoder's CPU twins: a job runs its samples token-level through the device training step
//! inside the engine's iterations, with its adapter and AdamW state on the device, and ends
//! where the same job on the CPU backend ends.

use crate::common;

use std::sync::{Arc, Mutex};

use common::device::{exact_twin_backend, twin_backend, wrap_device};
use common::engine::{collect, request, TestEngine};
use common::finetune::{drain, examples, Run};
use common::tiny_model::{write_gguf, TinyShape};
use coserve::backend::cuda::decoder::runner::{AdapterRows, DeviceModel};
use coserve::backend::cuda::decoder::train::TrainSample;
use coserve::backend::cuda::decoder::{RowsOut, Want};
use coserve::backend::cuda::CudaError;
use coserve::engine::hybrid::{FinetuneMode, TrainingConfig};
use coserve::engine::job::{JobEvent, ResumePoint, TrainHyper, TrainJobSpec};
use coserve::engine::{Backend, EngineConfig, SamplingParams};
use coserve::lora::optim::AdamW;
use coserve::lora::{AdapterLease, LoraConfig, LoraWeights};
use coserve::model::llama::ForwardBatch;
use coserve::model::loader::load_model;
use coserve::model::loss::LossStats;
use coserve::model::weights::WeightsDtype;

/// Heads of 32 (the kernels' multiple) and bf16-valued weights (what a device holds).
fn shape() -> TinyShape {
    TinyShape { heads: 2, kv_heads: 1, bf16_weights: true, ..TinyShape::default() }
}

fn engine(path: &std::path::Path, backend: Backend) -> TestEngine {
    let cfg = EngineConfig {
        max_num_batched_tokens: 64,
        kv_cache_bytes: 8 << 20,
        threads: 2,
        training: TrainingConfig {
            mode: FinetuneMode::Coserve,
            max_train_tokens_per_iter: 7,
            max_bwd_layers_per_iter: 1,
            ..TrainingConfig::default()
        },
        ..EngineConfig::default()
    };
    TestEngine::start_on(path, cfg, backend)
}

fn spec(id: &str, resume: Option<ResumePoint>) -> (TrainJobSpec, flume::Receiver<JobEvent>) {
    spec_with_dropout(id, resume, 0.0)
}

fn spec_with_dropout(
    id: &str,
    resume: Option<ResumePoint>,
    dropout: f32,
) -> (TrainJobSpec, flume::Receiver<JobEvent>) {
    let (tx, rx) = flume::unbounded();
    let spec = TrainJobSpec {
        id: id.into(),
        train: Arc::new(examples(6, 24)),
        validation: Arc::new(examples(2, 16)),
        lora: LoraConfig { r: 4, alpha: 8.0, dropout, ..LoraConfig::default() },
        hyper: TrainHyper {
            n_epochs: 2,
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

fn run_job(path: &std::path::Path, backend: Backend, dropout: f32) -> Run {
    run_job_beside(path, backend, dropout, None).0
}

/// The request that runs beside a job, on `adapter` (`None`: the base model): its tokens.
fn request_beside(e: &TestEngine, adapter: Option<&AdapterLease>) -> Vec<u32> {
    let mut params = SamplingParams::greedy(20);
    params.ignore_eos = true;
    let mut req = request(vec![5, 6, 7, 8], params);
    req.adapter = adapter.cloned();
    let g = collect(e.handle.submit(req).expect("submit"));
    assert_eq!(g.tokens.len(), 20);
    g.tokens
}

/// A job with a request alongside (the job's samples share iterations with it): the job's
/// run and the request's tokens.
fn run_job_beside(
    path: &std::path::Path,
    backend: Backend,
    dropout: f32,
    adapter: Option<&AdapterLease>,
) -> (Run, Vec<u32>) {
    let e = engine(path, backend);
    let (s, rx) = spec_with_dropout("ftjob-dev", None, dropout);
    e.handle.start_job(s).unwrap();
    let tokens = request_beside(&e, adapter);
    (drain(&rx, None), tokens)
}

fn max_rel(a: &LoraWeights, b: &LoraWeights) -> f32 {
    let scale = b.tensors().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let err = a
        .tensors()
        .flatten()
        .zip(b.tensors().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    err / scale
}

/// A device model that counts the sample tokens forwarded among serving rows and alone, and
/// the loss rows it scores and in how many calls.
struct Counting {
    inner: Box<dyn DeviceModel>,
    counts: Arc<Mutex<[usize; 4]>>,
}

impl DeviceModel for Counting {
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        self.inner.forward(batch, adapters, want)
    }
    fn forward_coserved(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
        train: Option<(u64, usize)>,
    ) -> Result<(RowsOut, usize), CudaError> {
        let (out, n) = self.inner.forward_coserved(batch, adapters, want, train)?;
        self.counts.lock().unwrap()[0] += n;
        Ok((out, n))
    }
    fn check(&mut self) -> Result<(), CudaError> {
        self.inner.check()
    }
    fn trains(&self) -> bool {
        self.inner.trains()
    }
    fn train_open(&mut self, key: u64, adapter: &LoraWeights, optimizer: &AdamW) -> R {
        self.inner.train_open(key, adapter, optimizer)
    }
    fn train_begin(&mut self, key: u64, sample: TrainSample) -> R {
        self.inner.train_begin(key, sample)
    }
    fn train_forward(&mut self, key: u64, max_tokens: usize) -> Result<usize, CudaError> {
        let n = self.inner.train_forward(key, max_tokens)?;
        self.counts.lock().unwrap()[1] += n;
        Ok(n)
    }
    fn train_loss(
        &mut self,
        key: u64,
        grad_scale: f32,
        max_rows: usize,
    ) -> Result<(usize, LossStats), CudaError> {
        let (rows, stats) = self.inner.train_loss(key, grad_scale, max_rows)?;
        assert!(rows <= max_rows, "{rows} loss rows for a budget of {max_rows}");
        let mut c = self.counts.lock().unwrap();
        c[2] += rows;
        c[3] += 1;
        Ok((rows, stats))
    }
    fn train_backward(&mut self, key: u64, max_layers: usize) -> Result<usize, CudaError> {
        self.inner.train_backward(key, max_layers)
    }
    fn train_step(&mut self, key: u64, lr: f32, max_norm: f32) -> Result<f64, CudaError> {
        self.inner.train_step(key, lr, max_norm)
    }
    fn train_state(&mut self, key: u64) -> Result<(LoraWeights, AdamW), CudaError> {
        self.inner.train_state(key)
    }
    fn train_close(&mut self, key: u64) {
        self.inner.train_close(key)
    }
}

type R = Result<(), CudaError>;

/// `backend` wrapped in [`Counting`]: (sample tokens forwarded among serving rows, alone, loss
/// rows, loss calls).
fn counting(backend: Backend) -> (Backend, Arc<Mutex<[usize; 4]>>) {
    let counts = Arc::new(Mutex::new([0; 4]));
    let c = counts.clone();
    let backend =
        wrap_device(backend, move |inner| Box::new(Counting { inner, counts: c.clone() }));
    (backend, counts)
}

/// With the twins' roundings off, the device job is the CPU job up to summation order: same
/// steps, losses, gradient norms, validation losses, checkpoints and final adapter. Its chunks
/// ride in the serving forwards while the request decodes, and forward alone after.
#[test]
fn a_job_on_the_device_ends_where_the_cpu_job_ends() {
    same_job_on_both(0.0);
}

/// With LoRA dropout the device draws the CPU's masks for the same samples (and none for
/// validation), so the job still ends where the CPU job ends.
#[test]
fn a_job_with_dropout_on_the_device_ends_where_the_cpu_job_ends() {
    same_job_on_both(0.1);
}

fn same_job_on_both(dropout: f32) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &shape());
    let cpu = run_job(&path, Backend::Cpu, dropout);
    let (backend, counts) = counting(exact_twin_backend());
    let dev = run_job(&path, backend, dropout);
    let [fused, alone, loss_rows, loss_calls] = *counts.lock().unwrap();
    assert!(fused > 0 && alone > 0, "sample tokens fused {fused}, alone {alone}");
    // The loss rows are the tokens with a target (not the prompts'), at most 7 (the cap) an
    // iteration.
    assert!(loss_rows > 0 && loss_rows < fused + alone, "{loss_rows} loss rows");
    assert!(loss_calls >= loss_rows.div_ceil(7), "{loss_rows} loss rows in {loss_calls} calls");
    assert_same_job(&dev, &cpu);
}

/// With a request on a served adapter (rank 8, the job's is 4) beside the job, the job's chunks
/// still ride in the serving forwards, its adapter in the slot after the served one's; the
/// request gets the tokens it gets with no job running, and the job ends where the CPU job
/// ends.
#[test]
fn a_job_coserves_beside_a_served_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &shape());
    let model = load_model(&path, WeightsDtype::F32).expect("tiny model").model;
    let served = crate::engine::adapter(&model.config, 8, 3);
    let no_job = request_beside(&engine(&path, exact_twin_backend()), Some(&served));
    let base = request_beside(&engine(&path, exact_twin_backend()), None);
    assert_ne!(no_job, base, "the adapter changes the tokens");
    let (cpu, _) = run_job_beside(&path, Backend::Cpu, 0.0, Some(&served));
    let (backend, counts) = counting(exact_twin_backend());
    let (dev, tokens) = run_job_beside(&path, backend, 0.0, Some(&served));
    assert_eq!(tokens, no_job, "the served adapter's tokens beside the job");
    let [fused, ..] = *counts.lock().unwrap();
    assert!(fused > 0, "no sample token rode with the served adapter's rows");
    assert_same_job(&dev, &cpu);
}

/// The device job `dev` against the CPU job `cpu`: same steps and learning rates, losses,
/// gradient norms, validation losses, checkpoints and final adapter up to summation order.
fn assert_same_job(dev: &Run, cpu: &Run) {
    assert_eq!(dev.steps.len(), 4, "6 examples, batch 4, 2 epochs");
    for (d, c) in dev.steps.iter().zip(&cpu.steps) {
        assert_eq!((d.step, d.tokens, d.trained_tokens), (c.step, c.tokens, c.trained_tokens));
        assert!((d.train_loss - c.train_loss).abs() <= 1e-4 * c.train_loss, "{d:?} vs {c:?}");
        assert!((d.grad_norm - c.grad_norm).abs() <= 1e-3 * c.grad_norm, "{d:?} vs {c:?}");
        assert_eq!(d.learning_rate, c.learning_rate);
    }
    assert_eq!(dev.valid.len(), 2);
    for (d, c) in dev.valid.iter().zip(&cpu.valid) {
        assert!((d - c).abs() <= 1e-4 * c, "validation {d} vs {c}");
    }
    assert_eq!(dev.checkpoints.len(), cpu.checkpoints.len());
    let (d, c) = (dev.end.as_ref().expect("device end"), cpu.end.as_ref().expect("cpu end"));
    assert_eq!((d.step, d.optimizer.step), (c.step, c.optimizer.step));
    let err = max_rel(&d.adapter, &c.adapter);
    assert!(err < 1e-3, "final adapters differ by {err:e} of the largest weight");
    assert!(max_rel(&d.optimizer.v, &c.optimizer.v) < 1e-3);
}

/// As the device runs it (bf16 activations): the job learns, and a job stopped after a step
/// resumes from its checkpoint to the adapter of an uninterrupted run.
#[test]
fn a_device_job_learns_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &shape());
    let whole = run_job(&path, twin_backend(), 0.0);
    let (first, last) = (whole.steps[0].train_loss, whole.steps[3].train_loss);
    assert!(last < first, "loss {first} -> {last}");

    let e = engine(&path, twin_backend());
    let (s, rx) = spec("ftjob-stop", None);
    e.handle.start_job(s).unwrap();
    let part = drain(&rx, Some((1, &e, "ftjob-stop")));
    let stopped = part.stopped.expect("stopped");
    assert_eq!(stopped.step, 1);
    let (s, rx) = spec("ftjob-stop", Some(stopped));
    e.handle.start_job(s).unwrap();
    let rest = drain(&rx, None);
    let (a, b) = (rest.end.expect("resumed end"), whole.end.expect("whole end"));
    assert_eq!(a.step, b.step);
    // Same arithmetic in the same order on the same thread: bit for bit.
    assert_eq!(a.adapter.tensors().collect::<Vec<_>>(), b.adapter.tensors().collect::<Vec<_>>());
}
