//! Decode steps as a server runs them on the device (`DeviceDecoder` with `replay_decodes`):
//! padded to their bucket and replayed as CUDA graphs, against the same steps run eagerly.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::model::{random_adapter, small_model, small_shape, E2E_ATOL, E2E_RTOL};
use super::{compare, Check};
use crate::backend::cuda::decoder::cuda::CudaOps;
use crate::backend::cuda::decoder::graphs::{context_bucket, row_bucket};
use crate::backend::cuda::decoder::runner::{DeviceDecoder, DeviceModel};
use crate::backend::cuda::decoder::{RowsOut, SeqRows, Want};
use crate::backend::cuda::twins::argmax_logprob;
use crate::backend::cuda::CudaError;
use crate::lora::ServedAdapter;

/// Blocks a sequence has (the last ones are never reached).
const PER_SEQ: usize = 8;

/// Five sequences prefilled, then decode steps of 5, 3, 1 and 2 of them (row buckets 8, 4, 1
/// and 2) with contexts crossing 32 and 64, sequence 1 through an adapter (steps with it are
/// recorded with the LoRA launches). Each step runs eagerly, then replayed (recorded first
/// where its bucket is new); both write the same K and V from the same inputs.
pub(super) fn check_replayed_decodes(
    mut ops: CudaOps,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let s = small_shape(false);
    let (weights, _, inv_freq) = small_model(&mut ops, &s, 23)?;
    let lens = [3usize, 14, 31, 60, 9];
    let blocks = lens.len() * PER_SEQ;
    let mut d = DeviceDecoder::new(ops, s.clone(), weights, inv_freq, blocks, 64)?;
    d.replay_decodes(true);
    let weights = random_adapter(&s, 8, &mut StdRng::seed_from_u64(5));
    let lease = Arc::new(ServedAdapter { id: "ft:selftest".into(), weights, created: 0 });
    let slot = d.place_adapters(&[&lease])?[0];
    let adapter = |i: usize| (i == 1).then_some(slot);
    // Blocks in reverse order, so a slot is never its row's position by accident.
    let table = |i: usize| -> Vec<u32> {
        (0..PER_SEQ).map(|b| (blocks - 1 - i * PER_SEQ - b) as u32).collect()
    };
    let prompts = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| SeqRows {
            tokens: (0..n).map(|j| ((i * 131 + j * 17) % s.vocab) as u32).collect(),
            start: 0,
            block_table: table(i),
            adapter: adapter(i),
        })
        .collect();
    let last: Vec<u32> =
        (0..lens.len()).map(|i| lens[..=i].iter().sum::<usize>() as u32 - 1).collect();
    let RowsOut::Greedy(first) = d.forward_seqs(prompts, &last, Want::Greedy)? else {
        return Err(CudaError::Shape("a prefill without greedy ids".into()));
    };
    let mut next: Vec<u32> = first.iter().map(|p| p.0).collect();
    let mut pos = lens.to_vec();
    let active: [&[usize]; 9] = [
        &[0, 1, 2, 3, 4],
        &[0, 1, 2, 3, 4],
        &[0, 2, 3],
        &[1, 3, 4],
        &[3],
        &[3],
        &[3],
        &[0, 3],
        &[0, 1, 2, 3, 4],
    ];
    let mut keys = Vec::new();
    for (step, act) in active.iter().enumerate() {
        let batch: Vec<SeqRows> = act
            .iter()
            .map(|&i| SeqRows {
                tokens: vec![next[i]],
                start: pos[i],
                block_table: table(i),
                adapter: adapter(i),
            })
            .collect();
        let rows: Vec<u32> = (0..act.len() as u32).collect();
        let key = (
            row_bucket(act.len()),
            context_bucket(act.iter().map(|&i| pos[i] + 1).max().unwrap_or(1)),
            act.contains(&1),
        );
        let eager = logits(d.forward_seqs(batch.clone(), &rows, Want::Logits)?)?;
        let replayed = d
            .forward_replayed(&batch, &rows, Want::Logits)?
            .ok_or_else(|| CudaError::Shape("a decode step the graphs did not take".into()))?;
        let replayed = logits(replayed)?;
        let recorded = if keys.contains(&key) { "replayed" } else { "recorded" };
        let through = if key.2 { " (one through an adapter)" } else { "" };
        let shape = format!(
            "step {step}: {} rows padded to {}{through}, context bucket {}, {recorded}",
            act.len(),
            key.0,
            key.1
        );
        compare(
            checks,
            "decoder_graph_replay (logits)",
            shape,
            &replayed,
            &eager,
            E2E_RTOL,
            E2E_ATOL,
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
        for (k, &i) in act.iter().enumerate() {
            pos[i] += 1;
            next[i] = argmax_logprob(&eager[k * s.vocab..(k + 1) * s.vocab]).0;
        }
    }
    // A fault of the device is reported against this check.
    d.check()?;
    let (replays, recordings) = d.replay_counts();
    let want = [(active.len() - keys.len()) as f32, keys.len() as f32];
    let shape = format!("{} steps, {} buckets (replays, recordings)", active.len(), keys.len());
    compare(
        checks,
        "decoder_graph_replay (steps replayed)",
        shape,
        &[replays as f32, recordings as f32],
        &want,
        0.0,
        0.0,
    );
    // Products were timed over cuBLASLt's algorithms at exactly the recorded buckets' row
    // counts, and each shape runs an algorithm that ran while timed.
    let tuned = d.ops().tuned_products();
    let mut rows: Vec<f32> = tuned.iter().map(|t| t.m as f32).collect();
    let mut want: Vec<f32> = keys.iter().map(|k| k.0 as f32).collect();
    for v in [&mut rows, &mut want] {
        v.sort_by(f32::total_cmp);
        v.dedup();
    }
    let shape = format!("{} product shapes tuned", tuned.len());
    compare(checks, "decoder_graph_replay (tuned rows)", shape.clone(), &rows, &want, 0.0, 0.0);
    let unrun = tuned.iter().filter(|t| t.chosen >= t.candidates || t.chosen_ms.is_none());
    let got = [unrun.count() as f32];
    compare(checks, "decoder_graph_replay (tuned, chosen ran)", shape, &got, &[0.0], 0.0, 0.0);
    Ok(())
}

fn logits(out: RowsOut) -> Result<Vec<f32>, CudaError> {
    match out {
        RowsOut::Logits(l) => Ok(l),
        RowsOut::Greedy(_) | RowsOut::Sampled(_) => {
            Err(CudaError::Shape("ids where logits were asked".into()))
        }
    }
}
