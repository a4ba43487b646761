//! `coserve bench-coserve`: FlexLLM's headline experiment at CPU scale. For each fine-tuning
//! mode it starts a server, starts a fine-tuning job, then drives `/v1/completions` with
//! Poisson arrivals at several rates, reporting fine-tuning tokens/s (training forward
//! tokens per second over the load window) next to inference TTFT, inter-token latency and
//! time per output token.
//!
//! Inter-token latency is the gap between streamed events that carry text, so a token whose
//! text is held back (part of a character) makes the next gap two iterations long; time per
//! output token is each request's generation time after its first token over its later
//! tokens, which such merges do not skew.

use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::bench::{one_request, percentile, prompt, Sample};
use crate::config::ServerConfig;
use crate::engine::hybrid::FinetuneMode;

#[derive(Debug, Clone, Args)]
pub struct CoserveBenchArgs {
    /// Request arrival rates (requests per second), comma separated; 0 means no inference.
    #[arg(long, default_value = "0,0.2,0.4,0.8", value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Modes to compare.
    #[arg(long, default_value = "coserve,temporal,inference-only", value_delimiter = ',')]
    pub modes: Vec<FinetuneMode>,
    /// Seconds of arrivals per rate.
    #[arg(long, default_value_t = 40)]
    pub seconds: u64,
    /// Tokens generated per request (ignore_eos, greedy).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Approximate prompt length in words.
    #[arg(long, default_value_t = 24)]
    pub prompt_words: usize,
    /// Approximate length of each training example, in words.
    #[arg(long, default_value_t = 180)]
    pub train_words: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub server: ServerConfig,
}

#[derive(Debug, Serialize)]
pub struct CoserveResult {
    pub mode: String,
    pub rate: f64,
    pub requests: usize,
    pub errors: usize,
    pub finetune_tokens_per_s: f64,
    pub generated_tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
}

/// A request's mean time per output token after its first (None with fewer than two).
fn tpot_ms(s: &Sample) -> Option<f64> {
    let later = s.tokens.checked_sub(1).filter(|&n| n > 0 && s.ok)?;
    Some(s.gaps.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / later as f64)
}

fn training_file(words: usize) -> String {
    (0..32)
        .map(|i| {
            let text = prompt(1000 + i, words);
            let (a, b) = text.split_at(text.len() / 2);
            serde_json::json!({"prompt": a, "completion": b}).to_string() + "\n"
        })
        .collect()
}

/// Training forward tokens so far: the sum of the `train_fwd` iteration-token histogram.
async fn train_tokens(client: &reqwest::Client, url: &str) -> Result<f64, String> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("coserve_iteration_tokens_sum{kind=\"train_fwd\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

async fn upload(client: &reqwest::Client, url: &str, content: String) -> Result<String, String> {
    let boundary = "coserve-bench-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let req = client
        .post(format!("{url}/v1/files"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body);
    created_id(req, "upload failed").await
}

/// Sends a request that creates an object; returns the object's `id`.
async fn created_id(req: reqwest::RequestBuilder, what: &str) -> Result<String, String> {
    let v: serde_json::Value =
        req.send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    v["id"].as_str().map(str::to_string).ok_or_else(|| format!("{what}: {v}"))
}

async fn start_job(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    file: &str,
) -> Result<String, String> {
    let body = serde_json::json!({
        "model": model, "training_file": file, "seed": 1,
        "hyperparameters": {"n_epochs": 50, "batch_size": 1},
    });
    created_id(client.post(format!("{url}/v1/fine_tuning/jobs")).json(&body), "job not created")
        .await
}

/// Open-loop Poisson arrivals for `seconds`; returns every request's sample.
async fn poisson_load(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    rate: f64,
    args: &CoserveBenchArgs,
    seed: u64,
) -> Vec<Sample> {
    if rate <= 0.0 {
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::new();
    let mut i = 0;
    loop {
        let u: f64 = rng.random::<f64>().max(1e-12);
        at += -u.ln() / rate;
        if at >= args.seconds as f64 {
            break;
        }
        let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
        tokio::time::sleep(wait).await;
        let (client, url, model) = (client.clone(), url.to_string(), model.to_string());
        let (words, max_tokens) = (args.prompt_words, args.max_tokens);
        tasks.push(tokio::spawn(async move {
            one_request(&client, &url, &model, prompt(i, words), max_tokens).await
        }));
        i += 1;
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(s) = t.await {
            out.push(s);
        }
    }
    out
}

pub async fn run(args: CoserveBenchArgs) -> Result<Vec<CoserveResult>, String> {
    let client = reqwest::Client::builder().build().map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    println!(
        "{:>14} {:>5} {:>5} {:>4} {:>10} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "mode",
        "rate",
        "reqs",
        "errs",
        "ft tok/s",
        "gen tok/s",
        "ttft p50",
        "ttft p99",
        "itl p50",
        "itl p99",
        "tpot p50",
        "tpot p99"
    );
    for &mode in &args.modes {
        let data =
            std::env::temp_dir().join(format!("coserve-bench-{}-{mode}", std::process::id()));
        let mut cfg = args.server.clone();
        cfg.port = 0;
        cfg.finetune_mode = mode;
        cfg.data_dir = Some(data.clone());
        let server = crate::server::start(cfg).await.map_err(|e| e.to_string())?;
        let url = format!("http://{}", server.addr());
        let model = server.model_id().to_string();
        let file = upload(&client, &url, training_file(args.train_words)).await?;
        let job = start_job(&client, &url, &model, &file).await?;
        // Let the job get going (files validated, first sample forwarded).
        let deadline = Instant::now() + Duration::from_secs(60);
        while mode != FinetuneMode::InferenceOnly && train_tokens(&client, &url).await? <= 0.0 {
            if Instant::now() > deadline {
                return Err("the fine-tuning job did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (k, &rate) in args.rates.iter().enumerate() {
            let t0 = train_tokens(&client, &url).await?;
            let start = Instant::now();
            let samples = poisson_load(&client, &url, &model, rate, &args, 17 + k as u64).await;
            let window = start.elapsed().as_secs_f64();
            let t1 = train_tokens(&client, &url).await?;
            let mut ttft: Vec<f64> =
                samples.iter().filter_map(|s| s.ttft).map(|d| d.as_secs_f64() * 1e3).collect();
            let mut itl: Vec<f64> =
                samples.iter().flat_map(|s| s.gaps.iter().map(|d| d.as_secs_f64() * 1e3)).collect();
            let mut tpot: Vec<f64> = samples.iter().filter_map(tpot_ms).collect();
            ttft.sort_by(f64::total_cmp);
            itl.sort_by(f64::total_cmp);
            tpot.sort_by(f64::total_cmp);
            let r = CoserveResult {
                mode: mode.to_string(),
                rate,
                requests: samples.len(),
                errors: samples.iter().filter(|s| !s.ok).count(),
                finetune_tokens_per_s: (t1 - t0) / window,
                generated_tokens_per_s: samples.iter().map(|s| s.tokens).sum::<usize>() as f64
                    / window,
                ttft_p50_ms: percentile(&ttft, 0.5),
                ttft_p99_ms: percentile(&ttft, 0.99),
                itl_p50_ms: percentile(&itl, 0.5),
                itl_p99_ms: percentile(&itl, 0.99),
                tpot_p50_ms: percentile(&tpot, 0.5),
                tpot_p99_ms: percentile(&tpot, 0.99),
            };
            println!(
                "{:>14} {:>5} {:>5} {:>4} {:>10.1} {:>9.1} {:>8.0}ms {:>8.0}ms {:>7.0}ms {:>7.0}ms \
                 {:>7.0}ms {:>7.0}ms",
                r.mode,
                r.rate,
                r.requests,
                r.errors,
                r.finetune_tokens_per_s,
                r.generated_tokens_per_s,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.itl_p50_ms,
                r.itl_p99_ms,
                r.tpot_p50_ms,
                r.tpot_p99_ms
            );
            results.push(r);
        }
        let _ = client.post(format!("{url}/v1/fine_tuning/jobs/{job}/cancel")).send().await;
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&data);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(results)
}
