//! Register-tiled kernels of the training GEMM: `C (+)= Apanel · Bpanel` for one tile, on
//! AVX-512, AVX2 or portable code. Every path walks each element's FMA chain over `k` in order,
//! so the AVX-512 tiles equal the AVX2 tile bit for bit.

use super::{MR, NR};

/// Scratch for a partial tile: `MR` rows of two panels.
pub(super) struct Edge([f32; MR * 2 * NR]);

impl Default for Edge {
    fn default() -> Self {
        Self([0.0; MR * 2 * NR])
    }
}

/// The `B` side of a column group of tiles: one panel, or two (`pair`, AVX-512 only) read with
/// the same step stride; `cols` of its columns are live.
pub(super) struct Group {
    pub b0: *const f32,
    pub b1: *const f32,
    pub ldb: usize,
    pub pair: bool,
    pub cols: usize,
    /// AVX-512 kernels are available (and allowed).
    pub wide: bool,
}

/// A row panel of `A`: packed (`MR` values a step), or read in place from row-major storage
/// (rows `rs` apart, steps adjacent; AVX-512 only). The next row panel starts `next` floats on.
#[derive(Clone, Copy)]
pub(super) struct APanel {
    pub ptr: *const f32,
    pub in_place: bool,
    pub rs: usize,
    pub next: usize,
}

impl Group {
    /// Updates the tile of this group at `dst` over `kc` steps from row panel `a` and returns
    /// how many of the `rows` left (all stored like `a`) it covered.
    ///
    /// # Safety
    /// `b0`/`b1` hold `kc` steps of `NR` floats `ldb` apart (zero past `cols`); each row panel
    /// holds `kc` steps (zero past the live rows); `dst` addresses `min(rows, MR)` rows (two
    /// panels' worth when the result says so) of `cols` floats, `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn update(
        &self,
        a: APanel,
        rows: usize,
        kc: usize,
        dst: *mut f32,
        ldc: usize,
        load: bool,
        edge: &mut Edge,
    ) -> usize {
        let (mr, span) = (MR.min(rows), if self.pair { 2 } else { 1 });
        #[cfg(target_arch = "x86_64")]
        if self.wide {
            let (b, ap) = ((self.b0, self.b1, self.ldb, self.pair), a.ptr);
            let full = mr == MR && self.cols == span * NR;
            let (out, ld) = if full { (dst, ldc) } else { (edge.0.as_mut_ptr(), 2 * NR) };
            if !full {
                // Partial tile: the padded operands' full tile on a copy, the live part back.
                copy_tile(dst, ldc, out, ld, mr, self.cols, load);
            }
            let covered = if full && rows >= 2 * MR {
                let ap2 = [ap, ap.add(a.next)];
                match a.in_place {
                    true => avx512::tile::<2, true>(ap2, a.rs, b, kc, out, ld, load),
                    false => avx512::tile::<2, false>(ap2, a.rs, b, kc, out, ld, load),
                }
                2 * MR
            } else {
                let load = load || !full;
                match a.in_place {
                    true => avx512::tile::<1, true>([ap], a.rs, b, kc, out, ld, load),
                    false => avx512::tile::<1, false>([ap], a.rs, b, kc, out, ld, load),
                }
                MR
            };
            if !full {
                copy_tile(out, ld, dst, ldc, mr, self.cols, true);
            }
            return covered;
        }
        debug_assert!(!a.in_place, "in-place A needs the AVX-512 kernels");
        let ap = std::slice::from_raw_parts(a.ptr, kc * MR);
        if mr == MR && self.cols == NR {
            kernel(ap, self.b0, self.ldb, kc, dst, ldc, load);
        } else {
            let e = edge.0.as_mut_ptr();
            copy_tile(dst, ldc, e, NR, mr, self.cols, load);
            kernel(ap, self.b0, self.ldb, kc, e, NR, true);
            copy_tile(e, NR, dst, ldc, mr, self.cols, true);
        }
        MR
    }
}

/// `rows x cols` floats from `src` (rows `lds` apart) to `dst` (`ldd` apart), or zeros
/// without `load`.
///
/// # Safety
/// Both address the `rows x cols` block at their strides.
unsafe fn copy_tile(
    src: *const f32,
    lds: usize,
    dst: *mut f32,
    ldd: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    for r in 0..rows {
        for q in 0..cols {
            *dst.add(r * ldd + q) = if load { *src.add(r * lds + q) } else { 0.0 };
        }
    }
}

/// One `MR x NR` tile: `C (+)= Apanel · Bpanel` over `kc`; step `p` of `B` is the `NR` floats
/// at `bp + p * ldb`.
///
/// # Safety
/// `dst` addresses `MR` rows of `NR` floats, `ldc` apart; the A panel holds `kc` steps and
/// `bp` `kc` steps of `NR` floats, `ldb` apart.
#[inline(always)]
unsafe fn kernel(
    ap: &[f32],
    bp: *const f32,
    ldb: usize,
    kc: usize,
    dst: *mut f32,
    ldc: usize,
    load: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::matmul::has_avx2_fma() {
        avx2::kernel(ap.as_ptr(), bp, ldb, kc, dst, ldc, load);
        return;
    }
    // Portable: the same order without fused multiply-add (so rounding differs from AVX2).
    let mut acc = [[0f32; NR]; MR];
    if load {
        for (r, row) in acc.iter_mut().enumerate() {
            for (q, v) in row.iter_mut().enumerate() {
                *v = *dst.add(r * ldc + q);
            }
        }
    }
    for p in 0..kc {
        let a = &ap[p * MR..(p + 1) * MR];
        let b = std::slice::from_raw_parts(bp.add(p * ldb), NR);
        for (r, row) in acc.iter_mut().enumerate() {
            for (q, v) in row.iter_mut().enumerate() {
                *v += a[r] * b[q];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, v) in row.iter().enumerate() {
            *dst.add(r * ldc + q) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::MR;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(
        ap: *const f32,
        bp: *const f32,
        ldb: usize,
        kc: usize,
        dst: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in c.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(dst.add(r * ldc));
                row[1] = _mm256_loadu_ps(dst.add(r * ldc + 8));
            }
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(bp.add(p * ldb));
            let b1 = _mm256_loadu_ps(bp.add(p * ldb + 8));
            for (r, row) in c.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*ap.add(p * MR + r));
                row[0] = _mm256_fmadd_ps(a, b0, row[0]);
                row[1] = _mm256_fmadd_ps(a, b1, row[1]);
            }
        }
        for (r, row) in c.iter().enumerate() {
            _mm256_storeu_ps(dst.add(r * ldc), row[0]);
            _mm256_storeu_ps(dst.add(r * ldc + 8), row[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// `kernel2` over two panels, or `kernel1` over `b0` alone (`b`: `b0`, `b1`, `ldb`, pair).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const P: usize, const IN_PLACE: bool>(
        ap: [*const f32; P],
        rs: usize,
        b: (*const f32, *const f32, usize, bool),
        kc: usize,
        dst: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let (b0, b1, ldb, pair) = b;
        if pair {
            kernel2::<P, IN_PLACE>(ap, rs, b0, b1, ldb, kc, dst, ldc, load);
        } else {
            kernel1::<P, IN_PLACE>(ap, rs, b0, ldb, kc, dst, ldc, load);
        }
    }

    /// Element `(r, p)` of a row panel: packed, or in place with rows `rs` apart.
    #[inline(always)]
    unsafe fn a_at<const IN_PLACE: bool>(a: *const f32, rs: usize, r: usize, p: usize) -> f32 {
        if IN_PLACE {
            *a.add(r * rs + p)
        } else {
            *a.add(p * MR + r)
        }
    }

    /// `P` row panels times one `B` panel: the same FMA chains as `P` calls of the AVX2
    /// kernel, one 16-wide vector a row.
    ///
    /// # Safety
    /// As `kernel2` with one panel (`NR` columns at `dst`).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel1<const P: usize, const IN_PLACE: bool>(
        ap: [*const f32; P],
        rs: usize,
        b0: *const f32,
        ldb: usize,
        kc: usize,
        dst: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let mut c = [[_mm512_setzero_ps(); MR]; P];
        if load {
            for (q, panel) in c.iter_mut().enumerate() {
                for (r, row) in panel.iter_mut().enumerate() {
                    *row = _mm512_loadu_ps(dst.add((q * MR + r) * ldc));
                }
            }
        }
        for p in 0..kc {
            _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add((p + 8) * ldb) as *const i8);
            let w0 = _mm512_loadu_ps(b0.add(p * ldb));
            for (panel, a) in c.iter_mut().zip(ap) {
                for (r, row) in panel.iter_mut().enumerate() {
                    *row = _mm512_fmadd_ps(_mm512_set1_ps(a_at::<IN_PLACE>(a, rs, r, p)), w0, *row);
                }
            }
        }
        for (q, panel) in c.iter().enumerate() {
            for (r, row) in panel.iter().enumerate() {
                _mm512_storeu_ps(dst.add((q * MR + r) * ldc), *row);
            }
        }
    }

    /// `P` row panels (`P * MR` rows at `dst`, panel `q`'s values at `ap[q]`, read
    /// packed or, with `IN_PLACE`, from rows `rs` apart) times two `B`
    /// panels with the same step stride (`2 * NR` columns): the same FMA chains as `2 * P`
    /// calls of the AVX2 kernel. Two row panels (24 accumulators, 14 loads per 24 FMAs) keep
    /// the load ports further from the bound than one (8 per 12).
    ///
    /// # Safety
    /// AVX-512F is available; as `super::kernel` for each panel pair, `dst` spanning `P * MR`
    /// rows and `2 * NR` columns.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel2<const P: usize, const IN_PLACE: bool>(
        ap: [*const f32; P],
        rs: usize,
        b0: *const f32,
        b1: *const f32,
        ldb: usize,
        kc: usize,
        dst: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let mut c = [[[_mm512_setzero_ps(); 2]; MR]; P];
        if load {
            for (q, panel) in c.iter_mut().enumerate() {
                for (r, row) in panel.iter_mut().enumerate() {
                    let at = dst.add((q * MR + r) * ldc);
                    row[0] = _mm512_loadu_ps(at);
                    row[1] = _mm512_loadu_ps(at.add(NR));
                }
            }
        }
        for p in 0..kc {
            _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add((p + 8) * ldb) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(b1.wrapping_add((p + 8) * ldb) as *const i8);
            let w0 = _mm512_loadu_ps(b0.add(p * ldb));
            let w1 = _mm512_loadu_ps(b1.add(p * ldb));
            for (panel, a) in c.iter_mut().zip(ap) {
                for (r, row) in panel.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(a_at::<IN_PLACE>(a, rs, r, p));
                    row[0] = _mm512_fmadd_ps(a, w0, row[0]);
                    row[1] = _mm512_fmadd_ps(a, w1, row[1]);
                }
            }
        }
        for (q, panel) in c.iter().enumerate() {
            for (r, row) in panel.iter().enumerate() {
                let at = dst.add((q * MR + r) * ldc);
                _mm512_storeu_ps(at, row[0]);
                _mm512_storeu_ps(at.add(NR), row[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::data;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_kernels_equal_avx2_kernels_bit_for_bit() {
        let avx2 = crate::backend::cpu::matmul::has_avx2_fma();
        if !(avx2 && std::arch::is_x86_feature_detected!("avx512f")) {
            return; // nothing to compare on this CPU
        }
        let (kc, ldb, ldc) = (37, 2 * NR + 5, 2 * NR + 3);
        let (ap, bd, c0) = (data(2 * kc * MR, 6), data(kc * ldb, 7), data(MR * ldc, 8));
        let c2 = data(2 * MR * ldc, 9);
        for load in [false, true] {
            let (mut wide, mut two) = (c0.clone(), c0.clone());
            let (mut wide4, mut four) = (c2.clone(), c2.clone());
            // SAFETY: the features were detected; every buffer covers the tiles it is given.
            unsafe {
                let (b0, b1) = (bd.as_ptr(), bd.as_ptr().add(NR));
                avx512::kernel2::<1, false>(
                    [ap.as_ptr()],
                    0,
                    b0,
                    b1,
                    ldb,
                    kc,
                    wide.as_mut_ptr(),
                    ldc,
                    load,
                );
                avx2::kernel(ap.as_ptr(), b0, ldb, kc, two.as_mut_ptr(), ldc, load);
                avx2::kernel(ap.as_ptr(), b1, ldb, kc, two.as_mut_ptr().add(NR), ldc, load);
                // Two row panels at once equal the two one-panel tiles.
                let ap2 = [ap.as_ptr(), ap.as_ptr().add(kc * MR)];
                avx512::kernel2::<2, false>(ap2, 0, b0, b1, ldb, kc, wide4.as_mut_ptr(), ldc, load);
                for (q, a) in ap2.into_iter().enumerate() {
                    let dst = four.as_mut_ptr().add(q * MR * ldc);
                    avx512::kernel2::<1, false>([a], 0, b0, b1, ldb, kc, dst, ldc, load);
                }
            }
            assert_eq!(wide, two, "load {load}");
            assert_ne!(wide, c0);
            assert_eq!(wide4, four, "two row panels, load {load}");
            assert_ne!(wide4, c2);
            // One 16-wide panel over two row panels equals the AVX2 tile of each.
            let (mut one, mut halves) = (c2.clone(), c2.clone());
            // SAFETY: as above, on the first `NR` columns of each row.
            unsafe {
                let (b0, ap2) = (bd.as_ptr(), [ap.as_ptr(), ap.as_ptr().add(kc * MR)]);
                avx512::kernel1::<2, false>(ap2, 0, b0, ldb, kc, one.as_mut_ptr(), ldc, load);
                for (q, a) in ap2.into_iter().enumerate() {
                    avx2::kernel(a, b0, ldb, kc, halves.as_mut_ptr().add(q * MR * ldc), ldc, load);
                }
            }
            assert_eq!(one, halves, "one panel, load {load}");
            assert_ne!(one, c2);
        }
    }
}
