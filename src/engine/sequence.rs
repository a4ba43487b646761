//! One inference sequence as the engine tracks it.

use std::time::Instant;

use super::request::{EngineEvent, SamplingParams, TokenLogprob};
use super::sampler::SamplerState;
use crate::kv::block_table::BlockTable;
use crate::lora::AdapterLease;

pub struct Sequence {
    pub id: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub params: SamplingParams,
    pub events: flume::Sender<EngineEvent>,
    /// Blocks holding this sequence's KV; `None` while waiting (or after preemption).
    pub blocks: Option<BlockTable>,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub sampler: SamplerState,
    /// Prompt logprobs gathered chunk by chunk (when asked for).
    pub prompt_logprobs: Vec<Option<TokenLogprob>>,
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub last_token_at: Option<Instant>,
    /// Whether the sequence has ever been scheduled (counted out of the waiting gauge).
    pub admitted_once: bool,
    pub adapter: Option<AdapterLease>,
}

impl Sequence {
    pub fn new(
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        events: flume::Sender<EngineEvent>,
        arrival: Instant,
        adapter: Option<AdapterLease>,
    ) -> Self {
        let sampler = SamplerState::new(&params, &prompt);
        let prompt_len = prompt.len();
        Self {
            id,
            tokens: prompt,
            prompt_len,
            params,
            events,
            blocks: None,
            num_computed: 0,
            sampler,
            prompt_logprobs: Vec::new(),
            arrival,
            first_scheduled: None,
            last_token_at: None,
            admitted_once: false,
            adapter,
        }
    }

    /// The `lora_name` metric label: the adapter's model id, or "" for the base model.
    pub fn lora_name(&self) -> &str {
        self.adapter.as_ref().map_or("", |a| a.id.as_str())
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be fed to the model before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.len() - self.num_computed
    }

    /// A decode feeds exactly the last sampled token.
    pub fn is_decode(&self) -> bool {
        self.num_uncomputed() == 1 && self.num_generated() > 0
    }

    pub fn wants_prompt_logprobs(&self) -> bool {
        self.params.prompt_logprobs.is_some() && self.num_generated() == 0
    }

    /// Frees the KV blocks and starts over from scratch when next scheduled (recompute).
    pub fn preempt(&mut self) {
        self.blocks = None;
        self.num_computed = 0;
        if self.num_generated() == 0 {
            self.prompt_logprobs.clear();
        }
    }
}
