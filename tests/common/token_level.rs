//! One training sample through the decoder seam's training step token-level, on any backend:
//! forwarded a few tokens at a time (alone, or riding in forwards with a served sequence), its
//! loss a few rows per call, its backward a few layers per call, as the engine spreads it.

use coserve::backend::cuda::decoder::train::{
    backward_layers, forward_chunk, loss_rows, TrainAdapter, TrainOps, TrainSample, TrainScratch,
};
use coserve::backend::cuda::decoder::{
    forward_rows_capturing, Capture, DecoderShape, DecoderWeights, Scratch, SeqRows, StepBatch,
    Want,
};
use coserve::lora::optim::AdamWConfig;
use coserve::lora::LoraWeights;
use coserve::model::loss::LossStats;

/// How the sample's work is cut: tokens per forward, loss rows and backward layers per call,
/// and whether each chunk rides in a forward with a served sequence.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub chunk: usize,
    pub loss: usize,
    pub bwd: usize,
    pub serving: bool,
}

impl Cut {
    /// The whole sample in one forward, one loss call and one backward call.
    pub const WHOLE: Cut =
        Cut { chunk: usize::MAX, loss: usize::MAX, bwd: usize::MAX, serving: false };
}

/// What the sample is: its tokens, which are targets, its dropout seed.
pub struct Sample<'a> {
    pub tokens: &'a [u32],
    pub trained: &'a [bool],
    pub seed: u64,
}

/// Runs `sample` on `ops` with `adapter` cut as `cut`, its blocks scattered over a 16-block
/// cache (the served sequence in blocks 12..16); returns the mean loss and the gradients.
pub fn token_level<O: TrainOps>(
    ops: &mut O,
    (s, w, f): (&DecoderShape, &DecoderWeights<O::Weight>, &[f32]),
    adapter: &LoraWeights,
    sample: &Sample<'_>,
    cut: Cut,
) -> (f64, LoraWeights) {
    let mut caches: Vec<_> = (0..s.layers).map(|_| ops.cache(s, 16).unwrap()).collect();
    let mut ad = TrainAdapter::new(ops, s, adapter, AdamWConfig::default()).unwrap();
    let mut sc = TrainScratch::new(ops, s, &ad, 32).unwrap();
    let table = vec![7, 2, 11, 0, 5, 9, 1, 3];
    let ts = TrainSample::new(sample.tokens.to_vec(), sample.trained, table);
    sc.begin(ts.with_dropout_seed(sample.seed)).unwrap();
    let mut fsc = Scratch::with_logits_rows(ops, s, 64, 0).unwrap();
    let mut served = SeqRows {
        tokens: vec![4, 9, 2],
        start: 0,
        block_table: vec![12, 13, 14, 15],
        adapter: None,
    };
    while sc.forward_remaining() > 0 {
        if !cut.serving {
            forward_chunk(ops, s, w, f, &mut caches, &ad, &mut sc, cut.chunk).unwrap();
            continue;
        }
        let train = sc.next_chunk(cut.chunk, 0).unwrap();
        let (r0, n) = (served.tokens.len(), train.tokens.len());
        let mut batch = StepBatch::new(vec![served.clone(), train], s.block_size).unwrap();
        // As the engine marks a sample's chunk among served rows.
        batch.train = vec![false, true];
        sc.prepare_tables(ops, &ad).unwrap();
        let (lora, mut cap) = sc.chunk_forward(s, r0..r0 + n).unwrap();
        let cap: &mut dyn Capture<O> = &mut cap;
        let (c, fs, want) = (&mut caches, &mut fsc, Want::Logits);
        forward_rows_capturing(ops, s, w, f, c, &batch, fs, &[], want, Some(lora), Some(cap))
            .unwrap();
        sc.advance(n);
        served.start += served.tokens.len();
        served.tokens = vec![(served.start * 5 % 50) as u32];
    }
    let count = sample.trained.iter().skip(1).filter(|t| **t).count();
    let scale = 1.0 / count as f32;
    // As the engine does in the iteration that completes the forward: start the loss.
    assert_eq!(loss_rows(ops, s, w, f, &mut sc, scale, 0).unwrap().0, 0);
    let mut stats = LossStats::default();
    while sc.loss_remaining() > 0 {
        let left = sc.loss_remaining();
        let (rows, got) = loss_rows(ops, s, w, f, &mut sc, scale, cut.loss).unwrap();
        assert_eq!(rows, cut.loss.min(left));
        stats.add(&got);
    }
    assert_eq!(stats.count, count);
    while !sc.is_done() {
        assert!(backward_layers(ops, s, w, &mut caches, &mut ad, &mut sc, cut.bwd).unwrap() > 0);
    }
    (stats.mean_loss(), ad.grads(ops).unwrap())
}
