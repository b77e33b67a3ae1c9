//! OpenAI-style chat messages, and the form a chat template sees them in.

use serde::{Deserialize, Serialize};

use crate::tokenizer::{THINK_END, THINK_START};
use crate::ChatError;

/// One message of a conversation, as an OpenAI `/v1/chat/completions` request carries it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with plain text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            ..Self::default()
        }
    }
}

/// A string, or a list of typed parts of which only `{"type": "text", "text": ...}` is supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A call the assistant made, as OpenAI carries it (`arguments` is a JSON text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// What a template sees for one message: content flattened to a string (or none for an assistant
/// turn that only calls tools), earlier reasoning removed.
#[derive(Debug, Serialize)]
pub(crate) struct TemplateMessage<'a> {
    role: &'a str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [ToolCall]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> TemplateMessage<'a> {
    pub(crate) fn from_message(index: usize, message: &'a ChatMessage) -> Result<Self, ChatError> {
        let mut content = match &message.content {
            None => None,
            Some(MessageContent::Text(text)) => Some(text.clone()),
            Some(MessageContent::Parts(parts)) => Some(join_text_parts(index, parts)?),
        };
        let tool_calls = message.tool_calls.as_deref().filter(|calls| !calls.is_empty());
        if message.role == "assistant" {
            // Earlier reasoning is never sent back to the model: `reasoning_content` is dropped here
            // and any `<think>…</think>` left in the content is cut away.
            content = content.map(|c| strip_reasoning(&c).to_owned());
            // A turn that only calls tools has no content, which is how templates recognise it.
            if tool_calls.is_some() && content.as_deref().is_some_and(str::is_empty) {
                content = None;
            }
        }
        if content.is_none() && tool_calls.is_none() {
            content = Some(String::new());
        }
        Ok(Self {
            role: &message.role,
            content,
            tool_calls,
            name: message.name.as_deref(),
            tool_call_id: message.tool_call_id.as_deref(),
        })
    }
}

fn join_text_parts(index: usize, parts: &[ContentPart]) -> Result<String, ChatError> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match (part.kind.as_str(), &part.text) {
            ("text", Some(text)) => texts.push(text.as_str()),
            ("text", None) => {
                return Err(ChatError::InvalidMessage {
                    index,
                    message: "content part of type \"text\" has no `text`".into(),
                })
            }
            (kind, _) => {
                return Err(ChatError::InvalidMessage {
                    index,
                    message: format!("content part of type {kind:?} is not supported (only \"text\")"),
                })
            }
        }
    }
    Ok(texts.join("\n"))
}

/// The answer part of an assistant turn: what follows the last `</think>` (leading whitespace
/// trimmed); a turn that opens `<think>` and never closes it has no answer.
pub fn strip_reasoning(content: &str) -> &str {
    if let Some(end) = content.rfind(THINK_END) {
        return content[end + THINK_END.len()..].trim_start();
    }
    if content.trim_start().starts_with(THINK_START) {
        return "";
    }
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_reasoning_from_assistant_turns() {
        assert_eq!(strip_reasoning("<think>\nhmm\n</think>\n\nYes."), "Yes.");
        assert_eq!(strip_reasoning("hmm</think>Yes."), "Yes.");
        assert_eq!(strip_reasoning("<think>never closed"), "");
        assert_eq!(strip_reasoning("plain"), "plain");
    }

    #[test]
    fn parses_openai_messages() {
        let json = r#"[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}
        ]"#;
        let messages: Vec<ChatMessage> = serde_json::from_str(json).unwrap();
        assert_eq!(messages.len(), 4);
        let user = TemplateMessage::from_message(1, &messages[1]).unwrap();
        assert_eq!(user.content.as_deref(), Some("a\nb"));
        let call = TemplateMessage::from_message(2, &messages[2]).unwrap();
        assert!(call.content.is_none() && call.tool_calls.is_some());
    }

    #[test]
    fn rejects_non_text_parts() {
        let message: ChatMessage =
            serde_json::from_str(r#"{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}"#).unwrap();
        let err = TemplateMessage::from_message(3, &message).unwrap_err().to_string();
        assert!(err.contains("messages[3]") && err.contains("image_url"), "{err}");
    }
}
