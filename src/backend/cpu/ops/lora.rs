//! LoRA on the CPU decoder: per projection, a table of the adapters' fp32 weights by slot;
//! rows are grouped by slot so each adapter's `A` and `B` are read once per projection.

use std::sync::Arc;

use crate::backend::cuda::decoder::lora::{LoraDims, SlotWeights};
use crate::backend::cuda::CudaError;
use crate::model::lora_apply::{contiguous, expand, gather_rows, shrink};

/// One adapter's weights for one projection: `A [rank, in]`, `B [out, rank]`, `alpha / r`.
#[derive(Debug)]
pub struct CpuSlot {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// A projection's adapters by slot, `None` where a slot's adapter leaves it alone. Joined
/// tables share the slots' weights.
pub type CpuLoraTable = Vec<Option<Arc<CpuSlot>>>;

pub fn table(slots: &[Option<SlotWeights<'_>>]) -> CpuLoraTable {
    let slot = |w: &SlotWeights<'_>| CpuSlot {
        a: w.a.to_vec(),
        b: w.b.to_vec(),
        rank: w.rank,
        scale: w.scale,
    };
    slots.iter().map(|w| w.as_ref().map(|w| Arc::new(slot(w)))).collect()
}

pub fn join(parts: &[(Option<&CpuLoraTable>, usize)]) -> Result<CpuLoraTable, CudaError> {
    let mut out = Vec::new();
    for &(table, slots) in parts {
        match table {
            Some(t) if t.len() == slots => out.extend(t.iter().cloned()),
            Some(t) => {
                return Err(CudaError::Shape(format!("a table of {} slots as {slots}", t.len())))
            }
            None => out.extend((0..slots).map(|_| None)),
        }
    }
    Ok(out)
}

/// The rows of each slot `row_slots` names (negative: none), slots in order of first row.
pub fn rows_by_slot(row_slots: &[i32]) -> Vec<(usize, Vec<usize>)> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (row, &slot) in row_slots.iter().enumerate() {
        let Ok(slot) = usize::try_from(slot) else { continue };
        match groups.iter_mut().find(|g| g.0 == slot) {
            Some(g) => g.1.push(row),
            None => groups.push((slot, vec![row])),
        }
    }
    groups
}

/// `y[t, col0..col0 + out] += scale · B (A x[t])` for each row with a slot in `table`.
pub fn apply(
    row_slots: &[i32],
    x: &[f32],
    table: &CpuLoraTable,
    y: &mut [f32],
    d: LoraDims,
) -> Result<(), CudaError> {
    let rows = row_slots.len();
    if x.len() < rows * d.in_dim || y.len() < rows * d.ld || d.col0 + d.out_dim > d.ld {
        return Err(CudaError::Shape(format!("LoRA over {rows} rows of buffers too small")));
    }
    for (slot, group) in rows_by_slot(row_slots) {
        let Some(w) = slot_weights(table, slot, &d)? else { continue };
        let n = group.len();
        let u = match contiguous(&group) {
            // Read in place: a sequence's rows are one run.
            Some(r0) => shrink(&x[r0 * d.in_dim..(r0 + n) * d.in_dim], n, d.in_dim, &w.a, w.rank),
            None => shrink(&gather_rows(x, d.in_dim, &group), n, d.in_dim, &w.a, w.rank),
        };
        expand(&u, w.rank, &w.b, d.out_dim, w.scale, &group, y, (d.ld, d.col0));
    }
    Ok(())
}

/// The slot's weights for rows of projection `d`, checked; `None` where the slot leaves it
/// alone.
fn slot_weights<'a>(
    table: &'a CpuLoraTable,
    slot: usize,
    d: &LoraDims,
) -> Result<Option<&'a CpuSlot>, CudaError> {
    let w = table.get(slot).ok_or_else(|| {
        CudaError::Shape(format!("a row names adapter slot {slot} of {}", table.len()))
    })?;
    let Some(w) = w.as_deref() else { return Ok(None) };
    if w.a.len() != w.rank * d.in_dim || w.b.len() != d.out_dim * w.rank || w.rank > d.max_rank {
        return Err(CudaError::Shape(format!(
            "rank {} weights of {} and {} values for a {}x{} projection of rank up to {}",
            w.rank,
            w.a.len(),
            w.b.len(),
            d.out_dim,
            d.in_dim,
            d.max_rank
        )));
    }
    Ok(Some(w))
}

/// `u[t, ..rank] = A x[t]` for each row with a slot, rows of `u` `max_rank` wide; every other
/// value of the first rows of `u` is zeroed.
pub fn shrink_into(
    row_slots: &[i32],
    x: &[f32],
    table: &CpuLoraTable,
    u: &mut [f32],
    d: LoraDims,
) -> Result<(), CudaError> {
    let (rows, mr) = (row_slots.len(), d.max_rank);
    if x.len() < rows * d.in_dim || u.len() < rows * mr {
        return Err(CudaError::Shape(format!("LoRA shrink over {rows} rows of buffers too small")));
    }
    u[..rows * mr].fill(0.0);
    for (slot, group) in rows_by_slot(row_slots) {
        let Some(w) = slot_weights(table, slot, &d)? else { continue };
        let n = group.len();
        let g = match contiguous(&group) {
            Some(r0) => shrink(&x[r0 * d.in_dim..(r0 + n) * d.in_dim], n, d.in_dim, &w.a, w.rank),
            None => shrink(&gather_rows(x, d.in_dim, &group), n, d.in_dim, &w.a, w.rank),
        };
        for (&row, ur) in group.iter().zip(g.chunks_exact(w.rank.max(1))) {
            u[row * mr..row * mr + w.rank].copy_from_slice(ur);
        }
    }
    Ok(())
}

/// `y[t, col0..col0 + out] += scale · B u[t, ..rank]` for each row with a slot (`u` as
/// [`shrink_into`] leaves it).
pub fn expand_from(
    row_slots: &[i32],
    u: &[f32],
    table: &CpuLoraTable,
    y: &mut [f32],
    d: LoraDims,
) -> Result<(), CudaError> {
    let (rows, mr) = (row_slots.len(), d.max_rank);
    if u.len() < rows * mr || y.len() < rows * d.ld || d.col0 + d.out_dim > d.ld {
        return Err(CudaError::Shape(format!("LoRA expand over {rows} rows of buffers too small")));
    }
    for (slot, group) in rows_by_slot(row_slots) {
        let Some(w) = slot_weights(table, slot, &d)? else { continue };
        let mut g = Vec::with_capacity(group.len() * w.rank);
        for &row in &group {
            g.extend_from_slice(&u[row * mr..row * mr + w.rank]);
        }
        expand(&g, w.rank, &w.b, d.out_dim, w.scale, &group, y, (d.ld, d.col0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_group_by_slot_in_order_of_first_row() {
        assert_eq!(rows_by_slot(&[2, -1, 0, 2, 0, -1]), [(2, vec![0, 3]), (0, vec![2, 4])]);
        assert!(rows_by_slot(&[-1, -1]).is_empty());
    }

    #[test]
    fn apply_adds_each_rows_adapter_and_refuses_slots_past_the_table() {
        // in 2, out 2, rank 1: A = [1, 2], B = [3, 4], scale 0.5.
        let w = SlotWeights { a: &[1.0, 2.0], b: &[3.0, 4.0], rank: 1, scale: 0.5 };
        let t = table(&[None, Some(w)]);
        let d = LoraDims { in_dim: 2, out_dim: 2, ld: 3, col0: 1, max_rank: 1 };
        let x = [1.0, 1.0, 5.0, 5.0, 1.0, 0.0];
        let mut y = [0.0; 9];
        apply(&[1, 0, 1], &x, &t, &mut y, d).unwrap();
        // Row 0: A x = 3, 0.5 B 3 = [4.5, 6]; row 1's slot has no weights; row 2: A x = 1.
        assert_eq!(y, [0.0, 4.5, 6.0, 0.0, 0.0, 0.0, 0.0, 1.5, 2.0]);
        assert!(apply(&[2, -1, -1], &x, &t, &mut y, d).is_err());
    }
}
