//! Backward of causal attention over one training sample, recomputing softmax from the saved
//! queries and the sample's keys (flash-attention style): no `tokens²` matrix is kept between
//! the forward and the backward.

use rayon::prelude::*;

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

/// Gradients w.r.t. the (rotated) queries, keys and values: `(dq, dk, dv)`.
pub fn attention_backward(a: &AttnBackwardInput<'_>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, nh, nkv, hd) = (a.len, a.num_heads, a.num_kv_heads, a.head_dim);
    let group = nh / nkv.max(1);
    let (q_row, kv_row) = (nh * hd, nkv * hd);
    // Each kv head's group of query heads is independent: one task per kv head, each writing
    // its own columns, merged afterwards in a fixed order.
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nkv)
        .into_par_iter()
        .map(|kvh| {
            let mut dq = vec![0f32; t * group * hd];
            let mut dk = vec![0f32; t * hd];
            let mut dv = vec![0f32; t * hd];
            let mut p = vec![0f32; t];
            let key = |j: usize| &a.k[j * kv_row + kvh * hd..j * kv_row + (kvh + 1) * hd];
            let val = |j: usize| &a.v[j * kv_row + kvh * hd..j * kv_row + (kvh + 1) * hd];
            for gh in 0..group {
                let h = kvh * group + gh;
                for i in 0..t {
                    let qi = &a.q[i * q_row + h * hd..i * q_row + (h + 1) * hd];
                    let oi = &a.o[i * q_row + h * hd..i * q_row + (h + 1) * hd];
                    let doi = &a.d_o[i * q_row + h * hd..i * q_row + (h + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (j, pj) in p[..=i].iter_mut().enumerate() {
                        *pj = a.scale * dot(qi, key(j));
                        max = max.max(*pj);
                    }
                    let mut sum = 0f32;
                    for pj in &mut p[..=i] {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    let inv = 1.0 / sum;
                    let d_i = dot(doi, oi);
                    let dqi = &mut dq[(i * group + gh) * hd..(i * group + gh + 1) * hd];
                    for (j, &pj) in p[..=i].iter().enumerate() {
                        let pj = pj * inv;
                        let ds = pj * (dot(doi, val(j)) - d_i) * a.scale;
                        axpy(dqi, ds, key(j));
                        axpy(&mut dk[j * hd..(j + 1) * hd], ds, qi);
                        axpy(&mut dv[j * hd..(j + 1) * hd], pj, doi);
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; t * q_row];
    let mut dk = vec![0f32; t * kv_row];
    let mut dv = vec![0f32; t * kv_row];
    for (kvh, (hq, hk, hv)) in per_head.iter().enumerate() {
        for i in 0..t {
            let q0 = i * q_row + kvh * group * hd;
            dq[q0..q0 + group * hd].copy_from_slice(&hq[i * group * hd..(i + 1) * group * hd]);
            let k0 = i * kv_row + kvh * hd;
            dk[k0..k0 + hd].copy_from_slice(&hk[i * hd..(i + 1) * hd]);
            dv[k0..k0 + hd].copy_from_slice(&hv[i * hd..(i + 1) * hd]);
        }
    }
    (dq, dk, dv)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}
