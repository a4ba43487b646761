//! Adds LoRA updates to the output of a frozen projection for the rows of a batch that use an
//! adapter. Rows are grouped by adapter (SGMV-style), so each adapter's `A` and `B` are read
//! once per projection per iteration however many of its requests are in the batch.

use std::ops::Range;

use crate::backend::cpu::gemm::{gemm, MatRef};
use crate::lora::dropout::apply_dropout;
use crate::lora::{LoraWeights, TargetModule};

/// Rows of one iteration that run through an adapter.
#[derive(Clone)]
pub struct LoraSlice<'a> {
    pub rows: Range<usize>,
    pub adapter: &'a LoraWeights,
    /// Training rows: dropout seed and the depth of the first row in its sample.
    pub train: Option<TrainRows>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainRows {
    pub dropout_seed: u64,
    pub first_pos: usize,
}

/// All rows of one adapter, in row order, with each row's training coordinates.
pub struct LoraGroup<'a> {
    pub adapter: &'a LoraWeights,
    pub rows: Vec<usize>,
    train: Vec<Option<(u64, usize)>>,
}

impl LoraGroup<'_> {
    fn contiguous(&self) -> Option<usize> {
        contiguous(&self.rows)
    }
}

/// The first row, when `rows` are one run `r0..r0 + len`.
pub fn contiguous(rows: &[usize]) -> Option<usize> {
    let r0 = *rows.first()?;
    rows.iter().enumerate().all(|(i, &r)| r == r0 + i).then_some(r0)
}

/// `u = x Aᵀ` for `x` `[n, in_dim]` and `A` `[rank, in_dim]`: `u` is `[n, rank]`.
pub fn shrink(x: &[f32], n: usize, in_dim: usize, a: &[f32], rank: usize) -> Vec<f32> {
    let mut u = vec![0f32; n * rank];
    // The rank is too narrow for the weight-row split of `matmul_t`; the GEMM splits rows
    // instead, and each row's result is still independent of the batch.
    gemm(1.0, MatRef::new(x, n, in_dim), MatRef::new(a, rank, in_dim).t(), false, &mut u, rank);
    u
}

/// `out[row, col0..col0 + out_dim] += scale · u[i] Bᵀ` for the `i`-th of `rows`, with `u`
/// `[rows.len(), rank]` and `B` `[out_dim, rank]`, rows of `out` `ld` wide.
#[allow(clippy::too_many_arguments)]
pub fn expand(
    u: &[f32],
    rank: usize,
    b: &[f32],
    out_dim: usize,
    scale: f32,
    rows: &[usize],
    out: &mut [f32],
    (ld, col0): (usize, usize),
) {
    let n = rows.len();
    let (u_m, b_t) = (MatRef::new(u, n, rank), MatRef::new(b, out_dim, rank).t());
    // The GEMM adds onto the output in its FMA chains, so scattered rows are gathered, updated
    // the same way and put back: a row's bits do not depend on its neighbours.
    if let Some(r0) = contiguous(rows) {
        gemm(scale, u_m, b_t, true, &mut out[r0 * ld + col0..], ld);
        return;
    }
    let mut y = Vec::with_capacity(n * out_dim);
    for &row in rows {
        y.extend_from_slice(&out[row * ld + col0..row * ld + col0 + out_dim]);
    }
    gemm(scale, u_m, b_t, true, &mut y, out_dim);
    for (&row, yr) in rows.iter().zip(y.chunks_exact(out_dim)) {
        out[row * ld + col0..row * ld + col0 + out_dim].copy_from_slice(yr);
    }
}

/// Groups slices by adapter identity.
pub fn group_slices<'a>(slices: &[LoraSlice<'a>]) -> Vec<LoraGroup<'a>> {
    let mut groups: Vec<LoraGroup<'a>> = Vec::new();
    for s in slices {
        let at = match groups.iter().position(|g| std::ptr::eq(g.adapter, s.adapter)) {
            Some(i) => i,
            None => {
                groups.push(LoraGroup { adapter: s.adapter, rows: Vec::new(), train: Vec::new() });
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        for (i, row) in s.rows.clone().enumerate() {
            g.rows.push(row);
            g.train.push(s.train.map(|t| (t.dropout_seed, t.first_pos + i)));
        }
    }
    groups
}

/// Copies `rows` of a `[_, dim]` matrix into a dense `[rows.len(), dim]` one.
pub fn gather_rows(x: &[f32], dim: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * dim);
    for &r in rows {
        out.extend_from_slice(&x[r * dim..(r + 1) * dim]);
    }
    out
}

/// The low-rank activations `u = dropout(x) Aᵀ` of each group for one projection; empty for a
/// group whose adapter does not adapt it. Dropout applies to training rows only.
pub fn lora_shrink(
    groups: &[LoraGroup<'_>],
    layer: usize,
    m: TargetModule,
    x: &[f32],
    in_dim: usize,
) -> Vec<Vec<f32>> {
    groups
        .iter()
        .map(|g| {
            let Some(pair) = g.adapter.pair(layer, m) else { return Vec::new() };
            let r = pair.rank();
            let n = g.rows.len();
            let p = g.adapter.config.dropout;
            let dropped = p > 0.0 && g.train.iter().any(Option::is_some);
            match g.contiguous() {
                // Read in place: a training sample's chunk is one run of rows.
                Some(r0) if !dropped => {
                    shrink(&x[r0 * in_dim..(r0 + n) * in_dim], n, in_dim, &pair.a, r)
                }
                _ => {
                    let mut xg = gather_rows(x, in_dim, &g.rows);
                    for (row, t) in xg.chunks_exact_mut(in_dim).zip(&g.train) {
                        if let Some((seed, pos)) = t {
                            apply_dropout(row, p, *seed, layer, m.index(), *pos);
                        }
                    }
                    shrink(&xg, n, in_dim, &pair.a, r)
                }
            }
        })
        .collect()
}

/// `out[row, col0..col0 + out_dim] += scale · u Bᵀ` for each group's rows.
pub fn lora_expand(
    groups: &[LoraGroup<'_>],
    us: &[Vec<f32>],
    layer: usize,
    m: TargetModule,
    out: &mut [f32],
    out_ld: usize,
    col0: usize,
) {
    for (g, u) in groups.iter().zip(us) {
        let Some(pair) = g.adapter.pair(layer, m) else { continue };
        let (r, od, s) = (pair.rank(), pair.out_dim, g.adapter.scale());
        expand(u, r, &pair.b, od, s, &g.rows, out, (out_ld, col0));
    }
}
