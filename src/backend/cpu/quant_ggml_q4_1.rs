//! Q4_1 weights (the default model's type) times Q8_1 activations: ggml's `vec_dot_q4_1_q8_1`,
//! whose candle version is scalar. Per block an exact integer sum, then
//! `sumf += sumi * dw * dy + mw * sy` in block order. The AVX2 path forms the integer sums with
//! `maddubs` (exact in any order) and the float terms four blocks at a time with unfused
//! multiplies, then adds them to `sumf` one by one: it returns the scalar result bit for bit.
//! Each weight block's nibbles and scales are decoded once for up to four activation rows.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1};
use half::f16;

use super::quant_ggml::Kernel;

// Byte layout of the blocks (ggml's, `repr(C)` in candle): Q4_1 is d, m (f16) then 16 bytes of
// nibbles (low nibbles are elements 0..16, high nibbles 16..32); Q8_1 is d, s (f16) then 32 i8.
const Q4_1_SIZE: usize = 20;
const Q8_1_SIZE: usize = 36;
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == Q4_1_SIZE);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == Q8_1_SIZE);

/// Scales of the quantized activation blocks (d and s) as f32, decoded once per matmul.
pub(crate) struct Q8_1Scales {
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Kernel for BlockQ4_1 {
    type Prepared = Q8_1Scales;

    fn prepare(xq: &[BlockQ8_1], _bpr: usize) -> Q8_1Scales {
        let bytes = as_bytes(xq);
        let at = |b: usize, off: usize| f16_at(bytes, b * Q8_1_SIZE + off);
        Q8_1Scales {
            d: (0..xq.len()).map(|b| at(b, 0)).collect(),
            s: (0..xq.len()).map(|b| at(b, 2)).collect(),
        }
    }

    fn dot_row(
        _k: usize,
        w: &[Self],
        xq: &[BlockQ8_1],
        bpr: usize,
        prepared: &Q8_1Scales,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_f16c() {
            // SAFETY: AVX2 and F16C are available; `xq` and the scales hold `out.len()` rows.
            unsafe { avx2::dot_row(w, xq, bpr, prepared, out) };
            return;
        }
        for (o, y) in out.iter_mut().zip(xq.chunks_exact(bpr)) {
            *o = dot_q4_1_q8_1(w, y);
        }
    }
}

fn f16_at(p: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([p[at], p[at + 1]]).to_f32()
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: the block types are plain data; this views their bytes read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// candle's scalar `vec_dot` for Q4_1, written over the raw bytes.
fn dot_q4_1_q8_1(w: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
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

#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1, Q8_1Scales, Q4_1_SIZE, Q8_1_SIZE};

    /// Activation rows sharing one decoding of a weight block.
    const ROWS: usize = 4;
    /// Bytes ahead of the current weight block to prefetch (see `matmul.rs`).
    const PREFETCH: usize = 1024;

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_row(
        w: &[BlockQ4_1],
        xq: &[BlockQ8_1],
        bpr: usize,
        sc: &Q8_1Scales,
        out: &mut [f32],
    ) {
        let m = out.len();
        assert!(w.len() == bpr && xq.len() >= m * bpr && sc.d.len() >= m * bpr); // ok: caller bug
        let wp = w.as_ptr() as *const u8;
        let row = |i: usize| {
            let at = i * bpr;
            (
                (xq.as_ptr() as *const u8).add(at * Q8_1_SIZE),
                sc.d.as_ptr().add(at),
                sc.s.as_ptr().add(at),
            )
        };
        let mut i = 0;
        while i + ROWS <= m {
            let rows = [row(i), row(i + 1), row(i + 2), row(i + 3)];
            let sums = dot_rows::<ROWS>(wp, bpr, rows);
            out[i..i + ROWS].copy_from_slice(&sums);
            i += ROWS;
        }
        while i < m {
            out[i] = dot_rows::<1>(wp, bpr, [row(i)])[0];
            i += 1;
        }
    }

    /// The 32 weights of block `b` as unsigned bytes (low nibbles, then high nibbles).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn nibbles(wp: *const u8, b: usize) -> __m256i {
        let q = _mm_loadu_si128(wp.add(b * Q4_1_SIZE + 4) as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), _mm256_set1_epi8(0x0F))
    }

    /// Exact integer dot product of a block's weights with activation block `b`, in 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn block_sums(nib: __m256i, yp: *const u8, b: usize) -> __m256i {
        let yq = _mm256_loadu_si256(yp.add(b * Q8_1_SIZE + 4) as *const __m256i);
        // Unsigned nibbles x signed bytes: pair sums stay within i16 (2 * 15 * 128).
        _mm256_madd_epi16(_mm256_maddubs_epi16(nib, yq), _mm256_set1_epi16(1))
    }

    /// d and m of weight blocks `b..b + 4`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scales4(wp: *const u8, b: usize) -> (__m128, __m128) {
        let at = |i: usize| (wp.add((b + i) * Q4_1_SIZE) as *const i32).read_unaligned();
        let pairs = _mm256_cvtph_ps(_mm_set_epi32(at(3), at(2), at(1), at(0)));
        let (lo, hi) = (_mm256_castps256_ps128(pairs), _mm256_extractf128_ps::<1>(pairs));
        (_mm_shuffle_ps::<0b10_00_10_00>(lo, hi), _mm_shuffle_ps::<0b11_01_11_01>(lo, hi))
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// One weight row (`nb` blocks at `wp`) against `R` activation rows given as (blocks, d, s).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn dot_rows<const R: usize>(
        wp: *const u8,
        nb: usize,
        rows: [(*const u8, *const f32, *const f32); R],
    ) -> [f32; R] {
        let mut sumf = [0f32; R];
        let mut b = 0;
        while b + 4 <= nb {
            _mm_prefetch::<_MM_HINT_T0>(wp.add(b * Q4_1_SIZE).wrapping_add(PREFETCH) as *const i8);
            let nib = [nibbles(wp, b), nibbles(wp, b + 1), nibbles(wp, b + 2), nibbles(wp, b + 3)];
            let (dw, mw) = scales4(wp, b);
            for (acc, &(yp, dy, sy)) in sumf.iter_mut().zip(&rows) {
                let p01 =
                    _mm256_hadd_epi32(block_sums(nib[0], yp, b), block_sums(nib[1], yp, b + 1));
                let p23 =
                    _mm256_hadd_epi32(block_sums(nib[2], yp, b + 2), block_sums(nib[3], yp, b + 3));
                let h = _mm256_hadd_epi32(p01, p23);
                let sumi =
                    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let scaled =
                    _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), dw), _mm_loadu_ps(dy.add(b)));
                let t = _mm_add_ps(scaled, _mm_mul_ps(mw, _mm_loadu_ps(sy.add(b))));
                let mut terms = [0f32; 4];
                _mm_storeu_ps(terms.as_mut_ptr(), t);
                for v in terms {
                    *acc += v;
                }
            }
            b += 4;
        }
        while b < nb {
            let nib = nibbles(wp, b);
            let wb = wp.add(b * Q4_1_SIZE);
            let (dw, mw) = (f16_at(wb), f16_at(wb.add(2)));
            for (acc, &(yp, dy, sy)) in sumf.iter_mut().zip(&rows) {
                let p = block_sums(nib, yp, b);
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
                let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
                let sumi =
                    _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2)));
                *acc += sumi as f32 * dw * *dy.add(b) + mw * *sy.add(b);
            }
            b += 1;
        }
        sumf
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::GgmlType;
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::backend::cpu::matmul::tests::data;
    use crate::backend::cpu::matmul::OutView;
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

    #[test]
    fn every_path_equals_candle_bit_for_bit() {
        for nb in [1usize, 2, 3, 4, 6, 7, 18, 48] {
            let (k, n, m) = (nb * 32, 3, 6);
            let w = blocks_of(quantized(GgmlDType::Q4_1, n, k, 1).bytes());
            let y = activations(&data(m * k, 2), k);
            let sc = BlockQ4_1::prepare(&y, nb);
            for wr in w.chunks_exact(nb) {
                let mut got = vec![0f32; m];
                BlockQ4_1::dot_row(k, wr, &y, nb, &sc, &mut got);
                for (i, yr) in y.chunks_exact(nb).enumerate() {
                    let scalar = dot_q4_1_q8_1(wr, yr);
                    assert_eq!(got[i].to_bits(), scalar.to_bits(), "{nb} blocks, row {i}");
                    // candle's scalar kernel asserts an even block count in debug builds.
                    if nb % 2 == 0 {
                        let want = BlockQ4_1::vec_dot(k, wr, yr);
                        assert_eq!(scalar.to_bits(), want.to_bits(), "candle, {nb} blocks");
                    }
                }
            }
        }
    }

    /// Q8_1 activations carry their block sum `s` (rounded to f16) for the offset term
    /// `m · s`, so the reference is llama.cpp's formula over the stored values, in f64:
    /// `Σ_b dw·dy·Σ qw·qy + mw·sy`.
    #[test]
    fn matmul_matches_f64_block_formula() {
        for k in [96usize, 576] {
            let (m, n, nb) = (5, 21, k / 32);
            let w = quantized(GgmlDType::Q4_1, n, k, 3);
            let x = data(m * k, 4);
            let mut got = vec![0f32; m * n];
            w.matmul(&x, m, OutView::new(&mut got, m, n));
            let (wb, y) = (w.bytes(), activations(&x, k));
            let yb = as_bytes(&y);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for b in 0..nb {
                        let wq = &wb[(j * nb + b) * Q4_1_SIZE..];
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
