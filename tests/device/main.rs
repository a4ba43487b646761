//! The device backend: the engine and training through `DecoderOps` on the host twins, the CUDA
//! kernels run on the CPU, and the CUDA host code on an emulated device.

#[path = "../common/mod.rs"]
mod common;

mod cuda_decoder;
mod cuda_kernels;
mod emulated;
mod engine;
mod finetune;
mod kernels_on_cpu;
mod training;
