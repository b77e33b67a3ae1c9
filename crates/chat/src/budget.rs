//! A per-sequence limit on reasoning length, over token ids.
//!
//! The engine reports each *sampled* token with [`ThinkingBudget::on_token`]. While generation is
//! inside thinking the budget counts tokens; when the count reaches the limit and `</think>` has
//! not been generated, `on_token` returns the ids of `"\n</think>\n\n"` for the engine to append to
//! the sequence as if sampled (without sampling, and without reporting them back: the budget has
//! already accounted for them). The model then writes its answer.
//!
//! `reasoning_tokens` counts the tokens of the thinking segment: the sampled ones, including a
//! sampled `<think>`/`</think>`, plus the forced tokens up to and including the forced `</think>`.

use crate::tokenizer::ThinkTokens;
use crate::{ChatError, Tokenizer};

/// The text force-fed when the budget runs out.
pub const FORCED_THINK_END: &str = "\n</think>\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not (yet) thinking: the first sampled token decides whether the model opens `<think>`.
    Start,
    Thinking,
    /// Thinking is over (closed by the model or forced), or never happened.
    Answering,
}

/// Thinking-budget state of one sequence. Pure logic over token ids.
#[derive(Debug, Clone)]
pub struct ThinkingBudget {
    limit: Option<u32>,
    think: ThinkTokens,
    forced: Vec<u32>,
    /// Tokens of `forced` that belong to the thinking segment (through `</think>`).
    forced_reasoning: u32,
    state: State,
    reasoning_tokens: u32,
    thinking_tokens: u32,
    was_forced: bool,
}

impl ThinkingBudget {
    /// `limit`: most tokens of thinking before the end is forced (`None`: count only).
    /// `forced`: ids of [`FORCED_THINK_END`]; it must contain `think.end`.
    /// `started_in_thinking`: the prompt opened `<think>` (see [`crate::prompt_opens_thinking`]).
    pub fn new(limit: Option<u32>, think: ThinkTokens, forced: Vec<u32>, started_in_thinking: bool) -> Self {
        let forced_reasoning = forced
            .iter()
            .position(|&id| id == think.end)
            .map_or(forced.len(), |i| i + 1);
        Self {
            limit,
            think,
            forced_reasoning: u32::try_from(forced_reasoning).unwrap_or(u32::MAX),
            forced,
            state: if started_in_thinking {
                State::Thinking
            } else {
                State::Start
            },
            reasoning_tokens: 0,
            thinking_tokens: 0,
            was_forced: false,
        }
    }

    /// A budget for a model served with `tokenizer`: `None` when it is not a reasoning model.
    pub fn for_tokenizer(
        tokenizer: &Tokenizer,
        limit: Option<u32>,
        started_in_thinking: bool,
    ) -> Result<Option<Self>, ChatError> {
        let Some(think) = tokenizer.think_tokens() else {
            return Ok(None);
        };
        let forced = forced_ids(tokenizer)?;
        Ok(Some(Self::new(limit, think, forced, started_in_thinking)))
    }

    /// Tokens to append before sampling anything: the end of thinking when the prompt opened it and
    /// the limit is 0.
    pub fn before_first_token(&mut self) -> Option<&[u32]> {
        if self.state == State::Thinking && self.limit == Some(0) {
            return self.force();
        }
        None
    }

    /// Reports one sampled token; returns tokens to append now (the forced end of thinking).
    pub fn on_token(&mut self, id: u32) -> Option<&[u32]> {
        match self.state {
            State::Start => {
                if id == self.think.start {
                    self.reasoning_tokens += 1;
                    self.state = State::Thinking;
                    return self.check_limit();
                }
                self.state = State::Answering;
                None
            }
            State::Thinking => {
                self.reasoning_tokens += 1;
                if id == self.think.end {
                    self.state = State::Answering;
                    return None;
                }
                self.thinking_tokens += 1;
                self.check_limit()
            }
            State::Answering => None,
        }
    }

    fn check_limit(&mut self) -> Option<&[u32]> {
        match self.limit {
            Some(limit) if self.thinking_tokens >= limit => self.force(),
            _ => None,
        }
    }

    fn force(&mut self) -> Option<&[u32]> {
        self.state = State::Answering;
        self.was_forced = true;
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(self.forced_reasoning);
        Some(&self.forced)
    }

    /// Tokens of the thinking segment so far (for `completion_tokens_details.reasoning_tokens`).
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// Whether generation is inside thinking now.
    pub fn in_thinking(&self) -> bool {
        self.state == State::Thinking
    }

    /// Whether the end of thinking was forced by the budget.
    pub fn was_forced(&self) -> bool {
        self.was_forced
    }
}

/// Ids of [`FORCED_THINK_END`] in `tokenizer`'s vocabulary (no special tokens added); an error if the
/// tokenizer has no `</think>` or does not encode it as that one token.
pub fn forced_ids(tokenizer: &Tokenizer) -> Result<Vec<u32>, ChatError> {
    let end = tokenizer
        .think_tokens()
        .ok_or_else(|| ChatError::MissingToken {
            token: crate::tokenizer::THINK_END.to_owned(),
        })?
        .end;
    let ids = tokenizer.encode(FORCED_THINK_END, false)?;
    if !ids.contains(&end) {
        return Err(ChatError::Tokenize(format!(
            "{FORCED_THINK_END:?} encodes to {ids:?}, without the </think> token {end}"
        )));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    const THINK: ThinkTokens = ThinkTokens { start: 100, end: 101 };
    /// "\n", "</think>", "\n\n"
    fn forced() -> Vec<u32> {
        vec![10, 101, 11]
    }

    #[test]
    fn forces_the_end_when_the_budget_runs_out() {
        let mut budget = ThinkingBudget::new(Some(3), THINK, forced(), true);
        assert_eq!(budget.before_first_token(), None);
        assert_eq!(budget.on_token(1), None);
        assert_eq!(budget.on_token(2), None);
        assert_eq!(budget.on_token(3), Some(&[10, 101, 11][..]));
        assert!(budget.was_forced() && !budget.in_thinking());
        // Three sampled tokens plus the forced "\n" and "</think>".
        assert_eq!(budget.reasoning_tokens(), 5);
        assert_eq!(budget.on_token(4), None);
        assert_eq!(budget.reasoning_tokens(), 5);
    }

    #[test]
    fn model_closing_thinking_itself_is_not_forced() {
        let mut budget = ThinkingBudget::new(Some(3), THINK, forced(), true);
        assert_eq!(budget.on_token(1), None);
        assert_eq!(budget.on_token(101), None);
        assert_eq!(budget.on_token(2), None);
        assert_eq!(budget.on_token(3), None);
        assert!(!budget.was_forced());
        assert_eq!(budget.reasoning_tokens(), 2);
    }

    #[test]
    fn model_opening_thinking_itself() {
        let mut budget = ThinkingBudget::new(Some(2), THINK, forced(), false);
        assert!(!budget.in_thinking());
        assert_eq!(budget.on_token(100), None);
        assert!(budget.in_thinking());
        assert_eq!(budget.on_token(1), None);
        assert!(budget.on_token(2).is_some());
        assert_eq!(budget.reasoning_tokens(), 5);

        let mut no_thinking = ThinkingBudget::new(Some(1), THINK, forced(), false);
        assert_eq!(no_thinking.on_token(1), None);
        assert_eq!(no_thinking.on_token(2), None);
        assert_eq!(no_thinking.reasoning_tokens(), 0);
    }

    #[test]
    fn zero_budget_forces_before_sampling() {
        let mut budget = ThinkingBudget::new(Some(0), THINK, forced(), true);
        assert_eq!(budget.before_first_token(), Some(&[10, 101, 11][..]));
        assert_eq!(budget.before_first_token(), None);
        assert_eq!(budget.on_token(5), None);
        assert_eq!(budget.reasoning_tokens(), 2);
        // Opened by the model itself with no budget: forced right after `<think>`.
        let mut budget = ThinkingBudget::new(Some(0), THINK, forced(), false);
        assert!(budget.on_token(100).is_some());
    }

    #[test]
    fn unlimited_only_counts() {
        let mut budget = ThinkingBudget::new(None, THINK, forced(), true);
        for id in 1000..2000 {
            assert_eq!(budget.on_token(id), None);
        }
        assert_eq!(budget.on_token(101), None);
        assert_eq!(budget.reasoning_tokens(), 1001);
    }
}
