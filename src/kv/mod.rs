//! Paged KV cache: fixed-size blocks, free list, per-sequence block tables.

pub mod block_allocator;
pub mod block_table;
