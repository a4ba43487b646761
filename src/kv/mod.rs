//! Paged KV cache: fixed-size blocks, free list, per-sequence block tables.

pub mod block_allocator;
pub mod block_table;

pub use block_allocator::{Block, BlockAllocator, BlockId};
pub use block_table::{BlockTable, OutOfBlocks};

/// The K and V storage of one model: per layer two buffers laid out
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, addressed by flat slot
/// (`block_id * block_size + offset`), so a token's K (or V) row is `num_kv_heads * head_dim`
/// contiguous floats at `slot * num_kv_heads * head_dim`.
#[derive(Debug)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// (K, V) per layer.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        // vec![0.0; n] maps zeroed pages lazily, so untouched blocks cost no resident memory.
        let layers = (0..num_layers).map(|_| (vec![0f32; len], vec![0f32; len])).collect();
        Self { num_blocks, block_size, num_kv_heads, head_dim, layers }
    }

    /// Bytes one block takes across all layers, K and V (to size the cache from a byte budget).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Stores the K and V rows of `slot_mapping.len()` tokens of one layer.
    /// `k`, `v`: `[num_tokens, num_kv_heads, head_dim]` row-major; token t goes to slot
    /// `slot_mapping[t]`.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], slot_mapping: &[usize]) {
        let row = self.row_len();
        debug_assert_eq!(k.len(), slot_mapping.len() * row);
        debug_assert_eq!(v.len(), slot_mapping.len() * row);
        debug_assert!(slot_mapping.iter().all(|&s| s < self.num_slots()), "slot out of range");
        let Some((kc, vc)) = self.layers.get_mut(layer) else {
            debug_assert!(false, "layer {layer} out of range");
            return;
        };
        let rows = k.chunks_exact(row).zip(v.chunks_exact(row));
        for (&slot, (kr, vr)) in slot_mapping.iter().zip(rows) {
            let at = slot * row;
            if let (Some(kd), Some(vd)) = (kc.get_mut(at..at + row), vc.get_mut(at..at + row)) {
                kd.copy_from_slice(kr);
                vd.copy_from_slice(vr);
            }
        }
    }

    /// The (K, V) buffers of one layer, `[num_blocks, block_size, num_kv_heads, head_dim]`.
    /// Panics if `layer >= num_layers()` (layers are fixed by the model).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_block_counts_k_and_v_of_every_layer() {
        // SmolLM2-135M: 30 layers, 3 kv heads of 64, blocks of 16.
        assert_eq!(KvCache::bytes_per_block(30, 16, 3, 64), 2 * 30 * 16 * 3 * 64 * 4);
        let cache = KvCache::new(2, 5, 4, 3, 8);
        let (k, v) = cache.layer(1);
        assert_eq!(k.len() * 4 * 2 * 2, 5 * KvCache::bytes_per_block(2, 4, 3, 8));
        assert_eq!(k.len(), v.len());
    }

    #[test]
    fn write_places_rows_at_their_slots() {
        let (heads, dim) = (2, 3);
        let mut cache = KvCache::new(2, 4, 4, heads, dim);
        let row = heads * dim;
        let k: Vec<f32> = (0..3 * row).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let slots = [13, 2, 7];
        cache.write(1, &k, &v, &slots);
        let (kc, vc) = cache.layer(1);
        for (t, &s) in slots.iter().enumerate() {
            assert_eq!(&kc[s * row..(s + 1) * row], &k[t * row..(t + 1) * row]);
            assert_eq!(&vc[s * row..(s + 1) * row], &v[t * row..(t + 1) * row]);
        }
        let written: usize = kc.iter().filter(|x| **x != 0.0).count();
        assert_eq!(written, 3 * row - 1, "only the three rows (k[0] is 0.0)");
        assert!(cache.layer(0).0.iter().all(|x| *x == 0.0), "other layers untouched");
    }
}
