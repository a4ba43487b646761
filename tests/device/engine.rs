//! The engine and the server on the device backend (`serve --device cuda`), driven here by the
//! CUDA decoder's CPU twins: the engine hands the decoder the right rows, positions, blocks and
//! logits rows under chunked prefill and preemption, and a server on that backend answers
//! completions and fine-tunes over HTTP.

use crate::common;

use coserve::backend::cuda::decoder::from_model::from_llama;
use coserve::backend::cuda::decoder::host::HostOps;
use coserve::backend::cuda::decoder::runner::DeviceDecoder;
use coserve::backend::cuda::decoder::SeqRows;
use coserve::backend::cuda::twins::argmax_logprob;
use std::sync::Arc;

use coserve::backend::cuda::decoder::runner::{AdapterRows, DeviceModel};
use coserve::backend::cuda::decoder::{RowsOut, Want};
use coserve::backend::cuda::CudaError;
use coserve::engine::sampler::logprobs_of;
use coserve::engine::{Backend, EngineConfig, EngineEvent, SamplingParams, TokenLogprob};
use coserve::lora::{AdapterLease, LoraConfig, LoraWeights, ServedAdapter};
use coserve::model::llama::ForwardBatch;
use coserve::model::loader::load_model;
use coserve::model::weights::WeightsDtype;
use serde_json::{json, Value};

use common::device::{padding_twin_backend, twin_backend, wrap_device};
use common::engine::{collect, metric_value, request, Generation, TestEngine};
use common::multipart::upload;
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
    decoder_alone_with(path, prompt, None)
}

/// As `decoder_alone`, through `adapter`.
fn decoder_alone_with(
    path: &std::path::Path,
    prompt: &[u32],
    adapter: Option<&AdapterLease>,
) -> Vec<u32> {
    scored_alone(path, prompt, adapter).into_iter().map(|(id, _)| id).collect()
}

/// As `decoder_alone_with`, each token with its log-probability.
fn scored_alone(
    path: &std::path::Path,
    prompt: &[u32],
    adapter: Option<&AdapterLease>,
) -> Vec<(u32, f32)> {
    let model = load_model(path, WeightsDtype::F32).expect("tiny model").model;
    let h = from_llama(&model, 16).expect("decoder weights");
    let vocab = h.shape.vocab;
    let blocks = (prompt.len() + NEW_TOKENS).div_ceil(16);
    let mut d = DeviceDecoder::new(HostOps, h.shape, h.weights, h.inv_freq, blocks, 256).unwrap();
    // Blocks in reverse order, so a slot is never its row's position by accident.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let slot = adapter.map(|a| d.place_adapters(&[a]).expect("placed")[0]);
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    let mut out = Vec::new();
    while out.len() < NEW_TOKENS {
        let rows = tokens.len();
        let seq =
            SeqRows { adapter: slot, tokens: tokens.clone(), start, block_table: table.clone() };
        let logits = d.forward_rows(vec![seq], &[rows as u32 - 1]).expect("forward");
        assert_eq!(logits.len(), vocab);
        let (next, logprob) = argmax_logprob(&logits);
        out.push((next, logprob));
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
    serves_what_the_decoder_computes_alone(twin_backend());
}

/// Decode steps padded to their buckets (rows of token 0 in a block of their own) change no
/// sequence's tokens: five short prompts prefilled together, then decode steps of 5, 4, 3 and
/// 2 rows (padded to 8, 4, 4 and 2) as they finish one by one. Also under the chunking and
/// preemption of the test above.
#[test]
fn padded_decode_steps_serve_what_the_decoder_computes_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let prompts: Vec<Vec<u32>> = [3usize, 9, 6, 2, 5]
        .iter()
        .map(|&n| (0..n as u32).map(|j| 7 + j * 13 % 200).collect())
        .collect();
    let alone: Vec<Vec<(u32, f32)>> =
        prompts.iter().map(|p| scored_alone(&path, p, None)).collect();
    let engine = TestEngine::start_on(&path, EngineConfig::default(), padding_twin_backend());
    let lengths = [12, 5, 9, 12, 7];
    let streams: Vec<_> = prompts
        .into_iter()
        .zip(lengths)
        .map(|(p, n)| {
            let mut params = params();
            params.max_tokens = n;
            params.logprobs = Some(0);
            engine.handle.submit(request(p, params)).expect("submit")
        })
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        // The log-probabilities too: a padding row writing into a sequence's cache may well
        // leave its greedy tokens alone.
        let g = collect(s);
        let logprobs = g.logprobs.into_iter().map(|l| l.expect("a logprob").logprob);
        let served: Vec<(u32, f32)> = g.tokens.into_iter().zip(logprobs).collect();
        assert_eq!(served, alone[i][..lengths[i]], "prompt {i}");
    }
    serves_what_the_decoder_computes_alone(padding_twin_backend());
}

fn serves_what_the_decoder_computes_alone(backend: coserve::engine::Backend) {
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
    let engine = TestEngine::start_on(&path, cfg, backend);
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
fn a_device_refuses_a_cpu_kv_cache_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let metrics = Arc::new(coserve::metrics::Metrics::new("test"));
    for dtype in [coserve::kv::KvDtype::F32, coserve::kv::KvDtype::F16] {
        let model = load_model(&path, WeightsDtype::F32).expect("load").model;
        let cfg = EngineConfig { kv_cache_dtype: Some(dtype), ..EngineConfig::default() };
        let started =
            coserve::engine::start_on(model, vec![], &cfg, metrics.clone(), twin_backend());
        let Err(e) = started else { panic!("a device engine started with a {dtype} KV cache") };
        let msg = e.to_string();
        assert!(msg.contains("--kv-cache-dtype") && msg.contains("bf16"), "{msg}");
    }
}

#[test]
fn prompt_logprobs_come_from_every_row_of_the_device_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let prompt: Vec<u32> = (0..21).map(|j| (j * 13 % 256) as u32).collect();
    // The decoder alone: the logits of every prompt row, row r scoring token r + 1.
    let want: Vec<f32> = {
        let model = load_model(&path, WeightsDtype::F32).expect("tiny model").model;
        let h = from_llama(&model, 16).expect("decoder weights");
        let vocab = h.shape.vocab;
        let mut d = DeviceDecoder::new(HostOps, h.shape, h.weights, h.inv_freq, 2, 64).unwrap();
        let seq =
            SeqRows { adapter: None, tokens: prompt.clone(), start: 0, block_table: vec![1, 0] };
        let rows: Vec<u32> = (0..prompt.len() as u32).collect();
        let logits = d.forward_rows(vec![seq], &rows).expect("forward");
        (0..prompt.len() - 1)
            .map(|r| logprobs_of(&logits[r * vocab..(r + 1) * vocab], prompt[r + 1], 0).logprob)
            .collect()
    };

    // Served in chunks of 8 next to another prompt, so each forward gathers some rows only.
    let cfg = EngineConfig { max_num_batched_tokens: 8, ..EngineConfig::default() };
    let engine = TestEngine::start_on(&path, cfg, twin_backend());
    let other = engine.handle.submit(request(prompts()[2].clone(), params())).expect("submit");
    let mut p = params();
    p.prompt_logprobs = Some(0);
    let g = collect(engine.handle.submit(request(prompt.clone(), p)).expect("submit"));
    collect(other);
    let lp = g.prompt_logprobs.expect("prompt logprobs");
    assert_eq!(lp.len(), prompt.len());
    assert!(lp[0].is_none(), "the first token has no logprob");
    for (r, (got, want)) in lp[1..].iter().zip(&want).enumerate() {
        let got = got.as_ref().expect("a logprob").logprob;
        assert!((got - want).abs() < 1e-6, "prompt token {}: {got} vs {want}", r + 1);
    }
    assert_eq!(g.tokens, decoder_alone(&path, &prompt), "the greedy tokens of the same prompt");
}

/// A served adapter of rank `r` on every projection, with weights that change the outputs.
pub(crate) fn adapter(
    model: &coserve::model::config::LlamaConfig,
    r: usize,
    seed: u64,
) -> AdapterLease {
    let config = LoraConfig { r, alpha: 2.0 * r as f32, ..LoraConfig::default() };
    let mut weights = LoraWeights::zeros(&config, model);
    for (i, p) in weights.pairs_mut().enumerate() {
        let wave = |n: usize, k: u64, amp: f32| -> Vec<f32> {
            (0..n).map(|j| amp * ((j as f32 * 0.37 + (seed + k) as f32 * 1.3).sin())).collect()
        };
        let amp = 1.0 / (p.in_dim as f32).sqrt();
        p.a = wave(p.a.len(), 2 * i as u64, amp);
        p.b = wave(p.b.len(), 2 * i as u64 + 1, 1.0);
    }
    Arc::new(ServedAdapter { id: format!("ft:tiny:{seed}"), weights, created: 0 })
}

#[test]
fn fine_tuned_models_are_served_on_a_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let model = load_model(&path, WeightsDtype::F32).expect("tiny model").model;
    let adapters = [None, Some(adapter(&model.config, 4, 1)), Some(adapter(&model.config, 8, 2))];
    let prompt = prompts().swap_remove(2);
    let alone: Vec<Vec<u32>> =
        adapters.iter().map(|a| decoder_alone_with(&path, &prompt, a.as_ref())).collect();
    assert_ne!(alone[0], alone[1], "the adapter changes the tokens");
    assert_ne!(alone[1], alone[2]);

    // The three in one batch, twice each, chunked: rows of different adapters side by side.
    let cfg = EngineConfig { max_num_batched_tokens: 32, ..EngineConfig::default() };
    let engine = TestEngine::start_on(&path, cfg, twin_backend());
    let streams: Vec<_> = adapters
        .iter()
        .chain(&adapters)
        .map(|a| {
            let mut req = request(prompt.clone(), params());
            req.adapter = a.clone();
            engine.handle.submit(req).expect("submit")
        })
        .collect();
    let served: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    for (i, got) in served.iter().enumerate() {
        assert_eq!(got, &alone[i % 3], "request {i} (adapter {})", i % 3);
    }
}

#[test]
fn greedy_picks_on_the_device_equal_the_host_samplers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let engine = TestEngine::start_on(&path, EngineConfig::default(), twin_backend());
    // The same prompts three ways: plain greedy (the device's argmax, with the chosen token's
    // logprob), greedy with two alternatives (the device sampler), and greedy with two
    // alternatives and prompt logprobs (whole rows of logits to the host sampler).
    let run = |logprobs: usize, prompt_logprobs: Option<usize>| -> Vec<_> {
        let streams: Vec<_> = prompts()
            .into_iter()
            .map(|p| {
                let mut params = params();
                params.logprobs = Some(logprobs);
                params.prompt_logprobs = prompt_logprobs;
                engine.handle.submit(request(p, params)).expect("submit")
            })
            .collect();
        streams.into_iter().map(collect).collect()
    };
    let (argmax, device, host) = (run(0, None), run(2, None), run(2, Some(0)));
    for (i, ((a, d), h)) in argmax.iter().zip(&device).zip(&host).enumerate() {
        assert_eq!(a.tokens, h.tokens, "prompt {i}");
        assert_eq!(d.tokens, h.tokens, "prompt {i}");
        for ((a, d), h) in a.logprobs.iter().zip(&d.logprobs).zip(&h.logprobs) {
            let (a, d, h) = (a.as_ref(), d.as_ref(), h.as_ref().expect("logprob"));
            let (a, d) = (a.expect("logprob"), d.expect("logprob"));
            assert_eq!((a.token_id, d.token_id), (h.token_id, h.token_id));
            assert!((a.logprob - h.logprob).abs() < 1e-5, "{a:?} {h:?}");
            assert!((d.logprob - h.logprob).abs() < 1e-5, "{d:?} {h:?}");
            assert!(a.top.is_empty() && h.top.len() == 2 && d.top.len() == 2);
            for (x, y) in d.top.iter().zip(&h.top) {
                assert_eq!(x.0, y.0);
                assert!((x.1 - y.1).abs() < 1e-5, "{x:?} {y:?}");
            }
        }
    }
    let p = prompts().swap_remove(1);
    assert_eq!(argmax[1].tokens, decoder_alone(&path, &p));
}

/// Seeded sampling with every filter, `logprobs` alternatives.
fn sampled(seed: u64, logprobs: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.9,
        min_p: 0.02,
        seed: Some(seed),
        logprobs: Some(logprobs),
        ..params()
    }
}

/// The twin device, counting its forwards by what they bring back: (logits, greedy, sampled).
struct CountingDevice {
    inner: Box<dyn DeviceModel>,
    counts: Arc<std::sync::Mutex<[usize; 3]>>,
}

impl DeviceModel for CountingDevice {
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        let kind = match want {
            Want::Logits => 0,
            Want::Greedy => 1,
            Want::Sample(..) => 2,
        };
        self.counts.lock().expect("counts")[kind] += 1;
        self.inner.forward(batch, adapters, want)
    }

    fn check(&mut self) -> Result<(), CudaError> {
        self.inner.check()
    }
}

fn counting_backend() -> (Backend, Arc<std::sync::Mutex<[usize; 3]>>) {
    let counts = Arc::new(std::sync::Mutex::new([0; 3]));
    let c = counts.clone();
    let backend = wrap_device(twin_backend(), move |inner| {
        Box::new(CountingDevice { inner, counts: c.clone() })
    });
    (backend, counts)
}

#[test]
fn a_seeded_sequence_draws_the_same_tokens_on_the_device_and_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let (backend, counts) = counting_backend();
    let engine = TestEngine::start_on(&path, EngineConfig::default(), backend);
    let run = |seed: u64, change: &dyn Fn(&mut SamplingParams), penalised: bool| -> Vec<_> {
        // A request with a presence penalty and logprobs in the batch sends every row's logits
        // to the host.
        let other = penalised.then(|| {
            let p = SamplingParams {
                presence_penalty: 0.5,
                logprobs: Some(1),
                max_tokens: 40,
                ..params()
            };
            engine.handle.submit(request(prompts()[0].clone(), p)).expect("submit")
        });
        let streams: Vec<_> = (0..prompts().len())
            .map(|i| {
                let mut p = sampled(seed + i as u64, 3);
                change(&mut p);
                engine.handle.submit(request(prompts()[i].clone(), p)).expect("submit")
            })
            .collect();
        let out: Vec<_> = streams.into_iter().map(collect).collect();
        other.map(collect);
        out
    };
    let device = run(1, &|_| {}, false);
    let [logits, _, samples] = *counts.lock().expect("counts");
    assert!(logits == 0 && samples > 0, "sampled on the device: {logits} logits forwards");
    // Sampled on the host: prompt logprobs keep a sequence's every step there, or another
    // request's penalty does.
    let with_prompt_logprobs = run(1, &|p| p.prompt_logprobs = Some(0), false);
    let beside_penalty = run(1, &|_| {}, true);
    assert!(counts.lock().expect("counts")[0] > 0, "sampled on the host");
    for (i, d) in device.iter().enumerate() {
        for (how, h) in
            [("prompt logprobs", &with_prompt_logprobs[i]), ("penalty", &beside_penalty[i])]
        {
            assert_eq!(d.tokens, h.tokens, "prompt {i}, host sampling for {how}");
            for (x, y) in d.logprobs.iter().zip(&h.logprobs) {
                let (x, y) = (x.as_ref().expect("logprob"), y.as_ref().expect("logprob"));
                assert!((x.logprob - y.logprob).abs() < 1e-5, "{x:?} {y:?}");
                let ids = |t: &[(u32, f32)]| t.iter().map(|e| e.0).collect::<Vec<_>>();
                assert_eq!(ids(&x.top), ids(&y.top));
            }
        }
    }
    // The seed fixes the tokens; other seeds and greedy give others.
    assert_eq!(
        run(1, &|_| {}, false).iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        device.iter().map(|g| &g.tokens).collect::<Vec<_>>()
    );
    let reseeded = run(100, &|_| {}, false);
    let greedy = run(1, &|p| p.temperature = 0.0, false);
    for other in [&reseeded, &greedy] {
        assert!(device.iter().zip(other).any(|(a, b)| a.tokens != b.tokens));
    }
}

/// Repetition, frequency and presence penalties apply on the device before its draw as the
/// host applies them: penalised sequences, greedy and sampled, draw the same tokens whether
/// their batch samples on the device or on the host, and the penalties change them.
#[test]
fn penalised_sequences_sample_on_the_device_as_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let (backend, counts) = counting_backend();
    let engine = TestEngine::start_on(&path, EngineConfig::default(), backend);
    let penalise = |p: &mut SamplingParams| {
        p.repetition_penalty = 1.5;
        p.frequency_penalty = 0.7;
        p.presence_penalty = 0.4;
    };
    // Prompt i: greedy when i is even, seeded sampling when odd, each with two alternatives'
    // logprobs (of the logits before the penalties).
    let run = |penalised: bool, on_host: bool| -> Vec<Generation> {
        // Prompt logprobs keep a row's logits, and so its whole batch's, on the host.
        let other = on_host.then(|| {
            let p = SamplingParams { prompt_logprobs: Some(0), max_tokens: 40, ..params() };
            engine.handle.submit(request(prompts()[0].clone(), p)).expect("submit")
        });
        let streams: Vec<_> = (0..prompts().len())
            .map(|i| {
                let mut p = SamplingParams { logprobs: Some(2), ..sampled(7 + i as u64, 0) };
                if i % 2 == 0 {
                    p.temperature = 0.0;
                }
                if penalised {
                    penalise(&mut p);
                }
                engine.handle.submit(request(prompts()[i].clone(), p)).expect("submit")
            })
            .collect();
        let out = streams.into_iter().map(collect).collect();
        other.map(collect);
        out
    };
    let sampled_on = |on: &str| {
        let prefix = format!("coserve_sampled_rows_total{{model_name=\"test\",on=\"{on}\"}}");
        metric_value(&engine.metrics.render(), &prefix).unwrap_or(0.0)
    };
    let device = run(true, false);
    let [logits, _, samples] = *counts.lock().expect("counts");
    assert!(logits == 0 && samples > 0, "penalised rows on the device: {logits} logits forwards");
    assert_eq!(sampled_on("host"), 0.0);
    // Every token of every request is a sampled row.
    let rows = (prompts().len() * NEW_TOKENS) as f64;
    assert_eq!(sampled_on("device"), rows);
    let host = run(true, true);
    assert!(counts.lock().expect("counts")[0] > 0, "sampled on the host");
    assert!(sampled_on("host") >= rows, "{} rows sampled on the host", sampled_on("host"));
    let tokens =
        |g: &[Generation]| -> Vec<Vec<u32>> { g.iter().map(|g| g.tokens.clone()).collect() };
    assert_eq!(tokens(&device), tokens(&host), "penalised tokens, device against host");
    for (d, h) in device.iter().zip(&host) {
        for (d, h) in d.logprobs.iter().zip(&h.logprobs) {
            let (d, h) = (d.as_ref().expect("a logprob"), h.as_ref().expect("a logprob"));
            assert!((d.logprob - h.logprob).abs() < 1e-4, "{d:?} against {h:?}");
            let ids = |t: &TokenLogprob| -> Vec<u32> { t.top.iter().map(|a| a.0).collect() };
            assert_eq!(ids(d), ids(h), "alternatives");
            for (a, b) in d.top.iter().zip(&h.top) {
                assert!((a.1 - b.1).abs() < 1e-4, "{d:?} against {h:?}");
            }
        }
    }
    assert_ne!(tokens(&device), tokens(&run(false, false)), "the penalties change the tokens");
}

/// A device that faults for good on its third forward, as a poisoned CUDA context does.
struct FaultingDevice {
    inner: Box<dyn DeviceModel>,
    forwards: usize,
}

impl DeviceModel for FaultingDevice {
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        adapters: &[AdapterRows<'_>],
        want: Want<'_>,
    ) -> Result<RowsOut, CudaError> {
        self.forwards += 1;
        if self.forwards >= 3 {
            return Err(CudaError::Driver("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        }
        self.inner.forward(batch, adapters, want)
    }

    fn check(&mut self) -> Result<(), CudaError> {
        if self.forwards >= 3 {
            Err(CudaError::Driver("CUDA_ERROR_ILLEGAL_ADDRESS".into()))
        } else {
            self.inner.check()
        }
    }
}

#[test]
fn a_device_that_faults_for_good_stops_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_gguf(dir.path(), &shape());
    let backend =
        wrap_device(twin_backend(), |inner| Box::new(FaultingDevice { inner, forwards: 0 }));
    let engine = TestEngine::start_on(&path, EngineConfig::default(), backend);
    let mut stream = engine.handle.submit(request(vec![5, 6, 7], params())).expect("submit");
    let mut tokens = 0;
    let error = loop {
        match stream.next_blocking() {
            Some(EngineEvent::Token { .. }) => tokens += 1,
            Some(EngineEvent::Error(e)) => break e,
            other => panic!("expected tokens, then an error: {other:?}"),
        }
    };
    assert_eq!(tokens, 2, "two forwards worked");
    assert!(error.contains("ILLEGAL_ADDRESS"), "{error}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.handle.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!engine.handle.is_running(), "the engine stops, so /health answers 503");
    assert!(engine.handle.submit(request(vec![1], params())).is_err());
}

#[tokio::test]
async fn a_server_on_a_device_answers_completions_and_fine_tunes() {
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

    // A fine-tuning job over HTTP trains on the device, and its model serves at once.
    let lines: String = (0..4)
        .map(|i| {
            json!({"prompt": format!("Q{i}?"), "completion": format!(" A{i}.")}).to_string() + "\n"
        })
        .collect();
    let file = upload(server.base_url(), "train.jsonl", "fine-tune", lines.as_bytes()).await;
    let job = json!({"model": server.model_id(), "training_file": file["id"],
                     "method": {"type": "supervised", "supervised": {
                         "hyperparameters": {"n_epochs": 2, "batch_size": 2},
                         "lora": {"r": 4, "alpha": 8}}}});
    let r = c.post(server.url("/v1/fine_tuning/jobs")).json(&job).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    let url = server.url(&format!("/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let done = loop {
        let j: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {j}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done["trained_tokens"].as_i64().unwrap() > 0, "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap();
    let body = json!({"model": model, "prompt": "Q1?", "max_tokens": 3, "temperature": 0});
    let r = c.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], model, "{v}");
    server.stop().await;
}
