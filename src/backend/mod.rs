//! Compute backends. The CPU backend uses candle tensors plus our own rayon kernels; the CUDA
//! side (loaded at run time) holds the device kernels and their checks.

pub mod cpu;
pub mod cuda;
