//! Engine settings, and the limits every request is checked against at submit.

use r1serve_kernels::KvCacheDtype;
use r1serve_model::CausalLm;

use crate::error::EngineError;
use crate::sequence::Request;

/// How big the KV cache is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as fit in this many bytes (entries of the cache's dtype), but no more than
    /// `max_num_seqs` full-context sequences can use.
    Bytes(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_cache: KvCacheSize,
    /// How entries are stored (vLLM's `--kv-cache-dtype`): F32 keeps the model's values exactly,
    /// F16 holds twice the tokens in the same bytes.
    pub kv_cache_dtype: KvCacheDtype,
    /// Sequences per step at most (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Tokens per step at most (`--max-num-batched-tokens`); longer prompts are chunked.
    pub max_num_batched_tokens: usize,
    /// Prompt + output tokens per request at most; `None`: the model's context.
    pub max_model_len: Option<usize>,
    pub enable_prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache: KvCacheSize::Bytes(1 << 30),
            kv_cache_dtype: KvCacheDtype::F32,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            enable_prefix_caching: true,
        }
    }
}

/// What a request must fit in; checked at submit, before anything is queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
}

impl Limits {
    /// Resolves `config` for `model`.
    pub fn resolve(model: &dyn CausalLm, config: &EngineConfig) -> Result<Self, EngineError> {
        let info = model.info();
        for (name, value) in [
            ("block_size", config.block_size),
            ("max_num_seqs", config.max_num_seqs),
            ("max_num_batched_tokens", config.max_num_batched_tokens),
        ] {
            if value == 0 {
                return Err(EngineError::Config(format!("{name} must be at least 1")));
            }
        }
        let context = info.max_position_embeddings;
        let max_model_len = config.max_model_len.unwrap_or(context);
        if max_model_len == 0 || max_model_len > context {
            return Err(EngineError::Config(format!(
                "max_model_len {max_model_len} must be in 1..={context} (the model's context)"
            )));
        }
        let num_blocks = match config.kv_cache {
            KvCacheSize::Blocks(n) => n,
            KvCacheSize::Bytes(bytes) => {
                let per_token = config.kv_cache_dtype.token_bytes(&model.kv_entry_widths());
                let per_block = (per_token * config.block_size).max(1) as u64;
                let fit = usize::try_from(bytes / per_block).unwrap_or(usize::MAX);
                let useful = config
                    .max_num_seqs
                    .saturating_mul(max_model_len.div_ceil(config.block_size));
                fit.min(useful)
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "the KV cache ({:?}) holds no block of {} tokens",
                config.kv_cache, config.block_size
            )));
        }
        Ok(Self {
            max_model_len,
            block_size: config.block_size,
            num_blocks,
            vocab_size: info.vocab_size,
        })
    }

    /// Rejects a request that is malformed or could never run, naming the limit it breaks.
    pub fn check(&self, request: &Request) -> Result<(), EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
        }
        self.check_tokens(&request.prompt)?;
        request.sampling.validate()?;
        let prompt = request.prompt.len();
        if prompt
            .checked_add(request.max_tokens)
            .is_none_or(|total| total > self.max_model_len)
        {
            return Err(EngineError::ExceedsContext {
                prompt_tokens: prompt,
                max_tokens: request.max_tokens,
                context: self.max_model_len,
            });
        }
        // The last generated token never needs a KV slot.
        let slots = (prompt + request.max_tokens).saturating_sub(1).max(prompt);
        let blocks_needed = slots.div_ceil(self.block_size);
        if blocks_needed > self.num_blocks {
            return Err(EngineError::ExceedsKvCache {
                prompt_tokens: prompt,
                max_tokens: request.max_tokens,
                blocks_needed,
                block_size: self.block_size,
                num_blocks: self.num_blocks,
            });
        }
        Ok(())
    }

    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        match tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&token) => Err(EngineError::TokenOutOfVocab {
                token,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }
}
