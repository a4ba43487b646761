//! bf16 products on AMX tiles (Sapphire Rapids and later) for training's frozen weights:
//! `C (+)= round(A) · B` with `A` rounded to bf16 per product, `B` rounded and packed once
//! ([`AmxWeight`]), products exact and sums in `f32` accumulators. One tile product does 16
//! times the multiply-adds of an AVX-512 FMA in about the same time, which is what makes
//! `--train-dtype bf16` several times faster than the `f32` kernels on such a CPU.
//!
//! Inside one tile product the unit sums more precisely than a chain of `f32` additions (in a
//! probe, a quarter of an FMA chain's error, without bias), so results are not bit-equal to
//! the portable bf16 path in [`super::frozen`]; both are checked against `f64` sums. As in the
//! vector GEMM, every
//! element of `C` is summed over `k` in order within one task and tasks split only `m` and
//! `n`, so results never depend on the thread count.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::gemm::MatRef;

/// Rows (and columns) of a tile; `C` is updated in blocks of up to 2 x 2 tiles.
const T: usize = 16;
/// Depth of one tile product: 32 bf16 a row.
const KB: usize = 32;
/// bf16 values in one `T x KB` tile (1 KiB).
const TILE: usize = T * KB;
/// Tile products of one pass over `k` (2,048 steps): a task's row panels and a column
/// pair's slices stay in L2 while the tiles walk them (only the LM head is deeper).
const SLICE: usize = 64;
/// Rows and columns of `C` per parallel task (multiples of `2 * T`).
const MC: usize = 256;
const NC: usize = 128;
/// Tasks worth splitting a product into when its columns alone give fewer.
const MIN_TASKS: usize = 8;

/// Whether the CPU has AMX-BF16, the OS enables tile state and grants it to this process,
/// and `COSERVE_CPU_ISA` (`avx512`, `avx2`) does not ask for the vector kernels instead.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("COSERVE_CPU_ISA").map_or(true, |isa| isa != "avx512" && isa != "avx2")
            && super::matmul::has_avx512f()
            && detect()
    })
}

fn detect() -> bool {
    // SAFETY: CPUID leaf 7 exists on every AVX-512 CPU; XGETBV is checked through OSXSAVE.
    unsafe {
        let amx = __cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (amx & (1 << 22) != 0, amx & (1 << 24) != 0);
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        if !(amx_bf16 && amx_tile && osxsave) {
            return false;
        }
        // XTILECFG and XTILEDATA state enabled by the OS.
        if xgetbv0() & (0b11 << 17) != (0b11 << 17) {
            return false;
        }
        request_tile_permission()
    }
}

/// `XGETBV` with `ECX = 0`.
///
/// # Safety
/// The CPU supports XSAVE and the OS enabled it (OSXSAVE).
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Linux hands out the 8 KiB tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`), once for the whole process.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call that only changes this process's permitted xsave features.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// A frozen `[k, n]` right operand rounded to bf16 and packed once, in `T`-column panels of
/// `[kb][pair][col]` (the tile unit's layout: steps `2p` and `2p + 1` of a column side by
/// side in one `u32`), zero past `k` and `n`.
pub struct AmxWeight {
    buf: Lines,
    k: usize,
    n: usize,
    panel: usize,
}

impl AmxWeight {
    /// Packs `b`; [`available`] must hold.
    pub fn new(b: &MatRef<'_>) -> Self {
        assert!(available(), "AMX packing without AMX"); // ok: caller bug
        let (k, n) = (b.rows, b.cols);
        let panel = k.div_ceil(KB) * T * T;
        let mut buf = Lines::new(n.div_ceil(T) * panel / 16);
        let pack = |(jp, out): (usize, &mut [u32])| {
            // SAFETY: AVX-512F is available (part of `available`); `out` is one panel.
            unsafe { pack_b(b, jp * T, out) }
        };
        buf.u32s_mut().par_chunks_exact_mut(panel.max(1)).enumerate().for_each(pack);
        Self { buf, k, n, panel }
    }

    pub fn bytes(&self) -> usize {
        self.buf.0.len() * std::mem::size_of::<Line>()
    }

    /// `c[i * ldc + j] (+)= Σ_p round(a(i, p)) · b(p, j)` on the current rayon pool.
    pub fn product(&self, a: &MatRef<'_>, accumulate: bool, c: &mut [f32], ldc: usize) {
        let (m, k, n) = (a.rows, self.k, self.n);
        assert!(a.cols == k && n <= ldc && (m == 0 || c.len() >= (m - 1) * ldc + n), "amx shapes"); // ok: caller bug
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // No tile product runs: an empty sum is zero.
            if !accumulate {
                c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
            }
            return;
        }
        let kbs = k.div_ceil(KB);
        let a_panel = kbs * TILE;
        // Kept per thread between products (every value is written before it is read): a
        // fresh buffer per product cost page faults and zeroing.
        thread_local! {
            static A_BUF: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let a_len = m.div_ceil(T) * a_panel;
        let mut a_buf = Lines(A_BUF.take());
        a_buf.0.resize(a_buf.0.len().max(a_len / 32), Line([0; 16]));
        let pack = |(ip, out): (usize, &mut [u16])| {
            // SAFETY: AVX-512F is available; `out` is one panel.
            unsafe { pack_a(a, ip * T, out) }
        };
        a_buf.u16s_mut()[..a_len].par_chunks_exact_mut(a_panel.max(1)).enumerate().for_each(pack);
        let tn = n.div_ceil(NC);
        let mc = if tn < MIN_TASKS {
            m.div_ceil(MIN_TASKS.div_ceil(tn)).next_multiple_of(2 * T).clamp(2 * T, MC)
        } else {
            MC
        };
        let tm = m.div_ceil(mc);
        let out = OutPtr(c.as_mut_ptr());
        let packed = Packed {
            a: &a_buf.u16s()[..a_len],
            b: self.buf.u32s(),
            a_panel,
            b_panel: self.panel,
            kbs,
            m,
            n,
        };
        let task = |t: usize| {
            let (i0, j0) = ((t / tn) * mc, (t % tn) * NC);
            let (i1, j1) = ((i0 + mc).min(m), (j0 + NC).min(n));
            // SAFETY: tiles of distinct tasks are disjoint and lie inside `c` (asserted
            // above); AMX is available.
            unsafe { packed.task(out, ldc, accumulate, i0..i1, j0..j1) };
        };
        (0..tm * tn).into_par_iter().for_each(task);
        A_BUF.set(a_buf.0);
    }
}

/// `C` shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own `[i0..i1) x [j0..j1)` tile of `C`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// 64-byte lines: tile rows must not straddle cache lines (a tile load that does runs at
/// about a quarter of the speed).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

struct Lines(Vec<Line>);

impl Lines {
    fn new(lines: usize) -> Self {
        Self(vec![Line([0; 16]); lines])
    }

    fn u16s(&self) -> &[u16] {
        // SAFETY: `Line` is 64 bytes of plain integers, any bit pattern valid as `u16`s.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 32) }
    }

    fn u16s_mut(&mut self) -> &mut [u16] {
        // SAFETY: as `u16s`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 32) }
    }

    fn u32s(&self) -> &[u32] {
        // SAFETY: as `u16s`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 16) }
    }

    fn u32s_mut(&mut self) -> &mut [u32] {
        // SAFETY: as `u16s`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
    }
}

/// Both operands packed: `A` in `T`-row panels of `[kb][row][KB]` bf16, `B` as
/// [`AmxWeight`] lays it out.
struct Packed<'a> {
    a: &'a [u16],
    b: &'a [u32],
    a_panel: usize,
    b_panel: usize,
    kbs: usize,
    m: usize,
    n: usize,
}

/// A `C` tile that is not whole (past `m` or `n`): worked on in a copy.
struct EdgeTile {
    buf: [f32; T * T],
    dst: *mut f32,
    rows: usize,
    cols: usize,
}

impl Packed<'_> {
    /// One task's tile of `C`, every `k` slice in order.
    ///
    /// # Safety
    /// The tile lies inside `out` (rows `ldc` apart) and is this task's alone; AMX is
    /// available.
    unsafe fn task(
        &self,
        out: OutPtr,
        ldc: usize,
        accumulate: bool,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        configure_tiles();
        let mut kb0 = 0;
        while kb0 < self.kbs {
            let kbs = SLICE.min(self.kbs - kb0);
            let load = accumulate || kb0 > 0;
            for j in cols.clone().step_by(2 * T) {
                let nb = if j + T < cols.end { 2 } else { 1 };
                for i in rows.clone().step_by(2 * T) {
                    let ma = if i + T < rows.end { 2 } else { 1 };
                    self.block(out, ldc, load, (i, ma), (j, nb), kb0, kbs);
                }
            }
            kb0 += kbs;
        }
        release_tiles();
    }

    /// `C[i.., j..]` for `ma x nb` tiles over `kbs` tile products from `kb0`.
    ///
    /// # Safety
    /// As [`Self::task`], the tiles configured.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        out: OutPtr,
        ldc: usize,
        load: bool,
        (i, ma): (usize, usize),
        (j, nb): (usize, usize),
        kb0: usize,
        kbs: usize,
    ) {
        let mut edges: [[Option<EdgeTile>; 2]; 2] = Default::default();
        let mut c = [[(std::ptr::null_mut::<f32>(), 0usize); 2]; 2];
        for (ti, row) in c.iter_mut().enumerate().take(ma) {
            for (tj, slot) in row.iter_mut().enumerate().take(nb) {
                let (r0, c0) = (i + ti * T, j + tj * T);
                let dst = out.0.add(r0 * ldc + c0);
                let (rows, cols) = (T.min(self.m - r0), T.min(self.n - c0));
                if rows == T && cols == T {
                    *slot = (dst, ldc * 4);
                } else {
                    let mut e = EdgeTile { buf: [0.0; T * T], dst, rows, cols };
                    if load {
                        for r in 0..rows {
                            for q in 0..cols {
                                e.buf[r * T + q] = *dst.add(r * ldc + q);
                            }
                        }
                    }
                    let edge = edges[ti][tj].insert(e);
                    *slot = (edge.buf.as_mut_ptr(), T * 4);
                }
            }
        }
        let a = [i / T, i / T + 1].map(|p| self.a.as_ptr().wrapping_add(p * self.a_panel));
        let b = [j / T, j / T + 1].map(|p| self.b.as_ptr().wrapping_add(p * self.b_panel));
        match (ma, nb) {
            (2, 2) => kernel::<2, 2>(a, b, kb0, kbs, c, load),
            (2, _) => kernel::<2, 1>(a, b, kb0, kbs, c, load),
            (_, 2) => kernel::<1, 2>(a, b, kb0, kbs, c, load),
            _ => kernel::<1, 1>(a, b, kb0, kbs, c, load),
        }
        for e in edges.iter().flatten().flatten() {
            for r in 0..e.rows {
                for q in 0..e.cols {
                    *e.dst.add(r * ldc + q) = e.buf[r * T + q];
                }
            }
        }
    }
}

/// Palette 1, all eight tiles 16 rows of 64 bytes: `tmm0..3` accumulate `C` (tile `(i, j)`
/// in `tmm(2i + j)`), `tmm4/5` hold `A` tiles, `tmm6/7` `B` tiles.
///
/// # Safety
/// AMX is available.
unsafe fn configure_tiles() {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t] = 64;
        cfg[48 + t] = T as u8;
    }
    asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
}

/// Hands the tile state back, so the OS need not save it across switches.
///
/// # Safety
/// AMX is available.
unsafe fn release_tiles() {
    asm!("tilerelease", options(nostack, nomem));
}

/// `MA x NB` tiles of `C` at `c[i][j]` (pointer, row stride in bytes) over tile products
/// `kb0..kb0 + kbs` of row panels `a[..MA]` and column panels `b[..NB]`.
///
/// # Safety
/// Tiles configured; the panels hold those products; every `c` tile addresses 16 rows of 16
/// floats.
#[inline(always)]
unsafe fn kernel<const MA: usize, const NB: usize>(
    a: [*const u16; 2],
    b: [*const u32; 2],
    kb0: usize,
    kbs: usize,
    c: [[(*mut f32, usize); 2]; 2],
    load: bool,
) {
    for (ti, row) in c.iter().enumerate().take(MA) {
        for (tj, &(p, s)) in row.iter().enumerate().take(NB) {
            acc_load(2 * ti + tj, p, s, load);
        }
    }
    for kb in kb0..kb0 + kbs {
        for (ti, panel) in a.iter().enumerate().take(MA) {
            operand_load(4 + ti, panel.add(kb * TILE) as *const u8);
        }
        for (tj, panel) in b.iter().enumerate().take(NB) {
            operand_load(6 + tj, panel.add(kb * T * T) as *const u8);
        }
        for ti in 0..MA {
            for tj in 0..NB {
                dot(2 * ti + tj);
            }
        }
    }
    for (ti, row) in c.iter().enumerate().take(MA) {
        for (tj, &(p, s)) in row.iter().enumerate().take(NB) {
            acc_store(2 * ti + tj, p, s);
        }
    }
}

/// Loads accumulator tile `t` from `p` (rows `s` bytes apart), or zeroes it.
#[inline(always)]
unsafe fn acc_load(t: usize, p: *const f32, s: usize, load: bool) {
    macro_rules! one {
        ($tmm:literal) => {
            if load {
                asm!(concat!("tileloadd ", $tmm, ", [{p} + {s}*1]"), p = in(reg) p, s = in(reg) s,
                     options(nostack, readonly));
            } else {
                asm!(concat!("tilezero ", $tmm), options(nostack, nomem));
            }
        };
    }
    match t {
        0 => one!("tmm0"),
        1 => one!("tmm1"),
        2 => one!("tmm2"),
        _ => one!("tmm3"),
    }
}

/// Stores accumulator tile `t` to `p` (rows `s` bytes apart).
#[inline(always)]
unsafe fn acc_store(t: usize, p: *mut f32, s: usize) {
    macro_rules! one {
        ($tmm:literal) => {
            asm!(concat!("tilestored [{p} + {s}*1], ", $tmm), p = in(reg) p, s = in(reg) s,
                 options(nostack))
        };
    }
    match t {
        0 => one!("tmm0"),
        1 => one!("tmm1"),
        2 => one!("tmm2"),
        _ => one!("tmm3"),
    }
}

/// Loads operand tile `t` (4..8) from a packed 1 KiB tile at `p`.
#[inline(always)]
unsafe fn operand_load(t: usize, p: *const u8) {
    macro_rules! one {
        ($tmm:literal) => {
            asm!(concat!("tileloadd ", $tmm, ", [{p} + {s}*1]"), p = in(reg) p, s = in(reg) 64usize,
                 options(nostack, readonly))
        };
    }
    match t {
        4 => one!("tmm4"),
        5 => one!("tmm5"),
        6 => one!("tmm6"),
        _ => one!("tmm7"),
    }
}

/// Accumulator tile `t` `+=` the product of its `A` and `B` operand tiles.
#[inline(always)]
unsafe fn dot(t: usize) {
    match t {
        0 => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
        1 => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
        2 => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
        _ => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
    }
}

/// 16 floats rounded to bf16 as [`super::frozen::round_bf16`] rounds one, each in the high
/// half of its 32-bit lane (low half cleared).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn round(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
    let rounded = _mm512_add_epi32(bits, bias);
    // A NaN stays a (quiet) NaN instead of rounding into the infinities.
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
    let v = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
}

/// 16 floats of `x` from `at` on: a plain load when whole and contiguous, else gathered
/// (zero past `live`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn vector(x: &MatRef<'_>, at: usize, step: usize, live: usize) -> __m512 {
    if live == 16 && step == 1 {
        return _mm512_loadu_ps(x.data[at..at + 16].as_ptr());
    }
    let mut v = [0f32; 16];
    for (q, o) in v.iter_mut().enumerate().take(live) {
        *o = x.data[at + q * step];
    }
    _mm512_loadu_ps(v.as_ptr())
}

/// Rows `i0..i0 + T` of `a` (zero past its rows and columns) as one rounded panel.
///
/// # Safety
/// AVX-512F is available; `out` holds `kbs * TILE` values.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(a: &MatRef<'_>, i0: usize, out: &mut [u16]) {
    let (m, k) = (a.rows, a.cols);
    for r in 0..T {
        let i = i0 + r;
        for kb in 0..k.div_ceil(KB) {
            for half in 0..2 {
                let p = kb * KB + half * 16;
                let live = if i < m { 16.min(k.saturating_sub(p)) } else { 0 };
                let at = if live > 0 { i * a.rs + p * a.cs } else { 0 };
                let bits = round(vector(a, at, a.cs, live));
                let at = (kb * T + r) * KB + half * 16;
                let narrow = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(bits));
                _mm256_storeu_si256(out[at..at + 16].as_mut_ptr().cast(), narrow);
            }
        }
    }
}

/// Columns `j0..j0 + T` of `b` (zero past its rows and columns) as one rounded panel: per
/// tile product, 16 pairs of steps of 16 columns.
///
/// # Safety
/// AVX-512F is available; `out` holds `kbs * T * T` values.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(b: &MatRef<'_>, j0: usize, out: &mut [u32]) {
    let (k, n) = (b.rows, b.cols);
    let cols = T.min(n - j0);
    let row = |p: usize| {
        let live = if p < k { cols } else { 0 };
        let at = if live > 0 { p * b.rs + j0 * b.cs } else { 0 };
        round(vector(b, at, b.cs, live))
    };
    for kb in 0..k.div_ceil(KB) {
        for pair in 0..KB / 2 {
            let p = kb * KB + 2 * pair;
            let (even, odd) = (row(p), row(p + 1));
            let v = _mm512_or_si512(odd, _mm512_srli_epi32::<16>(even));
            let at = (kb * T + pair) * T;
            _mm512_storeu_si512(out[at..at + 16].as_mut_ptr().cast(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::frozen::tests::{check_shapes, SHAPES};
    use crate::backend::cpu::frozen::{round_bf16, FrozenWeight, TrainDtype};
    use crate::backend::cpu::matmul::tests::data;

    #[test]
    fn tile_products_sum_the_rounded_operands() {
        if !available() {
            eprintln!("no AMX-BF16 here: the tile kernels are not exercised");
            return;
        }
        // Deep enough for several passes over `k`, wide and tall enough for several tasks.
        let mut shapes = SHAPES.to_vec();
        shapes.extend([(70, 4200, 300), (300, 64, 33), (5, 0, 7)]);
        check_shapes(&shapes, true, |w| FrozenWeight::new(w, TrainDtype::Bf16));
    }

    #[test]
    fn packing_rounds_as_the_scalar_rounding() {
        if !available() {
            return;
        }
        let mut x = data(64, 9);
        x.extend([f32::NAN, f32::INFINITY, -0.0, f32::MAX, f32::from_bits(0x3F80_8000)]);
        x.extend([f32::from_bits(0x7F80_0001), 1e-40, -3.0e38, 0.1, 7.0, 0.3]);
        for chunk in x.chunks_exact(16) {
            let mut got = [0u32; 16];
            // SAFETY: AVX-512F is available with AMX; `got` holds 16 lanes.
            unsafe {
                let v = round(_mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_si512(got.as_mut_ptr().cast(), v);
            }
            for (g, &v) in got.iter().zip(chunk) {
                let want = round_bf16(v);
                if v.is_nan() {
                    assert!(f32::from_bits(*g).is_nan());
                } else {
                    assert_eq!(*g, want.to_bits(), "{v:e}");
                }
            }
        }
    }
}
