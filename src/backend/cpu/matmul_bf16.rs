//! bf16 weights: half the bytes of f32 per decode step. Values are stored as the upper 16 bits
//! of an f32 (rounded to nearest even at load) and widened exactly in registers
//! (`_mm256_cvtepu16_epi32` + shift by 16), so the matmul performs the f32 kernel's arithmetic
//! on the widened weights, in the same order: results equal the f32 kernel over
//! [`Bf16::to_f32`] of every weight, bit for bit, and keep its batch invariance.

use super::matmul::{matmul_widened, OutView, WeightElem};

/// One bf16 value (its bit pattern).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Rounds to nearest even (NaN stays NaN).
    pub fn from_f32(v: f32) -> Self {
        Bf16(half::bf16::from_f32(v).to_bits())
    }
}

impl WeightElem for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Rounds every value to bf16.
pub fn to_bf16(data: &[f32]) -> Vec<Bf16> {
    data.iter().map(|&v| Bf16::from_f32(v)).collect()
}

/// The f32 value of a bf16 weight.
pub fn bf16_to_f32(v: Bf16) -> f32 {
    v.to_f32()
}

/// `out = x[m, k] · w[n, k]ᵀ` with bf16 weights.
pub fn matmul_t_bf16(x: &[f32], w: &[Bf16], m: usize, k: usize, n: usize, out: OutView<'_>) {
    matmul_widened(x, w, m, k, n, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::matmul::matmul_t;
    use crate::backend::cpu::matmul::tests::{assert_batch_invariant, assert_close, data};

    fn bf16_mm(x: &[f32], w: &[Bf16], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        matmul_t_bf16(x, w, m, k, n, OutView::new(&mut out, m, n));
        out
    }

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 4.0 / 256.0);
        assert_eq!(Bf16::from_f32(-2.5).to_f32(), -2.5);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        for v in data(1000, 9) {
            let r = Bf16::from_f32(v).to_f32();
            assert!((r - v).abs() <= v.abs() / 256.0, "{v} -> {r}");
        }
    }

    #[test]
    fn equals_f32_kernel_on_widened_weights_and_f64_reference() {
        for &(m, k, n) in &[(1, 8, 1), (3, 13, 7), (5, 64, 37), (17, 100, 33), (4, 576, 70)] {
            let x = data(m * k, 1);
            let w = to_bf16(&data(n * k, 2));
            let widened: Vec<f32> = w.iter().map(|v| bf16_to_f32(*v)).collect();
            let got = bf16_mm(&x, &w, m, k, n);
            let mut want = vec![0f32; m * n];
            matmul_t(&x, &widened, m, k, n, &mut want);
            assert_eq!(got, want, "{m}x{k}x{n}");
            assert_close(&got, &x, &widened, m, k, n);
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        let (k, n) = (136, 41);
        let w = to_bf16(&data(n * k, 4));
        assert_batch_invariant(k, n, |x, m, out| {
            matmul_t_bf16(x, &w, m, k, n, OutView::new(out, m, n))
        });
    }
}
