//! The text side of r1serve: the HF tokenizer, chat templates, a streaming detokenizer, and the
//! parsers that turn generated text into an OpenAI/DeepSeek response (reasoning, tool calls).
//!
//! - [`tokenizer`]: `tokenizer.json` ([`Tokenizer`]) and the `<think>` ids of reasoning models.
//! - [`template`]: [`ChatTemplate`] renders messages with the model's Jinja `chat_template`
//!   (sandboxed minijinja) or a built-in R1 template.
//! - [`message`]: [`ChatMessage`], the OpenAI request form of a message.
//! - [`detokenizer`]: [`IncrementalDecoder`], O(1) per token, whole characters only.
//! - [`reasoning`]: `<think>…</think>` → `reasoning_content` / `content`, one-shot and streaming.
//! - [`budget`]: [`ThinkingBudget`], forcing `</think>` after N reasoning tokens.
//! - [`tool_calls`]: DeepSeek tool-call blocks → name + arguments.
//!
//! A request's path through this crate: `ChatTemplate::render` → `Tokenizer::encode(prompt, false)`
//! → (engine) → `IncrementalDecoder::push` per token (`skip_special_tokens = true`) →
//! `ReasoningParser::push` per text delta → `parse_tool_calls` on the finished content.

pub mod budget;
pub mod detokenizer;
mod error;
pub mod message;
pub mod reasoning;
pub mod template;
pub mod tokenizer;
pub mod tool_calls;

pub use budget::ThinkingBudget;
pub use detokenizer::IncrementalDecoder;
pub use error::ChatError;
pub use message::{ChatMessage, ContentPart, FunctionCall, MessageContent, ToolCall};
pub use reasoning::{split as split_reasoning, Delta, ReasoningParser, ReasoningSplit};
pub use template::{prompt_opens_thinking, ChatTemplate, RenderOptions};
pub use tokenizer::{ThinkTokens, Tokenizer};
pub use tool_calls::{parse_tool_calls, ParsedToolCall, ToolCallParse};

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        assert_send_sync::<super::Tokenizer>();
        assert_send_sync::<super::ChatTemplate>();
        assert_send_sync::<super::ChatError>();
        assert_send_sync::<super::IncrementalDecoder<std::sync::Arc<super::Tokenizer>>>();
        assert_send_sync::<super::ReasoningParser>();
        assert_send_sync::<super::ThinkingBudget>();
    }
}
