//! CPU kernels (rayon).

pub mod paged_attention;
