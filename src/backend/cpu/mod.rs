//! CPU kernels (rayon).

pub mod matmul;
pub mod paged_attention;
