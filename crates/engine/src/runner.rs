//! The device side of a step: owns the paged KV cache, turns the scheduled chunks into one flat
//! `Batch`, runs the model, and hands back each sequence's rows of logits.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use r1serve_kernels::{KvCacheDtype, PagedKvCache};
use r1serve_model::{Batch, CausalLm, LogitsWanted, SeqInput};
use tracing::error;

use crate::scheduler::ScheduledSeq;
use crate::sequence::Sequence;

/// Which logits a scheduled chunk needs: every row while the prompt is being scored, the last
/// row when the chunk reaches the end of the sequence (a token is chosen next), else none.
pub fn logits_wanted(seq: &Sequence, s: &ScheduledSeq) -> LogitsWanted {
    if seq.wants_prompt_logprobs() && s.start < seq.prompt_len() {
        LogitsWanted::All
    } else if s.start + s.len == seq.len() {
        LogitsWanted::Last
    } else {
        LogitsWanted::None
    }
}

pub struct ModelRunner {
    model: Arc<dyn CausalLm>,
    cache: PagedKvCache,
    logits: Vec<f32>,
    vocab: usize,
}

impl ModelRunner {
    pub fn new(model: Arc<dyn CausalLm>, block_size: usize, num_blocks: usize, dtype: KvCacheDtype) -> Self {
        let cache = PagedKvCache::with_dtype(block_size, num_blocks, &model.kv_entry_widths(), dtype);
        let vocab = model.info().vocab_size;
        Self {
            model,
            cache,
            logits: Vec::new(),
            vocab,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Runs `scheduled` (chunks of `running`) as one batch. Returns, per scheduled chunk in
    /// order, the rows of [`ModelRunner::row`] that hold its logits. A model error or panic
    /// comes back as its message; the cache blocks it may have half-written are private to the
    /// failed sequences (only full computed blocks are shared), so nothing else is affected.
    pub fn execute(&mut self, running: &[Sequence], scheduled: &[ScheduledSeq]) -> Result<Vec<Range<usize>>, String> {
        let mut batch = Batch {
            seqs: Vec::with_capacity(scheduled.len()),
        };
        let mut rows = Vec::with_capacity(scheduled.len());
        let mut next_row = 0;
        for s in scheduled {
            let seq = running
                .get(s.index)
                .ok_or_else(|| format!("scheduled index {} is not running", s.index))?;
            let tokens = seq
                .tokens()
                .get(s.start..s.start + s.len)
                .ok_or_else(|| format!("sequence {} has no tokens {}..{}", seq.id, s.start, s.start + s.len))?;
            let logits = logits_wanted(seq, s);
            let n = match logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => s.len,
            };
            rows.push(next_row..next_row + n);
            next_row += n;
            batch.seqs.push(SeqInput {
                tokens,
                start_pos: s.start,
                block_table: seq.block_table().blocks(),
                logits,
            });
        }
        let (model, cache, logits) = (&self.model, &mut self.cache, &mut self.logits);
        let result = catch_unwind(AssertUnwindSafe(|| model.forward(&batch, cache, logits)));
        match result {
            Ok(Ok(())) if logits.len() == next_row * self.vocab => Ok(rows),
            Ok(Ok(())) => Err(format!(
                "the model returned {} logits, expected {next_row} rows of {}",
                logits.len(),
                self.vocab
            )),
            Ok(Err(e)) => {
                error!(error = %e, "forward pass failed");
                Err(e.to_string())
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                error!(panic = %msg, "forward pass panicked");
                Err(format!("the forward pass panicked: {msg}"))
            }
        }
    }

    /// One row of logits from the last `execute`.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.logits[row * self.vocab..(row + 1) * self.vocab]
    }
}
