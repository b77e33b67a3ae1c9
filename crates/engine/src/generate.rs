//! One sequence from prompt to finish over a private paged KV cache: the engine's simplest loop,
//! used by `r1serve generate` and as the reference the batched scheduler must agree with.

use r1serve_kernels::{KvCacheDtype, PagedKvCache};
use r1serve_model::{Batch, CausalLm, LogitsWanted, SeqInput};

use crate::error::EngineError;
use crate::logprobs::{log_softmax, score};
use crate::sampler::{Sampler, SamplingParams};

const BLOCK_SIZE: usize = 16;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// How many alternatives to report per generated token (0: none).
    pub top_logprobs: usize,
    /// Also score the prompt: the log-probability of each prompt token given the ones before.
    pub echo: bool,
    /// How the KV cache stores its entries.
    pub kv_cache_dtype: KvCacheDtype,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The request was cancelled (by the caller, or because nobody listens any more).
    Abort,
    /// The model failed on this request's batch; the event carries the message.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    /// With `echo`: `None` for the first prompt token, then each token's log-probability.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Per generated token, the `top_logprobs` best `(id, logprob)`, best first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Per generated token, its own log-probability.
    pub token_logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Runs a two-token prompt (every row's logits, then one decoded token) over a private cache, so
/// that what a backend prepares on first use — its packed copies of the weights — is built
/// before the first request instead of during it. Changes nothing a later request sees.
pub fn warm_up(model: &dyn CausalLm) -> Result<(), EngineError> {
    let request = GenerateRequest {
        prompt: vec![0, 0],
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop_token_ids: Vec::new(),
        top_logprobs: 0,
        echo: true,
        kv_cache_dtype: KvCacheDtype::default(),
    };
    model.prepare_weights();
    generate(model, &request, |_| {}).map(|_| ())
}

/// Generates from `request.prompt`, calling `on_token` with each new token as it is chosen.
pub fn generate(
    model: &dyn CausalLm,
    request: &GenerateRequest,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput, EngineError> {
    let info = model.info();
    let prompt = &request.prompt;
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
    }
    let context = info.max_position_embeddings;
    if prompt
        .len()
        .checked_add(request.max_tokens)
        .is_none_or(|total| total > context)
    {
        return Err(EngineError::InvalidRequest(format!(
            "prompt of {} tokens plus max_tokens {} exceeds the model's context of {context} tokens",
            prompt.len(),
            request.max_tokens
        )));
    }
    let mut sampler = Sampler::new(request.sampling.clone())?;
    sampler.set_prompt(prompt);
    let total = prompt.len() + request.max_tokens;
    let blocks = total.div_ceil(BLOCK_SIZE).max(1);
    let mut cache = PagedKvCache::with_dtype(BLOCK_SIZE, blocks, &model.kv_entry_widths(), request.kv_cache_dtype);
    let block_table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = info.vocab_size;

    let mut logits = Vec::with_capacity(vocab);
    let mut logprobs = Vec::with_capacity(vocab);
    let prefill = SeqInput {
        tokens: prompt,
        start_pos: 0,
        block_table: &block_table,
        logits: if request.echo {
            LogitsWanted::All
        } else {
            LogitsWanted::Last
        },
    };
    model.forward(&Batch::single(prefill), &mut cache, &mut logits)?;
    let prompt_logprobs = request.echo.then(|| {
        let mut scored = vec![None];
        for (row, &next) in logits.chunks_exact(vocab).zip(&prompt[1..]) {
            log_softmax(row, &mut logprobs);
            scored.push(Some(logprobs[next as usize]));
        }
        scored
    });
    if request.echo {
        // Keep only the last row: the distribution of the first generated token.
        let last = logits.len() - vocab;
        logits.drain(..last);
    }

    let mut output = GenerateOutput {
        tokens: Vec::with_capacity(request.max_tokens),
        prompt_logprobs,
        top_logprobs: Vec::new(),
        token_logprobs: Vec::new(),
        finish_reason: FinishReason::Length,
    };
    let mut pos = prompt.len();
    while output.tokens.len() < request.max_tokens {
        let next = sampler.sample(&logits);
        let scored = score(&logits, next, request.top_logprobs, &mut logprobs);
        output.token_logprobs.push(scored.logprob);
        if request.top_logprobs > 0 {
            output.top_logprobs.push(scored.top);
        }
        output.tokens.push(next);
        on_token(next);
        if request.stop_token_ids.contains(&next) {
            output.finish_reason = FinishReason::Stop;
            break;
        }
        if output.tokens.len() == request.max_tokens {
            break;
        }
        let step = SeqInput {
            tokens: std::slice::from_ref(&next),
            start_pos: pos,
            block_table: &block_table,
            logits: LogitsWanted::Last,
        };
        model.forward(&Batch::single(step), &mut cache, &mut logits)?;
        pos += 1;
    }
    Ok(output)
}
