//! The incremental decoder against the shared DeepSeek-V3 tokenizer: concatenated deltas equal a
//! full decode, for text whose characters span several byte-level tokens.

use std::path::Path;
use std::sync::Arc;

use r1serve_chat::{IncrementalDecoder, Tokenizer};

fn tokenizer(model: &str) -> Tokenizer {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/tokenizers")).join(model);
    Tokenizer::from_model_dir(&dir).unwrap().unwrap()
}

const TEXTS: &[&str] = &[
    "Hello, world! The quick brown fox.",
    "深度求索的模型会先思考再回答。数学：二加二等于四。",
    "日本語のテキストも大丈夫です。한국어도 됩니다.",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 🦀 crabs.",
    "Accents: café, naïve, Ångström, façade, Zürich, São Paulo, Dvořák, ﬁ ligature.",
    "Math ∑∫√∞ ≠ ≤ ≥, arrows →⇒, box drawing ┌─┐, and a tab\tand newline\n  indented.",
    "<think>\nreasoning</think>\n\nanswer<｜end▁of▁sentence｜>",
    "Mixed 中文 with English and 😀 emoji, ａｂｃ full-width, ١٢٣ Arabic digits.",
];

fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> (String, usize) {
    let mut decoder = IncrementalDecoder::new(tok, skip_special);
    let mut out = String::new();
    let mut empty_steps = 0;
    for &id in ids {
        let delta = decoder.push(id).unwrap();
        assert!(!delta.contains('\u{fffd}'), "split character in {delta:?}");
        empty_steps += usize::from(delta.is_empty());
        out.push_str(&delta);
    }
    out.push_str(&decoder.finish().unwrap());
    (out, empty_steps)
}

#[test]
fn deltas_concatenate_to_the_full_decode() {
    let tok = tokenizer("deepseek-v3");
    let mut held_back = 0;
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        for skip_special in [false, true] {
            let full = tok.decode(&ids, skip_special).unwrap();
            let (streamed, empty) = stream(&tok, &ids, skip_special);
            assert_eq!(streamed, full, "{text:?}");
            held_back += empty;
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), *text);
    }
    // Multi-token characters (emoji, rare CJK) were really held back somewhere.
    assert!(held_back > 0);
}

#[test]
fn invalid_byte_sequences_do_not_stall() {
    let tok = tokenizer("deepseek-v3");
    // The byte-level tokens of "🙂" without its last byte, then plain text: the incomplete
    // character becomes U+FFFD as in a full decode, and the stream keeps moving.
    let emoji = tok.encode("🙂", false).unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.extend_from_slice(&emoji[..emoji.len().saturating_sub(1).max(1)]);
    }
    ids.extend(tok.encode(" and then a long tail of ordinary words", false).unwrap());
    let full = tok.decode(&ids, false).unwrap();
    let mut decoder = IncrementalDecoder::new(Arc::new(tokenizer("deepseek-v3")), false);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&decoder.push(id).unwrap());
    }
    assert!(out.ends_with("words"), "{out:?}");
    out.push_str(&decoder.finish().unwrap());
    assert_eq!(out, full);
}

#[test]
fn random_token_streams_match_the_full_decode() {
    let tok = tokenizer("deepseek-v3");
    // A deterministic walk over the vocabulary, incl. byte tokens and added tokens.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..50 {
        let ids: Vec<u32> = (0..60)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 128_815) as u32
            })
            .collect();
        for skip_special in [false, true] {
            let full = tok.decode(&ids, skip_special).unwrap();
            let mut decoder = IncrementalDecoder::new(&tok, skip_special);
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&decoder.push(id).unwrap());
            }
            out.push_str(&decoder.finish().unwrap());
            assert_eq!(out, full, "{ids:?}");
        }
    }
}

#[test]
fn r1_think_tokens() {
    let tok = tokenizer("deepseek-r1");
    let think = tok.think_tokens().unwrap();
    assert_eq!((think.start, think.end), (128798, 128799));
    let forced = r1serve_chat::budget::forced_ids(&tok).unwrap();
    assert!(forced.contains(&128799));
    assert_eq!(tok.decode(&forced, true).unwrap(), "\n</think>\n\n");
    let budget = r1serve_chat::ThinkingBudget::for_tokenizer(&tok, Some(10), true).unwrap();
    assert!(budget.unwrap().in_thinking());
    assert!(
        r1serve_chat::ThinkingBudget::for_tokenizer(&tokenizer("deepseek-v3"), Some(10), true)
            .unwrap()
            .is_none()
    );
}

/// The way `r1serve generate` holds its decoder (an optional tokenizer, borrowed).
#[test]
fn optional_borrowed_decoder_as_the_cli_uses_it() {
    let tokenizer = Some(tokenizer("deepseek-v3"));
    let mut decoder = tokenizer.as_ref().map(|t| IncrementalDecoder::new(t, false));
    let ids = tokenizer.as_ref().unwrap().encode("ok 🙂", false).unwrap();
    let mut out = String::new();
    for id in ids {
        if let Some(d) = decoder.as_mut() {
            out.push_str(&d.push(id).unwrap());
        }
    }
    out.push_str(&decoder.as_mut().unwrap().finish().unwrap());
    assert_eq!(out, "ok 🙂");
}
