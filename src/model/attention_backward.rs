//! Backward of causal attention over one training sample, recomputing softmax from the saved
//! queries and the sample's keys (flash-attention style): no `tokens²` matrix is kept between
//! the forward and the backward, and the backward itself holds one `QTILE x tokens` block of
//! scores per query head at a time.
//!
//! Each query head is one parallel task; its query tiles run in order, so every key's and
//! value's gradient sums the tiles in the same order whatever the thread count, and the heads
//! of a GQA group are added in head order afterwards.

use rayon::prelude::*;

use super::attention_train::{head_rows_t, transpose_heads};
use crate::backend::cpu::gemm::{gemm_serial, MatRef};
use crate::backend::cpu::{exp_shifted, max, scratch};

/// Query rows per tile: the tile's score block (`QTILE x tokens`) stays in L2 for the
/// sequence lengths fine-tuning uses, and the GEMMs over it are large enough to run well.
const QTILE: usize = 64;

/// One sample's attention tensors, every position `0..len`, row-major:
/// `q`, `o`, `d_o`: `[len, heads, head_dim]`; `k`, `v`: `[len, kv_heads, head_dim]`.
pub struct AttnBackwardInput<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub o: &'a [f32],
    pub d_o: &'a [f32],
    pub len: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One query head's gradients, `[len, head_dim]` each.
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Gradients w.r.t. the (rotated) queries, keys and values: `(dq, dk, dv)`.
pub fn attention_backward(a: &AttnBackwardInput<'_>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, q_dim, kv_dim) = (a.len, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let row = q_dim + 2 * kv_dim;
    let mut d_qkv = vec![0f32; t * row];
    attention_backward_into(a, &mut d_qkv);
    let part = |from: usize, width: usize| -> Vec<f32> {
        d_qkv.chunks_exact(row).flat_map(|r| r[from..from + width].iter().copied()).collect()
    };
    (part(0, q_dim), part(q_dim, kv_dim), part(q_dim + kv_dim, kv_dim))
}

/// As [`attention_backward`], into the rows of `d_qkv` (`[len, q | k | v]`, overwritten).
pub fn attention_backward_into(a: &AttnBackwardInput<'_>, d_qkv: &mut [f32]) {
    let (t, nh, nkv, hd) = (a.len, a.num_heads, a.num_kv_heads, a.head_dim);
    let group = nh / nkv.max(1);
    let (q_row, kv_row) = (nh * hd, nkv * hd);
    let row = q_row + 2 * kv_row;
    // Keys and values with positions along rows, read in place by every tile of every head.
    let (kt, vt) = (transpose_heads(a.k, t, nkv, hd), transpose_heads(a.v, t, nkv, hd));
    let per_head: Vec<HeadGrads> = (0..nh)
        .into_par_iter()
        .map(|h| head_backward(a, (&kt, &vt), h, h / group.max(1)))
        .collect();
    for r in d_qkv.chunks_exact_mut(row).take(t) {
        r[q_row..].fill(0.0);
    }
    for (h, g) in per_head.iter().enumerate() {
        let kvh = h / group.max(1);
        for (i, r) in d_qkv.chunks_exact_mut(row).take(t).enumerate() {
            r[h * hd..(h + 1) * hd].copy_from_slice(&g.dq[i * hd..(i + 1) * hd]);
            let k0 = q_row + kvh * hd;
            let (src_k, src_v) = (&g.dk[i * hd..(i + 1) * hd], &g.dv[i * hd..(i + 1) * hd]);
            r[k0..k0 + hd].iter_mut().zip(src_k).for_each(|(d, s)| *d += s);
            let v0 = k0 + kv_row;
            r[v0..v0 + hd].iter_mut().zip(src_v).for_each(|(d, s)| *d += s);
        }
    }
}

thread_local! {
    static WEIGHTS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static D_SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Query head `h` (reading kv head `kvh` of the transposed keys and values), tile by tile:
/// `S = s·Q Kᵀ`, `P = softmax(S)` (causal), `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
/// `dQ = s·dS K`, `dK += s·dSᵀ Q`, `dV += Pᵀ dO`.
fn head_backward(
    a: &AttnBackwardInput<'_>,
    (kt, vt): (&[f32], &[f32]),
    h: usize,
    kvh: usize,
) -> HeadGrads {
    let (t, hd) = (a.len, a.head_dim);
    let mut g =
        HeadGrads { dq: vec![0f32; t * hd], dk: vec![0f32; t * hd], dv: vec![0f32; t * hd] };
    let mut scores = vec![0f32; t];
    scratch::with(&WEIGHTS, QTILE * t, |p| {
        scratch::with(&D_SCORES, QTILE * t, |dp| {
            for i0 in (0..t).step_by(QTILE) {
                let rows = QTILE.min(t - i0);
                tile_backward(a, (kt, vt), (h, kvh), (i0, rows), (p, dp, &mut scores), &mut g);
            }
        })
    });
    g
}

/// Rows `i0..i0 + rows` of [`head_backward`], adding into `g`.
fn tile_backward(
    a: &AttnBackwardInput<'_>,
    (kt, vt): (&[f32], &[f32]),
    (h, kvh): (usize, usize),
    (i0, rows): (usize, usize),
    (p, dp, scores): (&mut [f32], &mut [f32], &mut [f32]),
    g: &mut HeadGrads,
) {
    let (t, hd) = (a.len, a.head_dim);
    let (q_row, kv_row) = (a.num_heads * hd, a.num_kv_heads * hd);
    // Keys 0..i0 + rows are all any query of the tile sees.
    let keys = i0 + rows;
    let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
    let q_t = MatRef::columns(&a.q[i0 * q_row..], rows, q_row, h * hd, hd);
    let do_t = MatRef::columns(&a.d_o[i0 * q_row..], rows, q_row, h * hd, hd);
    let k_all = MatRef::columns(a.k, keys, kv_row, kvh * hd, hd);
    gemm_serial(a.scale, q_t, head_rows_t(kt, kvh, hd, t, keys), false, p, keys);
    gemm_serial(1.0, do_t, head_rows_t(vt, kvh, hd, t, keys), false, dp, keys);
    for r in 0..rows {
        let i = i0 + r;
        let (prow, dprow) = (&mut p[r * keys..(r + 1) * keys], &mut dp[r * keys..(r + 1) * keys]);
        let (seen, masked) = prow.split_at_mut(i + 1);
        let max = max(seen);
        let src = &mut scores[..=i];
        src.copy_from_slice(seen);
        let inv = (1.0 / exp_shifted(src, max, 1.0, seen)) as f32;
        masked.fill(0.0);
        let oi = &a.o[i * q_row + h * hd..i * q_row + (h + 1) * hd];
        let doi = &a.d_o[i * q_row + h * hd..i * q_row + (h + 1) * hd];
        let d_i: f32 = oi.iter().zip(doi).map(|(x, y)| x * y).sum();
        for (pj, dpj) in seen.iter_mut().zip(dprow.iter_mut()) {
            *pj *= inv;
            // dS, kept in the dP buffer.
            *dpj = *pj * (*dpj - d_i);
        }
        dprow[i + 1..].fill(0.0);
    }
    let p_m = MatRef::new(p, rows, keys);
    let ds_m = MatRef::new(dp, rows, keys);
    gemm_serial(a.scale, ds_m, k_all, false, &mut g.dq[i0 * hd..], hd);
    gemm_serial(a.scale, ds_m.t(), q_t, true, &mut g.dk, hd);
    gemm_serial(1.0, p_m.t(), do_t, true, &mut g.dv, hd);
}
