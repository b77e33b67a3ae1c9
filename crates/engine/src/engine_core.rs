//! The synchronous engine: `step() = schedule → build batch → forward → sample → postprocess`.
//! [`crate::Engine`] runs it on its own thread; tests can drive it directly.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use r1serve_model::CausalLm;
use tracing::{debug, warn};

use crate::block_manager::BlockManager;
use crate::config::{EngineConfig, Limits};
use crate::error::EngineError;
use crate::generate::FinishReason;
use crate::metrics::EngineStats;
use crate::runner::ModelRunner;
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig};
use crate::sequence::{GeneratedToken, Request, SeqId, SeqStatus, Sequence, TokenEvent, TokenLogprob};

/// Where a request's events go. An unbounded tokio channel: the engine thread never blocks on a
/// slow reader (a request's events are bounded by its `max_tokens`), the server awaits
/// `recv()`, and plain threads use `blocking_recv()`.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<TokenEvent>;
pub type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<TokenEvent>;

/// Per-step state the postprocessing writes to.
struct Outputs {
    sinks: HashMap<SeqId, EventSender>,
    stats: EngineStats,
    logprobs: Vec<f32>,
    /// `Finished` events held until the stats snapshot shows their blocks freed.
    finished: Vec<(SeqId, TokenEvent)>,
    /// Where [`EngineCore::publish_stats_to`] asked for snapshots.
    snapshot: Option<Arc<Mutex<EngineStats>>>,
}

impl Outputs {
    /// Sends `event`; false when nobody listens any more.
    fn send(&self, id: SeqId, event: TokenEvent) -> bool {
        self.sinks.get(&id).is_some_and(|tx| tx.send(event).is_ok())
    }

    fn score(&mut self, row: &[f32], token: u32, k: usize) -> TokenLogprob {
        crate::logprobs::score(row, token, k, &mut self.logprobs)
    }
}

pub struct EngineCore {
    limits: Limits,
    eos_token_ids: Vec<u32>,
    scheduler: Scheduler,
    runner: ModelRunner,
    out: Outputs,
}

impl EngineCore {
    pub fn new(model: Arc<dyn CausalLm>, config: &EngineConfig) -> Result<Self, EngineError> {
        let limits = Limits::resolve(model.as_ref(), config)?;
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            },
            BlockManager::new(limits.block_size, limits.num_blocks, config.enable_prefix_caching),
        );
        let eos_token_ids = model.info().eos_token_ids.clone();
        let runner = ModelRunner::new(model, limits.block_size, limits.num_blocks, config.kv_cache_dtype);
        let stats = EngineStats::new(limits.num_blocks, limits.block_size);
        Ok(Self {
            limits,
            eos_token_ids,
            scheduler,
            runner,
            out: Outputs {
                sinks: HashMap::new(),
                stats,
                logprobs: Vec::new(),
                finished: Vec::new(),
                snapshot: None,
            },
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// Queues a request under `id`; its events go to `sink`.
    pub fn add_request(&mut self, id: SeqId, request: Request, sink: EventSender) -> Result<(), EngineError> {
        self.limits.check(&request)?;
        let seq = Sequence::new(id, request, &self.eos_token_ids)?;
        let (front, back) = seq.forced.as_slices();
        self.limits.check_tokens(front)?;
        self.limits.check_tokens(back)?;
        self.out.sinks.insert(id, sink);
        self.scheduler.add(seq);
        Ok(())
    }

    /// Finishes a queued or running request now with `reason` (`Abort`, or `Stop` when the
    /// caller matched a stop string), freeing its blocks. False if it is not known.
    pub fn finish_request(&mut self, id: SeqId, reason: FinishReason) -> bool {
        match self.scheduler.remove(id) {
            Some(mut seq) => {
                seq.status = SeqStatus::Finished(reason);
                self.finish(seq);
                self.deliver();
                true
            }
            None => false,
        }
    }

    /// Finishes a request now with `Error` and `message`.
    fn fail_request(&mut self, id: SeqId, message: String) {
        if let Some(mut seq) = self.scheduler.remove(id) {
            seq.status = SeqStatus::Finished(FinishReason::Error);
            seq.error = Some(message);
            self.finish(seq);
            self.deliver();
        }
    }

    /// Aborts the requests whose receiver is gone (client disconnected) before they cost a step.
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .out
            .sinks
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            debug!(id, "receiver dropped: aborting");
            self.finish_request(id, FinishReason::Abort);
        }
    }

    /// Aborts every request.
    pub fn abort_all(&mut self) {
        for id in self.scheduler.ids() {
            self.finish_request(id, FinishReason::Abort);
        }
    }

    /// Queues tokens a request emits next instead of sampling.
    pub fn force_tokens(&mut self, id: SeqId, tokens: &[u32]) -> Result<(), EngineError> {
        self.limits.check_tokens(tokens)?;
        let seq = self.scheduler.get_mut(id).ok_or(EngineError::UnknownSequence(id))?;
        seq.push_forced(tokens.iter().copied());
        Ok(())
    }

    /// Keeps `snapshot` at [`Self::stats`] after every step and finished request, written before
    /// the requests' `Finished` events are sent: a client that has its answer sees its blocks
    /// freed and its request counted.
    pub fn publish_stats_to(&mut self, snapshot: Arc<Mutex<EngineStats>>) {
        *snapshot.lock().unwrap_or_else(PoisonError::into_inner) = self.stats();
        self.out.snapshot = Some(snapshot);
    }

    /// Writes [`Self::stats`] where [`Self::publish_stats_to`] asked (nothing if it was not).
    pub fn publish_stats(&self) {
        if let Some(snapshot) = &self.out.snapshot {
            *snapshot.lock().unwrap_or_else(PoisonError::into_inner) = self.stats();
        }
    }

    /// Publishes the stats, then sends the held `Finished` events.
    fn deliver(&mut self) {
        self.publish_stats();
        for (id, event) in std::mem::take(&mut self.out.finished) {
            self.out.send(id, event);
            self.out.sinks.remove(&id);
        }
    }

    /// A snapshot of the counters with fresh gauges.
    pub fn stats(&self) -> EngineStats {
        let mut stats = self.out.stats.clone();
        let counters = self.scheduler.counters();
        stats.num_running = self.scheduler.num_running();
        stats.num_waiting = self.scheduler.num_waiting();
        stats.kv_cache_usage = self.scheduler.block_manager().usage();
        stats.preemptions_total = counters.preemptions;
        stats.prefix_cache_queries_total = counters.prefix_cache_queries;
        stats.prefix_cache_hits_total = counters.prefix_cache_hits;
        stats
    }

    /// One engine iteration. Returns the number of tokens computed (0 when idle).
    pub fn step(&mut self) -> usize {
        let started = Instant::now();
        self.drop_abandoned();
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            // Unreachable for requests that passed `Limits::check` (alone, a request always
            // fits the pool); never spin on one that does not.
            let stuck = plan.preempted.is_empty() && self.scheduler.num_running() == 0;
            let head = self.scheduler.waiting().next().map(|s| s.id);
            if let Some(id) = head.filter(|_| stuck) {
                warn!(id, "the request at the head of the queue cannot be scheduled");
                self.fail_request(id, "the request cannot be scheduled in the KV cache".into());
            }
            self.publish_stats();
            return 0;
        }
        for s in &plan.scheduled {
            debug_assert!(self.scheduler.writes_are_private(s), "{s:?} would write a shared block");
        }
        match self.runner.execute(self.scheduler.running(), &plan.scheduled) {
            Ok(rows) => {
                for (s, rows) in plan.scheduled.iter().zip(rows) {
                    self.scheduler.complete(s);
                    if let Some(seq) = self.scheduler.running_mut().get_mut(s.index) {
                        postprocess(seq, s, rows, &self.runner, &mut self.out);
                    }
                }
            }
            Err(message) => {
                for s in &plan.scheduled {
                    if let Some(seq) = self.scheduler.running_mut().get_mut(s.index) {
                        seq.status = SeqStatus::Finished(FinishReason::Error);
                        seq.error = Some(message.clone());
                    }
                }
            }
        }
        for seq in self.scheduler.take_finished() {
            self.finish(seq);
        }
        let tokens = plan.num_tokens();
        self.out.stats.steps_total += 1;
        self.out.stats.computed_tokens_total += tokens as u64;
        self.deliver();
        debug!(
            seqs = plan.scheduled.len(),
            tokens,
            preempted = plan.preempted.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        tokens
    }

    /// Records a finished sequence (whose blocks are already freed); its event goes out with the
    /// next [`Self::deliver`].
    fn finish(&mut self, mut seq: Sequence) {
        let reason = match seq.status {
            SeqStatus::Finished(reason) => reason,
            _ => FinishReason::Abort,
        };
        let stats = &mut self.out.stats;
        stats.requests_finished.record(reason);
        stats.e2e_request_latency.observe(seq.arrival.elapsed().as_secs_f64());
        debug!(
            id = seq.id,
            reason = reason.as_str(),
            tokens = seq.num_generated(),
            "finished"
        );
        let event = TokenEvent::Finished {
            reason,
            usage: seq.usage(),
            error: seq.error.take(),
        };
        self.out.finished.push((seq.id, event));
    }
}

/// After the forward pass computed `s`: scores prompt tokens, then (if the chunk reached the end
/// of the sequence) picks the next token — forced or sampled — and checks the stop conditions.
fn postprocess(seq: &mut Sequence, s: &ScheduledSeq, rows: Range<usize>, runner: &ModelRunner, out: &mut Outputs) {
    if seq.wants_prompt_logprobs() && rows.len() == s.len {
        let prompt_len = seq.prompt_len();
        if seq.prompt_scores.len() != prompt_len {
            seq.prompt_scores = vec![None; prompt_len];
        }
        let k = seq.prompt_logprobs.unwrap_or(0);
        for (r, row) in rows.clone().enumerate() {
            let next = s.start + r + 1;
            if next < prompt_len {
                let score = out.score(runner.row(row), seq.tokens[next], k);
                seq.prompt_scores[next] = Some(score);
            }
        }
        if s.start + s.len >= prompt_len {
            seq.prompt_scores_sent = true;
            let scores = std::mem::take(&mut seq.prompt_scores);
            if !out.send(seq.id, TokenEvent::PromptLogprobs(scores)) {
                seq.status = SeqStatus::Finished(FinishReason::Abort);
                return;
            }
        }
    }
    if s.start + s.len != seq.len() || rows.is_empty() {
        return;
    }
    if seq.num_generated() >= seq.max_tokens {
        seq.status = SeqStatus::Finished(FinishReason::Length); // max_tokens 0: prompt scored only
        return;
    }
    let row = runner.row(rows.end - 1);
    let (token, forced) = match seq.forced.pop_front() {
        Some(token) => {
            seq.sampler.observe(token);
            (token, true)
        }
        None => {
            let token = seq.sampler.sample(row);
            // The hook is the caller's code running on the engine thread: a panic fails only
            // this request.
            let hooked = seq
                .hook
                .as_mut()
                .map(|h| catch_unwind(AssertUnwindSafe(|| h.on_sampled(token))));
            let error = match hooked {
                Some(Err(_)) => Some("the request's token hook panicked".to_owned()),
                Some(Ok(Some(tokens))) => match tokens.iter().find(|&&t| t as usize >= runner.vocab_size()) {
                    Some(&bad) => Some(format!(
                        "the request's hook forced token {bad}, outside the vocabulary of {}",
                        runner.vocab_size()
                    )),
                    None => {
                        seq.push_forced(tokens);
                        None
                    }
                },
                _ => None,
            };
            if let Some(error) = error {
                seq.status = SeqStatus::Finished(FinishReason::Error);
                seq.error = Some(error);
                return;
            }
            (token, false)
        }
    };
    let logprob = seq.logprobs.map(|k| out.score(row, token, k));
    seq.push_token(token);

    let now = Instant::now();
    let stats = &mut out.stats;
    stats.generation_tokens_total += 1;
    match seq.last_token_at {
        Some(last) => stats.inter_token_latency.observe((now - last).as_secs_f64()),
        None => {
            stats.time_to_first_token.observe((now - seq.arrival).as_secs_f64());
            stats.prompt_tokens_total += seq.prompt_len() as u64;
        }
    }
    seq.last_token_at = Some(now);

    let event = TokenEvent::Token(GeneratedToken {
        id: token,
        logprob,
        forced,
    });
    if !out.send(seq.id, event) {
        debug!(id = seq.id, "receiver dropped: aborting");
        seq.status = SeqStatus::Finished(FinishReason::Abort);
    } else if let Some(reason) = seq.stop_reason() {
        seq.status = SeqStatus::Finished(reason);
    }
}
