//! CPU kernels (rayon) and the small vector helpers they share.
//!
//! The helpers are written as fixed 16-lane loops that LLVM autovectorises. Kernels inline them
//! into one plain copy and one `#[target_feature(enable = "avx2")]` copy chosen at run time (no
//! `target-cpu=native`). No fused multiply-add is used on purpose: without FP contraction both
//! copies perform exactly the same operations in the same order, so results are bit-identical on
//! every x86-64 machine, not only batch-invariant on one.

pub mod matmul;
pub mod matmul_bf16;
pub mod paged_attention;
pub mod quant;
pub mod quant_ggml;
pub mod quant_ggml_q4_1;
pub mod quant_ggml_q8_0;

/// Lane count of the vector helpers: two AVX registers or four SSE registers of f32.
pub(crate) const LANES: usize = 16;

/// Whether the AVX2 copies of the kernels can run here (detected once, then cached by std).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sums 16 lanes in a fixed tree order (the same on every path).
#[inline(always)]
fn hsum(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Dot product with a fixed reduction order: 16 lane sums, a tree, then the tail in order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = hsum(acc);
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `y *= a`, element-wise.
#[inline(always)]
pub(crate) fn scale_in_place(y: &mut [f32], a: f32) {
    for v in y {
        *v *= a;
    }
}

/// e^x to about 2 ulp (Cephes `expf` polynomial), branch-free so that loops over it vectorise.
/// Inputs below -87.3 give exactly 0 (so a -inf logit has weight 0); inputs are capped at 88.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2 split in two for an exact first reduction step
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let underflow = x < -87.3;
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the integer that the rounding trick left in t's low mantissa bits.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let pow2n = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if underflow {
        0.0
    } else {
        y * pow2n
    }
}

#[inline(always)]
fn exp_shifted_generic(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    debug_assert_eq!(x.len(), out.len());
    let mut total = 0f64;
    let (cx, mut co) = (x.chunks_exact(LANES), out.chunks_exact_mut(LANES));
    let rx = cx.remainder();
    for (xs, os) in cx.zip(co.by_ref()) {
        let mut acc = [0f64; LANES];
        for i in 0..LANES {
            let e = exp_approx((xs[i] - shift) * scale);
            os[i] = e;
            acc[i] = e as f64;
        }
        total += acc.iter().sum::<f64>();
    }
    for (xs, os) in rx.iter().zip(co.into_remainder()) {
        let e = exp_approx((xs - shift) * scale);
        *os = e;
        total += e as f64;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    exp_shifted_generic(x, shift, scale, out)
}

/// Writes `out[i] = exp((x[i] - shift) * scale)` and returns their sum (accumulated in f64).
/// Used for softmax weights: with `shift` the maximum, every value lies in [0, 1].
pub(crate) fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { exp_shifted_avx2(x, shift, scale, out) };
    }
    exp_shifted_generic(x, shift, scale, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate_and_saturates() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let rel = ((exp_approx(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn dot_matches_f64_and_handles_tails() {
        for len in [0usize, 1, 7, 16, 33, 64, 100] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..len).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4, "len {len}");
        }
    }

    #[test]
    fn exp_shifted_paths_agree_bit_for_bit() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let sa = exp_shifted(&x, 20.0, 0.5, &mut a);
        let sb = exp_shifted_generic(&x, 20.0, 0.5, &mut b);
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let exact: f64 = x.iter().map(|v| ((*v as f64 - 20.0) * 0.5).exp()).sum();
        assert!(((sa - exact) / exact).abs() < 1e-6);
    }
}
