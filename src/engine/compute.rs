//! What the engine computes on: the CPU model with its KV cache, or a device model.

use crate::backend::cuda::decoder::runner::DeviceModel;
use crate::kv::KvCache;
use crate::model::config::LlamaConfig;
use crate::model::llama::Llama;

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
