//! Engine behaviour through its handle: aborts free blocks, the waiting queue is bounded,
//! stopping rules, seeded sampling and prompt logprobs.

use crate::common;

use std::time::{Duration, Instant};

use coserve::engine::{EngineConfig, EngineEvent, FinishReason, SamplingParams, SubmitError};
use coserve::kv::KvDtype;

use common::engine::{collect, generate, metric_value, request, TestEngine};
use common::tiny_model::{write_gguf, TinyShape};

fn tiny(cfg: EngineConfig) -> (tempfile::TempDir, TestEngine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());
    let engine = TestEngine::start(&path, cfg);
    (dir, engine)
}

fn long(max_tokens: usize) -> SamplingParams {
    let mut p = SamplingParams::greedy(max_tokens);
    p.ignore_eos = true;
    p
}

fn wait_for_metric(engine: &TestEngine, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric_value(&engine.metrics.render(), name);
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v:?}, expected {want}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropping_a_stream_aborts_and_frees_blocks() {
    let (_dir, engine) = tiny(EngineConfig::default());
    let mut stream = engine.handle.submit(request(vec![1, 2, 3, 4, 5], long(900))).expect("submit");
    for _ in 0..3 {
        assert!(matches!(stream.next_blocking(), Some(EngineEvent::Token { .. })));
    }
    assert!(
        metric_value(&engine.metrics.render(), "coserve_kv_cache_usage_perc").unwrap_or(0.0) > 0.0
    );
    drop(stream);
    wait_for_metric(&engine, "coserve_kv_cache_usage_perc", 0.0);
    wait_for_metric(&engine, "coserve_num_requests_running", 0.0);
    let text = engine.metrics.render();
    assert!(
        text.contains(
            "coserve_request_success_total{finished_reason=\"abort\",lora_name=\"\",model_name=\"test\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn waiting_queue_is_bounded() {
    let cfg = EngineConfig { max_num_seqs: 1, max_waiting: 2, ..EngineConfig::default() };
    let (_dir, engine) = tiny(cfg);
    let mut first = engine.handle.submit(request(vec![7; 4], long(900))).expect("submit");
    assert!(matches!(first.next_blocking(), Some(EngineEvent::Token { .. })));
    // The only running slot is taken: two more may wait, the third is refused.
    let b = engine.handle.submit(request(vec![8; 4], long(2))).expect("second waits");
    let c = engine.handle.submit(request(vec![9; 4], long(2))).expect("third waits");
    match engine.handle.submit(request(vec![10; 4], long(2))) {
        Err(SubmitError::QueueFull(2)) => {}
        Err(e) => panic!("expected QueueFull(2), got {e:?}"),
        Ok(_) => panic!("expected QueueFull(2), got a stream"),
    }
    drop(first);
    // Once the slot frees, the waiting ones run to completion.
    assert_eq!(collect(b).tokens.len(), 2);
    assert_eq!(collect(c).tokens.len(), 2);
    assert!(engine.handle.submit(request(vec![11; 4], long(1))).is_ok());
}

#[test]
fn stop_rules_and_lengths() {
    let (_dir, engine) = tiny(EngineConfig::default());
    let prompt: Vec<u32> = (40..60).collect();
    let free = generate(&engine.handle, prompt.clone(), long(12));
    assert_eq!(free.tokens.len(), 12);
    assert_eq!(free.finish, FinishReason::Length);

    let stop_at = free.tokens[5];
    let first = free.tokens.iter().position(|&t| t == stop_at).expect("present");
    let mut p = long(12);
    p.stop_token_ids = vec![stop_at];
    let stopped = generate(&engine.handle, prompt.clone(), p);
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.tokens, free.tokens[..=first].to_vec(), "stops right after the stop token");
}

#[test]
fn eos_ends_generation_unless_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());
    let prompt: Vec<u32> = (40..60).collect();
    let free = {
        let (_d, engine) = tiny(EngineConfig::default());
        generate(&engine.handle, prompt.clone(), long(12)).tokens
    };
    // Declare the sixth generated token the model's EOS.
    let eos = free[5];
    let first = free.iter().position(|&t| t == eos).expect("present");
    let loaded =
        coserve::model::loader::load_model(&path, coserve::model::weights::WeightsDtype::F32)
            .expect("load");
    let engine = TestEngine::from_parts(
        loaded.model,
        loaded.tokenizer,
        None,
        vec![eos],
        EngineConfig::default(),
    );
    let g = generate(&engine.handle, prompt.clone(), SamplingParams::greedy(12));
    assert_eq!(g.finish, FinishReason::Stop);
    assert_eq!(g.tokens, free[..=first].to_vec());
    let g = generate(&engine.handle, prompt, long(12));
    assert_eq!(g.tokens, free, "ignore_eos runs past EOS");
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_the_batch() {
    let (_dir, engine) = tiny(EngineConfig::default());
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let prompt: Vec<u32> = (100..110).collect();
    let a = generate(&engine.handle, prompt.clone(), params(42)).tokens;
    // The same request in a crowd of others gives the same tokens.
    let crowd: Vec<_> = (0..5u64)
        .map(|s| {
            engine
                .handle
                .submit(request((s as u32..s as u32 + 30).collect(), params(s)))
                .expect("submit")
        })
        .collect();
    let b = generate(&engine.handle, prompt.clone(), params(42)).tokens;
    for s in crowd {
        collect(s);
    }
    assert_eq!(a, b);
    let c = generate(&engine.handle, prompt, params(43)).tokens;
    assert_ne!(a, c, "a different seed should give a different sample");
}

#[test]
fn prompt_logprobs_cover_every_prompt_token() {
    // A small token budget makes the prompt arrive in several chunks.
    let cfg = EngineConfig { max_num_batched_tokens: 8, ..EngineConfig::default() };
    let (_dir, engine) = tiny(cfg);
    let prompt: Vec<u32> = (0..29).map(|i| (i * 13 % 256) as u32).collect();
    let mut p = long(3);
    p.prompt_logprobs = Some(2);
    p.logprobs = Some(2);
    let g = generate(&engine.handle, prompt.clone(), p);
    let plp = g.prompt_logprobs.expect("prompt logprobs");
    assert_eq!(plp.len(), prompt.len());
    assert!(plp[0].is_none());
    for (i, lp) in plp.iter().enumerate().skip(1) {
        let lp = lp.as_ref().expect("logprob");
        assert_eq!(lp.token_id, prompt[i]);
        assert!(lp.logprob <= 0.0 && lp.top.len() == 2);
    }
    assert_eq!(g.logprobs.len(), 3);
}

#[test]
fn bad_prompts_are_errors_not_crashes() {
    let cfg = EngineConfig {
        kv_cache_bytes: 4 * coserve::kv::KvCache::bytes_per_block(2, 16, 2, 16),
        ..EngineConfig::default()
    };
    let (_dir, engine) = tiny(cfg);
    assert_eq!(engine.max_model_len, 64, "max_model_len is capped by the cache");
    for prompt in [vec![], vec![1; 64], vec![100_000]] {
        let mut s = engine.handle.submit(request(prompt, long(1))).expect("submit");
        assert!(matches!(s.next_blocking(), Some(EngineEvent::Error(_))));
    }
    // The engine still serves.
    assert_eq!(generate(&engine.handle, vec![1, 2, 3], long(2)).tokens.len(), 2);
}

#[test]
fn an_f16_cache_holds_twice_the_blocks_of_the_same_memory() {
    let per_block = coserve::kv::KvCache::bytes_per_block(2, 16, 2, 16);
    for (dtype, blocks) in [(KvDtype::F32, 4), (KvDtype::F16, 8)] {
        let cfg = EngineConfig {
            kv_cache_bytes: 4 * per_block,
            kv_cache_dtype: Some(dtype),
            ..EngineConfig::default()
        };
        let (_dir, engine) = tiny(cfg);
        assert_eq!(engine.max_model_len, blocks * 16, "{dtype}: the cache caps max_model_len");
        // A prompt that fills all but one slot of the f16 cache still runs to the end.
        let prompt: Vec<u32> = (0..blocks as u32 * 16 - 3).map(|i| i % 200 + 1).collect();
        let g = generate(&engine.handle, prompt, long(2));
        assert_eq!(g.tokens.len(), 2, "{dtype}");
    }
}

#[test]
fn shutdown_read_ahead_with_a_hangup_still_stops_the_engine() {
    // A client hangs up (its next token cannot be delivered) while a shutdown is queued
    // behind its abort: the engine reads both ahead of their turn and must still stop.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &TinyShape::default());
    let loaded =
        coserve::model::loader::load_model(&path, coserve::model::weights::WeightsDtype::F32)
            .expect("load");
    let metrics = std::sync::Arc::new(coserve::metrics::Metrics::new("test"));
    let e = coserve::engine::start(loaded.model, vec![], &EngineConfig::default(), metrics)
        .expect("engine starts");
    let mut s = e.handle.submit(request(vec![1, 2, 3], long(100_000))).expect("submit");
    assert!(matches!(s.next_blocking(), Some(EngineEvent::Token { .. })));
    drop(s);
    e.handle.shutdown();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = e.thread.join();
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(Duration::from_secs(20)).is_ok(), "the engine thread did not stop");
}
