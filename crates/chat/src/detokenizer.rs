//! Streaming detokenization that costs O(1) per token.
//!
//! Decoding the whole sequence after every token costs O(n) per token (O(n²) per reply). Instead the
//! decoder keeps two offsets into the token list: `prefix_offset`, where the previously emitted chunk
//! starts, and `read_offset`, the end of what has been emitted. Each push decodes the window
//! `[prefix_offset, read_offset)` and `[prefix_offset, len)`; the new text is the difference.
//! Starting the window one chunk back keeps decoders that treat the first token specially (leading
//! space rules) giving the same text as a full decode. A character whose bytes span several tokens
//! shows up as U+FFFD in the window; it is held back until complete, for at most
//! `MAX_PENDING_TOKENS` tokens (a valid character is at most 4 bytes), so the window stays bounded.

use std::borrow::Borrow;

use crate::{ChatError, Tokenizer};

/// After this many tokens without completing a character, the bytes are invalid UTF-8 anyway:
/// emit them (as U+FFFD, like a full decode) so the window stays bounded.
const MAX_PENDING_TOKENS: usize = 8;

/// Turns a stream of token ids into text deltas that never split a character: bytes of an
/// unfinished UTF-8 sequence are held back until the token that completes them arrives.
///
/// Concatenating every `push` result and the final `finish` gives the same text as decoding all
/// tokens at once. `T` is `&Tokenizer` or an owner such as `Arc<Tokenizer>`.
pub struct IncrementalDecoder<T: Borrow<Tokenizer>> {
    tokenizer: T,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<T: Borrow<Tokenizer>> IncrementalDecoder<T> {
    pub fn new(tokenizer: T, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// All tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String, ChatError> {
        self.tokens.push(token);
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.tokens.len())?;
        let give_up = self.tokens.len() - self.read_offset >= MAX_PENDING_TOKENS;
        if text.ends_with('\u{fffd}') && !give_up {
            // An incomplete character: wait for the token that completes it.
            return Ok(String::new());
        }
        let delta = match text.strip_prefix(prefix_text.as_str()) {
            Some(delta) => delta.to_owned(),
            // A decoder that rewrote the window's earlier text: emit what lies past the part already
            // sent if that starts on a character boundary, else wait (a bounded number of tokens).
            None => match text.get(prefix_text.len()..) {
                Some(delta) => delta.to_owned(),
                None if give_up => self.decode(self.read_offset, self.tokens.len())?,
                None => return Ok(String::new()),
            },
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(delta)
    }

    /// Whatever is still held back (an incomplete character at the end of the stream).
    pub fn finish(&mut self) -> Result<String, ChatError> {
        if self.read_offset == self.tokens.len() {
            return Ok(String::new());
        }
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.tokens.len())?;
        let delta = match text.strip_prefix(prefix_text.as_str()) {
            Some(delta) => delta.to_owned(),
            None => self.decode(self.read_offset, self.tokens.len())?,
        };
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(delta)
    }

    fn decode(&self, start: usize, end: usize) -> Result<String, ChatError> {
        if start == end {
            return Ok(String::new());
        }
        self.tokenizer
            .borrow()
            .decode(&self.tokens[start..end], self.skip_special_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_stays_short() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/tokenizers/deepseek-v3/tokenizer.json"
        );
        let tok = Tokenizer::from_file(std::path::Path::new(path)).unwrap();
        let text = "Long replies stream in constant time per token: 数学 🙂 é. ".repeat(200);
        let ids = tok.encode(&text, false).unwrap();
        let mut decoder = IncrementalDecoder::new(&tok, true);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&decoder.push(id).unwrap());
            assert!(decoder.tokens.len() - decoder.prefix_offset <= 2 * MAX_PENDING_TOKENS);
        }
        out.push_str(&decoder.finish().unwrap());
        assert_eq!(out, text);
    }
}
