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
    /// The first row, when the group's rows are one run `r0..r0 + len`.
    fn contiguous(&self) -> Option<usize> {
        let r0 = *self.rows.first()?;
        self.rows.iter().enumerate().all(|(i, &r)| r == r0 + i).then_some(r0)
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
            let mut u = vec![0f32; n * r];
            // The rank is too narrow for the weight-row split of `matmul_t`; the GEMM splits
            // rows instead, and each row's result is still independent of the batch.
            let a_t = MatRef::new(&pair.a, r, in_dim).t();
            let p = g.adapter.config.dropout;
            let dropped = p > 0.0 && g.train.iter().any(Option::is_some);
            match g.contiguous() {
                // Read in place: a training sample's chunk is one run of rows.
                Some(r0) if !dropped => {
                    let x_m = MatRef::new(&x[r0 * in_dim..(r0 + n) * in_dim], n, in_dim);
                    gemm(1.0, x_m, a_t, false, &mut u, r);
                }
                _ => {
                    let mut xg = gather_rows(x, in_dim, &g.rows);
                    for (row, t) in xg.chunks_exact_mut(in_dim).zip(&g.train) {
                        if let Some((seed, pos)) = t {
                            apply_dropout(row, p, *seed, layer, m.index(), *pos);
                        }
                    }
                    gemm(1.0, MatRef::new(&xg, n, in_dim), a_t, false, &mut u, r);
                }
            }
            u
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
        let (r, od, n) = (pair.rank(), pair.out_dim, g.rows.len());
        let (u_m, b_t) = (MatRef::new(u, n, r), MatRef::new(&pair.b, od, r).t());
        let s = g.adapter.scale();
        // The GEMM adds onto the output in its FMA chains, so scattered rows are gathered,
        // updated the same way and put back: a row's bits do not depend on its neighbours.
        if let Some(r0) = g.contiguous() {
            gemm(s, u_m, b_t, true, &mut out[r0 * out_ld + col0..], out_ld);
            continue;
        }
        let mut y = Vec::with_capacity(n * od);
        for &row in &g.rows {
            y.extend_from_slice(&out[row * out_ld + col0..row * out_ld + col0 + od]);
        }
        gemm(s, u_m, b_t, true, &mut y, od);
        for (&row, yr) in g.rows.iter().zip(y.chunks_exact(od)) {
            out[row * out_ld + col0..row * out_ld + col0 + od].copy_from_slice(yr);
        }
    }
}
