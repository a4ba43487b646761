//! The engine thread: owns model, KV cache and scheduler; runs one forward per iteration.

pub mod handle;
pub mod request;
pub mod sampler;

pub use handle::{EngineCommand, EngineHandle, RequestStream, SubmitError};
pub use request::{EngineEvent, FinishReason, GenerateRequest, SamplingParams, TokenLogprob};
