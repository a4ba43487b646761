//! The CPU twin of each CUDA kernel: the CPU path's own function where one exists, applied to
//! the same bf16-rounded inputs and rounded where the kernel stores bf16, so a kernel and its
//! twin differ only by fp32 summation order and `expf` flavour.

use half::bf16;

use crate::backend::cpu::paged_attention::{paged_attention, AttnSeq, AttnShape};
use crate::lora::dropout::{apply_dropout, SampleDropout};

thread_local! {
    static EXACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's twin roundings off: the device's sequence of operations in
/// plain f32, so a composition of them (a training step) can be checked exactly against an
/// f32 oracle, apart from the bf16 error the device adds on purpose.
pub fn without_rounding<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXACT.set(self.0);
        }
    }
    let _restore = Restore(EXACT.replace(true));
    f()
}

/// Turns this thread's twin roundings off for good (a thread that runs nothing else, such as
/// an engine thread in a test whose device model is the twins).
pub fn stop_rounding_on_this_thread() {
    EXACT.set(true);
}

/// Rounds to the nearest bf16, as the device stores activations (unless this thread runs
/// [`without_rounding`]).
pub fn round_bf16(x: f32) -> f32 {
    if EXACT.get() {
        return x;
    }
    bf16::from_f32(x).to_f32()
}

pub fn round_all(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round_bf16(*v));
}

/// `rms_norm_bf16`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    crate::model::llama::rms_norm(x, w, eps, &mut out);
    round_all(&mut out);
    out
}

/// `add_rms_norm_bf16`: updates `residual` and returns the normalised rows.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    residual.iter_mut().zip(x).for_each(|(r, v)| *r = round_bf16(*r + v));
    rms_norm(residual, w, eps)
}

/// Shapes of `rope_kv_write_bf16`.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The q, k and v parts of `tokens` rows of a fused q/k/v projection (`q_dim + 2 kv_dim` wide).
pub fn split_qkv(
    qkv: &[f32],
    tokens: usize,
    q_dim: usize,
    kv_dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = q_dim + 2 * kv_dim;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in qkv[..tokens * width].chunks_exact(width) {
        q.extend_from_slice(&row[..q_dim]);
        k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
        v.extend_from_slice(&row[q_dim + kv_dim..]);
    }
    (q, k, v)
}

/// `rope_kv_write_bf16` (on q, k and v split from the fused rows): rotates `q` and `k` in place
/// and writes k and v rows to their slots.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    cos: &[f32],
    sin: &[f32],
    slots: &[i64],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    s: RopeShape,
    bias: Option<&[f32]>,
) {
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let (q_row, kv_row) = (s.num_heads * hd, s.num_kv_heads * hd);
    let add = |x: &mut [f32], b: Option<&[f32]>| {
        if let Some(b) = b {
            x.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
    };
    let (qb, kb, vb) = match bias {
        Some(b) => (
            Some(&b[..q_row]),
            Some(&b[q_row..q_row + kv_row]),
            Some(&b[q_row + kv_row..q_row + 2 * kv_row]),
        ),
        None => (None, None, None),
    };
    for (t, &slot) in slots.iter().enumerate() {
        let (c, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        let qs = &mut q[t * q_row..(t + 1) * q_row];
        add(qs, qb);
        let ks = &mut k[t * kv_row..(t + 1) * kv_row];
        add(ks, kb);
        for head in qs.chunks_exact_mut(hd).chain(ks.chunks_exact_mut(hd)) {
            crate::model::llama::apply_rope(head, c, sn);
            round_all(head);
        }
        if let Ok(slot) = usize::try_from(slot) {
            k_cache[slot * kv_row..(slot + 1) * kv_row].copy_from_slice(ks);
            let vd = &mut v_cache[slot * kv_row..(slot + 1) * kv_row];
            vd.copy_from_slice(&v[t * kv_row..(t + 1) * kv_row]);
            if vb.is_some() {
                add(vd, vb);
                round_all(vd);
            }
        }
    }
}

/// `silu_mul_bf16`.
pub fn silu_mul(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    crate::model::llama::silu_mul(gate_up, inter, &mut out);
    round_all(&mut out);
    out
}

/// `rms_norm_backward_f32`: adds the input gradient of `rms_norm(x) * w` to `dx`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    crate::model::backward::rms_norm_backward(x, w, eps, dy, dx);
}

/// `silu_mul_backward_f32`.
pub fn silu_mul_backward(gate_up: &[f32], d_act: &[f32], inter: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len()];
    crate::model::backward::silu_mul_backward(gate_up, d_act, inter, &mut out);
    out
}

/// `rope_backward_f32`: rotates the q and k heads of each `stride`-wide row by −angle.
pub fn rope_backward(d_qkv: &mut [f32], stride: usize, cos: &[f32], sin: &[f32], s: RopeShape) {
    let half = s.head_dim / 2;
    let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
    for (t, row) in d_qkv.chunks_exact_mut(stride).enumerate() {
        let (c, sn) = (&cos[t * half..(t + 1) * half], &neg_sin[t * half..(t + 1) * half]);
        for head in row[..(s.num_heads + s.num_kv_heads) * s.head_dim].chunks_exact_mut(s.head_dim)
        {
            crate::model::llama::apply_rope(head, c, sn);
        }
    }
}

/// `embedding_bf16`: rows of `table`, zeros for an id outside it.
pub fn embedding(ids: &[u32], table: &[f32], hidden: usize) -> Vec<f32> {
    let vocab = table.len() / hidden;
    let mut out = vec![0f32; ids.len() * hidden];
    for (o, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        if (id as usize) < vocab {
            o.copy_from_slice(&table[id as usize * hidden..(id as usize + 1) * hidden]);
        }
    }
    out
}

/// `paged_attention_partial_bf16` + `paged_attention_combine_bf16`.
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    paged_attention(q, k_cache, v_cache, seqs, shape, &mut out);
    round_all(&mut out);
    out
}

/// `attention_chunk_tiled`: one sequence's `rows` consecutive rows from position `pos0`, each
/// attending to keys `0..=` its position through `block_table`, written out directly. As the
/// kernel does, it walks the keys in tiles of 32 with a running maximum per row, rounds each
/// tile's `exp(s − max)` to bf16 for the sum with V (the row's sum of them stays unrounded),
/// and rounds the output to bf16. Sums in f64.
pub fn attention_chunk_bf16(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    block_table: &[u32],
    pos0: usize,
    shape: &AttnShape,
) -> Vec<f32> {
    const TILE: usize = 32;
    let (nh, nkv, hd, bs) = (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.block_size);
    let group = nh / nkv.max(1);
    let rows = q.len() / (nh * hd).max(1);
    let at = |j: usize, kvh: usize| ((block_table[j / bs] as usize * bs + j % bs) * nkv + kvh) * hd;
    let mut out = vec![0f32; q.len()];
    for i in 0..rows {
        let last = pos0 + i;
        for h in 0..nh {
            let kvh = h / group.max(1);
            let qi = &q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
            let (mut m, mut l, mut acc) = (f64::NEG_INFINITY, 0f64, vec![0f64; hd]);
            for key0 in (0..=last).step_by(TILE) {
                let keys = key0..(key0 + TILE).min(last + 1);
                let s: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        let kj = &k_cache[at(j, kvh)..at(j, kvh) + hd];
                        let dot: f64 =
                            qi.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                        dot * f64::from(shape.scale)
                    })
                    .collect();
                let mn = s.iter().fold(m, |a, &b| a.max(b));
                let alpha = if m == f64::NEG_INFINITY { 0.0 } else { (m - mn).exp() };
                l *= alpha;
                acc.iter_mut().for_each(|a| *a *= alpha);
                for (j, &sj) in keys.zip(&s) {
                    let p = (sj - mn).exp();
                    l += p;
                    let pb = f64::from(round_bf16(p as f32));
                    let vj = &v_cache[at(j, kvh)..at(j, kvh) + hd];
                    acc.iter_mut().zip(vj).for_each(|(a, &v)| *a += pb * f64::from(v));
                }
                m = mn;
            }
            let o = &mut out[(i * nh + h) * hd..(i * nh + h + 1) * hd];
            o.iter_mut().zip(&acc).for_each(|(o, a)| *o = (a / l) as f32);
        }
    }
    round_all(&mut out);
    out
}

/// `attention_backward_dq_tiled` + `attention_backward_dkv_tiled` (+ the partials' sum):
/// `(dq, dk, dv)` of causal attention, written out directly rather than through the CPU
/// backward's tiles. As the kernels do, it rounds dO to bf16 for its products (`dP = dO Vᵀ`,
/// `dV = Pᵀ dO`), P to bf16 for `dV`, and dS to bf16 for `dQ` and `dK`; rowsum(dO ∘ O) uses
/// dO as given. Sums in f64, so the kernels differ from it by fp32 summation alone.
pub fn attention_backward_bf16(
    a: &crate::model::attention_backward::AttnBackwardInput<'_>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, nh, nkv, hd) = (a.len, a.num_heads, a.num_kv_heads, a.head_dim);
    let group = nh / nkv.max(1);
    let scale = f64::from(a.scale);
    let dot = |x: &[f32], y: &[f64]| x.iter().zip(y).map(|(&x, y)| f64::from(x) * y).sum::<f64>();
    let (mut dq, mut dk, mut dv) =
        (vec![0f32; t * nh * hd], vec![0f64; t * nkv * hd], vec![0f64; t * nkv * hd]);
    let mut scores = vec![0f64; t];
    for h in 0..nh {
        let kvh = h / group.max(1);
        let kv_at = |j: usize| (j * nkv + kvh) * hd;
        for i in 0..t {
            let at = (i * nh + h) * hd;
            let qi: Vec<f64> = a.q[at..at + hd].iter().map(|&x| f64::from(x)).collect();
            let d_o = &a.d_o[at..at + hd];
            let dob: Vec<f64> = d_o.iter().map(|&x| f64::from(round_bf16(x))).collect();
            let delta: f64 =
                d_o.iter().zip(&a.o[at..at + hd]).map(|(&g, &o)| g as f64 * o as f64).sum();
            for (j, s) in scores[..=i].iter_mut().enumerate() {
                *s = scale * dot(&a.k[kv_at(j)..kv_at(j) + hd], &qi);
            }
            let m = scores[..=i].iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
            let lse = m + scores[..=i].iter().map(|&s| (s - m).exp()).sum::<f64>().ln();
            let mut dqi = vec![0f64; hd];
            for (j, &s) in scores[..=i].iter().enumerate() {
                let (kj, vj) = (&a.k[kv_at(j)..kv_at(j) + hd], &a.v[kv_at(j)..kv_at(j) + hd]);
                let p = (s - lse).exp();
                let ds = p * (dot(vj, &dob) - delta);
                let pb = f64::from(round_bf16(p as f32));
                let dsb = f64::from(round_bf16(ds as f32));
                for d in 0..hd {
                    dqi[d] += dsb * f64::from(kj[d]);
                    dk[kv_at(j) + d] += dsb * qi[d];
                    dv[kv_at(j) + d] += pb * dob[d];
                }
            }
            for (o, g) in dq[at..at + hd].iter_mut().zip(&dqi) {
                *o = (scale * g) as f32;
            }
        }
    }
    let dk = dk.iter().map(|&g| (scale * g) as f32).collect();
    (dq, dk, dv.iter().map(|&g| g as f32).collect())
}

/// `argmax_logprob_f32`: the greedy id and its log-probability.
pub fn argmax_logprob(row: &[f32]) -> (u32, f32) {
    let id = crate::engine::sampler::argmax(row);
    (id, crate::engine::sampler::logprobs_of(row, id, 0).logprob)
}

/// `cross_entropy_f32`: the loss; `row` becomes `scale * (softmax - onehot)`. A target outside
/// the row gives loss 0 and a zero gradient, as the kernel does.
pub fn cross_entropy(row: &mut [f32], target: i32, scale: f32) -> f32 {
    match usize::try_from(target).ok().filter(|&t| t < row.len()) {
        Some(t) => {
            let mut probs = vec![0f32; row.len()];
            crate::model::loss::row_loss(row, t, Some(scale), &mut probs).0 as f32
        }
        None => {
            row.fill(0.0);
            0.0
        }
    }
}

/// One adapter of `lora_shrink_bf16` / `lora_expand_bf16`: A `[rank, in]`, B `[out, rank]`.
#[derive(Debug, Clone)]
pub struct TwinAdapter {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// `lora_shrink_bf16` then `lora_expand_bf16`: `y[t] += scale * B (A x[t])` for each token with
/// an adapter slot; `y` is stored in bf16.
pub fn lora(
    x: &[f32],
    y: &mut [f32],
    slots: &[i32],
    adapters: &[TwinAdapter],
    in_dim: usize,
    out_dim: usize,
    (ld, col0): (usize, usize),
) {
    for (t, &slot) in slots.iter().enumerate() {
        let Some(ad) = usize::try_from(slot).ok().and_then(|s| adapters.get(s)) else { continue };
        let xr = &x[t * in_dim..(t + 1) * in_dim];
        let u: Vec<f32> = (0..ad.rank)
            .map(|r| ad.a[r * in_dim..(r + 1) * in_dim].iter().zip(xr).map(|(a, x)| a * x).sum())
            .collect();
        let row = &mut y[t * ld + col0..t * ld + col0 + out_dim];
        for (n, yv) in row.iter_mut().enumerate() {
            let s: f32 =
                ad.b[n * ad.rank..(n + 1) * ad.rank].iter().zip(&u).map(|(b, u)| b * u).sum();
            *yv = round_bf16(*yv + ad.scale * s);
        }
    }
}

/// `lora_dropout_bf16`: `out = x` (`width`-wide rows), with rows `drop_rows` (a training
/// sample's; row `t` at depth `pos[t]`) dropped as the CPU's training drops them, in bf16.
#[allow(clippy::too_many_arguments)]
pub fn lora_dropout(
    x: &[f32],
    out: &mut [f32],
    pos: &[usize],
    drop_rows: std::ops::Range<usize>,
    width: usize,
    d: SampleDropout,
    layer: usize,
    module: usize,
) {
    for (t, (xr, row)) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)).enumerate() {
        row.copy_from_slice(xr);
        if drop_rows.contains(&t) {
            apply_dropout(row, d.p, d.seed, layer, module, pos[t]);
            row.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
    }
}

/// `lora_dropout_add_f32`: `dst += drop(src)` over one training sample's rows (row `t` at
/// depth `pos[t]`), `width` wide: dropout's backward.
pub fn lora_dropout_add(
    src: &[f32],
    dst: &mut [f32],
    pos: &[usize],
    width: usize,
    d: SampleDropout,
    layer: usize,
    module: usize,
) {
    for (t, (sr, dr)) in src.chunks_exact(width).zip(dst.chunks_exact_mut(width)).enumerate() {
        let mut g = sr.to_vec();
        apply_dropout(&mut g, d.p, d.seed, layer, module, pos[t]);
        dr.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_twin_adds_the_low_rank_product_per_token() {
        // in 2, out 2, rank 1: A = [1, 2], B = [[3], [4]], scale 0.5.
        let ad = TwinAdapter { a: vec![1.0, 2.0], b: vec![3.0, 4.0], rank: 1, scale: 0.5 };
        let x = [1.0, 1.0, 5.0, 5.0];
        let mut y = [1.0, 1.0, 1.0, 1.0];
        lora(&x, &mut y, &[0, -1], &[ad], 2, 2, (2, 0));
        // token 0: A x = 3, B * 3 = [9, 12], * 0.5 = [4.5, 6]; token 1 has no adapter.
        assert_eq!(y, [5.5, 7.0, 1.0, 1.0]);
    }

    #[test]
    fn cross_entropy_twin_matches_the_formula() {
        let mut row = vec![1.0f32, 2.0, 3.0];
        let loss = cross_entropy(&mut row, 2, 1.0);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((loss - (z.ln() - 3.0)).abs() < 1e-5);
        assert!((row[0] - 1f32.exp() / z).abs() < 1e-5);
        assert!((row[2] - (3f32.exp() / z - 1.0)).abs() < 1e-5);
        let mut row = vec![1.0f32, 2.0];
        assert_eq!(cross_entropy(&mut row, -1, 1.0), 0.0);
        assert_eq!(row, [0.0, 0.0]);
    }

    #[test]
    fn tiled_attention_backward_twin_is_the_cpu_backward_without_its_roundings() {
        use crate::model::attention_backward::{attention_backward, AttnBackwardInput};
        let (len, nh, nkv, hd) = (19usize, 4usize, 2usize, 8usize);
        // Deterministic, varied values in [-1, 1).
        let vals = |n: usize, seed: u64| -> Vec<f32> {
            (0..n as u64)
                .map(|i| {
                    ((i.wrapping_mul(2654435761).wrapping_add(seed * 97) % 2000) as f32) / 1000.0
                        - 1.0
                })
                .collect()
        };
        let (q, k, v) = (vals(len * nh * hd, 1), vals(len * nkv * hd, 2), vals(len * nkv * hd, 3));
        let (o, d_o) = (vals(len * nh * hd, 4), vals(len * nh * hd, 5));
        let a = AttnBackwardInput {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            d_o: &d_o,
            len,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 0.35,
        };
        let all = |(dq, dk, dv): (Vec<f32>, Vec<f32>, Vec<f32>)| [dq, dk, dv].concat();
        let exact = all(without_rounding(|| attention_backward_bf16(&a)));
        let rounded = all(attention_backward_bf16(&a));
        let cpu = all(attention_backward(&a));
        let worst = exact.iter().zip(&cpu).map(|(e, c)| (e - c).abs() / (1e-3 + c.abs()));
        let worst = worst.fold(0f32, f32::max);
        let rounding = rounded.iter().zip(&cpu).map(|(r, c)| (r - c).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "the twin without roundings is off the CPU backward by {worst}");
        // And the roundings do change it.
        assert!(rounding > 1e-4, "the bf16 roundings changed nothing ({rounding})");
    }

    #[test]
    fn embedding_twin_zeroes_unknown_ids() {
        let table = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(embedding(&[1, 7, 0], &table, 2), [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
    }
}
