//! `/v1/completions` bodies.

use ordered::OrderedMap;
use serde::{Deserialize, Serialize};

use super::{CommonParams, SamplingFields, UsageInfo};

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Sampling and stopping fields shared with the other endpoint.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    #[serde(default)]
    pub echo: Option<bool>,
    /// 0–20: report this many alternatives per token (and each token's own log-probability).
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<i64>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
}

impl CompletionRequest {
    pub fn common(&self) -> CommonParams {
        self.sampling.common(self.max_tokens)
    }
}

/// The legacy `logprobs` object: parallel lists, one entry per token. `top_logprobs` maps token
/// text to log-probability and always holds the chosen token; the first prompt token (echo) has
/// `null` for both.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<OrderedMap>>,
}

impl CompletionLogprobs {
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.text_offset.extend(other.text_offset);
        self.token_logprobs.extend(other.token_logprobs);
        self.tokens.extend(other.tokens);
        self.top_logprobs.extend(other.top_logprobs);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageInfo>>,
}

/// A JSON object that keeps insertion order (best alternative first).
pub mod ordered {
    use serde::ser::SerializeMap;
    use serde::{Serialize, Serializer};

    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct OrderedMap(pub Vec<(String, f32)>);

    impl OrderedMap {
        /// Adds `key` unless it is already there (two ids can decode to the same text).
        pub fn insert(&mut self, key: String, value: f32) {
            if !self.0.iter().any(|(k, _)| *k == key) {
                self.0.push((key, value));
            }
        }
    }

    impl Serialize for OrderedMap {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                map.serialize_entry(k, v)?;
            }
            map.end()
        }
    }
}
