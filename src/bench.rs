//! `coserve bench`: an HTTP load generator for /v1/completions. It starts a server in-process
//! (or targets `--url`, e.g. another OpenAI-compatible server for a side-by-side run), drives
//! it at several concurrency levels with streamed greedy requests, and reports aggregate
//! generated tokens/s, TTFT and inter-token latency percentiles and peak RSS.

use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde::Serialize;

use crate::config::ServerConfig;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of a running server (e.g. http://127.0.0.1:8080); default: start one here.
    #[arg(long)]
    pub url: Option<String>,
    /// `model` to send (default: whatever /v1/models lists first).
    #[arg(long = "request-model")]
    pub request_model: Option<String>,
    /// Concurrency levels, comma separated.
    #[arg(long, default_value = "1,4,16,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level: this many times the concurrency (at least `--min-requests`).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long, default_value_t = 4)]
    pub min_requests: usize,
    /// Tokens generated per request (ignore_eos, greedy).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Approximate prompt length in words (about 32 tokens by default).
    #[arg(long, default_value_t = 24)]
    pub prompt_words: usize,
    /// Process id whose peak RSS to report (default: this process when serving in-process).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Server options when serving in-process.
    #[command(flatten)]
    pub server: ServerConfig,
}

#[derive(Debug, Serialize)]
pub struct LevelResult {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub generated_tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub peak_rss_mib: Option<f64>,
}

const WORDS: &str =
    "the quick brown fox jumps over a lazy dog while seven curious otters watch from \
    the riverbank and a small bird sings about distant mountains green valleys old bridges quiet \
    towns bright lanterns warm bread and long summer evenings by the sea";

pub(crate) fn prompt(i: usize, words: usize) -> String {
    let pool: Vec<&str> = WORDS.split_whitespace().collect();
    let body: Vec<&str> = (0..words).map(|w| pool[(i * 7 + w * 3) % pool.len()]).collect();
    format!("Story {i}: {}", body.join(" "))
}

pub(crate) struct Sample {
    pub ttft: Option<Duration>,
    pub gaps: Vec<Duration>,
    pub tokens: usize,
    pub ok: bool,
    pub error: Option<String>,
}

pub(crate) async fn one_request(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    text: String,
    max_tokens: usize,
) -> Sample {
    let body = serde_json::json!({
        "model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let mut s = Sample { ttft: None, gaps: Vec::new(), tokens: 0, ok: false, error: None };
    let start = Instant::now();
    let resp = match client.post(format!("{url}/v1/completions")).json(&body).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            s.error = Some(format!("HTTP {}", r.status()));
            return s;
        }
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                s.error = Some(e.to_string());
                return s;
            }
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                s.ok = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { continue };
            if let Some(n) = v.pointer("/usage/completion_tokens").and_then(|n| n.as_u64()) {
                s.tokens = n as usize;
            }
            let has_text = v
                .pointer("/choices/0/text")
                .and_then(|t| t.as_str())
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some(now - start),
                    Some(prev) => s.gaps.push(now - prev),
                }
                last = Some(now);
            }
        }
    }
    if !s.ok {
        s.error = Some("the stream ended without [DONE]".into());
    }
    s
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Peak resident set size (VmHWM) of a process, in MiB.
pub fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub async fn run(args: BenchArgs) -> Result<Vec<LevelResult>, String> {
    let mut server = None;
    let url = match &args.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let mut cfg = args.server.clone();
            cfg.port = 0;
            let s = crate::server::start(cfg).await.map_err(|e| e.to_string())?;
            let u = format!("http://{}", s.addr());
            server = Some(s);
            u
        }
    };
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(0).build().map_err(|e| e.to_string())?;
    let model = match &args.request_model {
        Some(m) => m.clone(),
        None => {
            let v: serde_json::Value = client
                .get(format!("{url}/v1/models"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            v.pointer("/data/0/id").and_then(|x| x.as_str()).unwrap_or("default").to_string()
        }
    };
    let rss_pid = if args.url.is_some() { args.pid } else { None };
    let mut results = Vec::new();
    let mut offset = 0;
    println!(
        "{:>5} {:>5} {:>4} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "conc", "reqs", "errs", "tok/s", "ttft p50", "ttft p99", "itl p50", "itl p99", "rss MiB"
    );
    for &c in &args.concurrency {
        let n = (c * args.rounds).max(args.min_requests).max(c);
        let queue = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..c {
            let (client, url, model, queue) =
                (client.clone(), url.clone(), model.clone(), queue.clone());
            let (words, max_tokens) = (args.prompt_words, args.max_tokens);
            workers.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = queue.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    samples.push(
                        one_request(&client, &url, &model, prompt(offset + i, words), max_tokens)
                            .await,
                    );
                }
                samples
            }));
        }
        let mut samples = Vec::new();
        for w in workers {
            samples.extend(w.await.unwrap_or_default());
        }
        let wall = start.elapsed().as_secs_f64();
        if let Some(e) = samples.iter().find_map(|s| s.error.as_ref()) {
            eprintln!("first error at concurrency {c}: {e}");
        }
        offset += n;
        let mut ttft: Vec<f64> =
            samples.iter().filter_map(|s| s.ttft).map(|d| d.as_secs_f64() * 1e3).collect();
        let mut itl: Vec<f64> =
            samples.iter().flat_map(|s| s.gaps.iter().map(|d| d.as_secs_f64() * 1e3)).collect();
        ttft.sort_by(f64::total_cmp);
        itl.sort_by(f64::total_cmp);
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let r = LevelResult {
            concurrency: c,
            requests: n,
            errors: samples.iter().filter(|s| !s.ok).count(),
            generated_tokens: tokens,
            wall_s: wall,
            tokens_per_s: tokens as f64 / wall,
            ttft_p50_ms: percentile(&ttft, 0.5),
            ttft_p99_ms: percentile(&ttft, 0.99),
            itl_p50_ms: percentile(&itl, 0.5),
            itl_p99_ms: percentile(&itl, 0.99),
            peak_rss_mib: if args.url.is_some() && rss_pid.is_none() {
                None
            } else {
                peak_rss_mib(rss_pid)
            },
        };
        println!(
            "{:>5} {:>5} {:>4} {:>9.1} {:>8.0}ms {:>8.0}ms {:>8.1}ms {:>8.1}ms {:>9}",
            r.concurrency,
            r.requests,
            r.errors,
            r.tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms,
            r.peak_rss_mib.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into())
        );
        results.push(r);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(s) = server {
        s.shutdown().await;
    }
    Ok(results)
}
