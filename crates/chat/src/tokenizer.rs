//! The HuggingFace `tokenizer.json` wrapper.

use std::path::Path;

use crate::ChatError;

/// The text of the tokens that open and close a reasoning segment.
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// Ids of `<think>` and `</think>` in a reasoning model's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkTokens {
    pub start: u32,
    pub end: u32,
}

/// A HuggingFace `tokenizer.json`. `Send + Sync`: share one behind an `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ChatError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Parses a `tokenizer.json` held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ChatError::Load {
            path: "<memory>".into(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Builds a tokenizer from a `tokenizer.json` held as a JSON value (the one a GGUF file's
    /// metadata translates to); `origin` names where it came from in errors.
    pub fn from_json(json: &serde_json::Value, origin: impl Into<std::path::PathBuf>) -> Result<Self, ChatError> {
        let loaded = serde_json::to_vec(json)
            .map_err(|e| e.to_string())
            .and_then(|bytes| tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string()));
        match loaded {
            Ok(inner) => Ok(Self { inner }),
            Err(message) => Err(ChatError::Load {
                path: origin.into(),
                message,
            }),
        }
    }

    /// Looks for `tokenizer.json` in a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            Self::from_file(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Encodes `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS etc.).
    /// A rendered chat prompt already holds its BOS: encode it with `add_special_tokens = false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ChatError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ChatError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ChatError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ChatError::Tokenize(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `Some` for a reasoning model: one whose vocabulary has both `<think>` and `</think>`.
    pub fn think_tokens(&self) -> Option<ThinkTokens> {
        Some(ThinkTokens {
            start: self.token_to_id(THINK_START)?,
            end: self.token_to_id(THINK_END)?,
        })
    }

    pub fn is_reasoning_model(&self) -> bool {
        self.think_tokens().is_some()
    }
}
