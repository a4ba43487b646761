//! A sample's loss on a device: the output head's forward and backward over its target rows,
//! `LOSS_ROWS` rows at a time (the `[tokens, vocab]` logits never exist whole), in as many
//! calls as the planner spreads it over.

use super::{TrainOps, TrainScratch};
use crate::backend::cuda::decoder::{
    rope_tables, DecoderShape, DecoderWeights, SeqRows, StepBatch,
};
use crate::backend::cuda::CudaError;
use crate::model::loss::LossStats;

/// Rows of logits the loss computes at once: bounds its buffer to `LOSS_ROWS x vocab` floats.
pub const LOSS_ROWS: usize = 256;

/// After the last chunk: the loss over the sample's targets (each weighted by `grad_scale`
/// in the gradient), computed `LOSS_ROWS` rows at a time, and its gradient w.r.t. the final
/// residual stream, which starts the backward.
pub fn finish_forward<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    sc: &mut TrainScratch<O>,
    grad_scale: f32,
) -> Result<LossStats, CudaError> {
    let (_, stats) = loss_rows(ops, s, w, inv_freq, sc, grad_scale, usize::MAX)?;
    Ok(stats)
}

/// Scores up to `max_rows` more rows of the sample's loss (its forward complete), so an
/// iteration can take a share of it as of the forward; returns the rows scored and their
/// stats. The gradient w.r.t. the final residual stream accumulates over the calls; the one
/// that scores the last row finishes it and readies the backward. Pieces break at multiples
/// of `LOSS_ROWS`, so no row's logits depend on how the loss was split.
pub fn loss_rows<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    sc: &mut TrainScratch<O>,
    grad_scale: f32,
    max_rows: usize,
) -> Result<(usize, LossStats), CudaError> {
    let left = sc.loss_remaining();
    let sample = match &sc.sample {
        Some(x) if left > 0 => x.clone(),
        _ => return Err(CudaError::Shape("the loss of a sample not forwarded whole".into())),
    };
    let t = sample.len();
    let first = match sc.loss_done {
        Some(done) => done,
        None => {
            ops.rms_norm(&sc.h_final, &w.norm, &mut sc.h, t, s)?;
            ops.zero(&mut sc.dx, t * s.hidden)?;
            ops.zero(&mut sc.dh, t * s.hidden)?;
            0
        }
    };
    let end = first + max_rows.min(left);
    let mut stats = LossStats::default();
    let chunk = LOSS_ROWS.min(sc.len.max(1));
    let mut r0 = first;
    while r0 < end {
        let r1 = ((r0 / chunk + 1) * chunk).min(end);
        let want = &sample.targets[r0..r1];
        let rows = r0..r1;
        r0 = r1;
        if want.iter().all(Option::is_none) {
            continue;
        }
        let targets: Vec<i32> =
            want.iter().map(|t| t.and_then(|v| i32::try_from(v).ok()).unwrap_or(-1)).collect();
        let scales: Vec<f32> =
            want.iter().map(|t| if t.is_some() { grad_scale } else { 0.0 }).collect();
        let (h, head, lg, dx) = (&sc.h, &w.lm_head, &mut sc.logits, &mut sc.dx);
        let got = ops.loss_rows(h, head, rows, &targets, &scales, lg, dx, s)?;
        for ((loss, id), target) in got.into_iter().zip(want) {
            if let Some(target) = target {
                stats.loss_sum += f64::from(loss);
                stats.correct += usize::from(id == *target);
                stats.count += 1;
            }
        }
    }
    sc.loss_done = Some(end);
    if end < t {
        return Ok((end - first, stats));
    }
    ops.rms_norm_backward(&sc.h_final, &w.norm, &sc.dx, &mut sc.dh, t, s)?;
    let rows = SeqRows {
        tokens: sample.tokens,
        start: 0,
        block_table: sample.block_table,
        adapter: Some(0),
    };
    let batch = StepBatch::new(vec![rows], s.block_size)?;
    let (cos, sin) = rope_tables(inv_freq, &batch.positions);
    sc.step = Some(ops.upload(&batch, &cos, &sin)?);
    sc.backward = Some(w.layers.len());
    Ok((end - first, stats))
}
