//! Running one HTTP request's sequences: submit them, then read their events fairly, through each
//! one's [`SeqProcessor`], finishing a sequence in the engine when a stop string matched.
//!
//! Dropping a [`Generation`] (the client went away, the handler future was dropped) drops the
//! event receivers, so the engine aborts those sequences and frees their blocks before its next
//! step; it also releases the admission slots and writes the request's log line.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use r1serve_engine::{EventReceiver, Request, SeqId};
use tracing::info;

use crate::error::ApiError;
use crate::seq::{SeqDelta, SeqOptions, SeqProcessor};
use crate::state::{Admission, ModelContext};

/// One sequence to start: its choice index, engine request and text options.
pub struct SeqSpec {
    pub index: usize,
    pub request: Request,
    pub options: SeqOptions,
}

struct SeqRun {
    index: usize,
    id: SeqId,
    rx: EventReceiver,
    proc: SeqProcessor,
    done: bool,
    /// `Engine::finish` was sent (a stop string matched).
    finish_sent: bool,
}

/// Per-request numbers for the log line.
struct RequestLog {
    id: String,
    arrival: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    reasons: Vec<&'static str>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let now = Instant::now();
        let ttft_ms = self.first_token.map(|t| (t - self.arrival).as_secs_f64() * 1e3);
        let decode_s = self.first_token.map_or(0.0, |t| (now - t).as_secs_f64());
        let tokens_per_s = if decode_s > 0.0 && self.completion_tokens > 1 {
            (self.completion_tokens - 1) as f64 / decode_s
        } else {
            0.0
        };
        let finish = if self.reasons.is_empty() {
            "disconnected".to_owned()
        } else {
            self.reasons.join(",")
        };
        info!(
            request_id = %self.id,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ttft_ms = ttft_ms.map(|t| (t * 10.0).round() / 10.0),
            tokens_per_s = (tokens_per_s * 10.0).round() / 10.0,
            total_ms = ((now - self.arrival).as_secs_f64() * 1e4).round() / 10.0,
            finish = %finish,
            "request"
        );
    }
}

pub struct Generation {
    ctx: Arc<ModelContext>,
    seqs: Vec<SeqRun>,
    /// Where the next fair scan starts.
    cursor: usize,
    log: RequestLog,
    _admission: Admission,
}

impl Generation {
    /// Submits every sequence; on a rejection the ones already submitted are dropped (aborted).
    pub fn start(
        ctx: Arc<ModelContext>,
        request_id: String,
        arrival: Instant,
        specs: Vec<SeqSpec>,
        admission: Admission,
    ) -> Result<Self, ApiError> {
        let mut seqs = Vec::with_capacity(specs.len());
        let mut prompt_tokens = 0;
        for spec in specs {
            let proc = SeqProcessor::new(Arc::clone(&ctx.tokenizer), spec.options)?;
            prompt_tokens += spec.request.prompt.len();
            let (id, rx) = ctx.engine.submit(spec.request)?;
            seqs.push(SeqRun {
                index: spec.index,
                id,
                rx,
                proc,
                done: false,
                finish_sent: false,
            });
        }
        Ok(Self {
            ctx,
            seqs,
            cursor: 0,
            log: RequestLog {
                id: request_id,
                arrival,
                first_token: None,
                prompt_tokens,
                completion_tokens: 0,
                reasons: Vec::new(),
            },
            _admission: admission,
        })
    }

    /// The next non-empty update of any sequence, with its choice index; `None` once all finished.
    pub async fn next(&mut self) -> Option<(usize, SeqDelta)> {
        loop {
            let (slot, delta) = poll_fn(|cx| self.poll_one(cx)).await?;
            let seq = &mut self.seqs[slot];
            if seq.proc.stop_matched() && !seq.done && !seq.finish_sent {
                seq.finish_sent = true;
                self.ctx.engine.finish(seq.id);
            }
            if !delta.tokens.is_empty() && self.log.first_token.is_none() {
                self.log.first_token = Some(Instant::now());
            }
            if let Some(finish) = &delta.finish {
                self.log.completion_tokens += finish.usage.completion_tokens;
                self.log.reasons.push(finish.reason);
            }
            if !delta.is_empty() {
                return Some((seq.index, delta));
            }
        }
    }

    fn poll_one(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<(usize, SeqDelta)>> {
        let len = self.seqs.len();
        if self.seqs.iter().all(|s| s.done) {
            return Poll::Ready(None);
        }
        for k in 0..len {
            let slot = (self.cursor + k) % len;
            let seq = &mut self.seqs[slot];
            if seq.done {
                continue;
            }
            let delta = match seq.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => seq.proc.on_event(event),
                Poll::Ready(None) => seq.proc.on_closed(),
                Poll::Pending => continue,
            };
            seq.done = seq.proc.is_finished();
            if seq.done {
                seq.rx.close();
            }
            self.cursor = (slot + 1) % len;
            return Poll::Ready(Some((slot, delta)));
        }
        Poll::Pending
    }
}
