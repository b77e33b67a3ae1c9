//! Text in and out of the model: the HF tokenizer, and a detokenizer that streams whole characters.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

/// A HuggingFace `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ChatError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
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
}

/// Turns a stream of token ids into text deltas that never split a character: bytes of an
/// unfinished UTF-8 sequence are held back until the token that completes them arrives.
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    tokens: Vec<u32>,
    emitted: usize,
    skip_special_tokens: bool,
}

impl<'t> IncrementalDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            emitted: 0,
            skip_special_tokens,
        }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String, ChatError> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens, self.skip_special_tokens)?;
        if text.ends_with('\u{fffd}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            // An incomplete character (or a decoder that rewrote earlier text): wait for more.
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_owned();
        self.emitted = text.len();
        Ok(delta)
    }

    /// Whatever is still held back (an incomplete character at the end of the stream).
    pub fn finish(&mut self) -> Result<String, ChatError> {
        let text = self.tokenizer.decode(&self.tokens, self.skip_special_tokens)?;
        let delta = text.get(self.emitted..).unwrap_or("").to_owned();
        self.emitted = text.len();
        Ok(delta)
    }
}
