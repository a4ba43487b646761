//! GGUF Q8_0 weights (the default model's embedding and tied head) times Q8_0 activations.
//!
//! candle's AVX2 `vec_dot_q8_0_q8_0` accumulates `fma(dw * dy, Σ wq·yq, acc)` over blocks in
//! eight lanes and sums them at the end. This kernel performs the same operations in the same
//! order (so it returns candle's AVX2 result bit for bit) while loading and sign-folding each
//! weight block once for up to four activation rows, and converting the f16 scales with F16C
//! instead of a call per block. Without AVX2, FMA and F16C candle's own `vec_dot` runs.

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use half::f16;

use super::quant_ggml::Kernel;

// ggml's Q8_0 block: d (f16) then 32 i8 (`repr(C)` in candle).
const Q8_0_SIZE: usize = 34;
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == Q8_0_SIZE);

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: the block types are plain data; this views their bytes read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl Kernel for BlockQ8_0 {
    /// The activation blocks' scales as f32.
    type Prepared = Vec<f32>;

    fn prepare(xq: &[BlockQ8_0], _bpr: usize) -> Vec<f32> {
        as_bytes(xq)
            .chunks_exact(Q8_0_SIZE)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    }

    fn dot_row(
        k: usize,
        w: &[Self],
        xq: &[BlockQ8_0],
        bpr: usize,
        prepared: &Vec<f32>,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_simd() {
            // SAFETY: AVX2, FMA and F16C are available; `xq` and the scales hold `out.len()`
            // rows of `bpr` blocks.
            unsafe { avx2::dot_row(w, xq, bpr, prepared, out) };
            return;
        }
        let _ = prepared;
        for (o, y) in out.iter_mut().zip(xq.chunks_exact(bpr)) {
            *o = Self::vec_dot(k, w, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_simd() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_0, Q8_0_SIZE};

    /// Activation rows sharing one load of a weight block.
    const ROWS: usize = 4;
    /// Bytes ahead of the current weight block to prefetch (see `matmul.rs`).
    const PREFETCH: usize = 1024;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row(
        w: &[BlockQ8_0],
        xq: &[BlockQ8_0],
        bpr: usize,
        dy: &[f32],
        out: &mut [f32],
    ) {
        let m = out.len();
        assert!(w.len() == bpr && xq.len() >= m * bpr && dy.len() >= m * bpr); // ok: caller bug
        let wp = w.as_ptr() as *const u8;
        let row = |i: usize| {
            ((xq.as_ptr() as *const u8).add(i * bpr * Q8_0_SIZE), dy.as_ptr().add(i * bpr))
        };
        let mut i = 0;
        while i + ROWS <= m {
            let sums = dot_rows::<ROWS>(wp, bpr, [row(i), row(i + 1), row(i + 2), row(i + 3)]);
            out[i..i + ROWS].copy_from_slice(&sums);
            i += ROWS;
        }
        while i < m {
            out[i] = dot_rows::<1>(wp, bpr, [row(i)])[0];
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// candle's `hsum_float_8`, same order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// One weight row (`nb` blocks at `wp`) against `R` activation rows given as (blocks, d).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows<const R: usize>(
        wp: *const u8,
        nb: usize,
        rows: [(*const u8, *const f32); R],
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            let wb = wp.add(b * Q8_0_SIZE);
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH) as *const i8);
            let dw = f16_at(wb);
            let bx = _mm256_loadu_si256(wb.add(2) as *const __m256i);
            let ax = _mm256_sign_epi8(bx, bx);
            for (a, &(yp, dy)) in acc.iter_mut().zip(&rows) {
                let by = _mm256_loadu_si256(yp.add(b * Q8_0_SIZE + 2) as *const __m256i);
                let dot = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(by, bx));
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
                *a = _mm256_fmadd_ps(_mm256_set1_ps(dw * *dy.add(b)), q, *a);
            }
        }
        let mut out = [0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::backend::cpu::matmul::tests::data;
    use crate::backend::cpu::quant_ggml::tests::quantized;

    #[test]
    fn equals_candle_vec_dot_bit_for_bit() {
        for nb in [1usize, 2, 5, 18] {
            let (k, n, m) = (nb * 32, 3, 6);
            let bytes = quantized(GgmlDType::Q8_0, n, k, 1).file_bytes().to_vec();
            let mut w = vec![BlockQ8_0::zeros(); n * nb];
            // SAFETY: test copy of plain blocks of the same total size.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    w.as_mut_ptr() as *mut u8,
                    bytes.len(),
                )
            };
            let x = data(m * k, 2);
            let mut y = vec![BlockQ8_0::zeros(); m * nb];
            for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(nb)) {
                BlockQ8_0::from_float(xr, yr);
            }
            let dy = BlockQ8_0::prepare(&y, nb);
            for wr in w.chunks_exact(nb) {
                let mut got = vec![0f32; m];
                BlockQ8_0::dot_row(k, wr, &y, nb, &dy, &mut got);
                for (i, yr) in y.chunks_exact(nb).enumerate() {
                    let want = BlockQ8_0::vec_dot(k, wr, yr);
                    assert_eq!(got[i].to_bits(), want.to_bits(), "{nb} blocks, row {i}");
                }
            }
        }
    }
}
