//! Continuous-batching scheduler: which tokens of which sequences run in the next iteration.
//!
//! Order of priority within the token budget: decodes of running sequences (oldest first), then
//! the pending prefill chunks of running sequences, then new sequences from the waiting queue in
//! arrival order. When KV blocks run out, the newest running sequence is preempted by recompute
//! (its blocks are freed and it goes back to the front of the queue), so the oldest work always
//! progresses: no deadlock and no starvation.

use std::collections::VecDeque;

use super::sequence::Sequence;
use crate::kv::block_allocator::BlockAllocator;
use crate::kv::block_table::BlockTable;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
}

/// Tokens `start..start + len` of sequence `seq_id` run in this iteration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq_id: u64,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the sequence, so a token is sampled after it.
    pub sample: bool,
}

#[derive(Default)]
pub struct Plan {
    pub chunks: Vec<Chunk>,
    pub num_preempted: usize,
    /// Sequences that could never fit in the whole cache (failed, removed from `running`).
    pub unschedulable: Vec<Sequence>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    allocator: BlockAllocator,
    pub waiting: VecDeque<Sequence>,
    /// In admission order: oldest first, so the newest is preempted first.
    pub running: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, allocator: BlockAllocator) -> Self {
        Self { cfg, allocator, waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn running_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    /// Removes a sequence wherever it is; dropping it frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i));
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }

    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_num_batched_tokens;

        // Decodes first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            if !self.running[i].is_decode() {
                i += 1;
                continue;
            }
            let need = self.running[i].len();
            match self.reserve_or_preempt(i, need, &mut plan, &mut budget) {
                Reserve::Ok => {
                    let s = &self.running[i];
                    plan.chunks.push(Chunk {
                        seq_id: s.id,
                        start: s.num_computed,
                        len: 1,
                        sample: true,
                    });
                    budget -= 1;
                    i += 1;
                }
                Reserve::PreemptedSelf => {}
                Reserve::Impossible => {
                    plan.unschedulable.push(self.running.remove(i));
                }
            }
        }

        // Pending prefill chunks of running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            if s.is_decode() || plan.chunks.iter().any(|c| c.seq_id == s.id) {
                i += 1;
                continue;
            }
            let len = s.num_uncomputed().min(budget);
            let need = s.num_computed + len;
            match self.reserve_or_preempt(i, need, &mut plan, &mut budget) {
                Reserve::Ok => {
                    let s = &self.running[i];
                    let sample = s.num_computed + len == s.len();
                    plan.chunks.push(Chunk { seq_id: s.id, start: s.num_computed, len, sample });
                    budget -= len;
                    i += 1;
                }
                Reserve::PreemptedSelf => {}
                Reserve::Impossible => {
                    plan.unschedulable.push(self.running.remove(i));
                }
            }
        }

        // Admit waiting sequences in arrival order while their first chunk fits.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(front) = self.waiting.front() else { break };
            let len = front.num_uncomputed().min(budget);
            let mut table = BlockTable::new(self.allocator.clone());
            if table.blocks_needed(len) > self.allocator.num_free() || table.reserve(len).is_err() {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            s.blocks = Some(table);
            let sample = len == s.len();
            plan.chunks.push(Chunk { seq_id: s.id, start: 0, len, sample });
            budget -= len;
            self.running.push(s);
        }
        plan
    }

    /// Makes `running[i]` hold blocks for `need` tokens, preempting the newest other running
    /// sequences as needed (or `running[i]` itself when it is the newest).
    fn reserve_or_preempt(
        &mut self,
        i: usize,
        need: usize,
        plan: &mut Plan,
        budget: &mut usize,
    ) -> Reserve {
        loop {
            let s = &mut self.running[i];
            let table = s.blocks.get_or_insert_with(|| BlockTable::new(self.allocator.clone()));
            if table.reserve(need).is_ok() {
                return Reserve::Ok;
            }
            let last = self.running.len() - 1;
            if last == i && i == 0 {
                // Alone and still too big for the whole cache.
                return Reserve::Impossible;
            }
            let mut victim = match self.running.pop() {
                Some(v) => v,
                None => return Reserve::Impossible,
            };
            if let Some(pos) = plan.chunks.iter().position(|c| c.seq_id == victim.id) {
                *budget += plan.chunks.remove(pos).len;
            }
            victim.preempt();
            plan.num_preempted += 1;
            self.waiting.push_front(victim);
            if last == i {
                return Reserve::PreemptedSelf;
            }
        }
    }
}

enum Reserve {
    Ok,
    PreemptedSelf,
    Impossible,
}
