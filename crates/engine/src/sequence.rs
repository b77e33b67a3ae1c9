//! A request as the engine tracks it: its tokens (prompt then output), how many of them have KV
//! entries, its blocks, its sampler, and what it reports back.

use std::collections::VecDeque;
use std::time::Instant;

use crate::block_manager::BlockTable;
use crate::error::EngineError;
use crate::generate::FinishReason;
use crate::sampler::{Sampler, SamplingParams};

/// Engine-wide request id, assigned at submit.
pub type SeqId = u64;

/// What a caller submits.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Generated tokens at most (forced tokens included). 0 only scores the prompt.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (in addition to EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's EOS tokens.
    pub ignore_eos: bool,
    /// `Some(k)`: report each generated token's log-probability and its `k` best alternatives.
    pub logprobs: Option<usize>,
    /// `Some(k)`: also score the prompt (echo), each token with `k` alternatives. Disables prefix
    /// cache hits for this request (cached tokens have no logits).
    pub prompt_logprobs: Option<usize>,
    /// Chooses tokens to force on the engine thread (e.g. a thinking budget's `</think>`).
    pub hook: Option<Hook>,
}

/// Decides on the engine thread, right after each sampled token, which tokens to force next. A
/// condition such as a thinking budget then takes effect at exactly the token that meets it,
/// where [`crate::Engine::force_tokens`] from another thread arrives a step or more late.
pub trait TokenHook: Send {
    /// Tokens to emit before anything is sampled.
    fn on_start(&mut self) -> Option<Vec<u32>> {
        None
    }
    /// Called with each sampled (not forced) token; returns tokens to emit next.
    fn on_sampled(&mut self, token: u32) -> Option<Vec<u32>>;
    /// A fresh copy (a `Request` is `Clone`).
    fn clone_box(&self) -> Box<dyn TokenHook>;
}

/// A request's [`TokenHook`]. Clones are independent; two hooks are equal only if they are the
/// same object.
pub struct Hook(pub Box<dyn TokenHook>);

impl Hook {
    pub fn new(hook: impl TokenHook + 'static) -> Self {
        Self(Box::new(hook))
    }
}

impl Clone for Hook {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook(..)")
    }
}

impl PartialEq for Hook {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(self.0.as_ref(), other.0.as_ref())
    }
}

impl Request {
    /// Greedy, `max_tokens` tokens, stopping at EOS, no log-probabilities.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            hook: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
    Finished(FinishReason),
}

/// One position's log-probability and the best alternatives there, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One generated (or forced) token.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// With `logprobs`: the token's log-probability under the model (before penalties and
    /// temperature) and the best alternatives.
    pub logprob: Option<TokenLogprob>,
    /// Pushed by the caller with `force_tokens`, not sampled.
    pub forced: bool,
}

/// Token counts of a finished request (OpenAI `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
}

/// What the engine sends back for a request, in order: `PromptLogprobs` (only if asked, once),
/// then `Token`s, then exactly one `Finished`, after which the channel closes.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    /// Entry `i` scores prompt token `i` given the ones before; entry 0 is `None`.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    Token(GeneratedToken),
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// The failure, when `reason` is `Error`.
        error: Option<String>,
    },
}

/// A request inside the engine.
pub struct Sequence {
    pub id: SeqId,
    pub(crate) tokens: Vec<u32>,
    prompt_len: usize,
    pub(crate) max_tokens: usize,
    /// Effective stop ids: the request's plus EOS unless `ignore_eos`.
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) logprobs: Option<usize>,
    pub(crate) prompt_logprobs: Option<usize>,
    /// Tokens with KV entries written (a prefix of `tokens`).
    pub(crate) num_computed: usize,
    /// Cached tokens reused at first admission.
    pub(crate) num_cached_tokens: usize,
    pub(crate) admitted_once: bool,
    pub(crate) block_table: BlockTable,
    pub(crate) status: SeqStatus,
    pub(crate) forced: VecDeque<u32>,
    pub(crate) hook: Option<Box<dyn TokenHook>>,
    pub(crate) sampler: Sampler,
    /// Prompt scores gathered so far (chunked prefill fills them chunk by chunk).
    pub(crate) prompt_scores: Vec<Option<TokenLogprob>>,
    pub(crate) prompt_scores_sent: bool,
    pub(crate) arrival: Instant,
    pub(crate) last_token_at: Option<Instant>,
    /// Why the request failed, when it finishes with `Error`.
    pub(crate) error: Option<String>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("id", &self.id)
            .field("prompt_len", &self.prompt_len)
            .field("len", &self.tokens.len())
            .field("num_computed", &self.num_computed)
            .field("blocks", &self.block_table.blocks())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Sequence {
    /// A waiting sequence; `eos_token_ids` are added to the stop ids unless `ignore_eos`.
    pub fn new(id: SeqId, request: Request, eos_token_ids: &[u32]) -> Result<Self, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
        }
        let mut sampler = Sampler::new(request.sampling)?;
        sampler.set_prompt(&request.prompt);
        let mut stop_ids = request.stop_token_ids;
        if !request.ignore_eos {
            stop_ids.extend_from_slice(eos_token_ids);
        }
        let mut hook = request.hook.map(|h| h.0);
        let start = match hook.as_mut() {
            Some(h) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.on_start()))
                .map_err(|_| EngineError::InvalidRequest("the request's token hook panicked".into()))?,
            None => None,
        };
        let forced: VecDeque<u32> = start.unwrap_or_default().into();
        let prompt_len = request.prompt.len();
        let mut tokens = request.prompt;
        tokens.reserve(request.max_tokens);
        Ok(Self {
            id,
            tokens,
            prompt_len,
            max_tokens: request.max_tokens,
            stop_ids,
            logprobs: request.logprobs,
            prompt_logprobs: request.prompt_logprobs,
            num_computed: 0,
            num_cached_tokens: 0,
            admitted_once: false,
            block_table: BlockTable::default(),
            status: SeqStatus::Waiting,
            forced,
            hook,
            sampler,
            prompt_scores: Vec::new(),
            prompt_scores_sent: false,
            arrival: Instant::now(),
            last_token_at: None,
            error: None,
        })
    }

    /// Prompt then output.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn num_computed(&self) -> usize {
        self.num_computed
    }

    /// Tokens still to compute before the next token can be chosen (1 when decoding).
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    pub fn num_cached_tokens(&self) -> usize {
        self.num_cached_tokens
    }

    pub fn status(&self) -> SeqStatus {
        self.status
    }

    pub fn block_table(&self) -> &BlockTable {
        &self.block_table
    }

    /// Whether the prompt still has to be scored (every prompt token must then be computed).
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs.is_some() && !self.prompt_scores_sent
    }

    /// Queues tokens to emit next instead of sampling (e.g. `</think>` for a thinking budget).
    pub fn push_forced(&mut self, tokens: impl IntoIterator<Item = u32>) {
        self.forced.extend(tokens);
    }

    pub(crate) fn push_token(&mut self, token: u32) {
        self.tokens.push(token);
    }

    /// Usage counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.num_generated(),
            cached_tokens: self.num_cached_tokens,
        }
    }

    /// The stop condition after the last token, if met.
    pub(crate) fn stop_reason(&self) -> Option<FinishReason> {
        let last = *self.tokens.last()?;
        if self.num_generated() > 0 && self.stop_ids.contains(&last) {
            Some(FinishReason::Stop)
        } else if self.num_generated() >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}
