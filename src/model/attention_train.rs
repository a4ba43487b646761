//! Causal attention of a training sample's chunk by GEMMs over the sample's own keys.
//!
//! Inference rows go through `paged_attention`, whose per-query online softmax keeps every
//! row bit-identical between prefill and decode. Training rows need no such match: only that
//! a row's result depends on its sample alone (never on the batch or thread count), which
//! plain GEMMs over the gathered keys give, at GEMM speed. The scores and softmax are the
//! same operations `attention_backward` recomputes, so the backward's `P` equals this `P`.

use rayon::prelude::*;

use super::activations::Capture;
use crate::backend::cpu::gemm::{gemm_serial, MatRef};
use crate::backend::cpu::paged_attention::{paged_attention, AttnSeq, AttnShape};
use crate::backend::cpu::{exp_shifted, max, scratch};
use crate::kv::KvLayer;

/// Query rows per task: the task's `QTILE x keys` scores stay in L2.
const QTILE: usize = 64;

/// A batch's sequences split into training chunks (those a capture saves), attended here,
/// and the rest, attended by `paged_attention`.
pub struct BatchAttention<'a, 'c> {
    paged: Vec<AttnSeq<'a>>,
    /// Each chunk with its sample's cache slots (positions `0..context_len` are read).
    chunks: Vec<(AttnSeq<'a>, &'c [usize])>,
}

impl<'a, 'c> BatchAttention<'a, 'c> {
    pub fn new(seqs: &[AttnSeq<'a>], captures: &[Capture<'c>]) -> Self {
        let (mut paged, mut chunks) = (Vec::new(), Vec::new());
        for s in seqs {
            let capture = captures.iter().find(|c| {
                c.rows.start == s.q_start
                    && c.rows.len() == s.q_len
                    && c.first_pos + s.q_len == s.context_len
                    && c.slots.len() >= s.context_len
            });
            match capture {
                Some(c) => chunks.push((*s, &c.slots[..s.context_len])),
                None => paged.push(*s),
            }
        }
        Self { paged, chunks }
    }

    /// Attention of every sequence of the batch: `q`, `out` `[tokens, heads, head_dim]`.
    pub fn attend(&self, layer: KvLayer<'_>, q: &[f32], shape: &AttnShape, out: &mut [f32]) {
        if !self.paged.is_empty() {
            match layer {
                KvLayer::F32(kc, vc) => paged_attention(q, kc, vc, &self.paged, shape, out),
                KvLayer::F16(kc, vc) => paged_attention(q, kc, vc, &self.paged, shape, out),
            }
        }
        let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let q_row = nh * hd;
        for (s, slots) in &self.chunks {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            layer.gather(slots, nkv * hd, &mut k, &mut v);
            let rows = s.q_start * q_row..(s.q_start + s.q_len) * q_row;
            let a = ChunkAttention {
                q: &q[rows.clone()],
                k: &k,
                v: &v,
                first_pos: s.context_len - s.q_len,
                rows: s.q_len,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: shape.scale,
            };
            chunk_attention(&a, &mut out[rows]);
        }
    }
}

/// One chunk of one sample: query rows at positions `first_pos..first_pos + rows`, keys and
/// values of positions `0..first_pos + rows`.
pub struct ChunkAttention<'a> {
    /// `[rows, heads, head_dim]`.
    pub q: &'a [f32],
    /// `[first_pos + rows, kv_heads, head_dim]` each.
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub first_pos: usize,
    pub rows: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Writes `softmax(s·Q Kᵀ, causal) V` of every query row and head into `out`
/// (`[rows, heads, head_dim]`).
pub fn chunk_attention(a: &ChunkAttention<'_>, out: &mut [f32]) {
    let (nh, hd) = (a.num_heads, a.head_dim);
    let group = nh / a.num_kv_heads.max(1);
    let q_row = nh * hd;
    let tiles = a.rows.div_ceil(QTILE);
    let kt = transpose_heads(a.k, a.first_pos + a.rows, a.num_kv_heads, hd);
    let results: Vec<Vec<f32>> = (0..nh * tiles)
        .into_par_iter()
        .map(|task| {
            let (h, tile) = (task / tiles, task % tiles);
            head_tile(a, &kt, h, h / group.max(1), tile * QTILE)
        })
        .collect();
    for (task, o) in results.iter().enumerate() {
        let (h, i0) = (task / tiles, (task % tiles) * QTILE);
        for (r, src) in o.chunks_exact(hd).enumerate() {
            let at = (i0 + r) * q_row + h * hd;
            out[at..at + hd].copy_from_slice(src);
        }
    }
}

/// `x [len, heads, head_dim]` as `[heads, head_dim, len]`: a head's keys (or values) with
/// positions along rows, so the products over them read it in place instead of packing a
/// transposed copy for every tile. (Packed or in place, a product computes the same bits.)
pub(super) fn transpose_heads(x: &[f32], len: usize, heads: usize, hd: usize) -> Vec<f32> {
    let mut t = vec![0f32; heads * hd * len];
    for (pos, row) in x.chunks_exact(heads * hd).take(len).enumerate() {
        for (d, v) in row.iter().enumerate() {
            t[d * len + pos] = *v;
        }
    }
    t
}

/// Head `h`'s `[head_dim, len]` block of a [`transpose_heads`] result, its first `cols`
/// positions.
pub(super) fn head_rows_t(t: &[f32], h: usize, hd: usize, len: usize, cols: usize) -> MatRef<'_> {
    MatRef { data: &t[h * hd * len..(h + 1) * hd * len], rows: hd, cols, rs: len, cs: 1 }
}

thread_local! {
    static SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static WEIGHTS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Query head `h` (reading kv head `kvh`, whose keys `kt` holds transposed) for chunk rows
/// `i0..i0 + QTILE`: `[rows, head_dim]`.
fn head_tile(a: &ChunkAttention<'_>, kt: &[f32], h: usize, kvh: usize, i0: usize) -> Vec<f32> {
    let hd = a.head_dim;
    let (q_row, kv_row) = (a.num_heads * hd, a.num_kv_heads * hd);
    let rows = QTILE.min(a.rows - i0);
    let len = a.first_pos + a.rows;
    // The tile's last query sees every key any of its rows sees.
    let keys = a.first_pos + i0 + rows;
    let q_t = MatRef::columns(&a.q[i0 * q_row..], rows, q_row, h * hd, hd);
    let v_all = MatRef::columns(a.v, keys, kv_row, kvh * hd, hd);
    let mut o = vec![0f32; rows * hd];
    scratch::with(&SCORES, rows * keys, |s| {
        scratch::with(&WEIGHTS, rows * keys, |p| {
            gemm_serial(a.scale, q_t, head_rows_t(kt, kvh, hd, len, keys), false, s, keys);
            for (r, (srow, prow)) in s.chunks_exact(keys).zip(p.chunks_exact_mut(keys)).enumerate()
            {
                let seen = a.first_pos + i0 + r + 1;
                let (ssrc, pdst) = (&srow[..seen], &mut prow[..seen]);
                let max = max(ssrc);
                let inv = (1.0 / exp_shifted(ssrc, max, 1.0, pdst)) as f32;
                pdst.iter_mut().for_each(|x| *x *= inv);
                prow[seen..].fill(0.0);
            }
            gemm_serial(1.0, MatRef::new(p, rows, keys), v_all, false, &mut o, hd);
        })
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one query row by its definition, in f64.
    fn reference(a: &ChunkAttention<'_>, r: usize, h: usize) -> Vec<f64> {
        let hd = a.head_dim;
        let kvh = h / (a.num_heads / a.num_kv_heads);
        let (q_row, kv_row) = (a.num_heads * hd, a.num_kv_heads * hd);
        let q = &a.q[r * q_row + h * hd..][..hd];
        let keys = a.first_pos + r + 1;
        let s: Vec<f64> = (0..keys)
            .map(|j| {
                let k = &a.k[j * kv_row + kvh * hd..][..hd];
                a.scale as f64 * q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>()
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (0..keys).map(|j| e[j] / z * a.v[j * kv_row + kvh * hd + d] as f64).sum())
            .collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(97));
                ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_chunks_anywhere_in_the_sample() {
        let (nh, nkv, hd) = (6, 2, 8);
        // Chunks that start at 0, mid-tile and past one tile, shorter and longer than a tile.
        for (first_pos, rows) in [(0, 1), (0, 70), (5, 3), (37, 130), (100, 1)] {
            let len = first_pos + rows;
            let (q, k, v) =
                (values(rows * nh * hd, 1), values(len * nkv * hd, 2), values(len * nkv * hd, 3));
            let a = ChunkAttention {
                q: &q,
                k: &k,
                v: &v,
                first_pos,
                rows,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 0.35,
            };
            let mut out = vec![f32::NAN; rows * nh * hd];
            chunk_attention(&a, &mut out);
            for r in 0..rows {
                for h in 0..nh {
                    let want = reference(&a, r, h);
                    let got = &out[(r * nh + h) * hd..][..hd];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "chunk at {first_pos}+{rows}, row {r} head {h}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A row's result depends only on its sample: the same row computed in a chunk of one or
    /// inside a long chunk has the same bits.
    #[test]
    fn a_row_does_not_depend_on_its_chunk() {
        let (nh, nkv, hd, len) = (4, 2, 16, 90);
        let (q, k, v) =
            (values(len * nh * hd, 4), values(len * nkv * hd, 5), values(len * nkv * hd, 6));
        let whole = |first_pos: usize, rows: usize| {
            let a = ChunkAttention {
                q: &q[first_pos * nh * hd..(first_pos + rows) * nh * hd],
                k: &k,
                v: &v,
                first_pos,
                rows,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 0.25,
            };
            let mut out = vec![0f32; rows * nh * hd];
            chunk_attention(&a, &mut out);
            out
        };
        let all = whole(0, len);
        for (first_pos, rows) in [(0, 7), (7, 1), (63, 27), (89, 1)] {
            let part = whole(first_pos, rows);
            assert_eq!(part, all[first_pos * nh * hd..(first_pos + rows) * nh * hd]);
        }
    }
}
