//! f32 weights packed for the inference matmul `y = x · Wᵀ`.
//!
//! `W [n, k]` is stored as panels of [`NR`] = 16 consecutive rows, each panel `k` lines of 16
//! floats: line `c` of panel `p` holds `W[16p..16p + 16][c]`. A register tile then multiplies
//! up to [`MR`] activation rows by a whole panel as an outer product (one broadcast of
//! `x[i][c]`, two 8-wide FMAs per row and step), which is what a CPU does fastest:
//! - batch 1 reads the weights as one sequential stream per thread (decode is bound by it);
//! - large batches reuse each panel, hot in cache, across all activation rows.
//!
//! Every output element is one fused multiply-add chain over `c = 0..k` in order, started at
//! zero, whatever the batch size, tile height, task split or thread count: a row's result is
//! bit-identical whether it is computed alone or in a batch (batch invariance), and the
//! portable path (`f32::mul_add`) matches the AVX2 and AVX-512 ones bit for bit.

use rayon::prelude::*;

use super::matmul::OutView;

/// Weight rows per panel (two AVX vectors of f32).
pub const NR: usize = 16;
/// Activation rows per register tile with AVX2: 6 x 2 accumulators, 2 weight vectors and a
/// broadcast fit the 16 AVX registers, and 12 independent FMA chains cover the FMA latency.
const MR_AVX2: usize = 6;
/// Activation rows per register tile with AVX-512: a panel line is one register and a tile
/// multiplies two panels at once, so 24 accumulators (of 32 registers) take 14 loads per 24
/// FMAs; with one panel (13 loads per 12 FMAs) the two load ports, not the FMA units, bound it.
pub const MR: usize = 12;
/// How far ahead the SIMD tiles prefetch each panel, in 64-byte lines (1 KiB).
#[cfg(target_arch = "x86_64")]
const PREFETCH_LINES: usize = 16;
/// Bytes of `x` a row block keeps hot in L2 while tasks sweep the panels over it.
const X_BLOCK_BYTES: usize = 256 * 1024;

/// One 64-byte line: a panel's 16 weights for one input column (aligned so a vector load never
/// splits a cache line).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; NR]);

/// A `[rows, cols]` f32 matrix in 16-row panels (the last one zero-padded).
#[derive(Clone)]
pub struct PackedF32 {
    rows: usize,
    cols: usize,
    lines: Vec<Line>,
}

impl PackedF32 {
    /// Packs row-major `w [rows, cols]`; `None` if the length does not match.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows * cols {
            return None;
        }
        let panels = rows.div_ceil(NR);
        let mut lines = vec![Line::default(); panels * cols];
        if cols > 0 {
            lines.par_chunks_mut(cols).enumerate().for_each(|(p, panel)| {
                for q in 0..NR.min(rows - p * NR) {
                    let row = &w[(p * NR + q) * cols..(p * NR + q + 1) * cols];
                    for (line, v) in panel.iter_mut().zip(row) {
                        line.0[q] = *v;
                    }
                }
            });
        }
        Some(Self { rows, cols, lines })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` into `out` (`out.len() == cols`).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of a packed matrix"); // ok: caller bug
        let panel = &self.lines[(r / NR) * self.cols..(r / NR + 1) * self.cols];
        for (o, line) in out.iter_mut().zip(panel) {
            *o = line.0[r % NR];
        }
    }

    /// The matrix row-major again.
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        out
    }

    /// Bytes one product reads (padding included).
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of_val(self.lines.as_slice())
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ` on the current rayon pool.
    pub fn matmul_t(&self, x: &[f32], m: usize, out: OutView<'_>) {
        let (k, n) = (self.cols, self.rows);
        assert!(x.len() >= m * k && out.rows() == m && out.cols() == n, "packed matmul shapes"); // ok: caller bug
        if m == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(NR);
        // Row blocks sized so that a block of `x` stays in L2; each weight panel then comes
        // from memory once per block and serves every row of it from cache.
        // Equal tiles (16 rows: 8 + 8, not 12 + 4): a short tile has too few FMA chains to
        // hide their latency.
        let mr = m.div_ceil(m.div_ceil(tile_rows()));
        // Each tile's rows interleaved, so its broadcasts read one sequential stream. The
        // buffer is reused (taken, so a nested call on this thread just makes its own):
        // a fresh one per product cost page faults and a memset.
        thread_local! {
            static INTERLEAVED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut interleaved = INTERLEAVED.take();
        let x = if m > 1 {
            interleave_into(&x[..m * k], k, mr, &mut interleaved);
            &interleaved
        } else {
            x
        };
        let block = (X_BLOCK_BYTES / (4 * k.max(1))).max(mr) / mr * mr;
        let blocks = m.div_ceil(block);
        // Tasks take two panels where a tile can hold both (half the broadcasts per FMA).
        let width = panels_per_tile();
        let units = panels.div_ceil(width);
        // Small batches stream weights: keep a few panels per task to amortise scheduling.
        let min_len = if m <= mr { 4 / width } else { 1 };
        (0..blocks * units).into_par_iter().with_min_len(min_len).for_each(|t| {
            let (b, u) = (t / units, t % units);
            let rows = b * block..((b + 1) * block).min(m);
            let ps = u * width..((u + 1) * width).min(panels);
            // SAFETY: panels `ps` write only their own columns of rows in their own block.
            unsafe { self.panel_task(x, rows, ps, mr, &out) };
        });
        INTERLEAVED.set(interleaved);
    }

    /// Rows `rows` of `x` against panels `ps` (one, or two where `panels_per_tile` allows),
    /// in tiles of up to `mr` rows.
    ///
    /// # Safety
    /// No other task writes the outputs of these rows and panels concurrently.
    unsafe fn panel_task(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        ps: std::ops::Range<usize>,
        mr: usize,
        out: &OutView,
    ) {
        let k = self.cols;
        let panel = |p: usize| &self.lines[p * k..(p + 1) * k];
        let mut i = rows.start;
        while i < rows.end {
            let r = mr.min(rows.end - i);
            let xt = &x[i * k..(i + r) * k];
            let cols = self.rows.min(ps.end * NR) - ps.start * NR;
            if ps.len() == 2 && cols == 2 * NR {
                // Two whole panels: the kernel stores straight into the output rows.
                let pair = [panel(ps.start), panel(ps.start + 1)];
                tile_pair(xt, r, pair, out.ptr_at(i, ps.start * NR), out.ld());
            } else {
                let mut acc = [[0f32; 2 * NR]; MR];
                if ps.len() == 2 {
                    let pair = [panel(ps.start), panel(ps.start + 1)];
                    tile_pair(xt, r, pair, acc.as_mut_ptr().cast(), 2 * NR);
                } else {
                    let mut one = [[0f32; NR]; MR];
                    tile(xt, r, panel(ps.start), &mut one);
                    for (a, o) in acc.iter_mut().zip(&one) {
                        a[..NR].copy_from_slice(o);
                    }
                }
                for (dr, row) in acc.iter().take(r).enumerate() {
                    out.write_row(i + dr, ps.start * NR, &row[..cols]);
                }
            }
            i += r;
        }
    }
}

/// Panels one tile multiplies at once: two with AVX-512 (24 accumulators of its 32
/// registers), else one.
fn panels_per_tile() -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::has_avx512f() {
        return 2;
    }
    1
}

/// [`tile`] for two panels at once (only called where `panels_per_tile() == 2`): row `j`'s 32
/// results go to `out + j * ld` (first panel, then second).
///
/// # Safety
/// `out` is valid for writes of `r` such rows, which no other task writes concurrently.
unsafe fn tile_pair(x: &[f32], r: usize, panels: [&[Line]; 2], out: *mut f32, ld: usize) {
    debug_assert!(panels[0].len() == panels[1].len() && x.len() == r * panels[0].len());
    #[cfg(target_arch = "x86_64")]
    if super::matmul::has_avx512f() {
        let (xp, k) = (x.as_ptr(), panels[0].len());
        let pp = panels.map(|p| p.as_ptr());
        // SAFETY: AVX-512F is available; `x` holds `r * k` floats, each panel `k` lines;
        // the caller vouches for `out`.
        unsafe {
            match r {
                1 => avx512::tile_pair::<1>(xp, pp, k, out, ld),
                2 => avx512::tile_pair::<2>(xp, pp, k, out, ld),
                3 => avx512::tile_pair::<3>(xp, pp, k, out, ld),
                4 => avx512::tile_pair::<4>(xp, pp, k, out, ld),
                5 => avx512::tile_pair::<5>(xp, pp, k, out, ld),
                6 => avx512::tile_pair::<6>(xp, pp, k, out, ld),
                7 => avx512::tile_pair::<7>(xp, pp, k, out, ld),
                8 => avx512::tile_pair::<8>(xp, pp, k, out, ld),
                9 => avx512::tile_pair::<9>(xp, pp, k, out, ld),
                10 => avx512::tile_pair::<10>(xp, pp, k, out, ld),
                11 => avx512::tile_pair::<11>(xp, pp, k, out, ld),
                _ => avx512::tile_pair::<MR>(xp, pp, k, out, ld),
            }
        }
        return;
    }
    let mut acc = [[[0f32; NR]; MR]; 2];
    for (a, p) in acc.iter_mut().zip(panels) {
        tile(x, r, p, a);
    }
    for (j, (a0, a1)) in acc[0].iter().zip(&acc[1]).take(r).enumerate() {
        // SAFETY: the caller vouches for `r` rows of 32 floats at `out + j * ld`.
        unsafe {
            std::ptr::copy_nonoverlapping(a0.as_ptr(), out.add(j * ld), NR);
            std::ptr::copy_nonoverlapping(a1.as_ptr(), out.add(j * ld + NR), NR);
        }
    }
}

/// Rows per register tile on this CPU (at most [`MR`]).
fn tile_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::has_avx512f() {
        return MR;
    }
    MR_AVX2
}

/// `x [m, k]` with each `mr`-row tile stored column by column: element `(i0 + j, c)` of the tile
/// at row `i0` (of `r` rows) at `i0 * k + c * r + j`.
#[cfg(test)]
fn interleave(x: &[f32], k: usize, mr: usize) -> Vec<f32> {
    let mut out = Vec::new();
    interleave_into(x, k, mr, &mut out);
    out
}

/// [`interleave`] into `out` (replacing what it held).
fn interleave_into(x: &[f32], k: usize, mr: usize, out: &mut Vec<f32>) {
    let k = k.max(1);
    let x = &x[..x.len() / k * k];
    out.clear();
    out.reserve(x.len());
    let spare = &mut out.spare_capacity_mut()[..x.len()];
    let tile = |(src, dst): (&[f32], &mut [std::mem::MaybeUninit<f32>])| {
        let r = src.len() / k;
        for (j, row) in src.chunks_exact(k).enumerate() {
            for (c, v) in row.iter().enumerate() {
                dst[c * r + j].write(*v);
            }
        }
    };
    x.par_chunks(mr * k).zip(spare.par_chunks_mut(mr * k)).for_each(tile);
    // SAFETY: the loop wrote every one of the first `x.len()` elements: each chunk holds `r`
    // whole rows (`x` was cut to a multiple of `k`) and fills its `r * k` slots.
    unsafe { out.set_len(x.len()) };
}

/// `acc[j][q] = Σ_c x[c][j] · panel[c][q]` for the `r` interleaved rows of `x` (see
/// [`interleave`]), `r <= tile_rows()`.
fn tile(x: &[f32], r: usize, panel: &[Line], acc: &mut [[f32; NR]; MR]) {
    debug_assert_eq!(x.len(), r * panel.len());
    #[cfg(target_arch = "x86_64")]
    {
        let (xp, pp, k) = (x.as_ptr(), panel.as_ptr(), panel.len());
        if super::matmul::has_avx512f() {
            // SAFETY: AVX-512F is available; `x` holds `r * k` floats, `panel` `k` lines.
            unsafe {
                match r {
                    1 => avx512::tile::<1>(xp, pp, k, acc),
                    2 => avx512::tile::<2>(xp, pp, k, acc),
                    3 => avx512::tile::<3>(xp, pp, k, acc),
                    4 => avx512::tile::<4>(xp, pp, k, acc),
                    5 => avx512::tile::<5>(xp, pp, k, acc),
                    6 => avx512::tile::<6>(xp, pp, k, acc),
                    7 => avx512::tile::<7>(xp, pp, k, acc),
                    8 => avx512::tile::<8>(xp, pp, k, acc),
                    9 => avx512::tile::<9>(xp, pp, k, acc),
                    10 => avx512::tile::<10>(xp, pp, k, acc),
                    11 => avx512::tile::<11>(xp, pp, k, acc),
                    _ => avx512::tile::<MR>(xp, pp, k, acc),
                }
            }
            return;
        }
        if super::matmul::has_avx2_fma() {
            // SAFETY: AVX2 and FMA are available; `x` holds `r * k` floats, `panel` `k` lines.
            unsafe {
                match r {
                    1 => avx2::tile::<1>(xp, pp, k, acc),
                    2 => avx2::tile::<2>(xp, pp, k, acc),
                    3 => avx2::tile::<3>(xp, pp, k, acc),
                    4 => avx2::tile::<4>(xp, pp, k, acc),
                    5 => avx2::tile::<5>(xp, pp, k, acc),
                    _ => avx2::tile::<MR_AVX2>(xp, pp, k, acc),
                }
            }
            return;
        }
    }
    portable_tile(x, r, panel, acc);
}

/// The same chains as the SIMD tiles: `mul_add` rounds once, as FMA does.
fn portable_tile(x: &[f32], r: usize, panel: &[Line], acc: &mut [[f32; NR]; MR]) {
    for (xc, line) in x.chunks_exact(r).zip(panel) {
        for (xv, a) in xc.iter().zip(acc.iter_mut()) {
            for (o, w) in a.iter_mut().zip(&line.0) {
                *o = xv.mul_add(*w, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Line, MR, NR, PREFETCH_LINES};

    /// `R` interleaved rows of `x` times a panel of `k` lines, into the first `R` rows of `out`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `x` holds `R * k` floats and `panel` `k` lines.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(
        x: *const f32,
        panel: *const Line,
        k: usize,
        out: &mut [[f32; NR]; MR],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..k {
            // As in `avx512::tile_pair`: the first tile streams the panel from memory.
            _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(c + PREFETCH_LINES) as *const i8);
            let w = panel.add(c) as *const f32;
            let (w0, w1) = (_mm256_load_ps(w), _mm256_load_ps(w.add(8)));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(c * R + r));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Line, MR, NR, PREFETCH_LINES};

    /// As `avx2::tile`, a panel line being one 16-wide register.
    ///
    /// # Safety
    /// AVX-512F is available; `x` holds `R * k` floats and `panel` `k` lines.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(
        x: *const f32,
        panel: *const Line,
        k: usize,
        out: &mut [[f32; NR]; MR],
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for c in 0..k {
            let w = _mm512_load_ps(panel.add(c) as *const f32);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(c * R + r)), w, *a);
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            _mm512_storeu_ps(o.as_mut_ptr(), *a);
        }
    }

    /// `tile` over two panels: each broadcast feeds two FMAs. Row `r`'s 32 results go to
    /// `out + r * ld`.
    ///
    /// # Safety
    /// AVX-512F is available; `x` holds `R * k` floats, each panel `k` lines, and `out` takes
    /// `R` rows of 32 floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_pair<const R: usize>(
        x: *const f32,
        panels: [*const Line; 2],
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for c in 0..k {
            // A pair of panels outgrows L1 and its first tile reads them from memory: ask
            // for the lines a kilobyte ahead (5-10% faster at every batch size measured).
            // Lines past a panel's end are only hinted, never read.
            for p in panels {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c + PREFETCH_LINES) as *const i8);
            }
            let w0 = _mm512_load_ps(panels[0].add(c) as *const f32);
            let w1 = _mm512_load_ps(panels[1].add(c) as *const f32);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(c * R + r));
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ld), a[0]);
            _mm512_storeu_ps(out.add(r * ld + NR), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::{assert_batch_invariant, assert_close, data};

    fn product(p: &PackedF32, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * p.rows()];
        p.matmul_t(x, m, OutView::new(&mut out, m, p.rows()));
        out
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for &(m, k, n) in &[(1, 8, 1), (3, 13, 7), (5, 64, 37), (17, 100, 33), (2, 576, 70)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let p = PackedF32::pack(&w, n, k).expect("shape");
            assert_close(&product(&p, &x, m), &x, &w, m, k, n);
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        let (k, n) = (99, 45);
        let p = PackedF32::pack(&data(n * k, 4), n, k).expect("shape");
        assert_batch_invariant(k, n, |x, m, out| p.matmul_t(x, m, OutView::new(out, m, n)));
    }

    #[test]
    fn row_blocks_and_threads_do_not_change_results() {
        // k large enough that the L2 row block holds fewer rows than m.
        let (m, k, n) = (40, 4000, 20);
        let (x, w) = (data(m * k, 5), data(n * k, 6));
        let p = PackedF32::pack(&w, n, k).expect("shape");
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            pool.expect("thread pool").install(|| product(&p, &x, m)) // ok: test setup
        };
        let one = run(1);
        assert_eq!(one, run(3));
        for i in [0, 17, 39] {
            assert_eq!(product(&p, &x[i * k..(i + 1) * k], 1), one[i * n..(i + 1) * n]);
        }
        assert_close(&one, &x, &w, m, k, n);
    }

    #[test]
    fn portable_tile_matches_simd_tiles_bit_for_bit() {
        let (k, n) = (77, 16);
        let x = data(MR * k, 7);
        let p = PackedF32::pack(&data(n * k, 8), n, k).expect("shape");
        let q = PackedF32::pack(&data(n * k, 9), n, k).expect("shape");
        for r in 1..=tile_rows() {
            let (mut a, mut b) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
            let xr = interleave(&x[..r * k], k, r);
            tile(&xr, r, &p.lines, &mut a);
            portable_tile(&xr, r, &p.lines, &mut b);
            assert_eq!(a, b, "{r} rows");
            let mut c = [[0f32; NR]; MR];
            portable_tile(&xr, r, &q.lines, &mut c);
            let mut pair = [[0f32; 2 * NR]; MR];
            // SAFETY: `pair` holds MR >= r rows of 32 floats.
            unsafe { tile_pair(&xr, r, [&p.lines, &q.lines], pair.as_mut_ptr().cast(), 2 * NR) };
            for j in 0..r {
                assert_eq!(pair[j][..NR], b[j], "{r} rows, first of two panels");
                assert_eq!(pair[j][NR..], c[j], "{r} rows, second of two panels");
            }
        }
        // Both SIMD kernels where the CPU has them, whichever `tile` picks.
        #[cfg(target_arch = "x86_64")]
        {
            let pp = p.lines.as_ptr();
            if crate::backend::cpu::matmul::has_avx2_fma() {
                let xr = interleave(&x[..MR_AVX2 * k], k, MR_AVX2);
                let (mut got, mut want) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
                portable_tile(&xr, MR_AVX2, &p.lines, &mut want);
                // SAFETY: AVX2 and FMA detected; `xr` holds 6 rows of `k`.
                unsafe { avx2::tile::<MR_AVX2>(xr.as_ptr(), pp, k, &mut got) };
                assert_eq!(got, want, "avx2");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                let xr = interleave(&x, k, MR);
                let (mut got, mut want) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
                portable_tile(&xr, MR, &p.lines, &mut want);
                // SAFETY: AVX-512F detected; `xr` holds MR rows of `k`.
                unsafe { avx512::tile::<MR>(xr.as_ptr(), pp, k, &mut got) };
                assert_eq!(got, want, "avx512");
            }
        }
    }

    #[test]
    fn rows_unpack_exactly() {
        let (n, k) = (37, 9);
        let w = data(n * k, 9);
        let p = PackedF32::pack(&w, n, k).expect("shape");
        assert_eq!(p.to_rows(), w);
        assert_eq!(p.size_bytes(), 3 * NR * k * 4);
        assert!(PackedF32::pack(&w[1..], n, k).is_none());
    }
}
