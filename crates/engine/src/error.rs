use r1serve_model::ModelError;

use crate::sequence::SeqId;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's context of {context} tokens"
    )]
    ExceedsContext {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} needs {blocks_needed} KV blocks of \
         {block_size} tokens but the whole cache has {num_blocks}"
    )]
    ExceedsKvCache {
        prompt_tokens: usize,
        max_tokens: usize,
        blocks_needed: usize,
        block_size: usize,
        num_blocks: usize,
    },
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("no request {0} is queued or running")]
    UnknownSequence(SeqId),
    #[error("the engine is shut down")]
    ShutDown,
}
