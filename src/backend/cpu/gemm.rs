//! General f32 GEMM for training: `C = β·C + α·op(A)·op(B)` over strided views, so transposed
//! operands (`dYᵀ·u`, `gᵀ·x`, `dY·W` with `W` in its Linear layout) need no transposed copies.
//!
//! Blocked as usual for CPUs: `A` is packed into `MR`-row panels (unless it is row-major and
//! taken as is, which the AVX-512 kernels read in place), `KC`-deep slices of `B` into
//! `NR`-column panels (unless `B` is row-major, whose panels are read in place), and a
//! register-tiled outer-product kernel (`gemm/kernels.rs`) updates `MR x NR` tiles of `C`.
//! Every element of `C` is one FMA chain walked over `k` in order, and parallel tasks split
//! only `m` and `n`, so results never depend on the thread count or the task split.
//! (The inference kernels in `matmul.rs` keep their own batch-invariant dot-product order.)

use rayon::prelude::*;

use super::scratch;

mod kernels;

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
/// Depth from which a product counts as deep (its `B` far larger than the caches).
const DEEP_K: usize = 16 * KC;

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
    run(alpha, a, b, accumulate, c, ldc, true, None);
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
    run(alpha, a, b, accumulate, c, ldc, false, None);
}

/// A frozen weight `W [k, n]` as the backward's `dX = dY · W` products read it: packed once
/// into the `KC x NR` panels the kernels walk. Read in place, a row-major weight's panels
/// step through memory `n` floats apart and conflict in the L1 sets (a row of 1,536 floats
/// maps every step of a panel to the same few sets); packed, each panel is contiguous. The
/// products run about 10-18% faster and compute the same bits.
pub struct PackedWeight {
    rows: usize,
    cols: usize,
    panels: PackedB,
}

impl PackedWeight {
    /// Packs a row-major `[rows, cols]` matrix.
    pub fn new(data: &[f32], rows: usize, cols: usize) -> Self {
        let panels = PackedB::new(&MatRef::new(data, rows, cols), true, true);
        Self { rows, cols, panels }
    }

    pub fn bytes(&self) -> usize {
        self.panels.buf.len() * 4
    }
}

/// `c[i * ldc + j] (+)= Σ_p a(i, p) · w(p, j)`, as [`gemm`] with `alpha` 1. Runs on the current
/// rayon pool.
pub fn gemm_weight(a: MatRef<'_>, w: &PackedWeight, accumulate: bool, c: &mut [f32], ldc: usize) {
    // Only the shape of this view is read: every panel comes from `w`.
    let b = MatRef { data: &[], rows: w.rows, cols: w.cols, rs: w.cols, cs: 1 };
    run(1.0, a, b, accumulate, c, ldc, true, Some(&w.panels));
}

/// `C` shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own `[i0..i1) x [j0..j1)` tile of `C`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// With `packed`, all of `B` comes from it (`b` then gives only its shape).
#[allow(clippy::too_many_arguments)]
fn run(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
    packed: Option<&PackedB>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k
            && a.fits()
            && (packed.is_some() || b.fits())
            && n <= ldc
            && (m == 0 || c.len() >= (m - 1) * ldc + n),
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
    #[cfg(target_arch = "x86_64")]
    let wide = super::matmul::has_avx512f();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    // `A` is packed once, up front, and shared by the tasks. Row-major `A` taken as it is
    // (`alpha` 1, e.g. `dY` in `dY·W`) is read in place by the AVX-512 kernels instead, its
    // row panels' broadcasts walking the rows; only a partial last panel is packed (packing
    // cost about a tenth of such a product).
    let in_place = wide && alpha == 1.0 && a.cs == 1;
    let packed_from = if in_place { m / MR * MR } else { 0 };
    let len = (m.div_ceil(MR) * MR - packed_from) * k;
    let mut buf = scratch::take(&SCRATCH_A, len);
    let pa = &mut buf[..len];
    let pack =
        |(ip, panel): (usize, &mut [f32])| pack_a_panel(&a, alpha, packed_from + ip * MR, m, panel);
    if parallel && m - packed_from > MR {
        pa.par_chunks_exact_mut(MR * k).enumerate().for_each(pack);
    } else {
        pa.chunks_exact_mut(MR * k).enumerate().for_each(pack);
    }
    let ap = PackedA { a, packed: pa, packed_from };
    // So is `B`, unless it comes packed (a `PackedWeight`) or is row-major: a row-major
    // `B`'s full panels are read in place and only a partial last panel is packed. (Packing
    // them would spare the L1 set conflicts of their strided rows, but per product it costs
    // more than that gains; frozen weights are packed once instead.)
    let owned = packed.is_none().then(|| PackedB::new(&b, parallel, false));
    let bp = packed.or(owned.as_ref()).expect("packed or owned"); // ok: one is set
    let out = OutPtr(c.as_mut_ptr());
    // Narrow products (LoRA ranks) get their parallelism from rows instead. The split never
    // changes a result: each element's sum runs over `k` in order within one task.
    // Deep products (the LM head's `dlogits · E`, `k` = vocabulary) stream `B` from memory:
    // each thread takes one wide column slab over all rows, so `B` is read once, in long runs.
    let deep = parallel && k >= DEEP_K;
    let nc_task =
        if deep { n.div_ceil(rayon::current_num_threads()).next_multiple_of(2 * NR) } else { NC };
    let tn = n.div_ceil(nc_task);
    let mc = if parallel && tn < MIN_TASKS && !deep {
        m.div_ceil(MIN_TASKS.div_ceil(tn)).next_multiple_of(MR).clamp(4 * MR, MC)
    } else {
        MC
    };
    let tm = m.div_ceil(mc);
    let task = |t: usize| {
        let (i0, j0) = ((t / tn) * mc, (t % tn) * nc_task);
        let (i1, j1) = ((i0 + mc).min(m), (j0 + nc_task).min(n));
        // SAFETY: tiles of distinct tasks are disjoint and lie inside `c` (checked above).
        unsafe { tile_task(&ap, &b, bp, wide, accumulate, out, ldc, i0..i1, j0..j1) };
    };
    if parallel && tm * tn > 1 {
        (0..tm * tn).into_par_iter().for_each(task);
    } else {
        (0..tm * tn).for_each(task);
    }
    scratch::put(&SCRATCH_A, buf);
    if let Some(bp) = owned {
        scratch::put(&SCRATCH_B, bp.buf);
    }
}

/// `A` as the kernels read it: rows from `packed_from` on packed (`MR`-row panels of `k`
/// steps), rows before read in place.
struct PackedA<'a> {
    a: MatRef<'a>,
    packed: &'a [f32],
    packed_from: usize,
}

impl PackedA<'_> {
    /// The row panel at `row` from step `p0`, and how many rows from `row` are stored alike.
    fn panel(&self, row: usize, p0: usize, end: usize) -> (kernels::APanel, usize) {
        let k = self.a.cols;
        if row < self.packed_from {
            let ptr = self.a.data[row * self.a.rs + p0..].as_ptr();
            let next = MR * self.a.rs;
            let panel = kernels::APanel { ptr, in_place: true, rs: self.a.rs, next };
            (panel, self.packed_from.min(end) - row)
        } else {
            let ptr = self.packed[(row - self.packed_from) * k + p0 * MR..].as_ptr();
            (kernels::APanel { ptr, in_place: false, rs: 0, next: MR * k }, end - row)
        }
    }
}

/// The packed part of `B`: columns `from..` in `KC`-deep slices of `NR`-column panels (the
/// slice at step `p0` starts at `p0 * width`).
struct PackedB {
    from: usize,
    width: usize,
    buf: Vec<f32>,
}

impl PackedB {
    /// Packs the columns of `b` that cannot be read in place, or all of them with `all` (into
    /// a buffer of its own rather than the thread's scratch).
    fn new(b: &MatRef<'_>, parallel: bool, all: bool) -> Self {
        let (k, n) = (b.rows, b.cols);
        let from = if b.cs == 1 && !all { n / NR * NR } else { 0 };
        let width = (n - from).div_ceil(NR) * NR;
        let mut buf = if all { vec![0.0; k * width] } else { scratch::take(&SCRATCH_B, k * width) };
        if width > 0 {
            let pack = |(s, out): (usize, &mut [f32])| {
                let p0 = s * KC;
                pack_b(b, from, n - from, p0, KC.min(k - p0), out);
            };
            let slices = &mut buf[..k * width];
            if parallel && k > KC {
                slices.par_chunks_mut(KC * width).enumerate().for_each(pack);
            } else {
                slices.chunks_mut(KC * width).enumerate().for_each(pack);
            }
        }
        Self { from, width, buf }
    }
}

thread_local! {
    /// Packing buffers kept per thread between products, so a product neither allocates nor
    /// zeroes its panels (every packed value is written before it is read).
    static SCRATCH_A: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static SCRATCH_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One task: its tile of `C` over every `KC` slice of `k`, in order, reading `A` through
/// `ap` and the packed part of `B` from `bp`.
///
/// # Safety
/// The tile lies inside `out` (rows `ldc` apart) and no other thread writes it.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_task(
    ap: &PackedA<'_>,
    b: &MatRef<'_>,
    bp: &PackedB,
    wide: bool,
    accumulate: bool,
    out: OutPtr,
    ldc: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    let (nc, k) = (cols.len(), b.rows);
    let np = nc.div_ceil(NR);
    let mut edge = kernels::Edge::default();
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        let load = accumulate || p0 > 0;
        let direct = |jp: usize| cols.start + jp * NR < bp.from;
        let panel = |jp: usize| {
            let j = cols.start + jp * NR;
            if j < bp.from {
                // In bounds: rows p0..p0+kc < k and columns up to j + NR <= n.
                (b.data[p0 * b.rs + j..].as_ptr(), b.rs)
            } else {
                (bp.buf[p0 * bp.width + (j - bp.from) * kc..].as_ptr(), NR)
            }
        };
        let mut jp = 0;
        while jp < np {
            // With AVX-512, two full panels of the same kind at once (12 FMA chains).
            let pair = wide && (jp + 2) * NR <= nc && direct(jp) == direct(jp + 1);
            let span = if pair { 2 } else { 1 };
            let (b0, ldb) = panel(jp);
            let group = kernels::Group {
                b0,
                b1: if pair { panel(jp + 1).0 } else { b0 },
                ldb,
                pair,
                cols: (nc - jp * NR).min(span * NR),
                wide,
            };
            let mut i = rows.start;
            while i < rows.end {
                let (panel, alike) = ap.panel(i, p0, rows.end);
                let dst = out.0.add(i * ldc + cols.start + jp * NR);
                i += group.update(panel, alike, kc, dst, ldc, load, &mut edge);
            }
            jp += span;
        }
        p0 += kc;
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
    if a.cs == 1 && live == MR {
        // Row-major storage: walk the rows together so the panel is written in order.
        let rows: [&[f32]; MR] = std::array::from_fn(|r| &a.data[(i0 + r) * a.rs..][..k]);
        for (p, o) in panel[..k * MR].chunks_exact_mut(MR).enumerate() {
            for (o, row) in o.iter_mut().zip(&rows) {
                *o = alpha * row[p];
            }
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
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 300, 17),
            (100, 70, 130),
            (7, 513, 33),
            (6, 0, 16),
            (9, DEEP_K, 50),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let ad = data(m * k, 1);
                let bd = data(k * n, 2);
                let a = if ta { MatRef::new(&ad, k, m).t() } else { MatRef::new(&ad, m, k) };
                let b = if tb { MatRef::new(&bd, n, k).t() } else { MatRef::new(&bd, k, n) };
                for (acc, alpha) in [(false, 0.5), (true, 0.5), (false, 1.0), (true, 1.0)] {
                    let ldc = n + 3;
                    let c0 = data(m * ldc, 3);
                    let mut c = c0.clone();
                    gemm(alpha, a, b, acc, &mut c, ldc);
                    let want = reference(alpha, &a, &b, &c0, acc, ldc);
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
    fn packed_weights_give_the_same_bits() {
        // The same FMA chains as reading the row-major weight in place (or packing its last
        // partial panel), for partial panels, several `KC` slices and deep products.
        for (m, k, n) in [(1, 40, 20), (64, 64, 64), (77, 1000, 45), (30, 513, 96), (9, DEEP_K, 50)]
        {
            let (ad, bd) = (data(m * k, 13), data(k * n, 14));
            let (a, b) = (MatRef::new(&ad, m, k), MatRef::new(&bd, k, n));
            let w = PackedWeight::new(&bd, k, n);
            assert_eq!(w.bytes(), k * n.next_multiple_of(NR) * 4);
            for acc in [false, true] {
                let c0 = data(m * (n + 2), 15);
                let (mut packed, mut direct) = (c0.clone(), c0.clone());
                gemm_weight(a, &w, acc, &mut packed, n + 2);
                gemm(1.0, a, b, acc, &mut direct, n + 2);
                assert_eq!(packed, direct, "{m}x{k}x{n} {acc}");
            }
        }
    }

    #[test]
    fn in_place_and_packed_a_give_the_same_bits() {
        // Row-major `A` with `alpha` 1 is read in place (AVX-512); the same values stored
        // transposed are packed. Both walk the same FMA chains.
        for (m, k, n) in [(29, 300, 70), (12, 513, 33), (5, 40, 16)] {
            let ad = data(m * k, 10);
            let at: Vec<f32> = (0..k * m).map(|i| ad[(i % m) * k + i / m]).collect();
            let bd = data(k * n, 11);
            let b = MatRef::new(&bd, k, n);
            for acc in [false, true] {
                let c0 = data(m * n, 12);
                let (mut rows, mut cols) = (c0.clone(), c0.clone());
                gemm(1.0, MatRef::new(&ad, m, k), b, acc, &mut rows, n);
                gemm(1.0, MatRef::new(&at, k, m).t(), b, acc, &mut cols, n);
                assert_eq!(rows, cols, "{m}x{k}x{n} {acc}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        // A product split by columns and rows, and a deep one split into column slabs.
        for (m, k, n) in [(200, 600, 300), (20, DEEP_K + 3, 100)] {
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
            // So do products with a packed weight.
            let w = PackedWeight::new(&bd, k, n);
            let packed = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                let pool = pool.expect("thread pool"); // ok: test setup
                let mut c = vec![0f32; m * n];
                pool.install(|| gemm_weight(MatRef::new(&ad, m, k), &w, false, &mut c, n));
                c
            };
            assert_eq!(packed(1), packed(3));
            let mut serial = vec![0f32; m * n];
            let (a, b) = (MatRef::new(&ad, m, k), MatRef::new(&bd, k, n));
            gemm_serial(1.0, a, b, false, &mut serial, n);
            assert_eq!(one, serial);
        }
    }
}
