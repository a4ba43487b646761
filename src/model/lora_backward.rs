//! Gradients of the LoRA adapters on the projections that read one input (q, k and v; gate
//! and up; o or down alone), for one layer over a whole training sample.
//!
//! The forward is `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` per projection. With `g = s · dY B`, the
//! gradients are `dB += s · dYᵀ u` (`u = drop(x) Aᵀ`, saved by the forward),
//! `dA += gᵀ drop(x)` and `dX += drop(g A)`. Without dropout the projections' `g` sit side by
//! side, so `dA` and `dX` take one product each for the group: each element is still the
//! FMA chain one product per projection would run (the projections' terms in order), so the
//! bits are the same, and `x` and `dX` are walked once instead of once per projection.

use crate::backend::cpu::gemm::{gemm, MatRef};
use crate::lora::dropout::apply_dropout;
use crate::lora::LoraPair;

/// One adapted projection of a group.
pub struct Adapted<'a> {
    pub pair: &'a LoraPair,
    pub grad: &'a mut LoraPair,
    /// `TargetModule::index` (it seeds the dropout mask).
    pub module: usize,
    /// The projection's output gradient, `[t, out]` (a column view of the fused one's).
    pub dy: MatRef<'a>,
    /// The saved `drop(x) Aᵀ`, `[t, r]`.
    pub u: &'a [f32],
}

/// Dropout of a training sample's adapters: probability, the sample's seed, and the layer.
pub type Dropout = Option<(f32, u64, usize)>;

/// Accumulates every projection's `dA`, `dB` into its `grad` and adds the LoRA part of `dX`
/// (`[t, in]`) to `dx`; `x` (`[t, in]`) is the group's input before dropout. All pairs of a
/// group share one rank and input width.
pub fn lora_backward(
    group: &mut [Adapted<'_>],
    scale: f32,
    dropout: Dropout,
    x: &[f32],
    t: usize,
    dx: &mut [f32],
) {
    let Some(first) = group.first() else { return };
    let (r, ind) = (first.pair.rank(), first.pair.in_dim);
    debug_assert!(group.iter().all(|a| a.pair.rank() == r && a.pair.in_dim == ind));
    let rt = r * group.len();
    // g = s · dY B of each projection, side by side in `[t, rt]` (scaled afterwards: with
    // alpha 1 the GEMM reads dY in place).
    let mut g = vec![0f32; t * rt];
    for (j, a) in group.iter_mut().enumerate() {
        let outd = a.pair.out_dim;
        // dB += s · dYᵀ u, as (s · uᵀ dY)ᵀ: `dY` is then read in place rather than packed
        // transposed (a strided gather of the whole `[t, out]` block).
        let mut db_t = vec![0f32; r * outd];
        gemm(scale, MatRef::new(a.u, t, r).t(), a.dy, false, &mut db_t, outd);
        for (o, row) in a.grad.b.chunks_exact_mut(r).enumerate() {
            row.iter_mut().enumerate().for_each(|(i, v)| *v += db_t[i * outd + o]);
        }
        gemm(1.0, a.dy, MatRef::new(&a.pair.b, outd, r), false, &mut g[j * r..], rt);
    }
    g.iter_mut().for_each(|v| *v *= scale);
    let g_all = MatRef::new(&g, t, rt);
    match dropout {
        None => {
            // dA += gᵀ x for the group at once, onto the current dA rows stacked.
            let mut da = Vec::with_capacity(rt * ind);
            group.iter().for_each(|a| da.extend_from_slice(&a.grad.a));
            gemm(1.0, g_all.t(), MatRef::new(x, t, ind), true, &mut da, ind);
            for (a, rows) in group.iter_mut().zip(da.chunks_exact(r * ind)) {
                a.grad.a.copy_from_slice(rows);
            }
            // dX += [g₁ g₂ …] [A₁; A₂; …]
            let mut a_cat = Vec::with_capacity(rt * ind);
            group.iter().for_each(|a| a_cat.extend_from_slice(&a.pair.a));
            gemm(1.0, g_all, MatRef::new(&a_cat, rt, ind), true, dx, ind);
        }
        Some((p, seed, layer)) => {
            // Each projection has its own mask.
            for (j, a) in group.iter_mut().enumerate() {
                let gj = MatRef::columns(&g, t, rt, j * r, r);
                let mut xd = x[..t * ind].to_vec();
                for (pos, row) in xd.chunks_exact_mut(ind).enumerate() {
                    apply_dropout(row, p, seed, layer, a.module, pos);
                }
                gemm(1.0, gj.t(), MatRef::new(&xd, t, ind), true, &mut a.grad.a, ind);
                // The mask (and its scale) applies to the gradient as to the input.
                let mut gx = vec![0f32; t * ind];
                gemm(1.0, gj, MatRef::new(&a.pair.a, r, ind), false, &mut gx, ind);
                for (pos, row) in gx.chunks_exact_mut(ind).enumerate() {
                    apply_dropout(row, p, seed, layer, a.module, pos);
                }
                dx.iter_mut().zip(&gx).for_each(|(a, b)| *a += b);
            }
        }
    }
}
