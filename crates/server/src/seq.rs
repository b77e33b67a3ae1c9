//! One sequence's text pipeline: engine events in; reasoning, content and finish info out.
//!
//! token ids → [`IncrementalDecoder`] (whole characters, special tokens skipped) →
//! [`ReasoningParser`] (chat with a reasoning model: `<think>…</think>` → reasoning) → content →
//! [`StopMatcher`] (stop strings apply to content only) → tool-call detection (content from
//! `<｜tool▁calls▁begin｜>` on is held and parsed at the end).
//!
//! Pure logic over [`TokenEvent`]s: the caller feeds events and, when a stop string matched,
//! tells the engine to finish the sequence.

use std::sync::Arc;

use r1serve_chat::tool_calls::TOOL_CALLS_BEGIN;
use r1serve_chat::{
    parse_tool_calls, ChatError, IncrementalDecoder, ParsedToolCall, ReasoningParser, ThinkingBudget, Tokenizer,
};
use r1serve_engine::{FinishReason, GeneratedToken, TokenEvent, TokenLogprob, Usage};

/// How a sequence's text is processed.
#[derive(Debug, Clone, Default)]
pub struct SeqOptions {
    /// Split `<think>` reasoning from content (chat with a reasoning model).
    pub reasoning: bool,
    /// The prompt opened `<think>`: generation starts inside reasoning.
    pub started_in_thinking: bool,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    /// Stop tokens whose text is never output (the request's `stop_token_ids`, EOS).
    pub hidden_ids: Vec<u32>,
    /// Parse DeepSeek tool-call blocks out of the content.
    pub tool_calls: bool,
}

/// What one event produced.
#[derive(Debug, Clone, Default)]
pub struct SeqDelta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    /// The tokens this event consumed (for their log-probabilities).
    pub tokens: Vec<GeneratedToken>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: Option<SeqFinish>,
}

impl SeqDelta {
    /// Nothing to report.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_none()
            && self.content.is_none()
            && self.tokens.is_empty()
            && self.prompt_logprobs.is_none()
            && self.finish.is_none()
    }

    fn push_reasoning(&mut self, text: Option<String>) {
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            self.reasoning.get_or_insert_with(String::new).push_str(&text);
        }
    }

    fn push_content(&mut self, text: &str) {
        if !text.is_empty() {
            self.content.get_or_insert_with(String::new).push_str(text);
        }
    }
}

/// How a sequence ended.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqFinish {
    /// OpenAI `finish_reason`: "stop", "length", "tool_calls", "abort" or "error".
    pub reason: &'static str,
    pub usage: Usage,
    pub reasoning_tokens: usize,
    /// The reply ended inside reasoning: it has no content (`null`).
    pub content_is_none: bool,
    pub tool_calls: Vec<ParsedToolCall>,
    pub error: Option<String>,
}

pub struct SeqProcessor {
    decoder: IncrementalDecoder<Arc<Tokenizer>>,
    reasoning: Option<ReasoningParser>,
    /// Counts reasoning tokens (never forces: the engine's hook does).
    counter: Option<ThinkingBudget>,
    stop: crate::stop::StopMatcher,
    hidden_ids: Vec<u32>,
    /// Finds the start of a tool-call block (even split over several deltas).
    tool_detector: Option<crate::stop::StopMatcher>,
    tool_buf: Option<String>,
    completion_tokens: usize,
    finished: bool,
}

impl SeqProcessor {
    pub fn new(tokenizer: Arc<Tokenizer>, options: SeqOptions) -> Result<Self, ChatError> {
        let reasoning = options.reasoning && tokenizer.is_reasoning_model();
        let counter = if reasoning {
            ThinkingBudget::for_tokenizer(&tokenizer, None, options.started_in_thinking)?
        } else {
            None
        };
        Ok(Self {
            decoder: IncrementalDecoder::new(tokenizer, true),
            reasoning: reasoning.then(|| ReasoningParser::new(options.started_in_thinking)),
            counter,
            stop: crate::stop::StopMatcher::new(options.stop, options.include_stop_str_in_output),
            hidden_ids: options.hidden_ids,
            tool_detector: options
                .tool_calls
                .then(|| crate::stop::StopMatcher::new(vec![TOOL_CALLS_BEGIN.to_owned()], false)),
            tool_buf: None,
            completion_tokens: 0,
            finished: false,
        })
    }

    /// Whether a stop string matched (the caller should finish the sequence in the engine).
    pub fn stop_matched(&self) -> bool {
        self.stop.matched()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Consumes one engine event.
    pub fn on_event(&mut self, event: TokenEvent) -> SeqDelta {
        let mut delta = SeqDelta::default();
        if self.finished {
            return delta;
        }
        match event {
            TokenEvent::PromptLogprobs(scores) => delta.prompt_logprobs = Some(scores),
            TokenEvent::Token(token) => {
                if !self.stop.matched() {
                    self.on_token(&token, &mut delta);
                    delta.tokens.push(token);
                }
            }
            TokenEvent::Finished { reason, usage, error } => self.finish(reason, usage, error, &mut delta),
        }
        delta
    }

    /// The engine went away without a `Finished` event.
    pub fn on_closed(&mut self) -> SeqDelta {
        self.on_event(TokenEvent::Finished {
            reason: FinishReason::Error,
            usage: Usage::default(),
            error: Some("the engine stopped".into()),
        })
    }

    fn on_token(&mut self, token: &GeneratedToken, delta: &mut SeqDelta) {
        self.completion_tokens += 1;
        if let Some(counter) = &mut self.counter {
            counter.on_token(token.id);
        }
        if self.hidden_ids.contains(&token.id) {
            return;
        }
        let text = match self.decoder.push(token.id) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, token = token.id, "cannot decode a token");
                String::new()
            }
        };
        self.on_text(&text, delta);
    }

    fn on_text(&mut self, text: &str, delta: &mut SeqDelta) {
        if text.is_empty() {
            return;
        }
        let content = match &mut self.reasoning {
            Some(parser) => {
                let d = parser.push(text);
                delta.push_reasoning(d.reasoning);
                d.content.unwrap_or_default()
            }
            None => text.to_owned(),
        };
        self.on_content(&content, delta);
    }

    fn on_content(&mut self, content: &str, delta: &mut SeqDelta) {
        if content.is_empty() {
            return;
        }
        if !self.stop.is_active() {
            // No stop strings: nothing to hold back or copy.
            self.route_content(content, delta);
            return;
        }
        let out = self.stop.push(content);
        self.route_content(&out.text, delta);
    }

    /// Content past the stop matcher: to the client, or into the tool-call buffer.
    fn route_content(&mut self, text: &str, delta: &mut SeqDelta) {
        if let Some(buf) = &mut self.tool_buf {
            buf.push_str(text);
            return;
        }
        match &mut self.tool_detector {
            None => delta.push_content(text),
            Some(detector) => {
                let out = detector.push(text);
                delta.push_content(&out.text);
                if out.matched {
                    self.tool_buf = Some(format!("{TOOL_CALLS_BEGIN}{}", out.rest));
                }
            }
        }
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage, error: Option<String>, delta: &mut SeqDelta) {
        self.finished = true;
        let stopped = self.stop.matched();
        if !stopped {
            let tail = self.decoder.finish().unwrap_or_default();
            self.on_text(&tail, delta);
            if let Some(parser) = &mut self.reasoning {
                let d = parser.finish();
                delta.push_reasoning(d.reasoning);
                if let Some(content) = d.content {
                    self.on_content(&content, delta);
                }
            }
            let held = self.stop.flush();
            self.route_content(&held, delta);
        }
        if self.tool_buf.is_none() {
            if let Some(detector) = &mut self.tool_detector {
                delta.push_content(&detector.flush());
            }
        }
        let content_is_none = self.reasoning.as_ref().is_some_and(ReasoningParser::in_reasoning);
        let mut reason = if stopped { "stop" } else { reason.as_str() };
        let mut tool_calls = Vec::new();
        if let Some(buf) = self.tool_buf.take() {
            let parsed = parse_tool_calls(&buf);
            if parsed.calls.is_empty() {
                delta.push_content(&buf);
            } else {
                tool_calls = parsed.calls;
                if let Some(rest) = parsed.content {
                    delta.push_content(&rest);
                }
                if reason == "stop" {
                    reason = "tool_calls";
                }
            }
        }
        let usage = Usage {
            completion_tokens: if stopped {
                self.completion_tokens
            } else {
                usage.completion_tokens.max(self.completion_tokens)
            },
            ..usage
        };
        delta.finish = Some(SeqFinish {
            reason,
            usage,
            reasoning_tokens: self.counter.as_ref().map_or(0, |c| c.reasoning_tokens() as usize),
            content_is_none,
            tool_calls,
            error,
        });
    }
}
