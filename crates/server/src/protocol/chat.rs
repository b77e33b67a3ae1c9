//! `/v1/chat/completions` bodies.

use r1serve_chat::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{CommonParams, SamplingFields, UsageInfo};

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Sampling and stopping fields shared with the other endpoint.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Most reasoning tokens before `</think>` is forced (r1serve's name).
    #[serde(default)]
    pub thinking_budget: Option<i64>,
    /// The same, under vLLM's name.
    #[serde(default)]
    pub thinking_token_budget: Option<i64>,
}

impl ChatCompletionRequest {
    pub fn common(&self) -> CommonParams {
        self.sampling.common(self.max_completion_tokens.or(self.max_tokens))
    }

    /// Whether tool calls in the reply are parsed into `tool_calls`.
    pub fn wants_tool_calls(&self) -> bool {
        let none = matches!(&self.tool_choice, Some(Value::String(s)) if s == "none");
        self.tools.as_ref().is_some_and(|t| !t.is_empty()) && !none
    }
}

/// One log-probability entry of a chat reply (`choices[].logprobs.content[]`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    /// Position in the list (streaming form only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResponseMessage {
    pub role: &'static str,
    pub content: Option<String>,
    /// The reasoning before `</think>` (DeepSeek API field); absent when there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageInfo,
}

/// `delta` of a stream chunk: only the fields that changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeltaMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: DeltaMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// With `stream_options.include_usage`: `null` on every chunk but the last, which has no
    /// choices and the totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageInfo>>,
}
