//! LoRA fine-tuning: training data, gradients against candle's autograd, the engine's training
//! iterations, learning on real data, restarts and the PEFT adapter layout.

#[path = "../common/mod.rs"]
mod common;

mod data;
mod engine;
mod learning;
mod lora_modules;
mod peft_layout;
mod restart;
mod seam_training;
mod training_gradients;
