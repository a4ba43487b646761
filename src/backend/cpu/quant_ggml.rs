//! Weights kept in a GGUF file's own quantization (Q4_0 ... Q8_0, K-quants, F16), multiplied
//! the way llama.cpp does: each activation row is quantized once to the type's `VecDotType`
//! (Q8_0, Q8_1 or Q8_K) and dotted with every weight row by candle's per-type `vec_dot`.
//!
//! Work is split over weight rows (each read once for all activation rows); every output is one
//! `vec_dot` of one weight row and one quantized activation row, and an activation row's
//! quantization depends only on that row, so results do not depend on the batch size or the
//! thread count. Q4_1 (the default model's type) has a faster AVX2 path here because candle's
//! is scalar; it computes the exact same values.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::matmul::{par_row_tasks, OutView};

/// A `[rows, cols]` matrix of ggml blocks with its matmul.
pub trait GgmlRows: Send + Sync {
    fn dtype(&self) -> GgmlDType;
    /// `out = x[m, cols] · selfᵀ`.
    fn matmul(&self, x: &[f32], m: usize, out: OutView<'_>);
    /// One row dequantized (`out.len() == cols`).
    fn dequantize_row(&self, r: usize, out: &mut [f32]);
    /// The raw blocks, row after row, exactly as in the file.
    fn bytes(&self) -> &[u8];
}

/// Builds a matrix from the raw bytes of a `dtype` tensor of `[rows, cols]`. F32 and BF16 are
/// served by the dense kernels and are not accepted here.
pub fn ggml_rows(
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Box<dyn GgmlRows>, String> {
    match dtype {
        GgmlDType::Q4_0 => boxed::<BlockQ4_0>(bytes, rows, cols),
        GgmlDType::Q4_1 => boxed::<BlockQ4_1>(bytes, rows, cols),
        GgmlDType::Q5_0 => boxed::<BlockQ5_0>(bytes, rows, cols),
        GgmlDType::Q5_1 => boxed::<BlockQ5_1>(bytes, rows, cols),
        GgmlDType::Q8_0 => boxed::<BlockQ8_0>(bytes, rows, cols),
        GgmlDType::Q8_1 => boxed::<BlockQ8_1>(bytes, rows, cols),
        GgmlDType::Q2K => boxed::<BlockQ2K>(bytes, rows, cols),
        GgmlDType::Q3K => boxed::<BlockQ3K>(bytes, rows, cols),
        GgmlDType::Q4K => boxed::<BlockQ4K>(bytes, rows, cols),
        GgmlDType::Q5K => boxed::<BlockQ5K>(bytes, rows, cols),
        GgmlDType::Q6K => boxed::<BlockQ6K>(bytes, rows, cols),
        GgmlDType::Q8K => boxed::<BlockQ8K>(bytes, rows, cols),
        GgmlDType::F16 => boxed::<f16>(bytes, rows, cols),
        GgmlDType::F32 | GgmlDType::BF16 => Err(format!("{dtype:?} is not a block type")),
    }
}

/// Bytes of one row of `cols` values of `dtype`, if `cols` is a whole number of blocks.
pub fn ggml_row_bytes(dtype: GgmlDType, cols: usize) -> Result<usize, String> {
    let bs = dtype.block_size();
    if cols % bs != 0 {
        return Err(format!("rows of {cols} values are not whole {dtype:?} blocks of {bs}"));
    }
    Ok(cols / bs * dtype.type_size())
}

fn boxed<T: Kernel + 'static>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Box<dyn GgmlRows>, String> {
    let dtype = T::DTYPE;
    if std::mem::size_of::<T>() != dtype.type_size() || T::VecDotType::BLCK_SIZE != T::BLCK_SIZE {
        return Err(format!("{dtype:?} has an unexpected block layout"));
    }
    let row_bytes = ggml_row_bytes(dtype, cols)?;
    if bytes.len() != rows * row_bytes {
        return Err(format!(
            "{} bytes of {dtype:?} data, expected {} for [{rows}, {cols}]",
            bytes.len(),
            rows * row_bytes
        ));
    }
    let mut blocks = vec![T::zeros(); rows * (cols / T::BLCK_SIZE)];
    // SAFETY: ggml blocks are plain `repr(C)` data (f16/f32 scales, byte arrays) valid for any
    // bit pattern; the destination holds exactly `bytes.len()` bytes (sizes checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len())
    };
    Ok(Box::new(GgmlMatrix { rows, cols, blocks }))
}

struct GgmlMatrix<T> {
    rows: usize,
    cols: usize,
    blocks: Vec<T>,
}

/// Activation rows quantized in parallel from this many on.
const PAR_QUANT_ROWS: usize = 8;

impl<T: Kernel> GgmlRows for GgmlMatrix<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul(&self, x: &[f32], m: usize, out: OutView<'_>) {
        let (k, n) = (self.cols, self.rows);
        assert!(x.len() >= m * k && out.rows() == m && out.cols() == n, "ggml matmul shapes"); // ok: caller bug
        if m == 0 || k == 0 {
            return;
        }
        let bpr = k / T::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); m * bpr];
        let quantize = |(xr, q): (&[f32], &mut [T::VecDotType])| T::VecDotType::from_float(xr, q);
        if m >= PAR_QUANT_ROWS {
            x[..m * k].par_chunks_exact(k).zip(xq.par_chunks_exact_mut(bpr)).for_each(quantize);
        } else {
            x[..m * k].chunks_exact(k).zip(xq.chunks_exact_mut(bpr)).for_each(quantize);
        }
        let xq = &xq;
        par_row_tasks(n, |j0, j1| {
            for j in j0..j1 {
                let wr = &self.blocks[j * bpr..(j + 1) * bpr];
                for (i, yr) in xq.chunks_exact(bpr).enumerate() {
                    // SAFETY: i < m, j in this task's own rows.
                    unsafe { out.write(i, j, T::dot(k, wr, yr)) };
                }
            }
        });
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / T::BLCK_SIZE;
        T::to_float(&self.blocks[r * bpr..(r + 1) * bpr], &mut out[..self.cols]);
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: plain data viewed as bytes, same length as the allocation's initialised part.
        unsafe {
            std::slice::from_raw_parts(
                self.blocks.as_ptr() as *const u8,
                std::mem::size_of_val(self.blocks.as_slice()),
            )
        }
    }
}

/// The dot product a block type uses: candle's `vec_dot`, or a faster equal one.
trait Kernel: GgmlType + 'static {
    fn dot(k: usize, w: &[Self], y: &[Self::VecDotType]) -> f32 {
        Self::vec_dot(k, w, y)
    }
}

impl Kernel for BlockQ4_0 {}
impl Kernel for BlockQ5_0 {}
impl Kernel for BlockQ5_1 {}
impl Kernel for BlockQ8_0 {}
impl Kernel for BlockQ8_1 {}
impl Kernel for BlockQ2K {}
impl Kernel for BlockQ3K {}
impl Kernel for BlockQ4K {}
impl Kernel for BlockQ5K {}
impl Kernel for BlockQ6K {}
impl Kernel for BlockQ8K {}
impl Kernel for f16 {}

impl Kernel for BlockQ4_1 {
    fn dot(_k: usize, w: &[Self], y: &[BlockQ8_1]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_f16c() {
            // SAFETY: AVX2 and F16C are available.
            return unsafe { q4_1_avx2::dot(w, y) };
        }
        dot_q4_1_q8_1(w, y)
    }
}

// Byte layout of the blocks (ggml's, `repr(C)` in candle): Q4_1 is d, m (f16) then 16 bytes of
// nibbles (low nibbles are elements 0..16, high nibbles 16..32); Q8_1 is d, s (f16) then 32 i8.
const Q4_1_SIZE: usize = 20;
const Q8_1_SIZE: usize = 36;
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == Q4_1_SIZE);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == Q8_1_SIZE);

fn f16_at(p: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([p[at], p[at + 1]]).to_f32()
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: the block types are plain data; this views their bytes read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// ggml's `vec_dot_q4_1_q8_1` (candle's scalar version, written over the raw bytes):
/// per block an exact integer sum, then `sumf += sumi * dw * dy + mw * sy`.
fn dot_q4_1_q8_1(w: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    dot_q4_1_q8_1_from(w, y, 0, 0.0)
}

/// Continues `dot_q4_1_q8_1`'s running sum `sumf` from block `from` on.
fn dot_q4_1_q8_1_from(w: &[BlockQ4_1], y: &[BlockQ8_1], from: usize, mut sumf: f32) -> f32 {
    let (wb, yb) = (as_bytes(w), as_bytes(y));
    for b in from..w.len().min(y.len()) {
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

#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"))
}

#[cfg(target_arch = "x86_64")]
mod q4_1_avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1, Q4_1_SIZE, Q8_1_SIZE};

    /// Exact integer dot product of block `b` as eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn block_sums(wp: *const u8, yp: *const u8, b: usize) -> __m256i {
        let q = _mm_loadu_si128(wp.add(b * Q4_1_SIZE + 4) as *const __m128i);
        let nibbles =
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), _mm256_set1_epi8(0x0F));
        let yq = _mm256_loadu_si256(yp.add(b * Q8_1_SIZE + 4) as *const __m256i);
        // Unsigned nibbles x signed bytes: pair sums stay within i16 (2 * 15 * 128).
        _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, yq), _mm256_set1_epi16(1))
    }

    /// The two f16 scales at the start of four blocks `size` bytes apart, as (first, second).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scales4(p: *const u8, size: usize, b: usize) -> (__m128, __m128) {
        let at = |i: usize| (p.add((b + i) * size) as *const i32).read_unaligned();
        let pairs = _mm256_cvtph_ps(_mm_set_epi32(at(3), at(2), at(1), at(0)));
        let (lo, hi) = (_mm256_castps256_ps128(pairs), _mm256_extractf128_ps::<1>(pairs));
        (_mm_shuffle_ps::<0b10_00_10_00>(lo, hi), _mm_shuffle_ps::<0b11_01_11_01>(lo, hi))
    }

    /// Same value as `dot_q4_1_q8_1`: integer sums are exact in any order, and the float
    /// terms are formed (without fusing) and added in the scalar order.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot(w: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
        let nb = w.len().min(y.len());
        let (wp, yp) = (w.as_ptr() as *const u8, y.as_ptr() as *const u8);
        let mut sumf = 0f32;
        let mut b = 0;
        while b + 4 <= nb {
            let (p0, p1) = (block_sums(wp, yp, b), block_sums(wp, yp, b + 1));
            let (p2, p3) = (block_sums(wp, yp, b + 2), block_sums(wp, yp, b + 3));
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
            let sumi = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            let (dw, mw) = scales4(wp, Q4_1_SIZE, b);
            let (dy, sy) = scales4(yp, Q8_1_SIZE, b);
            let t = _mm_add_ps(
                _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), dw), dy),
                _mm_mul_ps(mw, sy),
            );
            let mut terms = [0f32; 4];
            _mm_storeu_ps(terms.as_mut_ptr(), t);
            for v in terms {
                sumf += v;
            }
            b += 4;
        }
        super::dot_q4_1_q8_1_from(w, y, b, sumf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::{assert_batch_invariant, assert_close, data};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u32) -> Box<dyn GgmlRows> {
        let t = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &Device::Cpu);
        let q = t.and_then(|t| QTensor::quantize(&t, dtype)).expect("quantize"); // ok: test
        let bytes = q.data().expect("bytes").to_vec(); // ok: test
        ggml_rows(dtype, &bytes, rows, cols).expect("ggml rows") // ok: test
    }

    fn dequantized(w: &dyn GgmlRows, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            w.dequantize_row(r, row);
        }
        out
    }

    fn mm(w: &dyn GgmlRows, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        w.matmul(x, m, OutView::new(&mut out, m, n));
        out
    }

    /// The activations as the kernel sees them: each row rounded through `VecDotType`.
    fn requantized<T: GgmlType>(x: &[f32], k: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            let mut q = vec![T::VecDotType::zeros(); k / T::BLCK_SIZE];
            T::VecDotType::from_float(xr, &mut q);
            T::VecDotType::to_float(&q, or);
        }
        out
    }

    #[test]
    fn q4_1_paths_equal_candle_bit_for_bit() {
        for nb in [2usize, 4, 6, 18, 48] {
            let k = nb * 32;
            let w = quantized(GgmlDType::Q4_1, 3, k, 1);
            let wb = w.bytes();
            let mut blocks = vec![BlockQ4_1::zeros(); 3 * nb];
            // SAFETY: test copy of plain blocks of the same total size.
            unsafe {
                std::ptr::copy_nonoverlapping(wb.as_ptr(), blocks.as_mut_ptr() as *mut u8, wb.len())
            };
            let x = data(k, 2);
            let mut y = vec![BlockQ8_1::zeros(); nb];
            BlockQ8_1::from_float(&x, &mut y);
            for r in 0..3 {
                let wr = &blocks[r * nb..(r + 1) * nb];
                let want = BlockQ4_1::vec_dot(k, wr, &y);
                assert_eq!(dot_q4_1_q8_1(wr, &y).to_bits(), want.to_bits(), "scalar, {nb} blocks");
                assert_eq!(BlockQ4_1::dot(k, wr, &y).to_bits(), want.to_bits(), "{nb} blocks");
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_dequantized_weights_and_requantized_activations() {
        let cases: [(GgmlDType, usize); 4] = [
            (GgmlDType::Q8_0, 160),
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q6K, 512),
            (GgmlDType::Q4K, 256),
        ];
        for (dtype, k) in cases {
            let (m, n) = (5, 21);
            let w = quantized(dtype, n, k, 3);
            let x = data(m * k, 4);
            let got = mm(w.as_ref(), &x, m, n);
            let xq = match dtype {
                GgmlDType::Q8_0 | GgmlDType::Q4_0 => requantized::<BlockQ8_0>(&x, k),
                _ => requantized::<BlockQ6K>(&x, k),
            };
            assert_close(&got, &xq, &dequantized(w.as_ref(), n, k), m, k, n);
        }
    }

    /// Q8_1 activations carry their block sum `s` (rounded to f16) for the Q4_1 offset term
    /// `m · s`, so the reference is llama.cpp's formula over the stored values, in f64:
    /// `Σ_b dw·dy·Σ qw·qy + mw·sy`.
    #[test]
    fn q4_1_matches_f64_block_formula() {
        for k in [96usize, 576] {
            let (m, n, nb) = (5, 21, k / 32);
            let w = quantized(GgmlDType::Q4_1, n, k, 3);
            let x = data(m * k, 4);
            let got = mm(w.as_ref(), &x, m, n);
            let wb = w.bytes();
            for i in 0..m {
                let mut y = vec![BlockQ8_1::zeros(); nb];
                BlockQ8_1::from_float(&x[i * k..(i + 1) * k], &mut y);
                let yb = as_bytes(&y);
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for b in 0..nb {
                        let wq = &wb[(j * nb + b) * Q4_1_SIZE..];
                        let yq = &yb[b * Q8_1_SIZE..];
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

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        for (dtype, k) in [(GgmlDType::Q4_1, 128), (GgmlDType::Q8_0, 64), (GgmlDType::Q6K, 256)] {
            let n = 19;
            let w = quantized(dtype, n, k, 5);
            assert_batch_invariant(k, n, |x, m, out| w.matmul(x, m, OutView::new(out, m, n)));
        }
    }

    #[test]
    fn rejects_partial_blocks_and_wrong_sizes() {
        let e = ggml_rows(GgmlDType::Q4_1, &[0u8; 40], 1, 48).err().unwrap_or_default();
        assert!(e.contains("not whole Q4_1 blocks"), "{e}");
        let e = ggml_rows(GgmlDType::Q8_0, &[0u8; 30], 1, 32).err().unwrap_or_default();
        assert!(e.contains("expected 34"), "{e}");
        assert!(ggml_rows(GgmlDType::F32, &[0u8; 4], 1, 1).is_err());
    }
}
