//! LoRA dropout masks that the backward pass can regenerate instead of storing: each mask is
//! a pure function of (seed, layer, module, token depth), so it costs no activation memory.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mixes the coordinates of one mask into a 64-bit seed (SplitMix64 finaliser per step).
fn mix(seed: u64, layer: usize, module: usize, pos: usize) -> u64 {
    let mut h = seed;
    for v in [layer as u64, module as u64, pos as u64] {
        h = h.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// One training sample's LoRA dropout: the probability and the sample's seed (the mask of a
/// row then follows from its layer, projection and depth).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleDropout {
    pub p: f32,
    pub seed: u64,
}

/// Multiplies `x` in place by the inverted-dropout mask of one token row: each element is
/// zeroed with probability `p`, kept ones are scaled by `1 / (1 - p)`.
pub fn apply_dropout(x: &mut [f32], p: f32, seed: u64, layer: usize, module: usize, pos: usize) {
    if p <= 0.0 {
        return;
    }
    let keep_scale = 1.0 / (1.0 - p);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, layer, module, pos));
    for v in x.iter_mut() {
        let r: f32 = rng.random();
        *v = if r < p { 0.0 } else { *v * keep_scale };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_reproducible_and_differ_by_coordinate() {
        let mut a = vec![1.0f32; 256];
        let mut b = vec![1.0f32; 256];
        let mut c = vec![1.0f32; 256];
        apply_dropout(&mut a, 0.25, 7, 1, 2, 3);
        apply_dropout(&mut b, 0.25, 7, 1, 2, 3);
        apply_dropout(&mut c, 0.25, 7, 1, 2, 4);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((32..96).contains(&zeros), "{zeros} of 256 dropped at p=0.25");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
