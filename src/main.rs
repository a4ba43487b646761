//! The `coserve` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coserve::config::ServerConfig;
use coserve::model::fetch::{coserve_home, ensure_default_model};

#[derive(Parser)]
#[command(
    name = "coserve",
    version,
    about = "OpenAI-compatible LLM inference server that co-serves LoRA fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(Box<ServerConfig>),
    /// Download the embedded default model into $COSERVE_HOME (nothing else).
    FetchModel,
    /// Load-test /v1/completions at several concurrency levels.
    Bench(Box<coserve::bench::BenchArgs>),
    /// Measure LoRA fine-tuning throughput and activation memory through the engine.
    BenchFinetune(Box<coserve::bench_finetune::BenchFinetuneArgs>),
    /// Co-serving under Poisson inference load: fine-tuning tokens/s and inference latency in
    /// each fine-tuning mode.
    BenchCoserve(Box<coserve::bench_coserve::CoserveBenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    // The benchmark's stdout is its result (e.g. one JSON object); its progress goes to stderr.
    if matches!(cli.command, Command::BenchFinetune(_) | Command::BenchCoserve(_)) {
        logs.with_writer(std::io::stderr).init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::FetchModel => match ensure_default_model(&coserve_home()) {
            Ok(p) => {
                println!("{}", p.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(cfg) => serve(*cfg),
        Command::Bench(args) => bench(*args),
        Command::BenchFinetune(args) => bench_finetune(&args),
        Command::BenchCoserve(args) => bench_coserve(*args),
    }
}

fn bench_coserve(args: coserve::bench_coserve::CoserveBenchArgs) -> ExitCode {
    let Some(rt) = runtime() else { return ExitCode::FAILURE };
    match rt.block_on(coserve::bench_coserve::run(args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_finetune(args: &coserve::bench_finetune::BenchFinetuneArgs) -> ExitCode {
    match coserve::bench_finetune::run(args) {
        Ok(r) if args.json => match serde_json::to_string(&r) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => {
            r.print_text();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: coserve::bench::BenchArgs) -> ExitCode {
    let Some(rt) = runtime() else { return ExitCode::FAILURE };
    match rt.block_on(coserve::bench::run(args)) {
        Ok(results) if results.iter().all(|r| r.errors == 0) => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("error: some requests failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: ServerConfig) -> ExitCode {
    let Some(rt) = runtime() else { return ExitCode::FAILURE };
    rt.block_on(async move {
        match coserve::server::start(cfg).await {
            Ok(server) => {
                server.run_until_signal().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// HTTP needs only a couple of threads; the cores belong to the engine's compute pool.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}
