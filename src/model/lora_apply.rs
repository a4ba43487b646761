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
            let mut xg = gather_rows(x, in_dim, &g.rows);
            let p = g.adapter.config.dropout;
            for (row, t) in xg.chunks_exact_mut(in_dim).zip(&g.train) {
                if let Some((seed, pos)) = t {
                    apply_dropout(row, p, *seed, layer, m.index(), *pos);
                }
            }
            let mut u = vec![0f32; g.rows.len() * r];
            // The rank is too narrow for the weight-row split of `matmul_t`; the GEMM splits
            // rows instead, and each row's result is still independent of the batch.
            let (x_m, a_t) =
                (MatRef::new(&xg, g.rows.len(), in_dim), MatRef::new(&pair.a, r, in_dim).t());
            gemm(1.0, x_m, a_t, false, &mut u, r);
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
        let (r, od) = (pair.rank(), pair.out_dim);
        let mut y = vec![0f32; g.rows.len() * od];
        let (u_m, b_t) = (MatRef::new(u, g.rows.len(), r), MatRef::new(&pair.b, od, r).t());
        gemm(1.0, u_m, b_t, false, &mut y, od);
        let s = g.adapter.scale();
        for (&row, yr) in g.rows.iter().zip(y.chunks_exact(od)) {
            let dst = &mut out[row * out_ld + col0..row * out_ld + col0 + od];
            dst.iter_mut().zip(yr).for_each(|(d, v)| *d += s * v);
        }
    }
}
