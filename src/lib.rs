//! coserve: an OpenAI-compatible LLM server that co-serves inference and LoRA fine-tuning
//! in the same forward iterations. See DESIGN.md for the architecture.

pub mod api;
pub mod backend;
pub mod bench;
pub mod bench_coserve;
pub mod bench_decode;
pub mod bench_finetune;
pub mod config;
pub mod engine;
pub mod finetune;
pub mod kv;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod text;
