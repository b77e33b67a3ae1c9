//! Request fields → engine [`Request`]s: range checks (each failure a 400 naming the field),
//! sampling parameters, `max_tokens` defaults, and the thinking-budget hook.

use r1serve_chat::ThinkingBudget;
use r1serve_engine::{Hook, Request, SamplingParams, TokenHook};

use crate::error::ApiError;
use crate::protocol::CommonParams;
use crate::state::ModelContext;

/// Most choices one request may ask for.
pub const MAX_N: usize = 128;
/// Most alternatives per token (`logprobs` / `top_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// A count field that must lie in `lo..=hi`.
pub fn count_in(name: &str, value: Option<i64>, lo: usize, hi: usize) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= lo as i64 && v <= hi as i64 => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid_param(
            name,
            format!("{name} must be in {lo}..={hi}, got {v}"),
        )),
    }
}

/// The validated, engine-ready form of the fields both endpoints share.
#[derive(Debug, Clone)]
pub struct Plan {
    pub n: usize,
    /// `None`: as many as fit after the prompt.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

impl Plan {
    pub fn new(common: &CommonParams) -> Result<Self, ApiError> {
        let n = count_in("n", common.n, 1, MAX_N)?.unwrap_or(1);
        let max_tokens = count_in("max_tokens", common.max_tokens, 0, u32::MAX as usize)?;
        let top_k = match common.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: common.temperature.unwrap_or(1.0),
            top_k,
            top_p: common.top_p.unwrap_or(1.0),
            min_p: common.min_p.unwrap_or(0.0),
            presence_penalty: common.presence_penalty.unwrap_or(0.0),
            frequency_penalty: common.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: common.repetition_penalty.unwrap_or(1.0),
            // Negative seeds are accepted as their two's-complement bits.
            seed: common.seed.map(|s| s as u64),
        };
        sampling.validate().map_err(ApiError::from)?;
        if common.temperature.is_some_and(|t| t > 2.0) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!(
                    "temperature must be in [0, 2], got {}",
                    common.temperature.unwrap_or_default()
                ),
            ));
        }
        let stop = common.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        Ok(Self {
            n,
            max_tokens,
            sampling,
            stop,
            include_stop_str_in_output: common.include_stop_str_in_output,
            stop_token_ids: common.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: common.ignore_eos,
        })
    }

    /// `max_tokens` for a prompt of `prompt_len` tokens: as asked (the engine checks it against
    /// the context), else whatever fits in both the context and the KV cache.
    pub fn max_tokens_for(&self, ctx: &ModelContext, prompt_len: usize) -> Result<usize, ApiError> {
        if let Some(max) = self.max_tokens {
            return Ok(max);
        }
        let limits = ctx.engine.limits();
        let kv_tokens = limits.num_blocks.saturating_mul(limits.block_size).saturating_add(1);
        let room = limits.max_model_len.min(kv_tokens).saturating_sub(prompt_len);
        if room == 0 {
            return Err(ApiError::BadRequest {
                message: format!(
                    "the prompt of {prompt_len} tokens leaves no room to generate within the model's context of {} tokens",
                    limits.max_model_len
                ),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            });
        }
        Ok(room)
    }

    /// The engine request for choice `i` of `n`: with a seed, choice `i` samples under `seed + i`
    /// so that the choices differ.
    pub fn request(&self, prompt: Vec<u32>, max_tokens: usize, i: usize) -> Request {
        let mut sampling = self.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        Request {
            prompt,
            max_tokens,
            sampling,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: None,
            prompt_logprobs: None,
            hook: None,
        }
    }

    /// Token ids whose text is never shown: the stop ids, and EOS unless ignored.
    pub fn hidden_ids(&self, ctx: &ModelContext) -> Vec<u32> {
        let mut ids = self.stop_token_ids.clone();
        if !self.ignore_eos {
            ids.extend_from_slice(&ctx.eos);
        }
        ids
    }
}

/// The thinking budget as an engine hook: `</think>` is forced at exactly the token that
/// reaches the limit.
#[derive(Clone)]
struct BudgetHook(ThinkingBudget);

impl TokenHook for BudgetHook {
    fn on_start(&mut self) -> Option<Vec<u32>> {
        self.0.before_first_token().map(<[u32]>::to_vec)
    }

    fn on_sampled(&mut self, token: u32) -> Option<Vec<u32>> {
        self.0.on_token(token).map(<[u32]>::to_vec)
    }

    fn clone_box(&self) -> Box<dyn TokenHook> {
        Box::new(self.clone())
    }
}

/// The hook enforcing `limit` reasoning tokens, for a reasoning model; `None` otherwise.
pub fn thinking_hook(ctx: &ModelContext, limit: Option<u32>, started_in_thinking: bool) -> Option<Hook> {
    let limit = limit?;
    let think = ctx.think?;
    if ctx.forced_think_end.is_empty() {
        return None;
    }
    let budget = ThinkingBudget::new(Some(limit), think, ctx.forced_think_end.clone(), started_in_thinking);
    Some(Hook::new(BudgetHook(budget)))
}

/// `thinking_budget` / `thinking_token_budget`, else the server's default.
pub fn thinking_limit(request: [Option<i64>; 2], default: Option<u32>) -> Result<Option<u32>, ApiError> {
    for (name, value) in ["thinking_budget", "thinking_token_budget"].into_iter().zip(request) {
        // -1 means "no limit" (vLLM).
        match value {
            None => {}
            Some(-1) => return Ok(None),
            Some(v) => return count_in(name, Some(v), 0, u32::MAX as usize).map(|v| v.map(|v| v as u32)),
        }
    }
    Ok(default)
}
