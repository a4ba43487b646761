//! Paged KV cache: fixed-size blocks, free list, per-sequence block tables.

pub mod block_allocator;
pub mod block_table;

pub use block_allocator::{Block, BlockAllocator, BlockId};
pub use block_table::{BlockTable, OutOfBlocks};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// What the CPU cache stores K and V rows in. Attention computes in f32 either way; f16 halves
/// the cache's memory and the bytes each decode step reads, at the cost of rounding each stored
/// element to 11 significant bits (as llama.cpp's default cache does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

/// One layer's K and V buffers, in the cache's element type.
#[derive(Debug)]
enum Layer {
    F32(Vec<f32>, Vec<f32>),
    /// f16 bits: `vec![0u16; n]` maps zeroed pages lazily, as `vec![0f32; n]` does.
    F16(Vec<u16>, Vec<u16>),
}

/// A layer's (K, V) buffers as `layer` lends them, `[num_blocks, block_size, num_kv_heads,
/// head_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

impl KvLayer<'_> {
    /// Appends the K and V rows at `slots` (`row` elements each), widened to f32.
    pub fn gather(&self, slots: &[usize], row: usize, k: &mut Vec<f32>, v: &mut Vec<f32>) {
        for &s in slots {
            let at = s * row..(s + 1) * row;
            match self {
                KvLayer::F32(kc, vc) => {
                    k.extend_from_slice(&kc[at.clone()]);
                    v.extend_from_slice(&vc[at]);
                }
                KvLayer::F16(kc, vc) => {
                    k.extend(kc[at.clone()].iter().map(|x| x.to_f32()));
                    v.extend(vc[at].iter().map(|x| x.to_f32()));
                }
            }
        }
    }
}

/// The K and V storage of one model: per layer two buffers laid out
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, addressed by flat slot
/// (`block_id * block_size + offset`), so a token's K (or V) row is `num_kv_heads * head_dim`
/// contiguous elements at `slot * num_kv_heads * head_dim`.
#[derive(Debug)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
    layers: Vec<Layer>,
}

impl KvCache {
    /// An f32 cache.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self::with_dtype(num_layers, num_blocks, block_size, num_kv_heads, head_dim, KvDtype::F32)
    }

    pub fn with_dtype(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Self {
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        // Zeroed vectors map their pages lazily, so untouched blocks cost no resident memory.
        let layers = (0..num_layers)
            .map(|_| match dtype {
                KvDtype::F32 => Layer::F32(vec![0f32; len], vec![0f32; len]),
                KvDtype::F16 => Layer::F16(vec![0u16; len], vec![0u16; len]),
            })
            .collect();
        Self { num_blocks, block_size, num_kv_heads, head_dim, dtype, layers }
    }

    /// Bytes one block takes across all layers, K and V, in f32 (to size the cache from a byte
    /// budget; scale by `KvDtype::size() / 4` for other element types).
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
        let Some(buffers) = self.layers.get_mut(layer) else {
            debug_assert!(false, "layer {layer} out of range");
            return;
        };
        let rows = k.chunks_exact(row).zip(v.chunks_exact(row));
        for (&slot, (kr, vr)) in slot_mapping.iter().zip(rows) {
            let at = slot * row..(slot + 1) * row;
            match buffers {
                Layer::F32(kc, vc) => {
                    if let (Some(kd), Some(vd)) = (kc.get_mut(at.clone()), vc.get_mut(at)) {
                        kd.copy_from_slice(kr);
                        vd.copy_from_slice(vr);
                    }
                }
                Layer::F16(kc, vc) => {
                    if let (Some(kd), Some(vd)) = (kc.get_mut(at.clone()), vc.get_mut(at)) {
                        kd.reinterpret_cast_mut::<f16>().convert_from_f32_slice(kr);
                        vd.reinterpret_cast_mut::<f16>().convert_from_f32_slice(vr);
                    }
                }
            }
        }
    }

    /// The (K, V) buffers of one layer, `[num_blocks, block_size, num_kv_heads, head_dim]`.
    /// Panics if `layer >= num_layers()` (layers are fixed by the model).
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.layers[layer] {
            Layer::F32(k, v) => KvLayer::F32(k, v),
            Layer::F16(k, v) => KvLayer::F16(k.reinterpret_cast(), v.reinterpret_cast()),
        }
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
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

    /// Elements of one token's K (or V) row: `num_kv_heads * head_dim`.
    pub fn row_len(&self) -> usize {
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
        let KvLayer::F32(k, v) = cache.layer(1) else { panic!("an f32 cache") };
        assert_eq!(k.len() * 4 * 2 * 2, 5 * KvCache::bytes_per_block(2, 4, 3, 8));
        assert_eq!(k.len(), v.len());
        let cache = KvCache::with_dtype(2, 5, 4, 3, 8, KvDtype::F16);
        let KvLayer::F16(k, v) = cache.layer(1) else { panic!("an f16 cache") };
        assert_eq!(
            k.len() * KvDtype::F16.size() * 2 * 2,
            5 * KvCache::bytes_per_block(2, 4, 3, 8) / 2
        );
        assert_eq!(k.len(), v.len());
    }

    #[test]
    fn write_places_rows_at_their_slots() {
        let (heads, dim) = (2, 3);
        let row = heads * dim;
        // Values f16 holds exactly, so both element types must give them back unchanged.
        let k: Vec<f32> = (0..3 * row).map(|i| i as f32 * 0.5).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let slots = [13, 2, 7];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut cache = KvCache::with_dtype(2, 4, 4, heads, dim, dtype);
            cache.write(1, &k, &v, &slots);
            let (mut kc, mut vc) = (Vec::new(), Vec::new());
            let all: Vec<usize> = (0..16).collect();
            cache.layer(1).gather(&all, row, &mut kc, &mut vc);
            for (t, &s) in slots.iter().enumerate() {
                assert_eq!(&kc[s * row..(s + 1) * row], &k[t * row..(t + 1) * row], "{dtype}");
                assert_eq!(&vc[s * row..(s + 1) * row], &v[t * row..(t + 1) * row], "{dtype}");
            }
            let written: usize = kc.iter().filter(|x| **x != 0.0).count();
            assert_eq!(written, 3 * row - 1, "only the three rows (k[0] is 0.0), {dtype}");
            let (mut k0, mut v0) = (Vec::new(), Vec::new());
            cache.layer(0).gather(&all, row, &mut k0, &mut v0);
            assert!(k0.iter().chain(&v0).all(|x| *x == 0.0), "other layers untouched, {dtype}");
        }
    }

    #[test]
    fn f16_rows_are_rounded_to_nearest() {
        let mut cache = KvCache::with_dtype(1, 1, 1, 1, 4, KvDtype::F16);
        let k = [1.0 + 1.0 / 4096.0, std::f32::consts::PI, -65504.0, 1e-8];
        cache.write(0, &k, &k, &[0]);
        let (mut kc, mut vc) = (Vec::new(), Vec::new());
        cache.layer(0).gather(&[0], 4, &mut kc, &mut vc);
        let expected: Vec<f32> = k.iter().map(|x| f16::from_f32(*x).to_f32()).collect();
        assert_eq!(kc, expected);
        assert_eq!(kc[0], 1.0, "a quarter of an f16 ulp rounds down");
        assert!((kc[1] - 3.140_625).abs() < 1e-6);
    }
}
