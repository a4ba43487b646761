//! Driving the engine directly (no HTTP) for model-level tests.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use coserve::engine::{
    self, EngineConfig, EngineEvent, EngineHandle, FinishReason, GenerateRequest, SamplingParams,
    TokenLogprob,
};
use coserve::metrics::Metrics;
use coserve::model::loader::{load_model, LoadedModel};
use coserve::model::tokenizer::Tokenizer;
use coserve::model::weights::WeightsDtype;

pub struct TestEngine {
    pub handle: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub max_model_len: usize,
    pub chat_template: Option<coserve::model::chat_template::ChatTemplate>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestEngine {
    pub fn start(path: &Path, cfg: EngineConfig) -> Self {
        Self::start_with(path, WeightsDtype::F32, cfg)
    }

    /// As `start`, with the weights stored as `dtype`.
    pub fn start_with(path: &Path, dtype: WeightsDtype, cfg: EngineConfig) -> Self {
        let LoadedModel { model, tokenizer, chat_template, eos_token_ids, .. } =
            load_model(path, dtype)
                .unwrap_or_else(|e| panic!("loading {} as {dtype}: {e}", path.display()));
        Self::from_parts(model, tokenizer, chat_template, eos_token_ids, cfg)
    }

    /// As `start`, computing on `backend`.
    pub fn start_on(path: &Path, cfg: EngineConfig, backend: engine::Backend) -> Self {
        let LoadedModel { model, tokenizer, chat_template, eos_token_ids, .. } =
            load_model(path, WeightsDtype::F32)
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        Self::from_parts_on(model, tokenizer, chat_template, eos_token_ids, cfg, backend)
    }

    pub fn from_parts(
        model: coserve::model::llama::Llama,
        tokenizer: Tokenizer,
        chat_template: Option<coserve::model::chat_template::ChatTemplate>,
        eos: Vec<u32>,
        cfg: EngineConfig,
    ) -> Self {
        Self::from_parts_on(model, tokenizer, chat_template, eos, cfg, engine::Backend::Cpu)
    }

    pub fn from_parts_on(
        model: coserve::model::llama::Llama,
        tokenizer: Tokenizer,
        chat_template: Option<coserve::model::chat_template::ChatTemplate>,
        eos: Vec<u32>,
        cfg: EngineConfig,
        backend: engine::Backend,
    ) -> Self {
        let metrics = Arc::new(Metrics::new("test"));
        let e =
            engine::start_on(model, eos, &cfg, metrics.clone(), backend).expect("engine starts");
        Self {
            handle: e.handle,
            tokenizer: Arc::new(tokenizer),
            metrics,
            max_model_len: e.max_model_len,
            chat_template,
            thread: Some(e.thread),
        }
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<Option<TokenLogprob>>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: FinishReason,
}

pub fn request(prompt_ids: Vec<u32>, params: SamplingParams) -> GenerateRequest {
    GenerateRequest { prompt_ids, params, arrival: Instant::now(), adapter: None }
}

/// Submits and collects one request to the end (blocking).
pub fn generate(handle: &EngineHandle, prompt_ids: Vec<u32>, params: SamplingParams) -> Generation {
    let stream = handle.submit(request(prompt_ids, params)).expect("submit");
    collect(stream)
}

pub fn collect(mut stream: coserve::engine::RequestStream) -> Generation {
    let mut g = Generation {
        tokens: vec![],
        logprobs: vec![],
        prompt_logprobs: None,
        finish: FinishReason::Abort,
    };
    while let Some(ev) = stream.next_blocking() {
        match ev {
            EngineEvent::PromptLogprobs(p) => g.prompt_logprobs = Some(p),
            EngineEvent::Token { token_id, logprob } => {
                g.tokens.push(token_id);
                g.logprobs.push(logprob);
            }
            EngineEvent::Finished { reason, .. } => {
                g.finish = reason;
                break;
            }
            EngineEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    g
}

/// The value of a metric line (first sample whose line starts with `prefix`).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
