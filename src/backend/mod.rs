//! Compute backends. The CPU backend uses candle tensors plus our own rayon kernels.

pub mod cpu;
