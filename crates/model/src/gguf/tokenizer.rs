//! GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) → the HuggingFace
//! `tokenizer.json` it was converted from, so a lone `.gguf` file can be served without one.
//!
//! llama.cpp's converter writes a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`) as:
//! `tokens`, one per id (ids the HF tokenizer lacks become `[PAD{id}]`, type 5); `token_type`
//! (1 normal; 3 control: an HF special added token, or one that looks special like `<｜User｜>`;
//! 4 user-defined: a non-special added token like R1's `<think>`); `merges` as `"a b"` in rank
//! order; the special token ids; `add_bos_token`; and `pre`, the name of the HF pre-tokenizer
//! family ([`super::pretokenizer`]). This module inverts that.
//!
//! Every token stays in the BPE vocabulary at its own id (HF assigns an added token that is not in
//! the vocabulary the next free id, whatever `id` the file gives it), and control and user-defined
//! tokens are also added tokens, so they are matched whole before pre-tokenization, as HF does.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::error::GgufError;
use super::metadata::{GgufArray, Metadata};
use super::pretokenizer;

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TYPES: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";
const PAD: &str = "tokenizer.ggml.padding_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Tokenizer models read from GGUF.
pub const SUPPORTED_MODELS: &str = "gpt2 (byte-level BPE)";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const CONTROL: u8 = 3;
const USER_DEFINED: u8 = 4;
const MAX_TOKEN_TYPE: u8 = 6;

/// Token text → id.
type TokenIds<'a> = HashMap<Cow<'a, str>, usize>;

/// The chat-template side of a GGUF file's metadata, as the strings `tokenizer_config.json`
/// would hold them. Special tokens are `None` when the file has no such id or no token list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufText {
    /// `tokenizer.chat_template` (the default template; named variants are not read).
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

/// The chat template and special-token strings. Cheap: it builds no vocabulary.
pub fn text(meta: &Metadata) -> Result<GgufText, GgufError> {
    let tokens = strings(meta, TOKENS)?;
    let token = |key: &str| -> Result<Option<String>, GgufError> {
        let (Some(id), Some(tokens)) = (meta.usize(key)?, tokens) else {
            return Ok(None);
        };
        match tokens.get(id) {
            Some(token) => Ok(Some(token_text(id, token).into_owned())),
            None => Err(out_of_range(key, id, tokens.len())),
        }
    };
    Ok(GgufText {
        chat_template: meta.str(CHAT_TEMPLATE)?.map(str::to_owned),
        bos_token: token(BOS)?,
        eos_token: token(EOS)?,
        pad_token: token(PAD)?,
    })
}

/// The HF `tokenizer.json` equivalent of the metadata; `None` when the file carries no vocabulary
/// (no `tokenizer.ggml.model`, or llama.cpp's `none` / `no_vocab`).
pub fn hf_tokenizer(meta: &Metadata) -> Result<Option<Value>, GgufError> {
    match meta.str(MODEL)? {
        None | Some("none") | Some("no_vocab") => return Ok(None),
        Some("gpt2") => {}
        Some(other) => return Err(unsupported(MODEL, other, SUPPORTED_MODELS)),
    }
    let pre_name = match meta.str(PRE)? {
        Some(name) => name,
        None => {
            // Files converted before May 2024 have no `pre`; llama.cpp uses its default then.
            tracing::warn!(
                "GGUF has no {PRE}; using GPT-2's pre-tokenizer (re-convert the model if tokens look wrong)"
            );
            "default"
        }
    };
    let pre = pretokenizer::lookup(pre_name).ok_or_else(|| unsupported(PRE, pre_name, pretokenizer::SUPPORTED))?;

    let tokens = strings(meta, TOKENS)?.ok_or_else(|| missing(TOKENS))?;
    if tokens.is_empty() {
        return Err(GgufError::ValueOutOfRange {
            key: TOKENS.into(),
            value: "an empty array".into(),
            expected: "at least one token",
        });
    }
    let types = token_types(meta, tokens.len())?;
    let (vocab, ids) = vocabulary(tokens)?;
    let merges = merges(meta, &ids)?;

    let special_id = |key: &str| -> Result<Option<usize>, GgufError> {
        match meta.usize(key)? {
            Some(id) if id >= tokens.len() => Err(out_of_range(key, id, tokens.len())),
            id => Ok(id),
        }
    };
    let bos = special_id(BOS)?;
    let eos = special_id(EOS)?;
    special_id(PAD)?;
    // The family default applies only when there is a BOS to add; an explicit key must have one.
    let add_bos = meta.bool(ADD_BOS)?.unwrap_or(pre.add_bos_default && bos.is_some());
    let add_eos = meta.bool(ADD_EOS)?.unwrap_or(false);
    let added_special = |add: bool, id: Option<usize>, key: &str| -> Result<_, GgufError> {
        if !add {
            return Ok(None);
        }
        let id = id.ok_or_else(|| missing(key))?;
        Ok(Some((id, token_text(id, &tokens[id]))))
    };
    let opening = added_special(add_bos, bos, BOS)?;
    let closing = added_special(add_eos, eos, EOS)?;

    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(id, &t)| {
            let special = t == CONTROL;
            json!({
                "id": id,
                "content": token_text(id, &tokens[id]),
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                // HF's default for an added token: special ones match the raw text.
                "normalized": !special,
                "special": special,
            })
        })
        .collect();

    Ok(Some(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": pre.normalizer,
        "pre_tokenizer": pre.pre_tokenizer,
        "post_processor": post_processor(opening, closing),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    })))
}

/// A token's text; an empty one is named `[EMPTY_{id}]`, as llama.cpp's loader names it.
fn token_text(id: usize, token: &str) -> Cow<'_, str> {
    if token.is_empty() {
        Cow::Owned(format!("[EMPTY_{id}]"))
    } else {
        Cow::Borrowed(token)
    }
}

/// The vocabulary map (token → id) and the same as a lookup; a token listed twice is refused,
/// since the ids of one of them would be unreachable (llama.cpp asserts on it).
fn vocabulary(tokens: &[String]) -> Result<(Map<String, Value>, TokenIds<'_>), GgufError> {
    let mut ids = TokenIds::with_capacity(tokens.len());
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let text = token_text(id, token);
        if let Some(&first) = ids.get(&text) {
            return Err(GgufError::DuplicateToken {
                token: text.into_owned(),
                first,
                second: id,
            });
        }
        vocab.insert(text.to_string(), json!(id));
        ids.insert(text, id);
    }
    Ok((vocab, ids))
}

/// `token_type`, checked against the token list; all normal when the file has none (llama.cpp
/// reads such a file the same way).
fn token_types(meta: &Metadata, n_tokens: usize) -> Result<Vec<u8>, GgufError> {
    let Some(array) = meta.array(TYPES)? else {
        return Ok(vec![1; n_tokens]);
    };
    let values = integers(array).ok_or_else(|| GgufError::WrongValueType {
        key: TYPES.into(),
        expected: "an array of integers",
        found: array.describe(),
    })?;
    if values.len() != n_tokens {
        return Err(GgufError::LengthMismatch {
            key: TYPES,
            len: values.len(),
            other: TOKENS,
            other_len: n_tokens,
        });
    }
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| match u8::try_from(value) {
            Ok(t) if t <= MAX_TOKEN_TYPE => Ok(t),
            _ => Err(GgufError::BadTokenType { index, value }),
        })
        .collect()
}

/// Merges as `[a, b]` pairs (the unambiguous form of `tokenizer.json`), each checked to be two
/// tokens of the vocabulary separated by one space whose concatenation is in it too.
fn merges(meta: &Metadata, ids: &TokenIds<'_>) -> Result<Vec<Value>, GgufError> {
    let list = strings(meta, MERGES)?.ok_or_else(|| missing(MERGES))?;
    let mut out = Vec::with_capacity(list.len());
    for (index, merge) in list.iter().enumerate() {
        let bad = |reason: String| GgufError::BadMerge {
            index,
            merge: merge.clone(),
            reason,
        };
        let Some((a, b)) = merge.split_once(' ') else {
            return Err(bad("not two tokens separated by a space".into()));
        };
        if a.is_empty() || b.is_empty() || b.contains(' ') {
            return Err(bad("not two tokens separated by a space".into()));
        }
        for part in [a.to_owned(), b.to_owned(), format!("{a}{b}")] {
            if !ids.contains_key(part.as_str()) {
                return Err(bad(format!("`{part}` is not in {TOKENS}")));
            }
        }
        out.push(json!([a, b]));
    }
    Ok(out)
}

/// BOS/EOS around each sequence, as `LlamaTokenizerFast` writes them, after the byte-level
/// offset fix-up; only the fix-up when nothing is added.
fn post_processor(bos: Option<(usize, Cow<'_, str>)>, eos: Option<(usize, Cow<'_, str>)>) -> Value {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    if bos.is_none() && eos.is_none() {
        return byte_level;
    }
    let special = |token: &Option<(usize, Cow<'_, str>)>, type_id: u32| {
        token
            .as_ref()
            .map(|(_, text)| json!({"SpecialToken": {"id": text, "type_id": type_id}}))
    };
    let sequence = |id: &str, type_id: u32| Some(json!({"Sequence": {"id": id, "type_id": type_id}}));
    let single: Vec<Value> = [special(&bos, 0), sequence("A", 0), special(&eos, 0)]
        .into_iter()
        .flatten()
        .collect();
    let pair: Vec<Value> = [
        special(&bos, 0),
        sequence("A", 0),
        special(&eos, 0),
        special(&bos, 1),
        sequence("B", 1),
        special(&eos, 1),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut special_tokens = Map::new();
    for (id, text) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(text.to_string(), json!({"id": text, "ids": [id], "tokens": [text]}));
    }
    json!({"type": "Sequence", "processors": [
        byte_level,
        {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
    ]})
}

fn strings<'a>(meta: &'a Metadata, key: &str) -> Result<Option<&'a [String]>, GgufError> {
    match meta.array(key)? {
        None => Ok(None),
        Some(GgufArray::String(v)) => Ok(Some(v)),
        Some(other) => Err(GgufError::WrongValueType {
            key: key.to_owned(),
            expected: "an array of strings",
            found: other.describe(),
        }),
    }
}

/// Any integer array, widened; `None` for other element types.
fn integers(array: &GgufArray) -> Option<Vec<i128>> {
    fn widen<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
        v.iter().map(|&x| x.into()).collect()
    }
    Some(match array {
        GgufArray::U8(v) => widen(v),
        GgufArray::I8(v) => widen(v),
        GgufArray::U16(v) => widen(v),
        GgufArray::I16(v) => widen(v),
        GgufArray::U32(v) => widen(v),
        GgufArray::I32(v) => widen(v),
        GgufArray::U64(v) => widen(v),
        GgufArray::I64(v) => widen(v),
        _ => return None,
    })
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey { key: key.to_owned() }
}

fn unsupported(key: &'static str, value: &str, supported: &'static str) -> GgufError {
    GgufError::UnsupportedTokenizer {
        key,
        value: value.to_owned(),
        supported,
    }
}

fn out_of_range(key: &str, id: usize, n_tokens: usize) -> GgufError {
    GgufError::TokenIdOutOfRange {
        key: key.to_owned(),
        id,
        n_tokens,
    }
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
