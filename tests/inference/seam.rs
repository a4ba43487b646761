//! The engine on the CPU with the forward written once over the backend seam
//! (`CpuForward::Seam`) returns the CPU model engine's tokens and logprobs exactly: greedy,
//! seeded sampling with penalties, prompt logprobs, prompts arriving in chunks among others.

use crate::common;

use coserve::engine::{CpuForward, EngineConfig, SamplingParams};
use coserve::kv::KvDtype;

use common::engine::{collect, request, Generation, TestEngine};
use common::tiny_model::{write_gguf, TinyShape};

fn requests() -> Vec<(Vec<u32>, SamplingParams)> {
    let greedy = SamplingParams {
        logprobs: Some(3),
        prompt_logprobs: Some(2),
        ignore_eos: true,
        ..SamplingParams::greedy(10)
    };
    let sampled = |seed| SamplingParams {
        temperature: 0.9,
        top_p: 0.9,
        top_k: 40,
        seed: Some(seed),
        presence_penalty: 0.5,
        repetition_penalty: 1.2,
        logprobs: Some(2),
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    (0..6u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + 7 * i).map(|t| (t * 13 + i) % 250).collect();
            (prompt, if i % 2 == 0 { greedy.clone() } else { sampled(u64::from(i)) })
        })
        .collect()
}

/// Every request submitted at once, so prompts split into chunks share forwards with others.
fn run(path: &std::path::Path, forward: CpuForward, kv: KvDtype) -> Vec<String> {
    let cfg = EngineConfig {
        max_num_batched_tokens: 16,
        kv_cache_dtype: Some(kv),
        threads: 2,
        cpu_forward: forward,
        ..EngineConfig::default()
    };
    let engine = TestEngine::start(path, cfg);
    let streams: Vec<_> = requests()
        .into_iter()
        .map(|(p, params)| engine.handle.submit(request(p, params)).expect("submit"))
        .collect();
    streams
        .into_iter()
        .map(|s| {
            let Generation { tokens, logprobs, prompt_logprobs, finish } = collect(s);
            format!("{tokens:?} {logprobs:?} {prompt_logprobs:?} {finish:?}")
        })
        .collect()
}

#[test]
fn the_seam_engine_gives_the_cpu_model_engines_tokens_and_logprobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());
    for kv in [KvDtype::F32, KvDtype::F16] {
        let model = run(&path, CpuForward::Model, kv);
        let seam = run(&path, CpuForward::Seam, kv);
        for (i, (m, s)) in model.iter().zip(&seam).enumerate() {
            assert_eq!(m, s, "request {i}, {kv} cache");
        }
    }
}
