//! The AVX2 copies: the same operations as `Portable`, eight lanes per instruction. The
//! proof type also vouches for FMA and F16C, which every AVX2 CPU in use has.

use std::arch::x86_64::*;

use super::{
    rows_fit, KvElement, Vector, EXP_HI, EXP_LO, EXP_POLY, LANES, LN2_HI, LN2_LO, LOG2E, ROUND,
};

/// Proof that the CPU has AVX2, FMA and F16C: only `detect` makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    _private: (),
}

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Self { _private: () })
    }

    pub(crate) fn exp_shifted(self, x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
        // SAFETY: `self` exists only where AVX2 was detected.
        unsafe { exp_shifted(x, shift, scale, out) }
    }
}

impl Vector for Avx2 {
    #[inline(always)]
    fn accumulate_rows<E: KvElement>(self, out: &mut [f32], p: &[f32], rows: &[E], stride: usize) {
        debug_assert!(rows_fit(out, p, rows, stride));
        if rows_fit(out, p, rows, stride) {
            // SAFETY: AVX2 detected (see `dot`); `rows_fit` bounds every read below.
            unsafe { accumulate_rows(out, p, rows, stride) }
        }
    }

    #[inline(always)]
    fn dot_rows<E: KvElement>(self, a: &[f32], rows: &[E], stride: usize, out: &mut [f32]) {
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
    fn prefetch<E>(self, data: &[E]) {
        prefetch_lines(data);
    }
}

/// Asks for every 64-byte line of `data` (SSE, so any x86-64 CPU has it).
#[inline(always)]
pub(super) fn prefetch_lines<E>(data: &[E]) {
    let line = (64 / std::mem::size_of::<E>().max(1)).max(1);
    for at in (0..data.len()).step_by(line) {
        // SAFETY: a prefetch only hints the cache; `at` lies inside `data` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast()) };
    }
}

/// Eight `exp_approx`, operation for operation.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
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
    let pow2n =
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127))));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n))
}

/// 16 lanes held as (lanes 0..8, lanes 8..16), summed by `hsum`'s tree.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum16(lo: __m256, hi: __m256) -> f32 {
    hsum16_folded(_mm256_add_ps(lo, hi)) // i += i+8
}

/// The rest of `hsum16`'s tree once lanes 8..16 were added to lanes 0..8.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hsum16_folded(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // i += i+4
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x)); // i += i+2
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x))) // i += i+1
}

/// Eight elements widened to f32 (exactly: f16 to f32 loses nothing).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8<E: KvElement>(p: *const E) -> __m256 {
    if E::IS_F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    } else {
        _mm256_loadu_ps(p.cast())
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + LANES <= n {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8(pb.add(i)), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), load8(pb.add(i + 8)), hi);
        i += LANES;
    }
    let mut sum = hsum16(lo, hi);
    for (x, y) in a[i..n].iter().zip(&b[i..n]) {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

/// Four `dot`s at once: the same lane sums, then `hsum16_folded4`. Caller checks `rows_fit`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<E: KvElement>(a: &[f32], rows: &[E], stride: usize, out: &mut [f32]) {
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
                lo[t] = _mm256_fmadd_ps(a0, load8(r[t].add(i)), lo[t]);
                hi[t] = _mm256_fmadd_ps(a1, load8(r[t].add(i + 8)), hi[t]);
            }
            i += LANES;
        }
        let sums = hsum16_folded4([0, 1, 2, 3].map(|t| _mm256_add_ps(lo[t], hi[t]))); // i += i+8
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

/// `hsum16_folded` of four registers at once, in shuffled registers (each addition pairs the
/// same lanes as `hsum16_folded`).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hsum16_folded4(v: [__m256; 4]) -> [f32; 4] {
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
    let b = _mm256_add_ps(_mm256_shuffle_ps::<0x44>(x01, x23), _mm256_shuffle_ps::<0xEE>(x01, x23));
    // i += i+1: rows 0, 2, 1, 3 in lanes 0, 2, 4, 6.
    let c = _mm256_add_ps(b, _mm256_shuffle_ps::<0xB1>(b, b));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), c);
    [lanes[0], lanes[4], lanes[2], lanes[6]]
}

/// Caller checks `rows_fit`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_rows<E: KvElement>(out: &mut [f32], p: &[f32], rows: &[E], stride: usize) {
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
                *a = _mm256_fmadd_ps(w, load8(row.add(8 * k)), *a);
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
            let row = load8(pr.add(j * stride + c0));
            a = _mm256_fmadd_ps(_mm256_set1_ps(pj), row, a);
        }
        _mm256_storeu_ps(po.add(c0), a);
        c0 += 8;
    }
    for i in c0..d {
        for (j, &pj) in p.iter().enumerate() {
            *po.add(i) = pj.mul_add((*pr.add(j * stride + i)).to_f32(), *po.add(i));
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
