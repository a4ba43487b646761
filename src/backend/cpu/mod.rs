//! CPU kernels (rayon) and the small vector primitives they share.
//!
//! Each primitive exists three times: `Portable` (plain Rust, any target), `Avx2` and `Avx512`
//! (`std::arch` intrinsics, chosen at run time with `is_x86_feature_detected!`; never
//! `target-cpu=native`).
//! Both perform the same f32 operations in the same order: 16 lane accumulators, one fixed
//! reduction tree, tails in index order, and products summed by fused multiply-add where the
//! primitive says so (`f32::mul_add` in the portable copy, `vfmadd` in the fast one; never left
//! to the compiler, which does not contract `a * b + c` in Rust). So results are bit-identical
//! on every machine, and the portable copy is an exact oracle for the fast one.

pub mod activation;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod frozen;
pub mod gemm;
pub mod matmul;
pub mod matmul_bf16;
pub mod ops;
pub mod packed;
pub mod paged_attention;
pub mod quant;
pub mod quant_ggml;
pub mod quant_ggml_q4_1;
mod quant_ggml_q4_1_layout;
pub mod quant_ggml_q8_0;
pub(crate) mod scratch;

/// Lane count of the reductions: two AVX registers of f32.
pub(crate) const LANES: usize = 16;

/// What K/V cache rows are stored as. Attention widens each element to f32, exactly, and
/// computes in f32 whatever the storage, so a 16-bit cache halves the bytes attention reads and
/// changes only the rounding of what was stored.
pub trait KvElement: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// IEEE half precision (the AVX2 copies widen it with F16C); otherwise f32.
    const IS_F16: bool;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl KvElement for f32 {
    const IS_F16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl KvElement for half::f16 {
    const IS_F16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// The vector primitives kernels are generic over. Primitives that read cache rows take them
/// in any `KvElement`; the result is that of the same rows widened to f32, bit for bit.
pub(crate) trait Vector: Copy + Send + Sync {
    /// `out[i] = fma(p[j], rows[j * stride + i], out[i])` for j in order, per element. `rows` must
    /// hold `(p.len() - 1) * stride + out.len()` elements (otherwise nothing is added).
    fn accumulate_rows<E: KvElement>(self, out: &mut [f32], p: &[f32], rows: &[E], stride: usize);
    /// `out[j]` = the dot product of `a` and row `j` at `rows[j * stride..]`: lane `i % 16`
    /// accumulates `a[i] * row[i]` by fused multiply-add over whole 16-chunks, the lanes are
    /// summed by `hsum`'s tree, then the tail is fused in, in order (a kernel may reduce several
    /// rows at once, with the same result). `rows` must hold `(out.len() - 1) * stride + a.len()`
    /// elements (otherwise nothing is written).
    fn dot_rows<E: KvElement>(self, a: &[f32], rows: &[E], stride: usize, out: &mut [f32]);
    /// The largest element (`-inf` for none). Exact, so the order of comparisons is free; the
    /// copies agree on NaN-free input.
    fn max(self, x: &[f32]) -> f32;
    /// `x[i] = exp_approx(x[i] - shift)`; returns their sum: lane `i % 8` over whole 8-chunks,
    /// summed by `hsum8`'s tree, then the tail in order.
    fn exp_sub_sum(self, x: &mut [f32], shift: f32) -> f32;
    /// Hints that `data` will be read soon (no effect on results).
    fn prefetch<E>(self, _data: &[E]) {}
}

/// Plain Rust; the reference for every other implementation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

/// Sums 16 lanes in a fixed tree order: i += i+8, i += i+4, i += i+2, i += i+1.
#[inline(always)]
fn hsum<T: Copy + std::ops::AddAssign>(mut acc: [T; LANES]) -> T {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            let hi = acc[i + width];
            acc[i] += hi;
        }
        width /= 2;
    }
    acc[0]
}

/// Sums 8 lanes in a fixed tree order: i += i+4, i += i+2, i += i+1.
#[inline(always)]
fn hsum8(acc: [f32; 8]) -> f32 {
    let a: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

fn rows_fit<E>(out: &[f32], p: &[f32], rows: &[E], stride: usize) -> bool {
    p.is_empty() || rows.len() >= (p.len() - 1) * stride + out.len()
}

/// One dot product of `dot_rows`, `b` widened element by element.
#[inline(always)]
fn dot_elems<E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (mut a, mut b) = (a, b);
    while let (Some((x, ra)), Some((y, rb))) =
        (a.split_first_chunk::<LANES>(), b.split_first_chunk::<LANES>())
    {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i].to_f32(), acc[i]);
        }
        (a, b) = (ra, rb);
    }
    let mut sum = hsum(acc);
    for (x, y) in a.iter().zip(b) {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

impl Vector for Portable {
    #[inline(always)]
    fn accumulate_rows<E: KvElement>(self, out: &mut [f32], p: &[f32], rows: &[E], stride: usize) {
        debug_assert!(rows_fit(out, p, rows, stride));
        if !rows_fit(out, p, rows, stride) {
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            for (j, &pj) in p.iter().enumerate() {
                *o = pj.mul_add(rows[j * stride + i].to_f32(), *o);
            }
        }
    }

    #[inline(always)]
    fn dot_rows<E: KvElement>(self, a: &[f32], rows: &[E], stride: usize, out: &mut [f32]) {
        debug_assert!(rows_fit(a, out, rows, stride));
        if rows_fit(a, out, rows, stride) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot_elems(a, &rows[j * stride..j * stride + a.len()]);
            }
        }
    }

    #[inline(always)]
    fn max(self, x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    #[inline(always)]
    fn exp_sub_sum(self, x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp_approx(*v - shift);
                *a += *v;
            }
        }
        let mut sum = hsum8(acc);
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            sum += *v;
        }
        sum
    }
}

/// `y *= a`, element-wise (no reduction: LLVM vectorises it in either copy).
#[inline(always)]
pub(crate) fn scale_in_place(y: &mut [f32], a: f32) {
    for v in y {
        *v *= a;
    }
}

const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // ln 2 split in two for an exact first reduction step
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
const EXP_POLY: [f32; 6] =
    [1.987_569_2e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// e^x to about 2 ulp (Cephes `expf` polynomial), branch-free. Inputs below -87.3 give exactly
/// 0 (so a -inf logit has weight 0); inputs are capped at 88.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let underflow = x < EXP_LO;
    // Not `clamp`: `max` then `min` map NaN to EXP_LO exactly as vmaxps/vminps do.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(EXP_LO).min(EXP_HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
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

fn exp_shifted_portable(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    debug_assert_eq!(x.len(), out.len());
    let mut acc = [0f64; LANES];
    let (xs, mut outs) = (x.chunks_exact(LANES), out.chunks_exact_mut(LANES));
    let x_tail = xs.remainder();
    for (xc, oc) in xs.zip(outs.by_ref()) {
        for i in 0..LANES {
            let e = exp_approx((xc[i] - shift) * scale);
            oc[i] = e;
            acc[i] += e as f64;
        }
    }
    let mut total = hsum(acc);
    for (xs, os) in x_tail.iter().zip(outs.into_remainder()) {
        let e = exp_approx((xs - shift) * scale);
        *os = e;
        total += e as f64;
    }
    total
}

/// Writes `out[i] = exp_approx((x[i] - shift) * scale)` and returns their sum, accumulated in
/// f64 (16 lanes, `hsum`'s tree, then the tail). For softmax weights with `shift` the maximum.
pub(crate) fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = avx512::Avx512::detect() {
        return v.exp_shifted(x, shift, scale, out);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = avx2::Avx2::detect() {
        return v.exp_shifted(x, shift, scale, out);
    }
    exp_shifted_portable(x, shift, scale, out)
}

/// The largest element of `x` (`-inf` for none; exact, see [`Vector::max`]).
pub(crate) fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = avx512::Avx512::detect() {
        return v.max(x);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = avx2::Avx2::detect() {
        return v.max(x);
    }
    Portable.max(x)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// One dot product through `dot_rows`.
    fn dot<V: Vector, E: KvElement>(v: V, a: &[f32], b: &[E]) -> f32 {
        let mut out = [0f32];
        v.dot_rows(a, b, a.len(), &mut out);
        out[0]
    }

    fn to_f16(x: &[f32]) -> Vec<half::f16> {
        x.iter().map(|&v| half::f16::from_f32(v)).collect()
    }

    fn widen(x: &[half::f16]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    #[test]
    fn exp_approx_is_accurate_and_saturates() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_approx(x) as f64 - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn portable_dot_and_rows_match_f64() {
        let mut rng = StdRng::seed_from_u64(1);
        for len in [0usize, 1, 7, 16, 33, 64, 100] {
            let (a, b) = (random(&mut rng, len, 2.0), random(&mut rng, len, 2.0));
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(Portable, &a, &b) as f64 - exact).abs() < 1e-5, "len {len}");
        }
        let (d, stride, n) = (5, 7, 3);
        let rows = random(&mut rng, (n - 1) * stride + d, 1.0);
        let p = random(&mut rng, n, 1.0);
        let mut x = random(&mut rng, 21, 5.0);
        let exact_max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert_eq!(Portable.max(&x), exact_max);
        let expected: Vec<f64> = x.iter().map(|v| ((*v - exact_max) as f64).exp()).collect();
        let sum = Portable.exp_sub_sum(&mut x, exact_max);
        assert!((sum as f64 - expected.iter().sum::<f64>()).abs() < 1e-5);
        assert!(x.iter().zip(&expected).all(|(a, b)| (*a as f64 - b).abs() < 1e-6));
        let mut out = vec![1.0f32; d];
        Portable.accumulate_rows(&mut out, &p, &rows, stride);
        for (i, o) in out.iter().enumerate() {
            let exact: f64 =
                1.0 + (0..n).map(|j| p[j] as f64 * rows[j * stride + i] as f64).sum::<f64>();
            assert!((*o as f64 - exact).abs() < 1e-6);
        }
    }

    #[test]
    fn exp_shifted_sums_what_it_writes() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut out = vec![0f32; x.len()];
        let total = exp_shifted(&x, 20.0, 0.5, &mut out);
        let exact: f64 = x.iter().map(|v| ((*v as f64 - 20.0) * 0.5).exp()).sum();
        assert!(((total - exact) / exact).abs() < 1e-6);
        let written: f64 = out.iter().map(|v| *v as f64).sum();
        assert!(((total - written) / exact).abs() < 1e-12);
    }

    /// The AVX2 copies must equal the portable ones bit for bit (skipped without AVX2).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_primitives_equal_portable_bit_for_bit() {
        let Some(v) = avx2::Avx2::detect() else { return };
        assert_equals_portable(v);
        let mut rng = StdRng::seed_from_u64(3);
        for len in [0usize, 1, 8, 15, 16, 17, 24, 64, 71, 128, 200] {
            let x = random(&mut rng, len, 40.0);
            let (mut oa, mut op) = (vec![0f32; len], vec![0f32; len]);
            let sa = v.exp_shifted(&x, 30.0, 0.7, &mut oa);
            let sp = exp_shifted_portable(&x, 30.0, 0.7, &mut op);
            assert!(sa.to_bits() == sp.to_bits() && same_bits(&oa, &op), "exp_shifted {len}");
        }
    }

    /// The AVX-512 copies too (skipped without AVX-512F).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_primitives_equal_portable_bit_for_bit() {
        let Some(v) = avx512::Avx512::detect() else { return };
        assert_equals_portable(v);
        let mut rng = StdRng::seed_from_u64(4);
        for len in [0usize, 1, 8, 15, 16, 17, 24, 64, 71, 128, 200, 49_157] {
            let x = random(&mut rng, len, 40.0);
            let (mut oa, mut op) = (vec![0f32; len], vec![0f32; len]);
            let sa = v.exp_shifted(&x, 30.0, 0.7, &mut oa);
            let sp = exp_shifted_portable(&x, 30.0, 0.7, &mut op);
            assert!(sa.to_bits() == sp.to_bits() && same_bits(&oa, &op), "exp_shifted {len}");
        }
    }

    fn assert_equals_portable<V: Vector>(v: V) {
        let mut rng = StdRng::seed_from_u64(2);
        for len in [0usize, 1, 8, 15, 16, 17, 24, 40, 64, 71, 128, 200] {
            let (a, b) = (random(&mut rng, len, 3.0), random(&mut rng, len, 3.0));
            assert_eq!(dot(v, &a, &b).to_bits(), dot(Portable, &a, &b).to_bits(), "dot {len}");

            let mut x = random(&mut rng, len, 40.0);
            if len > 3 {
                x[0] = f32::NEG_INFINITY;
                x[1] = -200.0;
                x[2] = 0.0;
            }
            assert_eq!(v.max(&x).to_bits(), Portable.max(&x).to_bits(), "max {len}");
            let (mut xa, mut xp) = (x.clone(), x.clone());
            let sa = v.exp_sub_sum(&mut xa, 1.5);
            let sp = Portable.exp_sub_sum(&mut xp, 1.5);
            assert!(same_bits(&xa, &xp) && sa.to_bits() == sp.to_bits(), "exp_sub_sum {len}");

            for (n, stride) in [(1, len), (5, len + 3), (16, 3 * len), (7, len)] {
                let rows = random(&mut rng, (n - 1) * stride + len, 1.0);
                let (mut da, mut dp) = (vec![0f32; n], vec![0f32; n]);
                v.dot_rows(&a, &rows, stride, &mut da);
                Portable.dot_rows(&a, &rows, stride, &mut dp);
                assert!(same_bits(&da, &dp), "dot_rows {len} x {n}");
                let one = dot(Portable, &a, &rows[(n - 1) * stride..(n - 1) * stride + len]);
                assert_eq!(one.to_bits(), da[n - 1].to_bits(), "dot_rows is dot {len} x {n}");
                // f16 rows give what the same rows widened to f32 give, in both copies.
                let (rows16, mut d16, mut dp16) = (to_f16(&rows), vec![0f32; n], vec![0f32; n]);
                v.dot_rows(&a, &rows16, stride, &mut d16);
                Portable.dot_rows(&a, &rows16, stride, &mut dp16);
                Portable.dot_rows(&a, &widen(&rows16), stride, &mut dp);
                assert!(same_bits(&d16, &dp) && same_bits(&dp16, &dp), "f16 dot_rows {len} x {n}");
            }
            for (n, stride) in [(1, len), (5, len + 3), (16, 3 * len)] {
                let rows = random(&mut rng, (n - 1) * stride + len, 1.0);
                let p = random(&mut rng, n, 1.0);
                let init = random(&mut rng, len, 1.0);
                let (mut ra, mut rp) = (init.clone(), init.clone());
                v.accumulate_rows(&mut ra, &p, &rows, stride);
                Portable.accumulate_rows(&mut rp, &p, &rows, stride);
                assert!(same_bits(&ra, &rp), "rows {len} x {n}");
                let rows16 = to_f16(&rows);
                let (mut r16, mut rp16, mut rw) = (init.clone(), init.clone(), init);
                v.accumulate_rows(&mut r16, &p, &rows16, stride);
                Portable.accumulate_rows(&mut rp16, &p, &rows16, stride);
                Portable.accumulate_rows(&mut rw, &p, &widen(&rows16), stride);
                assert!(same_bits(&r16, &rw) && same_bits(&rp16, &rw), "f16 rows {len} x {n}");
            }
        }
    }
}
