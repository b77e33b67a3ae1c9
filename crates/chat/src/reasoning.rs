//! Splitting generated text into `reasoning_content` and `content` (DeepSeek API semantics).
//!
//! Generation is *in thinking* from the start when the prompt ended with an open `<think>`
//! (see [`crate::prompt_opens_thinking`]), or once the model itself opens with `<think>` (after
//! optional whitespace). Everything up to `</think>` is reasoning; what follows is content. Each
//! part has its leading whitespace trimmed, and a `<think>` repeated at the start of the reasoning
//! is dropped. Text that never enters thinking is all content, untouched. A reply cut off inside
//! thinking has reasoning only (`content` is `None`).
//!
//! Decode with `skip_special_tokens = true`: `<think>`/`</think>` are ordinary added tokens in
//! the DeepSeek vocabularies, so they stay in the text for this parser to find.

use crate::tokenizer::{THINK_END, THINK_START};

/// A finished reply, split.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReasoningSplit {
    /// `None` when there was no reasoning (or it was empty).
    pub reasoning_content: Option<String>,
    /// `None` when the reply ended inside thinking.
    pub content: Option<String>,
}

/// Splits a whole reply. `started_in_thinking`: the prompt opened `<think>`.
pub fn split(text: &str, started_in_thinking: bool) -> ReasoningSplit {
    let mut rest = text;
    if !started_in_thinking {
        match text.trim_start().strip_prefix(THINK_START) {
            Some(after) => rest = after,
            None => {
                return ReasoningSplit {
                    reasoning_content: None,
                    content: Some(text.to_owned()),
                }
            }
        }
    }
    loop {
        rest = rest.trim_start();
        match rest.strip_prefix(THINK_START) {
            Some(after) => rest = after,
            None => break,
        }
    }
    let (reasoning, content) = match rest.find(THINK_END) {
        Some(end) => (
            &rest[..end],
            Some(rest[end + THINK_END.len()..].trim_start().to_owned()),
        ),
        None => (rest, None),
    };
    ReasoningSplit {
        reasoning_content: (!reasoning.is_empty()).then(|| reasoning.to_owned()),
        content,
    }
}

/// The new text of one streaming step. Neither field is ever `Some("")`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_none() && self.content.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not in thinking; holding whitespace and a possible partial `<think>`.
    Undecided,
    /// In thinking, before its first non-whitespace text (a repeated `<think>` is dropped here).
    ReasoningLead,
    Reasoning,
    /// After `</think>`, skipping whitespace.
    ContentLead,
    Content,
}

/// Streaming form of [`split`]: feed it text deltas (whole characters, as from
/// [`crate::IncrementalDecoder`]) and it emits reasoning and content deltas, holding back only what
/// may turn out to be a marker split across deltas. Concatenated output equals [`split`]'s.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    phase: Phase,
    /// Held-back text not yet classified.
    pending: String,
    saw_reasoning: bool,
}

impl ReasoningParser {
    pub fn new(started_in_thinking: bool) -> Self {
        Self {
            phase: if started_in_thinking {
                Phase::ReasoningLead
            } else {
                Phase::Undecided
            },
            pending: String::new(),
            saw_reasoning: false,
        }
    }

    /// True once generation is past `</think>` (or never thought): the answer has begun.
    pub fn in_content(&self) -> bool {
        matches!(self.phase, Phase::ContentLead | Phase::Content)
    }

    /// True while generation is inside a reasoning segment.
    pub fn in_reasoning(&self) -> bool {
        matches!(self.phase, Phase::ReasoningLead | Phase::Reasoning)
    }

    pub fn push(&mut self, text: &str) -> Delta {
        let mut delta = Delta::default();
        self.pending.push_str(text);
        loop {
            let buf = std::mem::take(&mut self.pending);
            match self.phase {
                Phase::Undecided | Phase::ReasoningLead => {
                    let trimmed = buf.trim_start();
                    if let Some(after) = trimmed.strip_prefix(THINK_START) {
                        self.phase = Phase::ReasoningLead;
                        self.pending = after.to_owned();
                        continue;
                    }
                    if THINK_START.starts_with(trimmed) {
                        // Whitespace and perhaps the start of `<think>`: wait for more.
                        self.pending = buf;
                        return delta;
                    }
                    if self.phase == Phase::Undecided {
                        self.phase = Phase::Content;
                        self.pending = buf;
                    } else {
                        self.phase = Phase::Reasoning;
                        self.pending = trimmed.to_owned();
                    }
                }
                Phase::Reasoning => {
                    if let Some(end) = buf.find(THINK_END) {
                        self.emit_reasoning(&mut delta, &buf[..end]);
                        self.phase = Phase::ContentLead;
                        self.pending = buf[end + THINK_END.len()..].to_owned();
                        continue;
                    }
                    let keep = partial_suffix(&buf, THINK_END);
                    self.emit_reasoning(&mut delta, &buf[..buf.len() - keep]);
                    self.pending = buf[buf.len() - keep..].to_owned();
                    return delta;
                }
                Phase::ContentLead => {
                    let trimmed = buf.trim_start();
                    if trimmed.is_empty() {
                        return delta;
                    }
                    self.phase = Phase::Content;
                    self.pending = trimmed.to_owned();
                }
                Phase::Content => {
                    append(&mut delta.content, &buf);
                    return delta;
                }
            }
        }
    }

    /// Flushes held-back text at the end of the reply.
    pub fn finish(&mut self) -> Delta {
        let mut delta = Delta::default();
        let buf = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Undecided => append(&mut delta.content, &buf),
            Phase::ReasoningLead => self.emit_reasoning(&mut delta, buf.trim_start()),
            Phase::Reasoning => self.emit_reasoning(&mut delta, &buf),
            Phase::ContentLead | Phase::Content => {}
        }
        delta
    }

    /// Whether any reasoning text was emitted.
    pub fn saw_reasoning(&self) -> bool {
        self.saw_reasoning
    }

    fn emit_reasoning(&mut self, delta: &mut Delta, text: &str) {
        if !text.is_empty() {
            self.saw_reasoning = true;
            append(&mut delta.reasoning, text);
        }
    }
}

fn append(slot: &mut Option<String>, text: &str) {
    if !text.is_empty() {
        slot.get_or_insert_with(String::new).push_str(text);
    }
}

/// Length of the longest proper prefix of `marker` that `text` ends with.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && text.ends_with(&marker[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "reasoning_tests.rs"]
mod tests;
