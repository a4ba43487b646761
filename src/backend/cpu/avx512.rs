//! The AVX-512 copies: one 16-wide register where `Avx2` holds lanes 0..8 and 8..16 in two, so
//! every lane runs the same chain and the reductions finish with the AVX2 trees: the same bits
//! as `Avx2` and `Portable`.

use std::arch::x86_64::*;

use super::avx2::{exp8, hsum16_folded, hsum16_folded4, prefetch_lines};
use super::{
    rows_fit, KvElement, Vector, EXP_HI, EXP_LO, EXP_POLY, LANES, LN2_HI, LN2_LO, LOG2E, ROUND,
};

/// Proof that the CPU has AVX-512F (and so AVX2, FMA and F16C) and that
/// `COSERVE_CPU_ISA` does not ask for AVX2: only `detect` makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    _private: (),
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Self> {
        (super::matmul::has_avx512f() && is_x86_feature_detected!("f16c"))
            .then_some(Self { _private: () })
    }

    pub(crate) fn exp_shifted(self, x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
        // SAFETY: `self` exists only where AVX-512F (and so AVX2) was detected.
        unsafe { exp_shifted(x, shift, scale, out) }
    }
}

impl Vector for Avx512 {
    #[inline(always)]
    fn accumulate_rows<E: KvElement>(self, out: &mut [f32], p: &[f32], rows: &[E], stride: usize) {
        debug_assert!(rows_fit(out, p, rows, stride));
        if rows_fit(out, p, rows, stride) {
            // SAFETY: AVX-512F detected (see `detect`); `rows_fit` bounds every read below.
            unsafe { accumulate_rows(out, p, rows, stride) }
        }
    }

    #[inline(always)]
    fn dot_rows<E: KvElement>(self, a: &[f32], rows: &[E], stride: usize, out: &mut [f32]) {
        debug_assert!(rows_fit(a, out, rows, stride));
        if rows_fit(a, out, rows, stride) {
            // SAFETY: AVX-512F detected (see `detect`); `rows_fit` bounds every read below.
            unsafe { dot_rows(a, rows, stride, out) }
        }
    }

    #[inline(always)]
    fn max(self, x: &[f32]) -> f32 {
        // SAFETY: `self` exists only where AVX-512F was detected.
        unsafe { max(x) }
    }

    #[inline(always)]
    fn exp_sub_sum(self, x: &mut [f32], shift: f32) -> f32 {
        // SAFETY: `self` exists only where AVX-512F was detected.
        unsafe { exp_sub_sum(x, shift) }
    }

    #[inline(always)]
    fn prefetch<E>(self, data: &[E]) {
        prefetch_lines(data);
    }
}

/// Sixteen `exp_approx`, operation for operation (as `exp8`).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp16(x: __m512) -> __m512 {
    let set = _mm512_set1_ps;
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(EXP_LO));
    let xc = _mm512_min_ps(_mm512_max_ps(x, set(EXP_LO)), set(EXP_HI));
    let t = _mm512_add_ps(_mm512_mul_ps(xc, set(LOG2E)), set(ROUND));
    let n = _mm512_sub_ps(t, set(ROUND));
    let r = _mm512_sub_ps(
        _mm512_sub_ps(xc, _mm512_mul_ps(n, set(LN2_HI))),
        _mm512_mul_ps(n, set(LN2_LO)),
    );
    let mut p = set(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
    }
    let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), set(1.0));
    let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000));
    let pow2n =
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
    _mm512_maskz_mov_ps(!underflow, _mm512_mul_ps(y, pow2n))
}

/// Lanes 0..8 and 8..16 of a register.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn halves(v: __m512) -> (__m256, __m256) {
    (_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))))
}

/// Lane `i` added to lane `i + 8`: the first step of `hsum16`'s tree.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fold(v: __m512) -> __m256 {
    let (lo, hi) = halves(v);
    _mm256_add_ps(lo, hi)
}

/// Sixteen elements widened to f32 (exactly).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<E: KvElement>(p: *const E) -> __m512 {
    if E::IS_F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    } else {
        _mm512_loadu_ps(p.cast())
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dot<E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + LANES <= n {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), load16(pb.add(i)), acc);
        i += LANES;
    }
    let mut sum = hsum16_folded(fold(acc));
    for (x, y) in a[i..n].iter().zip(&b[i..n]) {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

/// Four `dot`s at once, reduced together by `hsum16_folded4`. Caller checks `rows_fit`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dot_rows<E: KvElement>(a: &[f32], rows: &[E], stride: usize, out: &mut [f32]) {
    let d = a.len();
    let body = d / LANES * LANES;
    let (pa, pr) = (a.as_ptr(), rows.as_ptr());
    let mut j = 0;
    while j + 4 <= out.len() {
        let r = [0, 1, 2, 3].map(|t| pr.add((j + t) * stride));
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < body {
            let x = _mm512_loadu_ps(pa.add(i));
            for t in 0..4 {
                acc[t] = _mm512_fmadd_ps(x, load16(r[t].add(i)), acc[t]);
            }
            i += LANES;
        }
        let sums = hsum16_folded4(acc.map(|v| fold(v)));
        for (t, mut sum) in sums.into_iter().enumerate() {
            for (x, y) in a[body..].iter().zip(&rows[(j + t) * stride + body..]) {
                sum = x.mul_add(y.to_f32(), sum);
            }
            out[j + t] = sum;
        }
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = dot(a, &rows[jj * stride..jj * stride + d]);
    }
}

/// Caller checks `rows_fit`. Element-wise chains, so any blocking gives the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn accumulate_rows<E: KvElement>(out: &mut [f32], p: &[f32], rows: &[E], stride: usize) {
    const REGS: usize = 4; // 64 floats of `out` stay in registers across j
    let d = out.len();
    let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
    let mut c0 = 0;
    while c0 + LANES * REGS <= d {
        let mut acc = [_mm512_setzero_ps(); REGS];
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(po.add(c0 + LANES * k));
        }
        for (j, &pj) in p.iter().enumerate() {
            let (w, row) = (_mm512_set1_ps(pj), pr.add(j * stride + c0));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, load16(row.add(LANES * k)), *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(po.add(c0 + LANES * k), *a);
        }
        c0 += LANES * REGS;
    }
    while c0 + LANES <= d {
        let mut a = _mm512_loadu_ps(po.add(c0));
        for (j, &pj) in p.iter().enumerate() {
            a = _mm512_fmadd_ps(_mm512_set1_ps(pj), load16(pr.add(j * stride + c0)), a);
        }
        _mm512_storeu_ps(po.add(c0), a);
        c0 += LANES;
    }
    for i in c0..d {
        for (j, &pj) in p.iter().enumerate() {
            *po.add(i) = pj.mul_add((*pr.add(j * stride + i)).to_f32(), *po.add(i));
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn max(x: &[f32]) -> f32 {
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut chunks = x.chunks_exact(LANES);
    for c in chunks.by_ref() {
        m = _mm512_max_ps(m, _mm512_loadu_ps(c.as_ptr()));
    }
    let mut best = _mm512_reduce_max_ps(m);
    for &v in chunks.remainder() {
        best = best.max(v);
    }
    best
}

/// As `avx2::exp_shifted`: f64 lanes 0..8 and 8..16 hold what its four registers hold in
/// 0..4, 4..8, 8..12 and 12..16, and the reduction adds them in its order.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    let n = x.len().min(out.len());
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let (s, k) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut acc = [_mm512_setzero_pd(); 2];
    let mut i = 0;
    while i + LANES <= n {
        let e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(px.add(i)), s), k));
        _mm512_storeu_ps(po.add(i), e);
        let (lo, hi) = halves(e);
        acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(lo));
        acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(hi));
        i += LANES;
    }
    let ab = _mm512_add_pd(acc[0], acc[1]); // i += i+8
    let a = _mm256_add_pd(_mm512_castpd512_pd256(ab), _mm512_extractf64x4_pd::<1>(ab)); // i += i+4
    let x2 = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd::<1>(a)); // i += i+2
    let mut total = _mm_cvtsd_f64(_mm_add_sd(x2, _mm_unpackhi_pd(x2, x2))); // i += i+1
    if i < n {
        // The tail in one masked register (lane by lane the same values), added in order.
        let mask = ((1u32 << (n - i)) - 1) as __mmask16;
        let e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, px.add(i)), s), k));
        _mm512_mask_storeu_ps(po.add(i), mask, e);
        let mut lanes = [0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), e);
        for v in &lanes[..n - i] {
            total += *v as f64;
        }
    }
    total
}

/// Lane `i % 8` sums, as `Avx2::exp_sub_sum`: each 16-chunk adds its lanes 0..8, then 8..16.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in chunks.by_ref() {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), _mm512_set1_ps(shift)));
        _mm512_storeu_ps(c.as_mut_ptr(), e);
        let (lo, hi) = halves(e);
        acc = _mm256_add_ps(_mm256_add_ps(acc, lo), hi);
    }
    let rest = chunks.into_remainder();
    let mut tail = rest.chunks_exact_mut(8);
    for c in tail.by_ref() {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc)); // i += i+4
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h)); // i += i+2
    let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))); // i += i+1
    for v in tail.into_remainder() {
        *v = super::exp_approx(*v - shift);
        sum += *v;
    }
    sum
}
