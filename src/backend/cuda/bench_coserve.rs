//! Co-serving on the GPU, measured on the decoder seam: every iteration decodes a batch of
//! sequences and, in the same forward, a chunk of a training sample's tokens; after the
//! sample's last chunk its loss runs, then its backward a few layers per iteration, then an
//! AdamW step. Reported next to the same decode batch alone (FlexLLM's co-serving figure).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::bench::BLOCK_SIZE;
use super::decoder::train::{
    backward_layers, finish_forward, TrainAdapter, TrainOps, TrainSample, TrainScratch,
};
use super::decoder::{
    forward_rows_capturing, Capture, DecoderShape, DecoderWeights, Scratch, SeqRows, StepBatch,
    Want,
};
use super::CudaError;
use crate::bench_finetune::synthetic_tokens;

/// What one co-serving measurement sets.
#[derive(Debug, Clone, Copy)]
pub struct CoserveSetup {
    pub decode_batch: usize,
    pub context: usize,
    pub seq_len: usize,
    pub train_tokens_per_iter: usize,
    pub bwd_layers_per_iter: usize,
    /// Training samples timed (after one untimed).
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoserveOnDevice {
    pub decode_batch: usize,
    pub context: usize,
    pub train_tokens_per_iter: usize,
    pub bwd_layers_per_iter: usize,
    /// Median decode step of the batch alone (greedy ids back on the host).
    pub inference_only_step_ms: f64,
    /// Median iteration with the co-served training in it.
    pub coserved_step_ms: f64,
    pub step_ratio: f64,
    /// Training tokens per second while co-serving (samples forwarded and back-propagated).
    pub coserved_train_tokens_per_s: f64,
    pub iterations: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the measurement with the training state of `ad` (its weights keep training).
#[allow(clippy::too_many_arguments)]
pub fn run<O: TrainOps>(
    ops: &mut O,
    s: &DecoderShape,
    w: &DecoderWeights<O::Weight>,
    inv_freq: &[f32],
    ad: &mut TrainAdapter<O::Logits>,
    sc: &mut TrainScratch<O>,
    lr: f32,
    max_norm: f32,
    cfg: CoserveSetup,
) -> Result<CoserveOnDevice, CudaError> {
    let CoserveSetup { decode_batch, context, seq_len, train_tokens_per_iter: chunk, .. } = cfg;
    let per_seq = (context + 1).div_ceil(BLOCK_SIZE);
    let train_blocks = seq_len.div_ceil(BLOCK_SIZE);
    let blocks = decode_batch * per_seq + train_blocks;
    // Zeroed: what the decodes attend to does not change their cost.
    let mut caches = (0..s.layers).map(|_| ops.cache(s, blocks)).collect::<Result<Vec<_>, _>>()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let decodes: Vec<SeqRows> = (0..decode_batch)
        .map(|i| SeqRows {
            adapter: None,
            tokens: vec![rng.random_range(0..s.vocab as u32)],
            start: context,
            block_table: ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect(),
        })
        .collect();
    let train_table: Vec<u32> = (blocks - train_blocks..blocks).map(|b| b as u32).collect();
    let mut fsc = Scratch::with_logits_rows(ops, s, decode_batch + chunk, decode_batch)?;
    let sampled: Vec<u32> = (0..decode_batch as u32).collect();

    // The decode batch alone.
    let alone = StepBatch::new(decodes.clone(), BLOCK_SIZE)?;
    let mut times = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        let c = &mut caches;
        forward_rows_capturing(
            ops,
            s,
            w,
            inv_freq,
            c,
            &alone,
            &mut fsc,
            &sampled,
            Want::Greedy,
            None,
            None,
        )?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let inference_only = median(&mut times);

    // Decoding with a sample co-served: chunks in the forward, then its loss, then its
    // backward a few layers per iteration, then the optimizer step.
    let trained = vec![true; seq_len];
    let grad_scale = 1.0 / (seq_len - 1) as f32;
    let (mut times, mut started, mut done) = (Vec::new(), None, 0usize);
    let mut next = 0u64;
    let mut begin = |sc: &mut TrainScratch<O>| {
        next += 1;
        let tokens = synthetic_tokens(s.vocab, seq_len, 1000 + next);
        sc.begin(TrainSample::new(tokens, &trained, train_table.clone()))
    };
    begin(sc)?;
    while done < cfg.samples + 1 {
        // Iterations count from the end of the first (untimed) sample.
        let timed = started.is_some();
        let t = Instant::now();
        let mut seqs = decodes.clone();
        let train = sc.next_chunk(chunk, 0);
        let n = train.as_ref().map_or(0, |r| r.tokens.len());
        seqs.extend(train);
        let batch = StepBatch::new(seqs, BLOCK_SIZE)?;
        let c = &mut caches;
        if n > 0 {
            sc.prepare_tables(ops, ad)?;
            let (lora, mut cap) = sc.chunk_forward(s, decode_batch..decode_batch + n)?;
            let cap: &mut dyn Capture<O> = &mut cap;
            let (b, f) = (&batch, &mut fsc);
            forward_rows_capturing(
                ops,
                s,
                w,
                inv_freq,
                c,
                b,
                f,
                &sampled,
                Want::Greedy,
                Some(lora),
                Some(cap),
            )?;
            sc.advance(n);
            if sc.forward_remaining() == 0 {
                finish_forward(ops, s, w, inv_freq, sc, grad_scale)?;
            }
        } else {
            forward_rows_capturing(
                ops,
                s,
                w,
                inv_freq,
                c,
                &batch,
                &mut fsc,
                &sampled,
                Want::Greedy,
                None,
                None,
            )?;
            backward_layers(ops, s, w, &mut caches, ad, sc, cfg.bwd_layers_per_iter)?;
            if sc.is_done() {
                ad.clip_and_step(ops, lr, Some(max_norm))?;
                done += 1;
                if done == 1 {
                    started = Some(Instant::now());
                }
                begin(sc)?;
            }
        }
        ops.sync()?;
        if timed {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let elapsed = started.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    let iterations = times.len();
    let coserved = median(&mut times);
    Ok(CoserveOnDevice {
        decode_batch,
        context,
        train_tokens_per_iter: chunk,
        bwd_layers_per_iter: cfg.bwd_layers_per_iter,
        inference_only_step_ms: inference_only * 1e3,
        coserved_step_ms: coserved * 1e3,
        step_ratio: coserved / inference_only,
        coserved_train_tokens_per_s: (cfg.samples * seq_len) as f64 / elapsed,
        iterations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::decoder::fill_uniform_host;
    use crate::backend::cuda::decoder::host::HostOps;
    use crate::lora::optim::AdamWConfig;
    use crate::lora::{LoraConfig, LoraWeights};
    use crate::model::config::LlamaConfig;

    /// The measurement's loop on the twins: samples go through forward, loss, backward and
    /// the optimizer step, and it ends.
    #[test]
    fn coserving_loop_runs_on_the_twins() {
        let c = LlamaConfig {
            architecture: "llama".into(),
            vocab_size: 200,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 3,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            attention_bias: false,
        };
        let s = DecoderShape::new(&c, BLOCK_SIZE).unwrap();
        let tensors = DecoderWeights::<()>::layout(&s)
            .into_iter()
            .enumerate()
            .map(|(i, (n, sc, off))| fill_uniform_host(n, i as u64, sc, off))
            .collect();
        let w = DecoderWeights::from_tensors(&s, tensors).unwrap();
        let lora = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
        let mut ops = HostOps;
        let adapter = LoraWeights::init(&lora, &c, 1);
        let mut ad = TrainAdapter::new(&mut ops, &s, &adapter, AdamWConfig::default()).unwrap();
        let mut sc = TrainScratch::new(&mut ops, &s, &ad, 40).unwrap();
        let setup = CoserveSetup {
            decode_batch: 3,
            context: 20,
            seq_len: 40,
            train_tokens_per_iter: 16,
            bwd_layers_per_iter: 2,
            samples: 2,
        };
        let inv = c.rope_inv_freq();
        let r = run(&mut ops, &s, &w, &inv, &mut ad, &mut sc, 1e-3, 1.0, setup).unwrap();
        // Per sample: 3 forward iterations (16 + 16 + 8), 2 of backward (2 + 1 layers).
        assert_eq!(r.iterations, 2 * 5);
        assert_eq!(ad.step, 3);
        assert!(r.coserved_train_tokens_per_s > 0.0 && r.inference_only_step_ms > 0.0);
    }
}
