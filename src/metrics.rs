//! Every Prometheus metric in one place. Names and meanings follow vLLM's metrics of the
//! same names (`vllm:` -> `coserve_`); each carries a constant `model_name` label.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    /// Fraction of KV-cache blocks in use, 0..=1 (vLLM reports a fraction despite the name).
    pub kv_cache_usage_perc: Gauge,
    pub num_preemptions_total: IntCounter,
    /// Per-request metrics carry `lora_name`: the fine-tuned model a request used ("" for the
    /// base model), so traffic per adapter is visible.
    pub prompt_tokens_total: IntCounterVec,
    pub generation_tokens_total: IntCounterVec,
    /// Labels `finished_reason` (stop | length | abort) and `lora_name`.
    pub request_success_total: IntCounterVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: HistogramVec,
    pub request_queue_time_seconds: Histogram,
    /// Label `kind`: decode | prefill | train_fwd | train_loss. Tokens (loss: rows) per iteration.
    pub iteration_tokens: HistogramVec,
    pub iteration_duration_seconds: Histogram,
    /// Backward layers run in an iteration that trained.
    pub iteration_bwd_layers: Histogram,
    /// Label `on`: host | device. Rows sampled, by where: on a GPU server, rows sample on the
    /// host only when some row of their batch needs what the device sampler lacks.
    pub sampled_rows_total: IntCounterVec,
    /// Label `status`: jobs per status (validating_files, queued, running, ...).
    pub finetune_jobs: IntGaugeVec,
    /// Label `job`: tokens forwarded for training.
    pub finetune_tokens_total: IntCounterVec,
    /// Label `job`: mean train loss of the last optimizer step.
    pub finetune_loss: GaugeVec,
    pub finetune_step_seconds: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];
const TOKEN_BUCKETS: &[f64] =
    &[1.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let hopts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .const_label("model_name", model_name)
                .buckets(buckets.to_vec())
        };
        // Registration only fails on duplicate or malformed names, which are constants here.
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric definition");
                registry.register(Box::new(m.clone())).expect("unique metric name");
                m
            }};
        }
        Self {
            num_requests_running: reg!(IntGauge::with_opts(opts(
                "coserve_num_requests_running",
                "Number of requests in model execution batches."
            ))),
            num_requests_waiting: reg!(IntGauge::with_opts(opts(
                "coserve_num_requests_waiting",
                "Number of requests waiting to be processed."
            ))),
            kv_cache_usage_perc: reg!(Gauge::with_opts(opts(
                "coserve_kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage."
            ))),
            num_preemptions_total: reg!(IntCounter::with_opts(opts(
                "coserve_num_preemptions_total",
                "Cumulative number of preemptions from the engine."
            ))),
            prompt_tokens_total: reg!(IntCounterVec::new(
                opts("coserve_prompt_tokens_total", "Number of prefill tokens processed."),
                &["lora_name"]
            )),
            generation_tokens_total: reg!(IntCounterVec::new(
                opts("coserve_generation_tokens_total", "Number of generation tokens processed."),
                &["lora_name"]
            )),
            request_success_total: reg!(IntCounterVec::new(
                opts("coserve_request_success_total", "Count of successfully processed requests."),
                &["finished_reason", "lora_name"]
            )),
            time_to_first_token_seconds: reg!(HistogramVec::new(
                hopts(
                    "coserve_time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    LATENCY_BUCKETS
                ),
                &["lora_name"]
            )),
            inter_token_latency_seconds: reg!(Histogram::with_opts(hopts(
                "coserve_inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                LATENCY_BUCKETS
            ))),
            e2e_request_latency_seconds: reg!(HistogramVec::new(
                hopts(
                    "coserve_e2e_request_latency_seconds",
                    "Histogram of end to end request latency in seconds.",
                    LATENCY_BUCKETS
                ),
                &["lora_name"]
            )),
            request_queue_time_seconds: reg!(Histogram::with_opts(hopts(
                "coserve_request_queue_time_seconds",
                "Histogram of time spent in the waiting queue in seconds.",
                LATENCY_BUCKETS
            ))),
            iteration_tokens: reg!(HistogramVec::new(
                hopts(
                    "coserve_iteration_tokens",
                    "Histogram of the number of tokens per engine iteration, by kind.",
                    TOKEN_BUCKETS
                ),
                &["kind"]
            )),
            iteration_duration_seconds: reg!(Histogram::with_opts(hopts(
                "coserve_iteration_duration_seconds",
                "Histogram of the wall time of one engine iteration in seconds.",
                LATENCY_BUCKETS
            ))),
            iteration_bwd_layers: reg!(Histogram::with_opts(hopts(
                "coserve_iteration_bwd_layers",
                "Histogram of the number of backward layers run per training iteration.",
                &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
            ))),
            sampled_rows_total: reg!(IntCounterVec::new(
                opts(
                    "coserve_sampled_rows_total",
                    "Rows sampled, by where: on the host from their logits, or on the device.",
                ),
                &["on"]
            )),
            finetune_jobs: reg!(IntGaugeVec::new(
                opts("coserve_finetune_jobs", "Number of fine-tuning jobs by status."),
                &["status"]
            )),
            finetune_tokens_total: reg!(IntCounterVec::new(
                opts("coserve_finetune_tokens_total", "Tokens forwarded for fine-tuning, by job."),
                &["job"]
            )),
            finetune_loss: reg!(GaugeVec::new(
                opts("coserve_finetune_loss", "Train loss of the last optimizer step, by job."),
                &["job"]
            )),
            finetune_step_seconds: reg!(Histogram::with_opts(hopts(
                "coserve_finetune_step_seconds",
                "Histogram of the wall time of one fine-tuning optimizer step in seconds.",
                LATENCY_BUCKETS
            ))),
            registry,
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
