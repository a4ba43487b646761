//! `CudaLoraTable`: one projection's LoRA weights for every adapter slot, as the kernels index
//! them, made from host weights (uploaded), from a training adapter's device buffers, or by
//! joining tables.

use cudarc::driver::CudaSlice;

use crate::backend::cuda::decoder::lora::SlotWeights;
use crate::backend::cuda::gemm::addr;
use crate::backend::cuda::gpu::Gpu;
use crate::backend::cuda::CudaError;

/// fp32 A and B on the device and the tables the kernels index by slot (a slot without the
/// projection has rank 0).
pub struct CudaLoraTable {
    /// Owns what `a_ptrs` and `b_ptrs` point at (empty where the table points into weights
    /// owned elsewhere).
    _weights: Vec<CudaSlice<f32>>,
    /// What the four arrays below hold, on the host, so tables can be joined.
    entries: Vec<LoraEntry>,
    pub(super) a_ptrs: CudaSlice<u64>,
    pub(super) b_ptrs: CudaSlice<u64>,
    pub(super) ranks: CudaSlice<i32>,
    pub(super) scales: CudaSlice<f32>,
    pub(super) slots: usize,
}

/// One slot: A's and B's device addresses, rank and scale (all zero for a slot without the
/// projection).
#[derive(Debug, Clone, Copy, Default)]
struct LoraEntry {
    a: u64,
    b: u64,
    rank: i32,
    scale: f32,
}

fn rank_i32(rank: usize) -> Result<i32, CudaError> {
    i32::try_from(rank).map_err(|_| CudaError::Shape("a LoRA rank".into()))
}

impl CudaLoraTable {
    /// A table over `entries`, owning `weights` (what they point at, or nothing).
    fn new(
        gpu: &Gpu,
        entries: Vec<LoraEntry>,
        weights: Vec<CudaSlice<f32>>,
    ) -> Result<Self, CudaError> {
        let pick = |f: fn(&LoraEntry) -> u64| entries.iter().map(f).collect::<Vec<u64>>();
        let ranks: Vec<i32> = entries.iter().map(|e| e.rank).collect();
        let scales: Vec<f32> = entries.iter().map(|e| e.scale).collect();
        Ok(Self {
            _weights: weights,
            a_ptrs: gpu.up(&pick(|e| e.a))?,
            b_ptrs: gpu.up(&pick(|e| e.b))?,
            ranks: gpu.up(&ranks)?,
            scales: gpu.up(&scales)?,
            slots: entries.len(),
            entries,
        })
    }

    /// The slots' host weights uploaded, the table owning them.
    pub(super) fn upload(gpu: &Gpu, slots: &[Option<SlotWeights<'_>>]) -> Result<Self, CudaError> {
        let (mut weights, mut entries) = (Vec::new(), Vec::new());
        for slot in slots {
            let Some(w) = slot else {
                entries.push(LoraEntry::default());
                continue;
            };
            let (a, b) = (gpu.up(w.a)?, gpu.up(w.b)?);
            let (a_ptr, b_ptr) = (addr(&a, &gpu.stream, 0), addr(&b, &gpu.stream, 0));
            entries.push(LoraEntry { a: a_ptr, b: b_ptr, rank: rank_i32(w.rank)?, scale: w.scale });
            weights.extend([a, b]);
        }
        Self::new(gpu, entries, weights)
    }

    /// One slot pointing into a training adapter's own buffers, which outlive every forward
    /// of the step it is made for.
    pub(super) fn pointing_at(
        gpu: &Gpu,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rank: usize,
        scale: f32,
    ) -> Result<Self, CudaError> {
        let (a, b) = (addr(a, &gpu.stream, 0), addr(b, &gpu.stream, 0));
        Self::new(gpu, vec![LoraEntry { a, b, rank: rank_i32(rank)?, scale }], Vec::new())
    }

    /// The parts' slots in order (`None`: that many empty slots), pointing into the parts'
    /// weights: the caller keeps them alive (see `DecoderOps::lora_table_join`).
    pub(super) fn join(gpu: &Gpu, parts: &[(Option<&Self>, usize)]) -> Result<Self, CudaError> {
        let mut entries = Vec::new();
        for &(table, slots) in parts {
            match table {
                Some(t) if t.slots == slots => entries.extend_from_slice(&t.entries),
                Some(t) => {
                    return Err(CudaError::Shape(format!(
                        "a table of {} slots as {slots}",
                        t.slots
                    )))
                }
                None => entries.extend((0..slots).map(|_| LoraEntry::default())),
            }
        }
        Self::new(gpu, entries, Vec::new())
    }
}
