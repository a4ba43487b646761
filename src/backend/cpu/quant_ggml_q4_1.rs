//! Q4_1 weights (the default model's type) times Q8_1 activations: ggml's `vec_dot_q4_1_q8_1`,
//! whose candle version is scalar. Per block an exact integer sum, then
//! `sumf += sumi * dw * dy + mw * sy` in block order, with unfused multiplies.
//!
//! The file's blocks are re-laid out at load time in groups of four rows
//! (`quant_ggml_q4_1_layout`), so that one 32-byte load holds eight elements of each of the four
//! rows. The SIMD kernel then forms each block's four integer sums with byte multiply-adds and
//! one horizontal add per two blocks, where the file layout needs a full reduction tree per
//! block and row, and carries the four rows' float sums in the lanes of one register. Integer
//! sums are exact in any order and every lane adds its terms in block order with the scalar
//! operations, so each result equals candle's scalar kernel bit for bit.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::matmul::{par_row_tasks, OutView, ROWS_PER_TASK};
use super::quant_ggml::GgmlRows;
use super::quant_ggml_q4_1_layout::{f16_at, Layout, Q8_1_SIZE};

const _: () = assert!(ROWS_PER_TASK.is_multiple_of(Layout::GROUP));

/// Activation rows quantized in parallel from this many on.
const PAR_QUANT_ROWS: usize = 8;
/// Activation rows multiplied with one decoding of a group's weights.
const ACT_ROWS: usize = 4;

/// A `[rows, cols]` Q4_1 matrix in the four-row layout.
pub(crate) struct Q4_1Matrix {
    layout: Layout,
}

impl Q4_1Matrix {
    /// From the file's blocks, row after row (`rows * cols / 32` blocks of 20 bytes).
    pub(crate) fn from_file_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        Q4_1Matrix { layout: Layout::from_file_bytes(bytes, rows, cols) }
    }
}

/// Four floats, aligned for one vector load.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Quad([f32; 4]);

/// Quantized activation rows and their block scales, spread the way the kernel reads them:
/// per pair of blocks `[dy0, dy0, dy1, dy1]` then `[sy0, sy0, sy1, sy1]`.
struct Activations {
    blocks: Vec<BlockQ8_1>,
    scales: Vec<Quad>,
    /// Blocks per row.
    nb: usize,
}

impl Activations {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k / 32;
        let mut blocks = vec![BlockQ8_1::zeros(); m * nb];
        let quantize = |(xr, q): (&[f32], &mut [BlockQ8_1])| BlockQ8_1::from_float(xr, q);
        if m >= PAR_QUANT_ROWS {
            x[..m * k].par_chunks_exact(k).zip(blocks.par_chunks_exact_mut(nb)).for_each(quantize);
        } else {
            x[..m * k].chunks_exact(k).zip(blocks.chunks_exact_mut(nb)).for_each(quantize);
        }
        let per_row = Self::scales_per_row(nb);
        let mut scales = vec![Quad([0.0; 4]); m * per_row];
        let bytes = as_bytes(&blocks);
        for (i, row) in scales.chunks_exact_mut(per_row).enumerate() {
            for (p, pair) in row.chunks_exact_mut(2).enumerate() {
                for h in 0..2 {
                    let b = 2 * p + h;
                    if b < nb {
                        let at = (i * nb + b) * Q8_1_SIZE;
                        let (d, s) = (f16_at(bytes, at), f16_at(bytes, at + 2));
                        pair[0].0[2 * h..2 * h + 2].fill(d);
                        pair[1].0[2 * h..2 * h + 2].fill(s);
                    }
                }
            }
        }
        Activations { blocks, scales, nb }
    }

    fn scales_per_row(nb: usize) -> usize {
        nb.div_ceil(2) * 2
    }

    /// Row `i`'s quantized blocks and spread scales.
    fn row(&self, i: usize) -> (&[BlockQ8_1], &[Quad]) {
        let per_row = Self::scales_per_row(self.nb);
        (&self.blocks[i * self.nb..(i + 1) * self.nb], &self.scales[i * per_row..(i + 1) * per_row])
    }
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: the block types are plain data; this views their bytes read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl GgmlRows for Q4_1Matrix {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q4_1
    }

    fn matmul(&self, x: &[f32], m: usize, out: OutView<'_>) {
        self.matmul_with(simd(), x, m, out)
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, chunk) in out[..self.layout.cols].chunks_exact_mut(32).enumerate() {
            BlockQ4_1::to_float(&[self.layout.file_block(r, b)], chunk);
        }
    }

    fn file_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.layout.file_bytes())
    }

    fn size_bytes(&self) -> usize {
        self.layout.size_bytes()
    }
}

impl Q4_1Matrix {
    fn matmul_with(&self, simd: Simd, x: &[f32], m: usize, out: OutView<'_>) {
        let (k, n) = (self.layout.cols, self.layout.rows);
        assert!(x.len() >= m * k && out.rows() == m && out.cols() == n, "ggml matmul shapes"); // ok: caller bug
        if m == 0 || k == 0 {
            return;
        }
        let acts = Activations::new(x, m, k);
        let acts = &acts;
        par_row_tasks(n, |j0, j1| {
            for g in j0 / Layout::GROUP..j1.div_ceil(Layout::GROUP) {
                let mut i = 0;
                while i < m {
                    let rows = (m - i).min(ACT_ROWS);
                    let sums = self.dot_group(simd, g, acts, i, rows);
                    for (di, s) in sums.iter().take(rows).enumerate() {
                        for (r, v) in s.iter().enumerate() {
                            let j = g * Layout::GROUP + r;
                            if j < n {
                                // SAFETY: i + di < m, j in this task's own rows.
                                unsafe { out.write(i + di, j, *v) };
                            }
                        }
                    }
                    i += rows;
                }
            }
        });
    }

    /// Group `g` (four weight rows) against activation rows `i..i + rows` (`rows <=
    /// ACT_ROWS`): `[activation row][weight row]`.
    fn dot_group(
        &self,
        simd: Simd,
        g: usize,
        acts: &Activations,
        i: usize,
        rows: usize,
    ) -> [[f32; 4]; ACT_ROWS] {
        let mut out = [[0f32; 4]; ACT_ROWS];
        #[cfg(target_arch = "x86_64")]
        if simd != Simd::Portable {
            let vnni = simd == Simd::Vnni;
            let row = |d: usize| {
                let (blocks, scales) = acts.row(i + d);
                (blocks.as_ptr() as *const u8, scales.as_ptr())
            };
            let (gp, nb) = (self.layout.group(g).as_ptr(), self.layout.nb);
            // SAFETY: `simd` (not portable) names available features; the group holds `nb`
            // blocks of four rows in `Layout`'s order and every activation row `nb` blocks and
            // their spread scales.
            unsafe {
                match rows {
                    1 => avx2::dot_group_into::<1>(vnni, gp, nb, row, &mut out),
                    2 => avx2::dot_group_into::<2>(vnni, gp, nb, row, &mut out),
                    3 => avx2::dot_group_into::<3>(vnni, gp, nb, row, &mut out),
                    _ => avx2::dot_group_into::<4>(vnni, gp, nb, row, &mut out),
                }
            }
            return out;
        }
        for (d, o) in out.iter_mut().take(rows).enumerate() {
            let (y, _) = acts.row(i + d);
            for (r, v) in o.iter_mut().enumerate() {
                *v = self.dot_scalar(g * Layout::GROUP + r, y);
            }
        }
        out
    }

    /// Weight row `r` (padding rows are zero) dotted with one activation row, candle's scalar
    /// way.
    fn dot_scalar(&self, r: usize, y: &[BlockQ8_1]) -> f32 {
        let mut sumf = 0f32;
        for (b, yb) in y.iter().enumerate() {
            let (dw, mw, q) = self.layout.block(r, b);
            let yb = as_bytes(std::slice::from_ref(yb));
            let sumi: i32 = (0..32).map(|e| q[e] as i32 * (yb[4 + e] as i8) as i32).sum();
            sumf += sumi as f32 * dw * f16_at(yb, 0) + mw * f16_at(yb, 2);
        }
        sumf
    }
}

/// The kernels this machine runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 VNNI, unless `COSERVE_CPU_ISA=avx2` asks for AVX2 (all give the same bits).
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

#[cfg(target_arch = "x86_64")]
fn simd() -> Simd {
    use std::sync::OnceLock;
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
            return Simd::Portable;
        }
        let vnni = is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && std::env::var("COSERVE_CPU_ISA").map_or(true, |isa| isa != "avx2");
        if vnni {
            Simd::Vnni
        } else {
            Simd::Avx2
        }
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn simd() -> Simd {
    Simd::Portable
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::quant_ggml_q4_1_layout::{NIBBLES, PAIR, SCALES};
    use super::{Quad, Q8_1_SIZE};

    /// Bytes ahead of the current pair of blocks to prefetch (see `matmul.rs`).
    const PREFETCH: usize = 1024;

    /// The four 32-byte vectors of one block of a group: vector `k` holds elements
    /// `8k..8k + 8` of each row, row after row (see `Layout`).
    #[inline(always)]
    unsafe fn decode(p: *const u8) -> [__m256i; 4] {
        let mask = _mm256_set1_epi8(0x0F);
        let (l0, l1) = (
            _mm256_load_si256(p as *const __m256i),
            _mm256_load_si256(p.add(32) as *const __m256i),
        );
        [
            _mm256_and_si256(l0, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(l0), mask),
            _mm256_and_si256(l1, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(l1), mask),
        ]
    }

    /// How a block's integer sums with activation block `y` (its 32 i8 values) are formed:
    /// lanes `[r0, r0, r1, r1, r2, r2, r3, r3]`, each row's two lanes adding to its exact sum.
    pub(super) trait BlockSums {
        /// # Safety
        /// The implementation's CPU features are available; `y..y + 32` is readable.
        unsafe fn block_sums(v: &[__m256i; 4], y: *const u8) -> __m256i;
    }

    /// The eight activation bytes vector `k` of a block multiplies, in every row's slot.
    #[inline(always)]
    unsafe fn y_bytes(y: *const u8, k: usize) -> __m256i {
        _mm256_set1_epi64x((y.add(8 * k) as *const i64).read_unaligned())
    }

    /// AVX2: byte pair products to i16, summed, then to i32.
    pub(super) struct Madd;

    impl BlockSums for Madd {
        #[inline(always)]
        unsafe fn block_sums(v: &[__m256i; 4], y: *const u8) -> __m256i {
            // Unsigned nibbles x signed bytes: a pair is at most 2 * 15 * 128 in magnitude,
            // the four pairs' sum 15,360, inside i16.
            let p = |k: usize| _mm256_maddubs_epi16(v[k], y_bytes(y, k));
            let s16 = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
            _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
        }
    }

    /// AVX-512 VNNI: four byte products straight into i32 lanes, one instruction.
    pub(super) struct Vnni;

    impl BlockSums for Vnni {
        #[inline(always)]
        unsafe fn block_sums(v: &[__m256i; 4], y: *const u8) -> __m256i {
            let zero = _mm256_setzero_si256();
            let a = _mm256_dpbusd_epi32(
                _mm256_dpbusd_epi32(zero, v[0], y_bytes(y, 0)),
                v[1],
                y_bytes(y, 1),
            );
            let b = _mm256_dpbusd_epi32(
                _mm256_dpbusd_epi32(zero, v[2], y_bytes(y, 2)),
                v[3],
                y_bytes(y, 3),
            );
            _mm256_add_epi32(a, b)
        }
    }

    /// `dot_group_with` for AVX2 machines.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_group<const R: usize>(
        g: *const u8,
        nb: usize,
        rows: [(*const u8, *const Quad); R],
    ) -> [[f32; 4]; R] {
        dot_group_with::<Madd, R>(g, nb, rows)
    }

    /// `dot_group` or `dot_group_vnni` of activation rows `row(0..R)`, into `out[..R]`.
    ///
    /// # Safety
    /// Their features are available (VNNI's if `vnni`) and the rows as theirs.
    #[inline(always)]
    pub(super) unsafe fn dot_group_into<const R: usize>(
        vnni: bool,
        g: *const u8,
        nb: usize,
        row: impl Fn(usize) -> (*const u8, *const Quad),
        out: &mut [[f32; 4]],
    ) {
        let rows = std::array::from_fn(row);
        let sums = if vnni { dot_group_vnni::<R>(g, nb, rows) } else { dot_group(g, nb, rows) };
        out[..R].copy_from_slice(&sums);
    }

    /// `dot_group_with` for machines with AVX-512 VNNI.
    #[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_group_vnni<const R: usize>(
        g: *const u8,
        nb: usize,
        rows: [(*const u8, *const Quad); R],
    ) -> [[f32; 4]; R] {
        dot_group_with::<Vnni, R>(g, nb, rows)
    }

    /// One group of `nb` blocks of four weight rows at `g` against `R` activation rows given
    /// as (Q8_1 blocks, spread scales): `[activation row][weight row]`.
    #[inline(always)]
    unsafe fn dot_group_with<S: BlockSums, const R: usize>(
        g: *const u8,
        nb: usize,
        rows: [(*const u8, *const Quad); R],
    ) -> [[f32; 4]; R] {
        // Lanes 0, 1, 4, 5 carry weight rows 0..4; the others collect the second block of
        // each pair before it is moved down, and are never read.
        let mut acc = [_mm256_setzero_ps(); R];
        for p in 0..nb.div_ceil(2) {
            let rec = g.add(p * PAIR);
            for line in 0..3 {
                let ahead = rec.wrapping_add(PREFETCH + 64 * line);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            // [r0 b0, r1 b0, r0 b1, r1 b1, r2 b0, r3 b0, r2 b1, r3 b1], as the sums below.
            let dw = _mm256_cvtph_ps(_mm_load_si128(rec as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_load_si128(rec.add(16) as *const __m128i));
            let second = 2 * p + 1 < nb;
            let v0 = decode(rec.add(SCALES));
            let v1 = if second { decode(rec.add(SCALES + NIBBLES)) } else { v0 };
            for (a, &(yp, sc)) in acc.iter_mut().zip(&rows) {
                let y = yp.add(2 * p * Q8_1_SIZE + 4);
                let s0 = S::block_sums(&v0, y);
                let s1 = if second { S::block_sums(&v1, y.add(Q8_1_SIZE)) } else { s0 };
                let sumi = _mm256_cvtepi32_ps(_mm256_hadd_epi32(s0, s1));
                // `Quad` is a 16-byte aligned `[f32; 4]`, as `__m128`.
                let dy = _mm256_broadcast_ps(&*(sc.add(2 * p) as *const __m128));
                let sy = _mm256_broadcast_ps(&*(sc.add(2 * p + 1) as *const __m128));
                let t = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_mul_ps(sumi, dw), dy),
                    _mm256_mul_ps(mw, sy),
                );
                *a = _mm256_add_ps(*a, t);
                if second {
                    *a = _mm256_add_ps(*a, _mm256_permute_ps::<0b11_10_11_10>(t));
                }
            }
        }
        acc.map(|a| {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            [lanes[0], lanes[1], lanes[4], lanes[5]]
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::GgmlType;

    use super::super::quant_ggml_q4_1_layout::Q4_1_SIZE;
    use super::*;
    use crate::backend::cpu::matmul::tests::data;
    use crate::backend::cpu::quant_ggml::tests::quantized;

    fn blocks_of(bytes: &[u8]) -> Vec<BlockQ4_1> {
        let mut blocks = vec![BlockQ4_1::zeros(); bytes.len() / Q4_1_SIZE];
        // SAFETY: test copy of plain blocks of the same total size.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                blocks.as_mut_ptr() as *mut u8,
                bytes.len(),
            )
        };
        blocks
    }

    fn activations(x: &[f32], k: usize) -> Vec<BlockQ8_1> {
        let mut y = vec![BlockQ8_1::zeros(); x.len() / 32];
        for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(k / 32)) {
            BlockQ8_1::from_float(xr, yr);
        }
        y
    }

    /// candle's scalar `vec_dot` for Q4_1, written over the file's bytes (candle's own asserts
    /// an even block count in debug builds).
    fn file_dot(w: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
        let (wb, yb) = (as_bytes(w), as_bytes(y));
        let mut sumf = 0f32;
        for b in 0..w.len().min(y.len()) {
            let (wq, yq) = (&wb[b * Q4_1_SIZE..(b + 1) * Q4_1_SIZE], &yb[b * Q8_1_SIZE..]);
            let mut sumi = 0i32;
            for j in 0..16 {
                let (lo, hi) = ((wq[4 + j] & 0x0F) as i32, (wq[4 + j] >> 4) as i32);
                sumi += lo * (yq[4 + j] as i8) as i32 + hi * (yq[20 + j] as i8) as i32;
            }
            sumf += sumi as f32 * f16_at(wq, 0) * f16_at(yq, 0) + f16_at(wq, 2) * f16_at(yq, 2);
        }
        sumf
    }

    fn matmul(w: &Q4_1Matrix, simd: Simd, x: &[f32], m: usize) -> Vec<f32> {
        let n = w.layout.rows;
        let mut got = vec![0f32; m * n];
        w.matmul_with(simd, x, m, OutView::new(&mut got, m, n));
        got
    }

    /// Every kernel this machine can run.
    fn kernels() -> Vec<Simd> {
        let mut all = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        if simd() != Simd::Portable {
            all.push(Simd::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                all.push(Simd::Vnni);
            }
        }
        all
    }

    /// Every activation-row count (groups of one to four), odd block counts and row counts
    /// that leave padding rows: the SIMD and the portable kernel equal candle's scalar kernel
    /// bit for bit.
    #[test]
    fn every_path_equals_candle_bit_for_bit() {
        for (nb, n) in [(1usize, 4usize), (2, 5), (3, 8), (7, 3), (18, 9), (48, 4)] {
            let k = nb * 32;
            let bytes = quantized(GgmlDType::Q4_1, n, k, 1).file_bytes().to_vec();
            let (w, file) = (Q4_1Matrix::from_file_bytes(&bytes, n, k), blocks_of(&bytes));
            for m in [1usize, 2, 3, 4, 5, 9] {
                let x = data(m * k, 2 + m as u32);
                let y = activations(&x, k);
                let got: Vec<_> =
                    kernels().into_iter().map(|s| (s, matmul(&w, s, &x, m))).collect();
                for (i, yr) in y.chunks_exact(nb).enumerate() {
                    for (j, wr) in file.chunks_exact(nb).enumerate() {
                        let want = file_dot(wr, yr);
                        for (simd, got) in &got {
                            let at = format!("{simd:?}: {nb} blocks, {n} x {m}, ({i}, {j})");
                            assert_eq!(got[i * n + j].to_bits(), want.to_bits(), "{at}");
                        }
                        if nb % 2 == 0 {
                            let candle = BlockQ4_1::vec_dot(k, wr, yr);
                            assert_eq!(want.to_bits(), candle.to_bits(), "candle, {nb} blocks");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dequantized_rows_are_candles() {
        let (n, k) = (6, 96);
        let bytes = quantized(GgmlDType::Q4_1, n, k, 9).file_bytes().to_vec();
        let (w, file) = (Q4_1Matrix::from_file_bytes(&bytes, n, k), blocks_of(&bytes));
        for (r, wr) in file.chunks_exact(k / 32).enumerate() {
            let (mut got, mut want) = (vec![0f32; k], vec![0f32; k]);
            w.dequantize_row(r, &mut got);
            BlockQ4_1::to_float(wr, &mut want);
            assert_eq!(got, want, "row {r}");
        }
        assert_eq!(w.file_bytes().as_ref(), bytes.as_slice());
    }

    /// Q8_1 activations carry their block sum `s` (rounded to f16) for the offset term
    /// `m · s`, so the reference is llama.cpp's formula over the stored values, in f64:
    /// `Σ_b dw·dy·Σ qw·qy + mw·sy`.
    #[test]
    fn matmul_matches_f64_block_formula() {
        for k in [96usize, 576] {
            let (m, n, nb) = (5, 21, k / 32);
            let bytes = quantized(GgmlDType::Q4_1, n, k, 3).file_bytes().to_vec();
            let w = Q4_1Matrix::from_file_bytes(&bytes, n, k);
            let x = data(m * k, 4);
            let got = matmul(&w, simd(), &x, m);
            let y = activations(&x, k);
            let yb = as_bytes(&y);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for b in 0..nb {
                        let wq = &bytes[(j * nb + b) * Q4_1_SIZE..];
                        let yq = &yb[(i * nb + b) * Q8_1_SIZE..];
                        let sumi: i32 = (0..16)
                            .map(|t| {
                                let (lo, hi) = ((wq[4 + t] & 15) as i32, (wq[4 + t] >> 4) as i32);
                                lo * (yq[4 + t] as i8) as i32 + hi * (yq[20 + t] as i8) as i32
                            })
                            .sum();
                        let scaled = sumi as f64 * f16_at(wq, 0) as f64 * f16_at(yq, 0) as f64;
                        let offset = f16_at(wq, 2) as f64 * f16_at(yq, 2) as f64;
                        want += scaled + offset;
                        mag += scaled.abs() + offset.abs();
                    }
                    let g = got[i * n + j] as f64;
                    assert!((g - want).abs() <= 1e-4 * (1.0 + mag), "{g} vs {want} k={k}");
                }
            }
        }
    }
}
