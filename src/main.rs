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
    /// Time one decode step at several batch sizes against its memory-bandwidth floor.
    BenchDecode(Box<coserve::bench_decode::BenchDecodeArgs>),
    /// CUDA kernels (`kernels/*.cu`, embedded in the binary).
    Kernels {
        #[command(subcommand)]
        action: KernelsAction,
    },
    /// Run every CUDA kernel on the GPU against its CPU twin: one line a check, then a JSON
    /// summary.
    Selftest {
        /// cuda, cuda:N or auto.
        #[arg(long, env = "COSERVE_DEVICE", default_value = "cuda")]
        device: String,
        /// Also write the JSON summary to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Run only the suites whose names contain one of these (comma-separated), e.g.
        /// `--only training_step,gemm`.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KernelsAction {
    /// Compile every kernel with NVRTC for sm_80 and sm_90 (no GPU needed; the toolkit is found
    /// at $CUDA_HOME, $CUDA_PATH or /usr/local/cuda). Fails on any compile error.
    Check {
        /// Also write each PTX to this folder, as `<file>-<arch>.ptx`.
        #[arg(long)]
        ptx_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    // The benchmark's stdout is its result (e.g. one JSON object); its progress goes to stderr.
    if matches!(
        cli.command,
        Command::BenchFinetune(_) | Command::BenchCoserve(_) | Command::BenchDecode(_)
    ) {
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
        Command::BenchDecode(args) => bench_decode(&args),
        Command::Kernels { action: KernelsAction::Check { ptx_dir } } => {
            kernels_check(ptx_dir.as_deref())
        }
        Command::Selftest { device, json, only } => selftest(&device, json.as_deref(), &only),
    }
}

fn bench_decode(args: &coserve::bench_decode::BenchDecodeArgs) -> ExitCode {
    report(coserve::bench_decode::run(args), args.json, |r| r.print_text(), |r| r.failures())
}

fn kernels_check(ptx_dir: Option<&std::path::Path>) -> ExitCode {
    use coserve::backend::cuda::{kernels, toolkit::Toolkit};
    let toolkit = match Toolkit::find() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("toolkit: {}", toolkit.home.display());
    let mut failed = 0;
    if let Some(dir) = ptx_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    for r in kernels::check_all(&toolkit) {
        match r.outcome {
            Ok(ptx) => {
                println!("ok    {:<20} {}  ({} bytes of PTX)", r.file, r.arch, ptx.len());
                if let Some(dir) = ptx_dir {
                    let path =
                        dir.join(format!("{}-{}.ptx", r.file.trim_end_matches(".cu"), r.arch));
                    if let Err(e) = std::fs::write(&path, ptx) {
                        eprintln!("error: {}: {e}", path.display());
                        failed += 1;
                    }
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL  {:<20} {}\n{e}", r.file, r.arch);
            }
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} kernel compilation(s) failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn selftest(device: &str, json: Option<&std::path::Path>, only: &[String]) -> ExitCode {
    use coserve::backend::cuda::{selftest, DeviceSpec};
    let report =
        device.parse::<DeviceSpec>().and_then(|spec| selftest::run(spec, &coserve_home(), only));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("device: {} ({})", report.device, report.arch);
    for c in &report.checks {
        let status = if c.passed { "ok  " } else { "FAIL" };
        // A check that must match exactly has a zero tolerance: any difference is past it.
        let ratio = if c.worst_ratio < 1e3 {
            format!("{:.2} of tolerance", c.worst_ratio)
        } else {
            "far past tolerance".to_string()
        };
        println!(
            "{status}  {:<34} max |gpu - cpu| {:.3e}, {ratio}  {}{}",
            c.kernel,
            c.max_abs_error,
            c.shape,
            c.error.as_deref().map(|e| format!("\n      {e}")).unwrap_or_default()
        );
    }
    let text = serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    println!("{text}");
    if let Some(path) = json {
        if let Err(e) = std::fs::write(path, &text) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
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
    report(coserve::bench_finetune::run(args), args.json, |r| r.print_text(), |r| r.errors.clone())
}

/// Prints a benchmark's result as one JSON object or as text, or its error. A result with
/// parts that failed (`failures`) is printed whole, then the command fails.
fn report<T: serde::Serialize, E: std::fmt::Display>(
    result: Result<T, E>,
    json: bool,
    text: impl FnOnce(&T),
    failures: impl FnOnce(&T) -> Vec<String>,
) -> ExitCode {
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        text(&r);
    } else {
        match serde_json::to_string(&r) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let failed = failures(&r);
    for f in &failed {
        eprintln!("error: {f}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
