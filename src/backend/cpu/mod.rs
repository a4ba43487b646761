//! CPU kernels (rayon) and the small vector primitives they share.
//!
//! Each primitive exists twice: `Portable` (plain Rust, any target) and `Avx2` (`std::arch`
//! intrinsics, chosen at run time with `is_x86_feature_detected!`; never `target-cpu=native`).
//! Both perform the same f32 operations in the same order: 16 lane accumulators, one fixed
//! reduction tree, tails in index order, and products summed by fused multiply-add where the
//! primitive says so (`f32::mul_add` in the portable copy, `vfmadd` in the fast one; never left
//! to the compiler, which does not contract `a * b + c` in Rust). So results are bit-identical
//! on every machine, and the portable copy is an exact oracle for the fast one.

pub mod gemm;
pub mod matmul;
pub mod matmul_bf16;
pub mod packed;
pub mod paged_attention;
pub mod quant;
pub mod quant_ggml;
pub mod quant_ggml_q4_1;
pub mod quant_ggml_q8_0;

/// Lane count of the reductions: two AVX registers of f32.
pub(crate) const LANES: usize = 16;

/// The vector primitives kernels are generic over.
pub(crate) trait Vector: Copy + Send + Sync {
    /// Dot product: lane `i % 16` accumulates `a[i] * b[i]` by fused multiply-add over whole
    /// 16-chunks, the lanes are summed by `hsum`'s tree, then the tail is fused in, in order.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `out[i] = fma(p[j], rows[j * stride + i], out[i])` for j in order, per element. `rows` must
    /// hold `(p.len() - 1) * stride + out.len()` floats (otherwise nothing is added).
    fn accumulate_rows(self, out: &mut [f32], p: &[f32], rows: &[f32], stride: usize);
    /// `out[j] = self.dot(a, row j)` for row `j` at `rows[j * stride..]`, bit for bit (a kernel
    /// may reduce several rows at once). `rows` must hold `(out.len() - 1) * stride + a.len()`
    /// floats (otherwise nothing is written).
    fn dot_rows(self, a: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        debug_assert!(rows_fit(a, out, rows, stride));
        if rows_fit(a, out, rows, stride) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = self.dot(a, &rows[j * stride..j * stride + a.len()]);
            }
        }
    }
    /// The largest element (`-inf` for none). Exact, so the order of comparisons is free; the
    /// copies agree on NaN-free input.
    fn max(self, x: &[f32]) -> f32;
    /// `x[i] = exp_approx(x[i] - shift)`; returns their sum: lane `i % 8` over whole 8-chunks,
    /// summed by `hsum8`'s tree, then the tail in order.
    fn exp_sub_sum(self, x: &mut [f32], shift: f32) -> f32;
    /// Hints that `data` will be read soon (no effect on results).
    fn prefetch(self, _data: &[f32]) {}
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

fn rows_fit(out: &[f32], p: &[f32], rows: &[f32], stride: usize) -> bool {
    p.is_empty() || rows.len() >= (p.len() - 1) * stride + out.len()
}

impl Vector for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        let mut acc = [0f32; LANES];
        let (mut a, mut b) = (a, b);
        while let (Some((x, ra)), Some((y, rb))) =
            (a.split_first_chunk::<LANES>(), b.split_first_chunk::<LANES>())
        {
            for i in 0..LANES {
                acc[i] = x[i].mul_add(y[i], acc[i]);
            }
            (a, b) = (ra, rb);
        }
        let mut sum = hsum(acc);
        for (x, y) in a.iter().zip(b) {
            sum = x.mul_add(*y, sum);
        }
        sum
    }

    #[inline(always)]
    fn accumulate_rows(self, out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
        debug_assert!(rows_fit(out, p, rows, stride));
        if !rows_fit(out, p, rows, stride) {
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            for (j, &pj) in p.iter().enumerate() {
                *o = pj.mul_add(rows[j * stride + i], *o);
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
    if let Some(v) = avx2::Avx2::detect() {
        return v.exp_shifted(x, shift, scale, out);
    }
    exp_shifted_portable(x, shift, scale, out)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The AVX2 copies: the same operations as `Portable`, eight lanes per instruction. The
    //! proof type also vouches for FMA, which every AVX2 CPU in use has.

    use std::arch::x86_64::*;

    use super::{rows_fit, Vector, EXP_HI, EXP_LO, EXP_POLY, LANES, LN2_HI, LN2_LO, LOG2E, ROUND};

    /// Proof that the CPU has AVX2 and FMA: only `detect` makes one.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2 {
        _private: (),
    }

    impl Avx2 {
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Self { _private: () })
        }

        pub(crate) fn exp_shifted(self, x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
            // SAFETY: `self` exists only where AVX2 was detected.
            unsafe { exp_shifted(x, shift, scale, out) }
        }
    }

    impl Vector for Avx2 {
        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: `self` exists only where AVX2 was detected.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn accumulate_rows(self, out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
            debug_assert!(rows_fit(out, p, rows, stride));
            if rows_fit(out, p, rows, stride) {
                // SAFETY: AVX2 detected (see `dot`); `rows_fit` bounds every read below.
                unsafe { accumulate_rows(out, p, rows, stride) }
            }
        }

        #[inline(always)]
        fn dot_rows(self, a: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
            debug_assert!(rows_fit(a, out, rows, stride));
            if rows_fit(a, out, rows, stride) {
                // SAFETY: AVX2 detected (see `dot`); `rows_fit` bounds every read below.
                unsafe { dot_rows(a, rows, stride, out) }
            }
        }

        #[inline(always)]
        fn max(self, x: &[f32]) -> f32 {
            // SAFETY: `self` exists only where AVX2 was detected.
            unsafe { max(x) }
        }

        #[inline(always)]
        fn exp_sub_sum(self, x: &mut [f32], shift: f32) -> f32 {
            // SAFETY: `self` exists only where AVX2 was detected.
            unsafe { exp_sub_sum(x, shift) }
        }

        #[inline(always)]
        fn prefetch(self, data: &[f32]) {
            const LINE: usize = 64 / std::mem::size_of::<f32>();
            for at in (0..data.len()).step_by(LINE) {
                // SAFETY: a prefetch only hints the cache; `at` lies inside `data` anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast()) };
            }
        }
    }

    /// Eight `exp_approx`, operation for operation.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(EXP_LO));
        let xc = _mm256_min_ps(_mm256_max_ps(x, set(EXP_LO)), set(EXP_HI));
        let t = _mm256_add_ps(_mm256_mul_ps(xc, set(LOG2E)), set(ROUND));
        let n = _mm256_sub_ps(t, set(ROUND));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(n, set(LN2_HI))),
            _mm256_mul_ps(n, set(LN2_LO)),
        );
        let mut p = set(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), set(1.0));
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000));
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            ni,
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n))
    }

    /// 16 lanes held as (lanes 0..8, lanes 8..16), summed by `hsum`'s tree.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum16(lo: __m256, hi: __m256) -> f32 {
        let v = _mm256_add_ps(lo, hi); // i += i+8
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // i += i+4
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x)); // i += i+2
        _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x))) // i += i+1
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + LANES <= n {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), lo);
            hi =
                _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), hi);
            i += LANES;
        }
        let mut sum = hsum16(lo, hi);
        for (x, y) in a[i..n].iter().zip(&b[i..n]) {
            sum = x.mul_add(*y, sum);
        }
        sum
    }

    /// Four `dot`s at once: the same lane sums, then `hsum16`'s tree for the four rows in
    /// shuffled registers (each addition pairs the same lanes as `hsum16`). Caller checks
    /// `rows_fit`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows(a: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let d = a.len();
        let body = d / LANES * LANES;
        let (pa, pr) = (a.as_ptr(), rows.as_ptr());
        let mut j = 0;
        while j + 4 <= out.len() {
            let r = [0, 1, 2, 3].map(|t| pr.add((j + t) * stride));
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                let (a0, a1) = (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pa.add(i + 8)));
                for t in 0..4 {
                    lo[t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(r[t].add(i)), lo[t]);
                    hi[t] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(r[t].add(i + 8)), hi[t]);
                }
                i += LANES;
            }
            let v = [0, 1, 2, 3].map(|t| _mm256_add_ps(lo[t], hi[t])); // i += i+8
                                                                       // i += i+4, two rows per register: [row0 | row1], [row2 | row3].
            let x01 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
                _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
            );
            let x23 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
                _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
            );
            // i += i+2: lanes [r0.0 r0.1 r2.0 r2.1 | r1.0 r1.1 r3.0 r3.1].
            let b = _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(x01, x23),
                _mm256_shuffle_ps::<0xEE>(x01, x23),
            );
            // i += i+1: rows 0, 2, 1, 3 in lanes 0, 2, 4, 6.
            let c = _mm256_add_ps(b, _mm256_shuffle_ps::<0xB1>(b, b));
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), c);
            for (t, lane) in [0usize, 4, 2, 6].into_iter().enumerate() {
                let mut sum = lanes[lane];
                for (x, y) in a[body..].iter().zip(&rows[(j + t) * stride + body..]) {
                    sum = x.mul_add(*y, sum);
                }
                out[j + t] = sum;
            }
            j += 4;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = dot(a, &rows[jj * stride..jj * stride + d]);
        }
    }

    /// Caller checks `rows_fit`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_rows(out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
        const REGS: usize = 8; // 64 floats of `out` stay in registers across j
        let d = out.len();
        let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
        let mut c0 = 0;
        while c0 + 8 * REGS <= d {
            let mut acc = [_mm256_setzero_ps(); REGS];
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(po.add(c0 + 8 * k));
            }
            for (j, &pj) in p.iter().enumerate() {
                let (w, row) = (_mm256_set1_ps(pj), pr.add(j * stride + c0));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(po.add(c0 + 8 * k), *a);
            }
            c0 += 8 * REGS;
        }
        while c0 + 8 <= d {
            let mut a = _mm256_loadu_ps(po.add(c0));
            for (j, &pj) in p.iter().enumerate() {
                let row = _mm256_loadu_ps(pr.add(j * stride + c0));
                a = _mm256_fmadd_ps(_mm256_set1_ps(pj), row, a);
            }
            _mm256_storeu_ps(po.add(c0), a);
            c0 += 8;
        }
        for i in c0..d {
            for (j, &pj) in p.iter().enumerate() {
                *po.add(i) = pj.mul_add(*pr.add(j * stride + i), *po.add(i));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn max(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = x.chunks_exact(8);
        for c in chunks.by_ref() {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let mut best = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        for &v in chunks.remainder() {
            best = best.max(v);
        }
        best
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(shift)));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc)); // i += i+4
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h)); // i += i+2
        let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))); // i += i+1
        for v in chunks.into_remainder() {
            *v = super::exp_approx(*v - shift);
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2")]
    unsafe fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
        let n = x.len().min(out.len());
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        let (s, k) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
        // f64 lanes 0..4, 4..8, 8..12, 12..16.
        let mut acc = [_mm256_setzero_pd(); 4];
        let mut i = 0;
        while i + LANES <= n {
            for half in 0..2 {
                let at = i + 8 * half;
                let e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(px.add(at)), s), k));
                _mm256_storeu_ps(po.add(at), e);
                let (lo, hi) = (_mm256_castps256_ps128(e), _mm256_extractf128_ps::<1>(e));
                acc[2 * half] = _mm256_add_pd(acc[2 * half], _mm256_cvtps_pd(lo));
                acc[2 * half + 1] = _mm256_add_pd(acc[2 * half + 1], _mm256_cvtps_pd(hi));
            }
            i += LANES;
        }
        let a = _mm256_add_pd(acc[0], acc[2]); // i += i+8 (lanes 0..4)
        let b = _mm256_add_pd(acc[1], acc[3]); // i += i+8 (lanes 4..8)
        let a = _mm256_add_pd(a, b); // i += i+4
        let x2 = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd::<1>(a)); // i += i+2
        let mut total = _mm_cvtsd_f64(_mm_add_sd(x2, _mm_unpackhi_pd(x2, x2))); // i += i+1
        for j in i..n {
            let e = super::exp_approx((*px.add(j) - shift) * scale);
            *po.add(j) = e;
            total += e as f64;
        }
        total
    }
}

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
            assert!((Portable.dot(&a, &b) as f64 - exact).abs() < 1e-5, "len {len}");
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
        let mut rng = StdRng::seed_from_u64(2);
        for len in [0usize, 1, 8, 15, 16, 17, 24, 64, 71, 128, 200] {
            let (a, b) = (random(&mut rng, len, 3.0), random(&mut rng, len, 3.0));
            assert_eq!(v.dot(&a, &b).to_bits(), Portable.dot(&a, &b).to_bits(), "dot {len}");

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

            let (mut oa, mut op) = (vec![0f32; len], vec![0f32; len]);
            let sa = v.exp_shifted(&x, 30.0, 0.7, &mut oa);
            let sp = exp_shifted_portable(&x, 30.0, 0.7, &mut op);
            assert!(sa.to_bits() == sp.to_bits() && same_bits(&oa, &op), "exp_shifted {len}");

            for (n, stride) in [(1, len), (5, len + 3), (16, 3 * len), (7, len)] {
                let rows = random(&mut rng, (n - 1) * stride + len, 1.0);
                let (mut da, mut dp) = (vec![0f32; n], vec![0f32; n]);
                v.dot_rows(&a, &rows, stride, &mut da);
                Portable.dot_rows(&a, &rows, stride, &mut dp);
                assert!(same_bits(&da, &dp), "dot_rows {len} x {n}");
                let one = Portable.dot(&a, &rows[(n - 1) * stride..(n - 1) * stride + len]);
                assert_eq!(one.to_bits(), da[n - 1].to_bits(), "dot_rows is dot {len} x {n}");
            }
            for (n, stride) in [(1, len), (5, len + 3), (16, 3 * len)] {
                let rows = random(&mut rng, (n - 1) * stride + len, 1.0);
                let p = random(&mut rng, n, 1.0);
                let init = random(&mut rng, len, 1.0);
                let (mut ra, mut rp) = (init.clone(), init);
                v.accumulate_rows(&mut ra, &p, &rows, stride);
                Portable.accumulate_rows(&mut rp, &p, &rows, stride);
                assert!(same_bits(&ra, &rp), "rows {len} x {n}");
            }
        }
    }
}
