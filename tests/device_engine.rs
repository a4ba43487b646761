//! The engine and the server on the device backend (`serve --device cuda`), driven here by the
//! CUDA decoder's CPU twins: the engine hands the decoder the right rows, positions, blocks and
//! logits rows under chunked prefill and preemption, and a server on that backend answers
//! completions and refuses fine-tuning with a clear error.

mod common;

use coserve::backend::cuda::decoder::from_model::from_llama;
use coserve::backend::cuda::decoder::host::HostOps;
use coserve::backend::cuda::decoder::runner::DeviceDecoder;
use coserve::backend::cuda::decoder::SeqRows;
use coserve::backend::cuda::twins::argmax_logprob;
use coserve::engine::{EngineConfig, SamplingParams};
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;
use serde_json::{json, Value};

use common::device::{twin_backend, TWIN_DEVICE};
use common::engine::{collect, metric_value, request, TestEngine};
use common::server::TestServer;
use common::tiny_model::{write_gguf, TinyShape};

const NEW_TOKENS: usize = 12;

/// The tiny model with heads of 32 (the kernels take multiples of 32).
fn shape() -> TinyShape {
    TinyShape { heads: 2, kv_heads: 1, ..TinyShape::default() }
}

fn prompts() -> Vec<Vec<u32>> {
    [3usize, 40, 90, 17, 130]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| ((i * 37 + j * 11 + j * j) % 256) as u32).collect())
        .collect()
}

/// Greedy tokens of `prompt` from the decoder alone: the prompt in one forward, then one
/// forward per token, on a cache of its own.
fn decoder_alone(path: &std::path::Path, prompt: &[u32]) -> Vec<u32> {
    let model = load_model(path, WeightsDtype::F32).expect("tiny model").model;
    let h = from_llama(&model, 16).expect("decoder weights");
    let vocab = h.shape.vocab;
    let blocks = (prompt.len() + NEW_TOKENS).div_ceil(16);
    let mut d = DeviceDecoder::new(HostOps, h.shape, h.weights, h.inv_freq, blocks).unwrap();
    // Blocks in reverse order, so a slot is never its row's position by accident.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    let mut out = Vec::new();
    while out.len() < NEW_TOKENS {
        let rows = tokens.len();
        let seq = SeqRows { tokens: tokens.clone(), start, block_table: table.clone() };
        let logits = d.forward_rows(vec![seq], &[rows as u32 - 1]).expect("forward");
        assert_eq!(logits.len(), vocab);
        let next = argmax_logprob(&logits).0;
        out.push(next);
        start += rows;
        tokens = vec![next];
    }
    out
}

fn params() -> SamplingParams {
    let mut p = SamplingParams::greedy(NEW_TOKENS);
    p.ignore_eos = true;
    p
}

#[test]
fn the_device_engine_serves_what_the_decoder_computes_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let alone: Vec<Vec<u32>> = prompts().iter().map(|p| decoder_alone(&path, p)).collect();

    // bf16 blocks: half the bytes of the CPU cache's. 14 blocks hold well under what the
    // five sequences need together (23), and a 32-token budget chunks every long prompt.
    let per_block = coserve::kv::KvCache::bytes_per_block(2, 16, 1, 32) / 2;
    let cfg = EngineConfig {
        max_num_batched_tokens: 32,
        kv_cache_bytes: 14 * per_block,
        ..EngineConfig::default()
    };
    let engine = TestEngine::start_on(&path, cfg, twin_backend());
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| engine.handle.submit(request(p, params())).expect("submit"))
        .collect();
    let served: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();

    let metrics = engine.metrics.render();
    let preemptions = metric_value(&metrics, "coserve_num_preemptions_total").unwrap_or(0.0);
    assert!(preemptions > 0.0, "the small cache was meant to force preemption");
    for (i, (a, b)) in alone.iter().zip(&served).enumerate() {
        assert_eq!(a, b, "prompt {i}: the engine's tokens differ from the decoder's alone");
    }
    let usage = metric_value(&engine.metrics.render(), "coserve_kv_cache_usage_perc");
    assert_eq!(usage, Some(0.0), "all blocks are back once every request finished");
}

#[test]
fn prompt_logprobs_come_from_every_row_of_the_device_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let cfg = EngineConfig { max_num_batched_tokens: 8, ..EngineConfig::default() };
    let engine = TestEngine::start_on(&path, cfg, twin_backend());
    let prompt: Vec<u32> = (0..21).map(|j| (j * 13 % 256) as u32).collect();
    let mut p = params();
    p.prompt_logprobs = Some(0);
    let g = collect(engine.handle.submit(request(prompt.clone(), p)).expect("submit"));
    let lp = g.prompt_logprobs.expect("prompt logprobs");
    assert_eq!(lp.len(), prompt.len());
    assert!(lp[0].is_none(), "the first token has no logprob");
    assert!(lp[1..].iter().all(|l| l.as_ref().is_some_and(|l| l.logprob <= 0.0)));
    assert_eq!(g.tokens, decoder_alone(&path, &prompt), "the greedy tokens of the same prompt");
}

#[tokio::test]
async fn a_server_on_a_device_answers_completions_and_refuses_fine_tuning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let server = TestServer::start_path_on(Some(&path), |_| {}, Some(twin_backend())).await;
    let c = reqwest::Client::new();

    let body = json!({"model": server.model_id(), "prompt": "hello", "max_tokens": 5,
                      "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let r = c.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().map(Vec::len), Some(5), "{v}");

    let job = json!({"model": server.model_id(), "training_file": "file-abc"});
    let r = c.post(server.url("/v1/fine_tuning/jobs")).json(&job).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(TWIN_DEVICE) && msg.contains("--device cpu"), "{e}");
    server.stop().await;
}
