//! Fine-tuning: turning uploaded training files into token sequences with loss masks, which
//! the engine trains on token by token (see DESIGN.md, "Token-level fine-tuning").

pub mod dataset;
pub mod job_object;
pub mod manager;
pub mod persist;

pub use dataset::{
    parse_training_file, DatasetError, DatasetOptions, LineError, TrainingExample, MAX_KEPT_ERRORS,
};
