//! Q8_0 weights (ggml's layout: blocks of 32 int8 with one f16 scale, 34 bytes for 32 weights)
//! quantized at load, multiplied with f32 activations.
//!
//! Each output is `Σ_blocks d_b · (Σ_{t<32} x_t · q_t)`: the block sum runs over eight lanes in
//! a fixed order, is scaled by the block's scale and added to the lane accumulators, which are
//! summed pairwise at the end. The order depends on nothing but `k`, so a row's result does not
//! depend on the batch size or the thread count. A row whose length is not a multiple of 32 ends
//! in a zero-padded block whose real elements are summed one by one.

use half::f16;

use super::matmul::{hsum8, par_row_tasks, OutView};

/// Weights per block.
pub const QK8_0: usize = 32;

/// One block: scale (f16 bits) and 32 signed 8-bit weights; the weight is `qs[t] * d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// Blocks per row of `cols` weights (the last one zero-padded).
pub fn q8_0_blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(QK8_0)
}

/// Quantizes `[rows, cols]` f32 weights row by row as ggml's `quantize_row_q8_0` does.
pub fn quantize_q8_0(data: &[f32], rows: usize, cols: usize) -> Vec<BlockQ8_0> {
    assert_eq!(data.len(), rows * cols, "quantize_q8_0 shape"); // ok: caller bug
    let bpr = q8_0_blocks_per_row(cols);
    let mut out = Vec::with_capacity(rows * bpr);
    for row in data.chunks_exact(cols.max(1)).take(rows) {
        for chunk in row.chunks(QK8_0) {
            let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK8_0];
            for (q, v) in qs.iter_mut().zip(chunk) {
                *q = (v * id).round() as i8;
            }
            out.push(BlockQ8_0 { d: f16::from_f32(d).to_bits(), qs });
        }
    }
    out
}

/// The f32 weights of one row (`out.len()` is the row length).
pub fn dequantize_row_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    for (chunk, b) in out.chunks_mut(QK8_0).zip(blocks) {
        let d = f16::from_bits(b.d).to_f32();
        for (o, q) in chunk.iter_mut().zip(b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// Activation rows per register tile: converting a weight block to f32 is shared by them.
const TILE_M: usize = 3;
/// Weight rows per register tile.
const TILE_N: usize = 2;

/// `out = x[m, k] · w[n, k]ᵀ` with Q8_0 weights (`w` holds `n` rows of
/// `q8_0_blocks_per_row(k)` blocks).
pub fn matmul_t_q8_0(x: &[f32], w: &[BlockQ8_0], m: usize, k: usize, n: usize, out: OutView<'_>) {
    let bpr = q8_0_blocks_per_row(k);
    assert!(
        x.len() >= m * k && w.len() >= n * bpr && out.rows() == m && out.cols() == n,
        "matmul_t_q8_0 shapes"
    ); // ok: caller bug
    if m == 0 {
        return;
    }
    par_row_tasks(n, |j0, j1| {
        #[cfg(target_arch = "x86_64")]
        if has_simd() {
            // SAFETY: AVX2, FMA and F16C are available; shapes were checked above.
            unsafe { avx2::task(x, w, m, k, j0, j1, &out) };
            return;
        }
        portable_task(x, w, m, k, j0, j1, &out);
    });
}

#[cfg(target_arch = "x86_64")]
fn has_simd() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        super::matmul::has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// The tiling of weight rows `j0..j1` against all rows of `x`, shared by both paths.
macro_rules! tiled_task {
    ($tile:ident, $x:expr, $w:expr, $m:expr, $k:expr, $j0:expr, $j1:expr, $out:expr) => {{
        let (x, w, m, k, out) = ($x, $w, $m, $k, $out);
        let bpr = q8_0_blocks_per_row(k);
        let mut j = $j0;
        while j < $j1 {
            let cols = TILE_N.min($j1 - j);
            let wt = &w[j * bpr..(j + cols) * bpr];
            let mut i = 0;
            while i < m {
                let rows = TILE_M.min(m - i);
                let xs = &x[i * k..(i + rows) * k];
                let mut acc = [[0f32; TILE_N]; TILE_M];
                match (rows, cols) {
                    (TILE_M, TILE_N) => $tile::<TILE_M, TILE_N>(xs, wt, k, &mut acc),
                    (_, TILE_N) => {
                        for r in 0..rows {
                            $tile::<1, TILE_N>(&xs[r * k..], wt, k, &mut acc[r..r + 1]);
                        }
                    }
                    _ => {
                        for r in 0..rows {
                            for c in 0..cols {
                                let wc = &wt[c * bpr..(c + 1) * bpr];
                                let mut one = [[0f32; 1]; 1];
                                $tile::<1, 1>(&xs[r * k..], wc, k, &mut one);
                                acc[r][c] = one[0][0];
                            }
                        }
                    }
                }
                for (r, row) in acc.iter().take(rows).enumerate() {
                    for (c, v) in row.iter().take(cols).enumerate() {
                        // SAFETY: row i + r < m, column j + c in this task's own range.
                        unsafe { out.write(i + r, j + c, *v) };
                    }
                }
                i += rows;
            }
            j += cols;
        }
    }};
}

fn portable_task(
    x: &[f32],
    w: &[BlockQ8_0],
    m: usize,
    k: usize,
    j0: usize,
    j1: usize,
    out: &OutView<'_>,
) {
    tiled_task!(portable_tile, x, w, m, k, j0, j1, out)
}

/// `R x C` outputs; `x` holds `R` rows of `k`, `w` holds `C` rows of blocks. Fills `out[..R]`.
fn portable_tile<const R: usize, const C: usize>(
    x: &[f32],
    w: &[BlockQ8_0],
    k: usize,
    out: &mut [[f32; C]],
) {
    let bpr = q8_0_blocks_per_row(k);
    let full = k / QK8_0;
    for (r, orow) in out.iter_mut().take(R).enumerate() {
        let xr = &x[r * k..(r + 1) * k];
        for (c, o) in orow.iter_mut().enumerate() {
            let wr = &w[c * bpr..(c + 1) * bpr];
            let mut acc = [0f32; 8];
            for (b, blk) in wr.iter().take(full).enumerate() {
                let xb = &xr[b * QK8_0..(b + 1) * QK8_0];
                let mut s = [0f32; 8];
                for part in 0..4 {
                    for l in 0..8 {
                        s[l] += xb[part * 8 + l] * blk.qs[part * 8 + l] as f32;
                    }
                }
                let d = f16::from_bits(blk.d).to_f32();
                for l in 0..8 {
                    acc[l] += s[l] * d;
                }
            }
            let mut total = hsum8(&acc);
            if full < bpr {
                let blk = &wr[full];
                let mut s = 0f32;
                for (xv, q) in xr[full * QK8_0..].iter().zip(blk.qs) {
                    s += xv * q as f32;
                }
                total += s * f16::from_bits(blk.d).to_f32();
            }
            *o = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{q8_0_blocks_per_row, BlockQ8_0, OutView, QK8_0, TILE_M, TILE_N};

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn task(
        x: &[f32],
        w: &[BlockQ8_0],
        m: usize,
        k: usize,
        j0: usize,
        j1: usize,
        out: &OutView<'_>,
    ) {
        tiled_task!(tile, x, w, m, k, j0, j1, out)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale(d: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen8(q: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q as *const __m128i)))
    }

    /// Bytes ahead of the current weight block to prefetch (see `matmul.rs`).
    const PREFETCH: usize = 1024;

    /// As `portable_tile`, with fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        w: &[BlockQ8_0],
        k: usize,
        out: &mut [[f32; C]],
    ) {
        let bpr = q8_0_blocks_per_row(k);
        let full = k / QK8_0;
        debug_assert!(x.len() >= R * k && w.len() >= C * bpr && out.len() >= R);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..full {
            for j in 0..C {
                let blk = &*wp.add(j * bpr + b);
                _mm_prefetch::<_MM_HINT_T0>(
                    (blk as *const BlockQ8_0 as *const i8).wrapping_add(PREFETCH),
                );
                let q = blk.qs.as_ptr();
                let (w0, w1, w2, w3) =
                    (widen8(q), widen8(q.add(8)), widen8(q.add(16)), widen8(q.add(24)));
                let d = _mm256_set1_ps(scale(blk.d));
                for (r, accr) in acc.iter_mut().enumerate() {
                    let xb = xp.add(r * k + b * QK8_0);
                    let mut s = _mm256_mul_ps(_mm256_loadu_ps(xb), w0);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(8)), w1, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(16)), w2, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(24)), w3, s);
                    accr[j] = _mm256_fmadd_ps(s, d, accr[j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..C {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
                let mut total = super::hsum8(&lanes);
                if full < bpr {
                    let blk = &*wp.add(j * bpr + full);
                    let mut s = 0f32;
                    for t in 0..k - full * QK8_0 {
                        s = (*xp.add(r * k + full * QK8_0 + t)).mul_add(blk.qs[t] as f32, s);
                    }
                    total = s.mul_add(scale(blk.d), total);
                }
                out[r][j] = total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::{assert_batch_invariant, assert_close, data};

    fn dequantized(w: &[BlockQ8_0], n: usize, k: usize) -> Vec<f32> {
        let bpr = q8_0_blocks_per_row(k);
        let mut out = vec![0f32; n * k];
        for (j, row) in out.chunks_exact_mut(k).enumerate() {
            dequantize_row_q8_0(&w[j * bpr..(j + 1) * bpr], row);
        }
        out
    }

    fn mm(x: &[f32], w: &[BlockQ8_0], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        matmul_t_q8_0(x, w, m, k, n, OutView::new(&mut out, m, n));
        out
    }

    #[test]
    fn quantization_matches_ggml_layout_and_error_bound() {
        let (rows, cols) = (5, 96);
        let src = data(rows * cols, 11);
        let ours = quantize_q8_0(&src, rows, cols);
        let t = candle_core::Tensor::from_vec(src.clone(), (rows, cols), &candle_core::Device::Cpu);
        let t = t.expect("tensor"); // ok: test setup
        let q =
            candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q8_0);
        let theirs = q.and_then(|q| q.data().map(|d| d.to_vec())).expect("candle Q8_0"); // ok: test
        let bytes: Vec<u8> = ours
            .iter()
            .flat_map(|b| b.d.to_le_bytes().into_iter().chain(b.qs.iter().map(|q| *q as u8)))
            .collect();
        assert_eq!(bytes, theirs, "same bytes as ggml's Q8_0");
        let back = dequantized(&ours, rows, cols);
        for (row, brow) in src.chunks(cols).zip(back.chunks(cols)) {
            for (chunk, bchunk) in row.chunks(QK8_0).zip(brow.chunks(QK8_0)) {
                let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in chunk.iter().zip(bchunk) {
                    // Half a step, plus the scale's rounding to f16 (2^-11 relative) over 127 steps.
                    assert!((a - b).abs() <= amax / 127.0 * 0.5 + amax / 2048.0, "{a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_dequantized_weights() {
        for &(m, k, n) in &[(1, 32, 1), (3, 13, 7), (5, 64, 37), (17, 100, 33), (4, 576, 70)] {
            let x = data(m * k, 1);
            let w = quantize_q8_0(&data(n * k, 2), n, k);
            assert_eq!(w.len(), n * q8_0_blocks_per_row(k));
            let got = mm(&x, &w, m, k, n);
            assert_close(&got, &x, &dequantized(&w, n, k), m, k, n);
        }
    }

    #[test]
    fn portable_path_agrees_closely() {
        let (m, k, n) = (4, 200, 9);
        let x = data(m * k, 1);
        let w = quantize_q8_0(&data(n * k, 2), n, k);
        let got = mm(&x, &w, m, k, n);
        let mut portable = vec![0f32; m * n];
        portable_task(&x, &w, m, k, 0, n, &OutView::new(&mut portable, m, n));
        for (a, b) in got.iter().zip(&portable) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        for (k, n) in [(128, 41), (77, 9)] {
            let w = quantize_q8_0(&data(n * k, 4), n, k);
            assert_batch_invariant(k, n, |x, m, out| {
                matmul_t_q8_0(x, &w, m, k, n, OutView::new(out, m, n))
            });
        }
    }
}
