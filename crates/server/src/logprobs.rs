//! Log-probabilities in the two OpenAI shapes: chat (`logprobs.content[]`, with `bytes`) and the
//! legacy completions form (parallel lists, `top_logprobs` as objects). With
//! `return_tokens_as_token_ids` every token is written `token_id:N`.

use r1serve_chat::Tokenizer;
use r1serve_engine::TokenLogprob;

use crate::protocol::chat::{ChatLogprob, ChatTopLogprob};
use crate::protocol::completions::{ordered::OrderedMap, CompletionLogprobs};

/// What JSON gets for a log-probability of -inf (it has no infinity).
const FLOOR: f32 = -9999.0;

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        FLOOR
    }
}

/// How token ids are shown.
#[derive(Clone, Copy)]
pub struct TokenNames<'a> {
    pub tokenizer: &'a Tokenizer,
    pub as_ids: bool,
}

impl TokenNames<'_> {
    pub fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.tokenizer.decode(&[id], false).unwrap_or_default()
        }
    }

    /// A chat `logprobs.content` entry with the `k` best alternatives.
    pub fn chat_entry(&self, score: &TokenLogprob, k: usize) -> ChatLogprob {
        let token = self.name(score.token);
        ChatLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: finite(score.logprob),
            top_logprobs: score
                .top
                .iter()
                .take(k)
                .map(|&(id, lp)| {
                    let token = self.name(id);
                    ChatTopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: finite(lp),
                    }
                })
                .collect(),
        }
    }
}

/// Builds the completions `logprobs` object; `text_offset` counts characters of the returned
/// text, starting at `offset`.
pub struct CompletionLogprobsBuilder {
    k: usize,
    offset: usize,
}

impl CompletionLogprobsBuilder {
    pub fn new(k: usize) -> Self {
        Self { k, offset: 0 }
    }

    /// Adds one token: `score` is `None` for the first prompt token (nothing to condition on).
    pub fn push(&mut self, names: TokenNames<'_>, id: u32, score: Option<&TokenLogprob>, out: &mut CompletionLogprobs) {
        let token = names.name(id);
        // Offsets follow each token's text as it appears in the output (special tokens skipped).
        let width = names.tokenizer.decode(&[id], true).unwrap_or_default().chars().count();
        out.text_offset.push(self.offset);
        self.offset += width;
        match score {
            None => {
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
            }
            Some(score) => {
                out.token_logprobs.push(Some(finite(score.logprob)));
                let mut top = OrderedMap::default();
                for &(alt, lp) in score.top.iter().take(self.k) {
                    top.insert(names.name(alt), finite(lp));
                }
                // The chosen token is always listed (vLLM).
                top.insert(token.clone(), finite(score.logprob));
                out.top_logprobs.push(Some(top));
            }
        }
        out.tokens.push(token);
    }
}
