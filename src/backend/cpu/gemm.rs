//! General f32 GEMM for training: `C = β·C + α·op(A)·op(B)` over strided views, so transposed
//! operands (`dYᵀ·u`, `gᵀ·x`, `dY·W` with `W` in its Linear layout) need no transposed copies.
//!
//! Blocked as usual for CPUs: `A` is packed into `MR`-row panels, `KC`-deep slices of `B` into
//! `NR`-column panels (unless `B` is row-major, whose panels are read in place), and a
//! register-tiled outer-product kernel updates `MR x NR` tiles of `C`.
//! Every element of `C` is one FMA chain walked over `k` in order, and parallel tasks split
//! only `m` and `n`, so results never depend on the thread count or the task split.
//! (The inference kernels in `matmul.rs` keep their own batch-invariant dot-product order.)

use rayon::prelude::*;

/// Rows of a register tile: 6 x 2 accumulators + 2 `B` vectors + 1 broadcast fit 16 AVX regs.
const MR: usize = 6;
/// Columns of a register tile (two AVX vectors).
const NR: usize = 16;
/// Depth of one packed slice: an `A` panel (6 KiB) and a `B` panel (16 KiB) stay in L1.
const KC: usize = 256;
/// Rows of `C` per parallel task (a multiple of `MR`): large, so `B` is packed about once.
const MC: usize = 288;
/// Columns of `C` per parallel task (a multiple of `NR`).
const NC: usize = 96;
/// Tasks worth splitting a product into when its columns alone give fewer.
const MIN_TASKS: usize = 8;

/// A read-only `[rows, cols]` matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// Columns `c0..c0 + cols` of a row-major matrix whose rows are `ld` apart.
    pub fn columns(data: &'a [f32], rows: usize, ld: usize, c0: usize, cols: usize) -> Self {
        Self { data: &data[c0.min(data.len())..], rows, cols, rs: ld, cs: 1 }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `c[i * ldc + j] (+)= alpha · Σ_p a(i, p) · b(p, j)` for `i < a.rows`, `j < b.cols`; with
/// `accumulate` false, `c` is overwritten. Runs on the current rayon pool.
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, c: &mut [f32], ldc: usize) {
    run(alpha, a, b, accumulate, c, ldc, true);
}

/// As [`gemm`], on the calling thread only (for use inside parallel tasks).
pub fn gemm_serial(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    c: &mut [f32],
    ldc: usize,
) {
    run(alpha, a, b, accumulate, c, ldc, false);
}

/// `C` shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own `[i0..i1) x [j0..j1)` tile of `C`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn run(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && a.fits() && b.fits() && n <= ldc && (m == 0 || c.len() >= (m - 1) * ldc + n),
        "gemm shapes"
    ); // ok: caller bug
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // All of `A` is packed once, up front, and shared by the tasks.
    let mut pa = vec![0f32; m.div_ceil(MR) * MR * k];
    let pack = |(ip, panel): (usize, &mut [f32])| pack_a_panel(&a, alpha, ip * MR, m, panel);
    if parallel && m > MR {
        pa.par_chunks_exact_mut(MR * k).enumerate().for_each(pack);
    } else {
        pa.chunks_exact_mut(MR * k).enumerate().for_each(pack);
    }
    let out = OutPtr(c.as_mut_ptr());
    // Narrow products (LoRA ranks) get their parallelism from rows instead. The split never
    // changes a result: each element's sum runs over `k` in order within one task.
    let tn = n.div_ceil(NC);
    let mc = if parallel && tn < MIN_TASKS {
        m.div_ceil(MIN_TASKS.div_ceil(tn)).next_multiple_of(MR).clamp(4 * MR, MC)
    } else {
        MC
    };
    let tm = m.div_ceil(mc);
    let task = |t: usize| {
        let (i0, j0) = ((t / tn) * mc, (t % tn) * NC);
        let (i1, j1) = ((i0 + mc).min(m), (j0 + NC).min(n));
        // SAFETY: tiles of distinct tasks are disjoint and lie inside `c` (checked above).
        unsafe { tile_task(&pa, &b, accumulate, out, ldc, i0..i1, j0..j1, k) };
    };
    if parallel && tm * tn > 1 {
        (0..tm * tn).into_par_iter().for_each(task);
    } else {
        (0..tm * tn).for_each(task);
    }
}

/// One task: its tile of `C` over every `KC` slice of `k`, in order. `pa` is all of `A`
/// packed (`MR`-row panels of `k` steps).
///
/// # Safety
/// The tile lies inside `out` (rows `ldc` apart) and no other thread writes it.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_task(
    pa: &[f32],
    b: &MatRef<'_>,
    accumulate: bool,
    out: OutPtr,
    ldc: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k: usize,
) {
    let (mc, nc) = (rows.len(), cols.len());
    let np = nc.div_ceil(NR);
    // Row-major `B` (e.g. `W` in `dY·W`) already holds each panel's NR values of a step
    // contiguously: full panels are read in place (their KC x NR slice stays in L1 across the
    // row tiles just as a packed copy would) and only a partial last panel is packed.
    let direct = b.cs == 1;
    let packed_from = if direct { nc / NR * NR } else { 0 };
    let mut pb = vec![0f32; (nc - packed_from).div_ceil(NR) * NR * KC.min(k)];
    let mut edge = [0f32; MR * NR];
    #[cfg(target_arch = "x86_64")]
    let wide = super::matmul::has_avx512f();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        if packed_from < nc {
            pack_b(b, cols.start + packed_from, nc - packed_from, p0, kc, &mut pb);
        }
        let load = accumulate || p0 > 0;
        let panel = |jp: usize| {
            let j = jp * NR;
            if j < packed_from {
                // In bounds: rows p0..p0+kc < k and columns up to cols.start+j+NR <= n.
                (b.data[p0 * b.rs + cols.start + j..].as_ptr(), b.rs)
            } else {
                (pb[(j - packed_from) * kc..].as_ptr(), NR)
            }
        };
        let mut jp = 0;
        while jp < np {
            // With AVX-512, two full panels of the same kind at once (12 FMA chains).
            let pair = wide
                && (jp + 2) * NR <= nc
                && ((jp + 2) * NR <= packed_from || jp * NR >= packed_from);
            let span = if pair { 2 } else { 1 };
            let mut i = 0;
            while i < mc {
                let mr = MR.min(mc - i);
                // Row panel `i / MR` starts `MR * k` floats after the one before.
                let ap = &pa[(rows.start + i) * k + p0 * MR..];
                if pair && mr == MR {
                    let ((b0, ldb), (b1, _)) = (panel(jp), panel(jp + 1));
                    let dst = out.0.add((rows.start + i) * ldc + cols.start + jp * NR);
                    let a = ap.as_ptr();
                    #[cfg(target_arch = "x86_64")]
                    if mc - i >= 2 * MR {
                        let ap2 = [a, a.add(MR * k)];
                        avx512::kernel2::<2>(ap2, b0, b1, ldb, kc, dst, ldc, load);
                        i += 2 * MR;
                        continue;
                    } else {
                        avx512::kernel2::<1>([a], b0, b1, ldb, kc, dst, ldc, load);
                    }
                    i += MR;
                    continue;
                }
                for jq in jp..jp + span {
                    let (j, nr) = (jq * NR, NR.min(nc - jq * NR));
                    let (bp, ldb) = panel(jq);
                    let dst = out.0.add((rows.start + i) * ldc + cols.start + j);
                    edge_or_full(ap, bp, ldb, kc, dst, ldc, load, mr, nr, &mut edge);
                }
                i += MR;
            }
            jp += span;
        }
        p0 += kc;
    }
}

/// One tile of `mr x nr` (at most `MR x NR`): the kernel in place when full, else on a padded
/// copy whose live part is written back.
///
/// # Safety
/// As [`kernel`], for the `mr x nr` part of `dst`.
#[allow(clippy::too_many_arguments)]
unsafe fn edge_or_full(
    ap: &[f32],
    bp: *const f32,
    ldb: usize,
    kc: usize,
    dst: *mut f32,
    ldc: usize,
    load: bool,
    mr: usize,
    nr: usize,
    edge: &mut [f32; MR * NR],
) {
    if mr == MR && nr == NR {
        kernel(ap, bp, ldb, kc, dst, ldc, load);
    } else {
        // Partial tile: run the full kernel on a padded copy, write back the part.
        for r in 0..mr {
            for q in 0..nr {
                edge[r * NR + q] = if load { *dst.add(r * ldc + q) } else { 0.0 };
            }
        }
        kernel(ap, bp, ldb, kc, edge.as_mut_ptr(), NR, true);
        for r in 0..mr {
            for q in 0..nr {
                *dst.add(r * ldc + q) = edge[r * NR + q];
            }
        }
    }
}

/// Rows `i0..i0 + MR` of `alpha · A` (zero past `m`) as one panel: `k` steps of `MR` values.
fn pack_a_panel(a: &MatRef<'_>, alpha: f32, i0: usize, m: usize, panel: &mut [f32]) {
    let k = a.cols;
    let live = MR.min(m - i0);
    if a.rs == 1 && live == MR {
        // Transposed storage: the panel's values for one step are contiguous.
        for (p, o) in panel.chunks_exact_mut(MR).enumerate() {
            let s = &a.data[p * a.cs + i0..p * a.cs + i0 + MR];
            o.iter_mut().zip(s).for_each(|(o, v)| *o = alpha * v);
        }
        return;
    }
    for r in 0..MR {
        if r < live {
            if a.cs == 1 {
                let row = &a.data[(i0 + r) * a.rs..(i0 + r) * a.rs + k];
                for (p, v) in row.iter().enumerate() {
                    panel[p * MR + r] = alpha * v;
                }
            } else {
                for p in 0..k {
                    panel[p * MR + r] = alpha * a.at(i0 + r, p);
                }
            }
        } else {
            for p in 0..k {
                panel[p * MR + r] = 0.0;
            }
        }
    }
}

/// `B[p0.., j0..]` as `NR`-column panels, each `kc` rows of `NR` values (zero-padded).
fn pack_b(b: &MatRef<'_>, j0: usize, nc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    for jp in 0..nc.div_ceil(NR) {
        let panel = &mut out[jp * NR * kc..(jp + 1) * NR * kc];
        let (c0, w) = (j0 + jp * NR, NR.min(nc - jp * NR));
        if b.cs == 1 && w == NR {
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                let s = (p0 + p) * b.rs + c0;
                let src: &[f32; NR] = b.data[s..s + NR].try_into().expect("NR floats"); // ok: sliced to NR
                let dst: &mut [f32; NR] = row.try_into().expect("NR floats"); // ok: chunk of NR
                *dst = *src;
            }
        } else if b.rs == 1 {
            // Transposed storage: walk each column contiguously.
            panel.fill(0.0);
            for q in 0..w {
                let col = &b.data[(c0 + q) * b.cs + p0..(c0 + q) * b.cs + p0 + kc];
                for (p, v) in col.iter().enumerate() {
                    panel[p * NR + q] = *v;
                }
            }
        } else {
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (q, v) in row.iter_mut().enumerate() {
                    *v = if q < w { b.at(p0 + p, c0 + q) } else { 0.0 };
                }
            }
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
    if super::matmul::has_avx2_fma() {
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

    /// `P` row panels (`P * MR` rows at `dst`, panel `q`'s values at `ap[q]`) times two `B`
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
    pub(super) unsafe fn kernel2<const P: usize>(
        ap: [*const f32; P],
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
            let w0 = _mm512_loadu_ps(b0.add(p * ldb));
            let w1 = _mm512_loadu_ps(b1.add(p * ldb));
            for (panel, a) in c.iter_mut().zip(ap) {
                for (r, row) in panel.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*a.add(p * MR + r));
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

    fn reference(
        alpha: f32,
        a: &MatRef<'_>,
        b: &MatRef<'_>,
        c0: &[f32],
        acc: bool,
        ldc: usize,
    ) -> Vec<f64> {
        let mut out: Vec<f64> = c0.iter().map(|&v| if acc { v as f64 } else { 0.0 }).collect();
        for i in 0..a.rows {
            for j in 0..b.cols {
                let s: f64 = (0..a.cols).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
                out[i * ldc + j] += alpha as f64 * s;
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_for_every_layout() {
        for &(m, k, n) in
            &[(1, 1, 1), (5, 3, 7), (13, 300, 17), (100, 70, 130), (7, 513, 33), (6, 0, 16)]
        {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let ad = data(m * k, 1);
                let bd = data(k * n, 2);
                let a = if ta { MatRef::new(&ad, k, m).t() } else { MatRef::new(&ad, m, k) };
                let b = if tb { MatRef::new(&bd, n, k).t() } else { MatRef::new(&bd, k, n) };
                for acc in [false, true] {
                    let ldc = n + 3;
                    let c0 = data(m * ldc, 3);
                    let mut c = c0.clone();
                    gemm(0.5, a, b, acc, &mut c, ldc);
                    let want = reference(0.5, &a, &b, &c0, acc, ldc);
                    for i in 0..m {
                        for j in 0..ldc {
                            let (g, w) = (c[i * ldc + j] as f64, want[i * ldc + j]);
                            let w = if j < n { w } else { c0[i * ldc + j] as f64 };
                            assert!(
                                (g - w).abs() <= 1e-4 * (1.0 + k as f64),
                                "{m}x{k}x{n} {ta} {tb} {acc} ({i},{j}): {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let (m, k, n) = (200, 600, 300);
        let (ad, bd) = (data(m * k, 4), data(k * n, 5));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            let pool = pool.expect("thread pool"); // ok: test setup
            let mut c = vec![0f32; m * n];
            pool.install(|| {
                gemm(1.0, MatRef::new(&ad, m, k), MatRef::new(&bd, k, n), false, &mut c, n)
            });
            c
        };
        let one = run(1);
        assert_eq!(one, run(3));
        let mut serial = vec![0f32; m * n];
        gemm_serial(1.0, MatRef::new(&ad, m, k), MatRef::new(&bd, k, n), false, &mut serial, n);
        assert_eq!(one, serial);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_pair_kernel_equals_two_avx2_kernels_bit_for_bit() {
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
                avx512::kernel2::<1>([ap.as_ptr()], b0, b1, ldb, kc, wide.as_mut_ptr(), ldc, load);
                avx2::kernel(ap.as_ptr(), b0, ldb, kc, two.as_mut_ptr(), ldc, load);
                avx2::kernel(ap.as_ptr(), b1, ldb, kc, two.as_mut_ptr().add(NR), ldc, load);
                // Two row panels at once equal the two one-panel tiles.
                let ap2 = [ap.as_ptr(), ap.as_ptr().add(kc * MR)];
                avx512::kernel2::<2>(ap2, b0, b1, ldb, kc, wide4.as_mut_ptr(), ldc, load);
                for (q, a) in ap2.into_iter().enumerate() {
                    let dst = four.as_mut_ptr().add(q * MR * ldc);
                    avx512::kernel2::<1>([a], b0, b1, ldb, kc, dst, ldc, load);
                }
            }
            assert_eq!(wide, two, "load {load}");
            assert_ne!(wide, c0);
            assert_eq!(wide4, four, "two row panels, load {load}");
            assert_ne!(wide4, c2);
        }
    }
}
