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

/// Scores up to `max_rows` more rows with a target of the sample's loss (its forward
/// complete), so an iteration can take a share of it as of the forward; returns the rows
/// scored and their stats. Rows without a target count for nothing, as on the CPU, and go
/// through the output head only between two targets of a piece: a call passes those before its first scored row and, once no target is left, the
/// rest of the sample, so a call with `max_rows` 0 only starts the loss, or ends that of a
/// sample without targets. The gradient w.r.t. the final residual stream accumulates over the
/// calls; the one that reaches the last row finishes it and readies the backward. Pieces
/// break at multiples of `LOSS_ROWS`: on the twins no row's logits depend on how the loss was
/// split; on a device the products' algorithms may change with a piece's rows, within bf16
/// rounding, as with forward chunks.
pub fn loss_rows<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    sc: &mut TrainScratch<O>,
    grad_scale: f32,
    max_rows: usize,
) -> Result<(usize, LossStats), CudaError> {
    let sample = match &sc.sample {
        Some(x) if sc.loss_pending() => x.clone(),
        _ => return Err(CudaError::Shape("the loss of a sample not forwarded whole".into())),
    };
    let t = sample.len();
    let first = match sc.loss_done {
        Some(done) => done,
        None => {
            ops.mark("norms")?;
            ops.rms_norm(&sc.h_final, &w.norm, &mut sc.h, t, s)?;
            ops.zero(&mut sc.dx, t * s.hidden)?;
            ops.zero(&mut sc.dh, t * s.hidden)?;
            0
        }
    };
    // Up to `max_rows` targets, and the rows without one up to the next target.
    let (mut end, mut scored) = (first, 0);
    while end < t && (sample.targets[end].is_none() || scored < max_rows) {
        scored += usize::from(sample.targets[end].is_some());
        end += 1;
    }
    let mut stats = LossStats::default();
    let chunk = LOSS_ROWS.min(sc.len.max(1));
    let mut r0 = first;
    while r0 < end {
        let r1 = ((r0 / chunk + 1) * chunk).min(end);
        let piece = &sample.targets[r0..r1];
        // Only the span from the piece's first target to its last goes through the head.
        let (Some(a), Some(b)) =
            (piece.iter().position(Option::is_some), piece.iter().rposition(Option::is_some))
        else {
            r0 = r1;
            continue;
        };
        let (want, rows) = (&piece[a..=b], r0 + a..r0 + b + 1);
        r0 = r1;
        let targets: Vec<i32> =
            want.iter().map(|t| t.and_then(|v| i32::try_from(v).ok()).unwrap_or(-1)).collect();
        let scales: Vec<f32> =
            want.iter().map(|t| if t.is_some() { grad_scale } else { 0.0 }).collect();
        let (h, head, lg, dx) = (&sc.h, &w.lm_head, &mut sc.logits, &mut sc.dx);
        ops.mark("loss (lm_head, cross-entropy)")?;
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
        return Ok((scored, stats));
    }
    ops.mark("bwd norms")?;
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
    Ok((scored, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::decoder::host::HostOps;
    use crate::backend::cuda::decoder::tiny::tiny_decoder;
    use crate::backend::cuda::decoder::train::{forward_chunk, TrainAdapter, TrainSample};
    use crate::backend::cuda::decoder::DecoderOps;
    use crate::lora::optim::AdamWConfig;
    use crate::lora::{LoraConfig, LoraWeights};

    /// A sample of 40 tokens forwarded whole on the twins, `trained` marking its targets.
    fn forwarded(
        trained: &[bool],
    ) -> (HostOps, DecoderShape, DecoderWeights<Vec<f32>>, TrainScratch<HostOps>) {
        let (c, s, w) = tiny_decoder();
        let mut ops = HostOps;
        let lora = LoraConfig { r: 2, alpha: 4.0, ..LoraConfig::default() };
        let ad = TrainAdapter::new(
            &mut ops,
            &s,
            &LoraWeights::init(&lora, &c, 1),
            AdamWConfig::default(),
        )
        .unwrap();
        let mut sc = TrainScratch::new(&mut ops, &s, &ad, 40).unwrap();
        let mut caches: Vec<_> = (0..s.layers).map(|_| ops.cache(&s, 3).unwrap()).collect();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 50) as u32).collect();
        sc.begin(TrainSample::new(tokens, trained, vec![0, 1, 2])).unwrap();
        let inv = c.rope_inv_freq();
        forward_chunk(&mut ops, &s, &w, &inv, &mut caches, &ad, &mut sc, 40).unwrap();
        (ops, s, w, sc)
    }

    /// Rows without a target count for nothing: a budget covers targets, passing the rows
    /// between them, and the call that scores the last target ends the loss.
    #[test]
    fn loss_budgets_count_the_rows_with_a_target() {
        // A prompt of 10 (its last row predicts the first completion token), then 30 trained.
        let trained: Vec<bool> = (0..40).map(|i| i >= 10).collect();
        let (mut ops, s, w, mut sc) = forwarded(&trained);
        let inv = vec![0.0; s.head_dim / 2];
        assert!(sc.loss_pending());
        assert_eq!(sc.loss_remaining(), 30);
        assert_eq!(loss_rows(&mut ops, &s, &w, &inv, &mut sc, 1.0, 0).unwrap().0, 0);
        assert_eq!(sc.loss_remaining(), 30, "a budget of 0 only starts the loss");
        let (rows, stats) = loss_rows(&mut ops, &s, &w, &inv, &mut sc, 1.0, 7).unwrap();
        assert_eq!((rows, stats.count, sc.loss_remaining()), (7, 7, 23));
        let (rows, _) = loss_rows(&mut ops, &s, &w, &inv, &mut sc, 1.0, 100).unwrap();
        assert_eq!((rows, sc.loss_pending(), sc.backward_remaining()), (23, false, 3));

        // No targets at all: the start ends the loss.
        let (mut ops, s, w, mut sc) = forwarded(&[false; 40]);
        assert_eq!((sc.loss_pending(), sc.loss_remaining()), (true, 0));
        let (rows, stats) = loss_rows(&mut ops, &s, &w, &inv, &mut sc, 1.0, 0).unwrap();
        assert_eq!(
            (rows, stats.count, sc.loss_pending(), sc.backward_remaining()),
            (0, 0, false, 3)
        );
    }
}
