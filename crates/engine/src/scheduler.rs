//! Continuous batching policy: which sequences run in the next step and how many tokens each.
//! Never touches a device; unit-tested with plain numbers.
//!
//! Each step, within `max_num_seqs` sequences and `max_num_batched_tokens` tokens:
//! 1. running sequences that decode (one uncomputed token) are scheduled first, then running
//!    sequences in the middle of a chunked prefill, each in admission order;
//! 2. if nothing had to be preempted, waiting sequences are admitted in FIFO order (no skipping:
//!    a request that does not fit blocks the ones behind it), reusing cached prefix blocks. A
//!    prompt longer than the remaining budget is split across steps (chunked prefill).
//!
//! When a running sequence needs a block and none is free, the newest running sequence not yet
//! scheduled this step is preempted by recompute: its blocks are freed and it goes back to the
//! front of the waiting queue with its output kept, to be recomputed as prompt + output.

use std::collections::VecDeque;

use tracing::debug;

use crate::block_manager::{BlockManager, PrefixMatch};
use crate::sequence::{SeqId, SeqStatus, Sequence};

/// Tokens per step at most for a sequence whose prompt is being scored: each of them returns a
/// full row of logits (`vocab` floats), so the chunk is kept small whatever the token budget.
pub const SCORING_CHUNK: usize = 256;

/// Tokens to schedule for `seq` from `num_computed` on, within `budget`.
fn chunk_len(seq: &Sequence, num_computed: usize, budget: usize) -> usize {
    let n = (seq.len() - num_computed).min(budget);
    if seq.wants_prompt_logprobs() {
        n.min(SCORING_CHUNK)
    } else {
        n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences per step at most.
    pub max_num_seqs: usize,
    /// Tokens per step at most (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step: tokens `start..start + len` of `running()[index]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub index: usize,
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// In `running()` order; indices stay valid until the scheduler is next mutated.
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Counters the scheduler keeps for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    pub preemptions: u64,
    /// Tokens looked up in the prefix cache, and tokens found there, over all admissions.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    counters: SchedulerCounters,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: SchedulerCounters::default(),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [Sequence] {
        &mut self.running
    }

    pub fn waiting(&self) -> impl Iterator<Item = &Sequence> {
        self.waiting.iter()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// A queued or running sequence.
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|s| s.id == id)
    }

    /// Every sequence id, running then waiting.
    pub fn ids(&self) -> Vec<SeqId> {
        self.running.iter().chain(&self.waiting).map(|s| s.id).collect()
    }

    /// Picks the next step's batch (see the module doc).
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.config.max_num_batched_tokens;
        let mut chosen: Vec<(SeqId, usize, usize)> = Vec::new();
        let mut preempted = Vec::new();

        let mut order: Vec<(bool, SeqId)> = self.running.iter().map(|s| (s.num_uncomputed() > 1, s.id)).collect();
        order.sort_by_key(|&(prefilling, _)| prefilling); // stable: admission order within each group
        for (_, id) in order {
            if budget == 0 {
                break;
            }
            let Some(mut i) = self.running.iter().position(|s| s.id == id) else {
                continue; // preempted earlier in this loop
            };
            let seq = &self.running[i];
            let n = chunk_len(seq, seq.num_computed, budget);
            if n == 0 {
                continue;
            }
            loop {
                let seq = &mut self.running[i];
                let needed = seq.num_computed + n;
                if self.blocks.append(&mut seq.block_table, needed).is_ok() {
                    chosen.push((id, seq.num_computed, n));
                    budget -= n;
                    break;
                }
                let victim = self
                    .running
                    .iter()
                    .rposition(|s| s.id != id && !chosen.iter().any(|c| c.0 == s.id));
                match victim {
                    Some(v) => {
                        preempted.push(self.preempt(v));
                        if v < i {
                            i -= 1;
                        }
                    }
                    None => {
                        preempted.push(self.preempt(i));
                        break;
                    }
                }
            }
        }

        if preempted.is_empty() {
            self.admit(&mut budget, &mut chosen);
        }

        let mut scheduled: Vec<ScheduledSeq> = chosen
            .into_iter()
            .filter_map(|(id, start, len)| {
                let index = self.running.iter().position(|s| s.id == id)?;
                Some(ScheduledSeq { index, id, start, len })
            })
            .collect();
        scheduled.sort_by_key(|s| s.index);
        if !preempted.is_empty() {
            debug!(?preempted, "preempted by recompute: out of KV blocks");
        }
        SchedulerOutput { scheduled, preempted }
    }

    fn admit(&mut self, budget: &mut usize, chosen: &mut Vec<(SeqId, usize, usize)>) {
        while let Some(seq) = self.waiting.front() {
            if *budget == 0 || self.running.len() >= self.config.max_num_seqs {
                break;
            }
            let prefix = if seq.wants_prompt_logprobs() {
                PrefixMatch::default()
            } else {
                self.blocks.match_prefix(seq.tokens())
            };
            let cached = prefix.num_blocks() * self.blocks.block_size();
            let n = chunk_len(seq, cached, *budget);
            if !self.blocks.can_allocate(&prefix, cached + n) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            match self.blocks.allocate(&mut seq.block_table, prefix, cached + n) {
                Ok(hit) => {
                    seq.num_computed = hit;
                    self.counters.prefix_cache_queries += seq.len() as u64;
                    self.counters.prefix_cache_hits += hit as u64;
                    if !seq.admitted_once {
                        seq.admitted_once = true;
                        seq.num_cached_tokens = hit;
                    }
                }
                Err(_) => {
                    self.waiting.push_front(seq);
                    break;
                }
            }
            seq.status = SeqStatus::Running;
            chosen.push((seq.id, seq.num_computed, n));
            *budget -= n;
            self.running.push(seq);
        }
    }

    /// Frees `running[index]`'s blocks and puts it at the front of the waiting queue.
    fn preempt(&mut self, index: usize) -> SeqId {
        let mut seq = self.running.remove(index);
        self.blocks.free(&mut seq.block_table);
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        self.counters.preemptions += 1;
        let id = seq.id;
        self.waiting.push_front(seq);
        id
    }

    /// Records that the forward pass computed `s`'s tokens and caches its newly full blocks.
    pub fn complete(&mut self, s: &ScheduledSeq) {
        let Some(seq) = self.running.get_mut(s.index) else {
            return;
        };
        debug_assert_eq!(seq.id, s.id);
        seq.num_computed = (s.start + s.len).min(seq.len());
        self.blocks
            .commit(&mut seq.block_table, &seq.tokens[..seq.num_computed], seq.num_computed);
    }

    /// Whether `s`'s writes land only in blocks private to its sequence (the block manager's
    /// no-write-to-shared-blocks invariant).
    pub fn writes_are_private(&self, s: &ScheduledSeq) -> bool {
        self.running
            .get(s.index)
            .is_some_and(|seq| self.blocks.writable(&seq.block_table, s.start..s.start + s.len))
    }

    /// Removes a queued or running sequence and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.free(&mut seq.block_table);
        Some(seq)
    }

    /// Removes the running sequences marked finished and frees their blocks.
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if matches!(self.running[i].status, SeqStatus::Finished(_)) {
                let mut seq = self.running.remove(i);
                self.blocks.free(&mut seq.block_table);
                done.push(seq);
            } else {
                i += 1;
            }
        }
        done
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
