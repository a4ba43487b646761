//! Greedy outputs do not depend on what else is in the batch: chunked prefill, concurrent
//! decodes and preemption by recompute all give the tokens a prompt gets when served alone.

use crate::common;

use coserve::engine::{EngineConfig, SamplingParams};

use common::engine::{collect, generate, metric_value, request, TestEngine};
use common::tiny_model::{write_gguf, TinyShape};

fn prompts() -> Vec<Vec<u32>> {
    let lens = [3usize, 17, 40, 90, 5, 130, 64, 200];
    lens.iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| ((i * 31 + j * 7 + j * j) % 256) as u32).collect())
        .collect()
}

fn params() -> SamplingParams {
    let mut p = SamplingParams::greedy(40);
    p.ignore_eos = true;
    p
}

#[test]
fn concurrent_chunked_and_preempted_equal_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());

    let alone: Vec<Vec<u32>> = {
        let engine = TestEngine::start(&path, EngineConfig::default());
        prompts().into_iter().map(|p| generate(&engine.handle, p, params()).tokens).collect()
    };

    // 24 blocks of 16 tokens hold under half of what the 8 sequences need together,
    // and a 32-token budget splits every long prompt into chunks.
    let per_block = coserve::kv::KvCache::bytes_per_block(2, 16, 2, 16);
    let cfg = EngineConfig {
        max_num_batched_tokens: 32,
        kv_cache_bytes: 24 * per_block,
        ..EngineConfig::default()
    };
    let engine = TestEngine::start(&path, cfg);
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| engine.handle.submit(request(p, params())).expect("submit"))
        .collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();

    let preemptions =
        metric_value(&engine.metrics.render(), "coserve_num_preemptions_total").unwrap_or(0.0);
    assert!(preemptions > 0.0, "the small cache was meant to force preemption");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "prompt {i}: batched output differs from the output alone");
        assert_eq!(a.len(), 40);
    }
    let usage =
        metric_value(&engine.metrics.render(), "coserve_kv_cache_usage_perc").unwrap_or(-1.0);
    assert_eq!(usage, 0.0, "all blocks are back once every request finished");
}
