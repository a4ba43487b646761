//! The four-row layout of a Q4_1 matrix (`quant_ggml_q4_1`), and the way back to the file's.
//!
//! The file stores each row's blocks in turn: `d`, `m` (f16), then 16 bytes whose low nibbles
//! are elements 0..16 and high nibbles 16..32. Here rows go in groups of four (the last one
//! padded with zero rows), and a group's blocks in pairs. A pair is
//! - `d` of its 8 (row, block) cells, then `m` of the same (f16 each, 32 bytes), in the lane
//!   order of the kernel's sums: `[r0 b0, r1 b0, r0 b1, r1 b1, r2 b0, r3 b0, r2 b1, r3 b1]`;
//! - each block's nibbles, 64 bytes: two 32-byte halves `h`, whose byte `8r + e` holds element
//!   `16h + e` of row `r` in its low nibble and element `16h + 8 + e` in its high nibble.
//!
//! so one load and a shift give eight elements of all four rows. An odd last block is a pair
//! without its second block (its scale cells are zero). Sizes are multiples of 32 bytes, and
//! the data is 32-byte aligned, so the kernel's loads are aligned.

use candle_core::quantized::k_quants::BlockQ4_1;
use half::f16;

pub(crate) const Q4_1_SIZE: usize = 20;
pub(crate) const Q8_1_SIZE: usize = 36;
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == Q4_1_SIZE);
const _: () =
    assert!(std::mem::size_of::<candle_core::quantized::k_quants::BlockQ8_1>() == Q8_1_SIZE);

/// Bytes of a pair's scales (`d` then `m`).
pub(crate) const SCALES: usize = 32;
/// Bytes of one block's nibbles, four rows.
pub(crate) const NIBBLES: usize = 64;
/// Bytes of a whole pair of blocks.
pub(crate) const PAIR: usize = SCALES + 2 * NIBBLES;

#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Chunk([u8; 32]);

pub(crate) struct Layout {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row.
    pub(crate) nb: usize,
    group_bytes: usize,
    data: Vec<Chunk>,
}

pub(crate) fn f16_at(p: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([p[at], p[at + 1]]).to_f32()
}

/// Where cell (row `r` of the group, block `b`) keeps its `d` among a pair's 8 lanes.
fn scale_lane(r: usize, b: usize) -> usize {
    (r / 2) * 4 + (b % 2) * 2 + r % 2
}

/// Where element `e` of row `r` of a block lives: byte offset in the block's nibbles, and
/// whether it is the high nibble.
fn nibble_at(r: usize, e: usize) -> (usize, bool) {
    let (h, within) = (e / 16, e % 16);
    (h * 32 + 8 * r + within % 8, within >= 8)
}

impl Layout {
    /// Rows per group.
    pub(crate) const GROUP: usize = 4;

    /// From the file's bytes, which the caller checked hold `rows * cols / 32` blocks.
    pub(crate) fn from_file_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let nb = cols / 32;
        let group_bytes = (nb / 2) * PAIR + (nb % 2) * (SCALES + NIBBLES);
        let groups = rows.div_ceil(Self::GROUP);
        let mut layout = Layout {
            rows,
            cols,
            nb,
            group_bytes,
            data: vec![Chunk([0; 32]); groups * group_bytes / 32],
        };
        let data = layout.bytes_mut();
        for r in 0..rows {
            for b in 0..nb {
                let src = &bytes[(r * nb + b) * Q4_1_SIZE..(r * nb + b + 1) * Q4_1_SIZE];
                let (pair, nib, lane) = Self::cell(group_bytes, r, b);
                data[pair + 2 * lane..pair + 2 * lane + 2].copy_from_slice(&src[0..2]);
                data[pair + 16 + 2 * lane..pair + 16 + 2 * lane + 2].copy_from_slice(&src[2..4]);
                for e in 0..32 {
                    let q = if e < 16 { src[4 + e] & 0x0F } else { src[4 + e - 16] >> 4 };
                    let (at, high) = nibble_at(r % Self::GROUP, e);
                    data[nib + at] |= if high { q << 4 } else { q };
                }
            }
        }
        layout
    }

    /// Offsets of cell (row `r`, block `b`): its pair, its block's nibbles, its scale lane.
    fn cell(group_bytes: usize, r: usize, b: usize) -> (usize, usize, usize) {
        let pair = (r / Self::GROUP) * group_bytes + (b / 2) * PAIR;
        (pair, pair + SCALES + (b % 2) * NIBBLES, scale_lane(r % Self::GROUP, b))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Chunk` is plain bytes; this views the whole vector read-only.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * 32) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, with the vector borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, self.data.len() * 32)
        }
    }

    /// Group `g`'s bytes (32-byte aligned).
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        &self.bytes()[g * self.group_bytes..(g + 1) * self.group_bytes]
    }

    /// Bytes held (the file's size, plus zero padding rows and odd blocks' empty cells).
    pub(crate) fn size_bytes(&self) -> usize {
        self.data.len() * 32
    }

    /// Block `b` of row `r` (a padding row reads as zeros): `d`, `m` and the 32 elements.
    pub(crate) fn block(&self, r: usize, b: usize) -> (f32, f32, [u8; 32]) {
        let (pair, nib, lane) = Self::cell(self.group_bytes, r, b);
        let data = self.bytes();
        let q = std::array::from_fn(|e| {
            let (at, high) = nibble_at(r % Self::GROUP, e);
            if high {
                data[nib + at] >> 4
            } else {
                data[nib + at] & 0x0F
            }
        });
        (f16_at(data, pair + 2 * lane), f16_at(data, pair + 16 + 2 * lane), q)
    }

    /// Block `b` of row `r` exactly as the file stored it.
    pub(crate) fn file_block_bytes(&self, r: usize, b: usize) -> [u8; Q4_1_SIZE] {
        let (pair, _, lane) = Self::cell(self.group_bytes, r, b);
        let (_, _, q) = self.block(r, b);
        let data = self.bytes();
        let mut out = [0u8; Q4_1_SIZE];
        out[0..2].copy_from_slice(&data[pair + 2 * lane..pair + 2 * lane + 2]);
        out[2..4].copy_from_slice(&data[pair + 16 + 2 * lane..pair + 16 + 2 * lane + 2]);
        for j in 0..16 {
            out[4 + j] = q[j] | (q[j + 16] << 4);
        }
        out
    }

    /// Block `b` of row `r` as candle's block type.
    pub(crate) fn file_block(&self, r: usize, b: usize) -> BlockQ4_1 {
        let bytes = self.file_block_bytes(r, b);
        let mut block = <BlockQ4_1 as candle_core::quantized::k_quants::GgmlType>::zeros();
        // SAFETY: `BlockQ4_1` is ggml's plain 20-byte `repr(C)` block (size asserted above),
        // valid for any bit pattern.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                &mut block as *mut BlockQ4_1 as *mut u8,
                Q4_1_SIZE,
            )
        };
        block
    }

    /// The whole matrix in the file's layout.
    pub(crate) fn file_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.nb * Q4_1_SIZE);
        for r in 0..self.rows {
            for b in 0..self.nb {
                out.extend_from_slice(&self.file_block_bytes(r, b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_and_nibbles_are_each_used_once() {
        let mut lanes: Vec<usize> =
            (0..4).flat_map(|r| (0..2).map(move |b| scale_lane(r, b))).collect();
        lanes.sort();
        assert_eq!(lanes, (0..8).collect::<Vec<_>>());
        let mut nibbles: Vec<(usize, bool)> =
            (0..4).flat_map(|r| (0..32).map(move |e| nibble_at(r, e))).collect();
        nibbles.sort();
        nibbles.dedup();
        assert_eq!(nibbles.len(), 128);
        assert!(nibbles.iter().all(|&(at, _)| at < NIBBLES));
    }

    #[test]
    fn file_bytes_round_trip_with_odd_rows_and_blocks() {
        for (rows, cols) in [(1usize, 32usize), (5, 96), (8, 64), (7, 160)] {
            let len = rows * cols / 32 * Q4_1_SIZE;
            let bytes: Vec<u8> = (0..len).map(|i| (i * 131 + 7) as u8).collect();
            let layout = Layout::from_file_bytes(&bytes, rows, cols);
            assert_eq!(layout.file_bytes(), bytes, "{rows} x {cols}");
            assert_eq!(layout.size_bytes() % 32, 0);
            // Padding rows read as zero blocks.
            let (d, m, q) = layout.block(rows.div_ceil(4) * 4 - 1, 0);
            if rows % 4 != 0 {
                assert_eq!((d, m, q), (0.0, 0.0, [0; 32]));
            }
        }
    }
}
