//! What the engine computes on: the CPU model with its KV cache, or a device model.

use std::sync::Arc;

use rayon::ThreadPool;

use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cpu::ops::{from_llama, CpuOps};
use crate::backend::cuda::decoder::runner::{AdapterRows, DeviceDecoder, DeviceModel};
use crate::backend::cuda::decoder::train::TrainSample;
use crate::backend::cuda::decoder::{RowsOut, Want};
use crate::backend::cuda::CudaError;
use crate::engine::CacheGeometry;
use crate::kv::KvCache;
use crate::kv::KvDtype;
use crate::lora::optim::AdamW;
use crate::lora::LoraWeights;
use crate::model::config::LlamaConfig;
use crate::model::llama::ForwardBatch;
use crate::model::llama::Llama;
use crate::model::loss::LossStats;

/// What the engine computes on.
// One per engine, never moved after start: boxing the model would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Compute {
    /// The CPU model and its KV cache: inference, adapters and fine-tuning.
    Host { model: Llama, kv: KvCache },
    /// A device model with its own KV cache: inference on the base model and adapters, and
    /// fine-tuning (its jobs' state on the device).
    Device { model: Box<dyn DeviceModel>, name: String, config: LlamaConfig },
}

impl Compute {
    /// Whether sampling runs the device's algorithm (its greedy picks and sampling, or the
    /// host's emulation of them), not the host sampler's.
    pub fn samples_on_device(&self) -> bool {
        matches!(self, Self::Device { model, .. } if !model.samples_on_host())
    }

    /// Why fine-tuning is unavailable here (`None`: it is available).
    pub fn no_training_reason(&self) -> Option<String> {
        match self {
            Self::Device { model, name, .. } if !model.trains() => Some(format!(
                "this server's device model ({name}) cannot fine-tune (start it with --device \
                 cpu to train)"
            )),
            _ => None,
        }
    }
}

/// The CPU's decoder over the seam (`--cpu-forward seam`): `model`'s weights moved, not
/// copied; its KV cache in `kv`, training's frozen products in `train`; every call runs on
/// `pool`, the engine's compute threads.
pub fn cpu_decoder(
    model: Llama,
    g: CacheGeometry,
    (kv, train): (KvDtype, TrainDtype),
    pool: Arc<ThreadPool>,
) -> Result<Box<dyn DeviceModel>, String> {
    let m = from_llama(model, g.block_size).map_err(|e| e.to_string())?;
    let ops = CpuOps::new(kv, train);
    let d = DeviceDecoder::new(ops, m.shape, m.weights, m.inv_freq, g.num_blocks, g.max_rows)
        .map_err(|e| e.to_string())?;
    Ok(Box::new(Pooled { inner: d, pool }))
}

/// A device model whose every call runs inside `pool` (so its kernels' parallel loops use the
/// engine's threads). Only for a model that may move between threads: a CUDA one may not.
struct Pooled<M> {
    inner: M,
    pool: Arc<ThreadPool>,
}

type R = Result<(), CudaError>;

impl<M: DeviceModel + Send> DeviceModel for Pooled<M> {
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.forward(batch, adapters, want))
    }

    fn forward_coserved(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
        train: Option<(u64, usize)>,
    ) -> Result<(RowsOut, usize), CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.forward_coserved(batch, adapters, want, train))
    }

    fn samples_on_host(&self) -> bool {
        self.inner.samples_on_host()
    }

    fn check(&mut self) -> R {
        self.inner.check()
    }

    fn trains(&self) -> bool {
        self.inner.trains()
    }

    fn train_open(&mut self, key: u64, adapter: &LoraWeights, optimizer: &AdamW) -> R {
        let m = &mut self.inner;
        self.pool.install(|| m.train_open(key, adapter, optimizer))
    }

    fn train_begin(&mut self, key: u64, sample: TrainSample) -> R {
        let m = &mut self.inner;
        self.pool.install(|| m.train_begin(key, sample))
    }

    fn train_forward(&mut self, key: u64, max_tokens: usize) -> Result<usize, CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.train_forward(key, max_tokens))
    }

    fn train_loss(
        &mut self,
        key: u64,
        grad_scale: f32,
        max_rows: usize,
    ) -> Result<(usize, LossStats), CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.train_loss(key, grad_scale, max_rows))
    }

    fn train_backward(&mut self, key: u64, max_layers: usize) -> Result<usize, CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.train_backward(key, max_layers))
    }

    fn train_step(&mut self, key: u64, lr: f32, max_norm: f32) -> Result<f64, CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.train_step(key, lr, max_norm))
    }

    fn train_state(&mut self, key: u64) -> Result<(LoraWeights, AdamW), CudaError> {
        let m = &mut self.inner;
        self.pool.install(|| m.train_state(key))
    }

    fn train_close(&mut self, key: u64) {
        self.inner.train_close(key);
    }
}
