//! LoRA tables through `CudaOps`: served adapters' tables joined with a training adapter's,
//! so that rows of both share one forward's LoRA launches.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{compare, random_bf16, Check, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::decoder::cuda::CudaOps;
use crate::backend::cuda::decoder::lora::{LoraDims, SlotWeights};
use crate::backend::cuda::decoder::train::TrainOps;
use crate::backend::cuda::decoder::{DecoderOps, SeqRows, StepBatch};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;

fn random_adapter(rng: &mut StdRng, rank: usize, d: LoraDims, scale: f32) -> twins::TwinAdapter {
    twins::TwinAdapter {
        a: (0..rank * d.in_dim).map(|_| rng.random_range(-0.1..0.1)).collect(),
        b: (0..d.out_dim * rank).map(|_| rng.random_range(-0.1..0.1)).collect(),
        rank,
        scale,
    }
}

/// Two served slots (ranks 8 and 16, or none) joined with a training adapter of rank 4 in
/// slot 2, on rows of every slot and rows without one, against the twin over the three.
pub(super) fn check_joined_tables(
    ops: &mut CudaOps,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(10);
    // The adapted columns are a block of a wider fused output, as k in q/k/v.
    let d = LoraDims { in_dim: 576, out_dim: 192, ld: 960, col0: 576, max_rank: 16 };
    let served = [random_adapter(&mut rng, 8, d, 2.0), random_adapter(&mut rng, 16, d, 0.5)];
    let train = random_adapter(&mut rng, 4, d, 4.0);
    // Rows: slot 2 (the training adapter's), 0, none, 1, 2, 2.
    let slots: [i32; 6] = [2, 0, -1, 1, 2, 2];
    let seqs: Vec<SeqRows> = slots
        .iter()
        .enumerate()
        .map(|(i, &slot)| SeqRows {
            tokens: vec![i as u32],
            start: 0,
            block_table: vec![i as u32],
            adapter: u32::try_from(slot).ok(),
        })
        .collect();
    let batch = StepBatch::new(seqs, 16)?;
    let rope = vec![0f32; batch.rows()];
    let step = ops.upload(&batch, &rope, &rope)?;
    let (ta, tb) = (ops.upload_f32(&train.a)?, ops.upload_f32(&train.b)?);
    let train_table = ops.train_table(&ta, &tb, train.rank, train.scale)?;
    let x = random_bf16(&mut rng, slots.len() * d.in_dim, 1.0);
    let y = random_bf16(&mut rng, slots.len() * d.ld, 1.0);
    let dx = ops.gpu.up_bf16(&x)?;
    for with_served in [true, false] {
        let weights: Vec<Option<SlotWeights<'_>>> = served
            .iter()
            .map(|a| {
                with_served.then_some(SlotWeights {
                    a: &a.a,
                    b: &a.b,
                    rank: a.rank,
                    scale: a.scale,
                })
            })
            .collect();
        let served_table = if with_served { Some(ops.lora_table(&weights)?) } else { None };
        let joined = ops.lora_table_join(&[(served_table.as_ref(), 2), (Some(&train_table), 1)])?;
        let mut dy = ops.gpu.up_bf16(&y)?;
        ops.lora(&step, &dx, &joined, &mut dy, d)?;
        let got = ops.gpu.down_bf16(&dy, y.len())?;
        let none = twins::TwinAdapter { a: Vec::new(), b: Vec::new(), rank: 0, scale: 0.0 };
        let mut adapters: Vec<twins::TwinAdapter> =
            if with_served { served.to_vec() } else { vec![none.clone(), none] };
        adapters.push(train.clone());
        let mut want = y.clone();
        twins::lora(&x, &mut want, &slots, &adapters, d.in_dim, d.out_dim, (d.ld, d.col0));
        let shape = format!(
            "slots {slots:?} over {} and a training adapter of rank 4, in={} out={} at column {} \
             of {}",
            if with_served { "served ranks 8 and 16" } else { "two empty slots" },
            d.in_dim,
            d.out_dim,
            d.col0,
            d.ld
        );
        compare(checks, "LoRA over joined tables", shape, &got, &want, BF16_RTOL, BF16_ATOL);
    }
    Ok(())
}
