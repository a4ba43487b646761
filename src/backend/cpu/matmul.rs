//! `y = x · Wᵀ` for row-major activations `x [m, k]` and weights `W [n, k]` (PyTorch Linear
//! layout), written for LLM serving on a CPU:
//! - each weight row is streamed once for all rows of `x` (decode is bound by reading weights);
//! - the result for one row of `x` is bit-identical whatever `m` is (batch invariance): every
//!   output element is one dot product accumulated in the same order by every code path.
//!
//! This file holds the f32 kernel plus what the other weight formats share with it: the output
//! view, the split of weight rows into parallel tasks, and a register-tiled dot-product kernel
//! generic over how weights are widened to f32 (used as is by bf16).

use std::marker::PhantomData;

use rayon::prelude::*;

/// Weight rows per parallel work item: enough to amortise scheduling, small enough to balance,
/// and a multiple of the kernels' tile widths.
pub(crate) const ROWS_PER_TASK: usize = 24;

/// Activation rows per register tile: 4 x 3 accumulators and 3 weight vectors fit the 16 AVX
/// registers, and 12 independent FMA chains hide the FMA latency.
const TILE_M: usize = 4;
/// Weight rows per register tile.
const TILE_N: usize = 3;

/// Columns `col0..col0 + n` of an `[m, ld]` row-major output, written by parallel tasks.
#[derive(Clone, Copy)]
pub struct OutView<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    ld: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks write disjoint elements (see `write`), so sharing the pointer is sound.
unsafe impl Send for OutView<'_> {}
unsafe impl Sync for OutView<'_> {}

impl<'a> OutView<'a> {
    /// The whole `[m, n]` output.
    pub fn new(out: &'a mut [f32], m: usize, n: usize) -> Self {
        Self::columns(out, m, n, 0, n)
    }

    /// Columns `col0..col0 + n` of `out` seen as `[m, ld]` (fused projections write parts).
    pub fn columns(out: &'a mut [f32], m: usize, ld: usize, col0: usize, n: usize) -> Self {
        assert!(col0 + n <= ld && out.len() >= m * ld, "output view out of bounds"); // ok: caller bug
        Self { ptr: out.as_mut_ptr().wrapping_add(col0), m, n, ld, _out: PhantomData }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// Stores element `(i, j)`.
    ///
    /// # Safety
    /// `i < rows()`, `j < cols()`, and no other task writes `(i, j)` concurrently.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, j: usize, v: f32) {
        debug_assert!(i < self.m && j < self.n);
        *self.ptr.add(i * self.ld + j) = v;
    }

    /// Where element `(i, j)` lives; row `i + 1` starts [`Self::ld`] floats after row `i`.
    ///
    /// # Safety
    /// `i < rows()` and `j <= cols()`; writes through it follow `write`'s rules.
    #[inline(always)]
    pub(crate) unsafe fn ptr_at(&self, i: usize, j: usize) -> *mut f32 {
        debug_assert!(i < self.m && j <= self.n);
        self.ptr.add(i * self.ld + j)
    }

    /// Distance between rows, in floats.
    pub(crate) fn ld(&self) -> usize {
        self.ld
    }

    /// Stores `vals` at `(i, j..j + vals.len())`.
    ///
    /// # Safety
    /// `i < rows()`, `j + vals.len() <= cols()`, and no other task writes them concurrently.
    #[inline(always)]
    pub(crate) unsafe fn write_row(&self, i: usize, j: usize, vals: &[f32]) {
        debug_assert!(i < self.m && j + vals.len() <= self.n);
        std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(i * self.ld + j), vals.len());
    }
}

/// Runs `task(j0, j1)` over weight rows `0..n` split into fixed chunks on the current rayon
/// pool. Every output element is computed wholly inside one task, so neither the split nor the
/// thread count changes any value.
pub(crate) fn par_row_tasks<F: Fn(usize, usize) + Sync + Send>(n: usize, task: F) {
    let tasks = n.div_ceil(ROWS_PER_TASK);
    if tasks <= 1 {
        if n > 0 {
            task(0, n);
        }
        return;
    }
    (0..tasks).into_par_iter().for_each(|t| {
        let j0 = t * ROWS_PER_TASK;
        task(j0, (j0 + ROWS_PER_TASK).min(n));
    });
}

/// A weight element the tiled kernel widens exactly to f32 (f32 itself, bf16 bits).
pub(crate) trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Eight consecutive elements as f32.
    ///
    /// # Safety
    /// AVX2 is available and `p..p + 8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    matmul_t_into(x, w, m, k, n, OutView::new(out, m, n));
}

/// As [`matmul_t`], writing into a view.
pub fn matmul_t_into(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: OutView<'_>) {
    matmul_widened(x, w, m, k, n, out);
}

/// `x · wᵀ` for any exactly-widened weight storage: the tiled kernel on AVX2+FMA, otherwise the
/// portable loop.
pub(crate) fn matmul_widened<W: WeightElem>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    out: OutView<'_>,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.rows() == m && out.cols() == n,
        "matmul shapes"
    ); // ok: caller bug
    if m == 0 {
        return;
    }
    par_row_tasks(n, |j0, j1| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are available; slices were checked above.
            unsafe { avx2::task(x, w, m, k, j0, j1, &out) };
            return;
        }
        portable_task(x, w, m, k, j0, j1, &out);
    });
}

/// Dot product of two equally long slices with the crate's fixed accumulation order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let mut acc = [[0f32; 1]; 1];
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA are available; both slices hold `k` elements.
        unsafe { avx2::tile::<f32, 1, 1>(a.as_ptr(), k, b.as_ptr(), k, &mut acc) };
        return acc[0][0];
    }
    portable_tile::<f32, 1, 1>(a, k, b, k, &mut acc);
    acc[0][0]
}

/// AVX-512F, unless `COSERVE_CPU_ISA=avx2` asks for the AVX2 kernels (to compare the two on one
/// machine; both compute the same bits).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && has_avx2_fma()
            && std::env::var("COSERVE_CPU_ISA").map_or(true, |isa| isa != "avx2")
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Weight rows `j0..j1` against every row of `x`, tile by tile (same loop on every path).
fn portable_task<W: WeightElem>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    j0: usize,
    j1: usize,
    out: &OutView<'_>,
) {
    let mut j = j0;
    while j + TILE_N <= j1 {
        let wt = &w[j * k..(j + TILE_N) * k];
        let mut i = 0;
        while i + TILE_M <= m {
            let mut acc = [[0f32; TILE_N]; TILE_M];
            portable_tile::<W, TILE_M, TILE_N>(&x[i * k..], k, wt, k, &mut acc);
            store(out, i, j, &acc);
            i += TILE_M;
        }
        while i < m {
            let mut acc = [[0f32; TILE_N]; 1];
            portable_tile::<W, 1, TILE_N>(&x[i * k..], k, wt, k, &mut acc);
            store(out, i, j, &acc);
            i += 1;
        }
        j += TILE_N;
    }
    while j < j1 {
        for i in 0..m {
            let mut acc = [[0f32; 1]; 1];
            portable_tile::<W, 1, 1>(&x[i * k..], k, &w[j * k..(j + 1) * k], k, &mut acc);
            store(out, i, j, &acc);
        }
        j += 1;
    }
}

#[inline(always)]
fn store<const R: usize, const C: usize>(
    out: &OutView<'_>,
    i: usize,
    j: usize,
    acc: &[[f32; C]; R],
) {
    for (r, row) in acc.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            // SAFETY: rows i..i+R < m and columns j..j+C lie in this task's own range.
            unsafe { out.write(i + r, j + c, *v) };
        }
    }
}

/// Eight lanes accumulated separately, then summed pairwise: the same order as the AVX2 path
/// (which fuses multiply and add, so the two paths differ in rounding but each is deterministic).
/// `x` holds `R` rows `ldx` apart, `w` holds `C` rows `k` apart.
fn portable_tile<W: WeightElem, const R: usize, const C: usize>(
    x: &[f32],
    ldx: usize,
    w: &[W],
    k: usize,
    out: &mut [[f32; C]; R],
) {
    let body = k / 8 * 8;
    for (r, orow) in out.iter_mut().enumerate() {
        let xr = &x[r * ldx..r * ldx + k];
        for (c, o) in orow.iter_mut().enumerate() {
            let wr = &w[c * k..(c + 1) * k];
            let mut lanes = [0f32; 8];
            for cc in (0..body).step_by(8) {
                for l in 0..8 {
                    lanes[l] += xr[cc + l] * wr[cc + l].to_f32();
                }
            }
            let mut s = hsum8(&lanes);
            for cc in body..k {
                s += xr[cc] * wr[cc].to_f32();
            }
            *o = s;
        }
    }
}

#[inline(always)]
pub(crate) fn hsum8(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{OutView, WeightElem, TILE_M, TILE_N};

    /// Bytes ahead of the current weight position to prefetch: with two or three weight rows
    /// streaming per thread, the hardware prefetchers alone leave a single thread well short
    /// of the memory bandwidth.
    const PREFETCH: usize = 1024;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task<W: WeightElem>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        j0: usize,
        j1: usize,
        out: &OutView<'_>,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut j = j0;
        while j + TILE_N <= j1 {
            let wt = wp.add(j * k);
            let mut i = 0;
            while i + TILE_M <= m {
                let mut acc = [[0f32; TILE_N]; TILE_M];
                tile::<W, TILE_M, TILE_N>(xp.add(i * k), k, wt, k, &mut acc);
                super::store(out, i, j, &acc);
                i += TILE_M;
            }
            while i < m {
                let mut acc = [[0f32; TILE_N]; 1];
                tile::<W, 1, TILE_N>(xp.add(i * k), k, wt, k, &mut acc);
                super::store(out, i, j, &acc);
                i += 1;
            }
            j += TILE_N;
        }
        while j < j1 {
            for i in 0..m {
                let mut acc = [[0f32; 1]; 1];
                tile::<W, 1, 1>(xp.add(i * k), k, wp.add(j * k), k, &mut acc);
                super::store(out, i, j, &acc);
            }
            j += 1;
        }
    }

    /// `R x C` dot products of `R` activation rows (`ldx` apart) with `C` weight rows (`k`
    /// apart). Each output has its own 8-lane accumulator walked over `k` in order, so the
    /// tile size never changes a result.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<W: WeightElem, const R: usize, const C: usize>(
        x: *const f32,
        ldx: usize,
        w: *const W,
        k: usize,
        out: &mut [[f32; C]; R],
    ) {
        let body = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut c = 0;
        while c < body {
            let mut wv = [_mm256_setzero_ps(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                let p = w.add(j * k + c);
                _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
                *v = W::load8(p);
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(r * ldx + c));
                for (a, wj) in accr.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *wj, *a);
                }
            }
            c += 8;
        }
        for r in 0..R {
            for j in 0..C {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
                let mut s = super::hsum8(&lanes);
                for cc in body..k {
                    s = (*x.add(r * ldx + cc)).mul_add((*w.add(j * k + cc)).to_f32(), s);
                }
                out[r][j] = s;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `x · wᵀ` in f64.
    pub(crate) fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
            }
        }
        out
    }

    /// Pseudo-random values in [-1, 1).
    pub(crate) fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Asserts `got` equals the f64 reference to `tol` relative to the sum of |products|.
    pub(crate) fn assert_close(got: &[f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
        let r = reference(x, w, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let mag: f64 =
                    (0..k).map(|c| (x[i * k + c] as f64 * w[j * k + c] as f64).abs()).sum();
                let (a, b) = (got[i * n + j] as f64, r[i * n + j]);
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + mag),
                    "{a} vs {b} at ({i}, {j}) {m}x{k}x{n}"
                );
            }
        }
    }

    /// Row `i` of an `m`-row product equals the product of row `i` alone, bit for bit.
    pub(crate) fn assert_batch_invariant(
        k: usize,
        n: usize,
        mm: impl Fn(&[f32], usize, &mut [f32]),
    ) {
        let m = 11;
        let x = data(m * k, 3);
        let mut all = vec![0f32; m * n];
        mm(&x, m, &mut all);
        for split in [1usize, 2, 4, 5] {
            let mut i = 0;
            while i < m {
                let rows = split.min(m - i);
                let mut part = vec![0f32; rows * n];
                mm(&x[i * k..(i + rows) * k], rows, &mut part);
                for (a, b) in all[i * n..(i + rows) * n].iter().zip(&part) {
                    assert_eq!(a.to_bits(), b.to_bits(), "rows {i}.. in batches of {split}");
                }
                i += rows;
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for &(m, k, n) in &[(1, 8, 1), (3, 13, 7), (5, 64, 37), (17, 100, 33), (2, 576, 70)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0f32; m * n];
            matmul_t(&x, &w, m, k, n, &mut out);
            assert_close(&out, &x, &w, m, k, n);
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        let (k, n) = (99, 45);
        let w = data(n * k, 4);
        assert_batch_invariant(k, n, |x, m, out| matmul_t(x, &w, m, k, n, out));
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let (m, k, n) = (7, 70, 90);
        let (x, w) = (data(m * k, 5), data(n * k, 6));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            let pool = pool.expect("thread pool"); // ok: test setup
            let mut out = vec![0f32; m * n];
            pool.install(|| matmul_t(&x, &w, m, k, n, &mut out));
            out
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn column_views_write_only_their_columns() {
        let (m, k) = (3, 16);
        let x = data(m * k, 7);
        let (w1, w2) = (data(5 * k, 8), data(6 * k, 9));
        let mut fused = vec![f32::NAN; m * 11];
        matmul_t_into(&x, &w1, m, k, 5, OutView::columns(&mut fused, m, 11, 0, 5));
        matmul_t_into(&x, &w2, m, k, 6, OutView::columns(&mut fused, m, 11, 5, 6));
        let mut whole = vec![0f32; m * 11];
        matmul_t(&x, &[w1, w2].concat(), m, k, 11, &mut whole);
        assert_eq!(fused, whole);
    }

    #[test]
    fn portable_path_matches_reference_and_simd_path_closely() {
        let (m, k, n) = (7, 99, 13);
        let (x, w) = (data(m * k, 10), data(n * k, 11));
        let mut portable = vec![0f32; m * n];
        portable_task(&x, &w, m, k, 0, n, &OutView::new(&mut portable, m, n));
        assert_close(&portable, &x, &w, m, k, n);
        let mut simd = vec![0f32; m * n];
        matmul_t(&x, &w, m, k, n, &mut simd);
        for (a, b) in portable.iter().zip(&simd) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let mut one = vec![0f32; n];
        portable_task(&x[2 * k..3 * k], &w, 1, k, 0, n, &OutView::new(&mut one, 1, n));
        assert_eq!(one, portable[2 * n..3 * n], "portable path is batch invariant too");
    }

    #[test]
    fn dot_matches_one_by_one_tile() {
        let (a, b) = (data(77, 1), data(77, 2));
        let mut out = vec![0f32; 1];
        matmul_t(&a, &b, 1, 77, 1, &mut out);
        assert_eq!(dot(&a, &b).to_bits(), out[0].to_bits());
    }
}
