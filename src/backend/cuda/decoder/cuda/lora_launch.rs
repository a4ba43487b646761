//! The LoRA kernels' launches, shared by the forward and the training step.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, CudaLoraTable, CudaStep, Kernels, R};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims};
use crate::backend::cuda::gpu::{cfg, n32, Gpu};
use crate::backend::cuda::CudaError;

/// `u = x Aᵀ` per row's slot (`lora_shrink_bf16`); the caller checked the shapes.
pub(super) fn launch_shrink(
    gpu: &Gpu,
    k: &Kernels,
    st: &CudaStep,
    x: &CudaSlice<u16>,
    t: &CudaLoraTable,
    u: &mut CudaSlice<f32>,
    d: LoraDims,
) -> R {
    let (ind, mr) = (d.in_dim as i32, d.max_rank as i32);
    let mut b = gpu.stream.launch_builder(&k.lora_shrink);
    b.arg(x).arg(&t.a_ptrs).arg(&t.ranks).arg(&st.row_slots).arg(u);
    b.arg(&ind).arg(&mr);
    // SAFETY: argument list matches lora_shrink_bf16 (4 warps a block, one per rank row);
    // every slot a row names has a table entry, u holds rows * max_rank (checked by callers).
    unsafe { b.launch(cfg((n32(st.rows), n32(d.max_rank.div_ceil(4)), 1), 128)) }?;
    Ok(())
}

/// `y[:, col0..] += scale · u Bᵀ` per row's slot (`lora_expand_bf16`); shapes checked by the
/// caller.
pub(super) fn launch_expand(
    gpu: &Gpu,
    k: &Kernels,
    st: &CudaStep,
    u: &CudaSlice<f32>,
    t: &CudaLoraTable,
    y: &mut CudaSlice<u16>,
    d: LoraDims,
) -> R {
    let (outd, ld, mr) = (d.out_dim as i32, d.ld as i32, d.max_rank as i32);
    let mut cols = y.slice_mut(d.col0..);
    let mut b = gpu.stream.launch_builder(&k.lora_expand);
    b.arg(u).arg(&t.b_ptrs).arg(&t.ranks).arg(&t.scales).arg(&st.row_slots);
    b.arg(&mut cols).arg(&outd).arg(&ld).arg(&mr);
    // SAFETY: argument list matches lora_expand_bf16; row t writes columns
    // col0..col0 + out_dim of a row ld wide, inside y (checked by callers).
    unsafe { b.launch(cfg((n32(st.rows), n32(d.out_dim.div_ceil(256)), 1), 256)) }?;
    Ok(())
}

/// Threads of a dropout block (`lora_dropout_bf16`, `lora_dropout_add_f32`); each masks 16
/// elements of a row.
pub(super) const DROPOUT_THREADS: u32 = 64;

/// The dropout kernels' grid over `rows` rows `width` wide.
pub(super) fn dropout_grid(rows: usize, width: usize) -> (u32, u32, u32) {
    (n32(rows), n32(width.div_ceil(16).div_ceil(DROPOUT_THREADS as usize)), 1)
}

/// The dropout kernels' last four arguments: probability, seed, layer and projection.
pub(super) fn dropout_site_args(site: &DropoutSite) -> (f32, u64, i32, i32) {
    let (layer, module) = (n32(site.layer) as i32, site.module.index() as i32);
    (site.dropout.p, site.dropout.seed, layer, module)
}

/// The checks of a LoRA update of `d` on a batch's rows into `y`.
pub(super) fn check_lora(
    st: &CudaStep,
    x_len: usize,
    y_len: usize,
    t: &CudaLoraTable,
    d: LoraDims,
) -> R {
    let rows = st.rows;
    check_len(x_len, rows * d.in_dim, "LoRA input")?;
    check_len(y_len, rows.saturating_sub(1) * d.ld + d.col0 + d.out_dim, "LoRA output")?;
    if d.col0 + d.out_dim > d.ld || d.max_rank == 0 || rows == 0 || st.slots_needed > t.slots {
        return Err(CudaError::Shape(format!("a LoRA update of {d:?} on {rows} rows")));
    }
    Ok(())
}
