//! Tokenizer metadata → `tokenizer.json`: the structure written for a small vocabulary, and one
//! named error per kind of bad metadata. Encoding equivalence with real HF tokenizers is tested in
//! `crates/model/tests/gguf_tokenizer.rs`.

use super::*;
use crate::gguf::metadata::GgufValue;

fn strings(values: &[&str]) -> GgufValue {
    GgufValue::Array(GgufArray::String(values.iter().map(|s| s.to_string()).collect()))
}

/// `<s>`, `</s>`, the letters a, b, c, the merges a+b and ab+c, and a user-defined `<think>`.
fn valid() -> Metadata {
    let mut m = Metadata::default();
    m.insert(MODEL.into(), GgufValue::String("gpt2".into()));
    m.insert(PRE.into(), GgufValue::String("llama-bpe".into()));
    m.insert(
        TOKENS.into(),
        strings(&["<s>", "</s>", "a", "b", "c", "ab", "abc", "<think>"]),
    );
    m.insert(
        TYPES.into(),
        GgufValue::Array(GgufArray::I32(vec![3, 3, 1, 1, 1, 1, 1, 4])),
    );
    m.insert(MERGES.into(), strings(&["a b", "ab c"]));
    m.insert(BOS.into(), GgufValue::U32(0));
    m.insert(EOS.into(), GgufValue::U32(1));
    m.insert(CHAT_TEMPLATE.into(), GgufValue::String("{{ bos_token }}".into()));
    m
}

/// `valid()` with `key` replaced.
fn with(key: &str, value: GgufValue) -> Metadata {
    let mut m = Metadata::default();
    let base = valid();
    for k in base.keys() {
        if k != key {
            m.insert(k.to_owned(), base.get(k).unwrap().clone());
        }
    }
    m.insert(key.to_owned(), value);
    m
}

fn without(key: &str) -> Metadata {
    let mut m = Metadata::default();
    let base = valid();
    for k in base.keys().filter(|k| *k != key) {
        m.insert(k.to_owned(), base.get(k).unwrap().clone());
    }
    m
}

fn error(meta: &Metadata) -> GgufError {
    hf_tokenizer(meta).expect_err("must be refused")
}

#[test]
fn writes_vocabulary_merges_added_tokens_and_bos() {
    let json = hf_tokenizer(&valid()).unwrap().unwrap();
    let model = &json["model"];
    assert_eq!(model["type"], "BPE");
    assert_eq!(model["vocab"]["<think>"], 7);
    assert_eq!(model["vocab"]["abc"], 6);
    assert_eq!(model["merges"], json!([["a", "b"], ["ab", "c"]]));
    // llama-bpe: Llama 3's ignore_merges and its BOS by default.
    assert_eq!(model["ignore_merges"], true);
    let added = json["added_tokens"].as_array().unwrap();
    let summary: Vec<_> = added
        .iter()
        .map(|t| {
            (
                t["id"].as_u64().unwrap(),
                t["content"].as_str().unwrap(),
                t["special"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary, [(0, "<s>", true), (1, "</s>", true), (7, "<think>", false)]);
    let processors = json["post_processor"]["processors"].as_array().unwrap();
    let template = &processors[1];
    assert_eq!(template["single"][0]["SpecialToken"]["id"], "<s>");
    assert_eq!(template["special_tokens"]["<s>"]["ids"], json!([0]));
    assert_eq!(template["single"].as_array().unwrap().len(), 2, "no EOS unless asked");
}

#[test]
fn add_bos_token_key_overrides_the_family_default() {
    let json = hf_tokenizer(&with(ADD_BOS, GgufValue::Bool(false))).unwrap().unwrap();
    assert_eq!(json["post_processor"]["type"], "ByteLevel");
    let json = hf_tokenizer(&with(ADD_EOS, GgufValue::Bool(true))).unwrap().unwrap();
    let single = &json["post_processor"]["processors"][1]["single"];
    assert_eq!(single[2]["SpecialToken"]["id"], "</s>");
    let e = error(&{
        let mut m = without(BOS);
        m.insert(ADD_BOS.into(), GgufValue::Bool(true));
        m
    });
    assert_eq!(e, GgufError::MissingKey { key: BOS.into() });
}

#[test]
fn each_pre_tokenizer_family() {
    for (pre, normalizer, ignore_merges) in [
        ("gpt-2", Value::Null, false),
        ("default", Value::Null, false),
        ("qwen2", json!({"type": "NFC"}), false),
        ("deepseek-r1-qwen", json!({"type": "NFC"}), false),
        ("deepseek-llm", json!({"type": "Sequence", "normalizers": []}), false),
        ("deepseek-v3", json!({"type": "Sequence", "normalizers": []}), false),
        ("llama3", Value::Null, true),
    ] {
        let json = hf_tokenizer(&with(PRE, GgufValue::String(pre.into())))
            .unwrap()
            .unwrap();
        assert_eq!(json["normalizer"], normalizer, "{pre}");
        assert_eq!(json["model"]["ignore_merges"], ignore_merges, "{pre}");
    }
    // Files older than the `pre` key: GPT-2's split, as llama.cpp does.
    let json = hf_tokenizer(&without(PRE)).unwrap().unwrap();
    assert_eq!(json["pre_tokenizer"]["use_regex"], true);
}

#[test]
fn no_vocabulary_is_none() {
    assert_eq!(hf_tokenizer(&without(MODEL)).unwrap(), None);
    assert_eq!(
        hf_tokenizer(&with(MODEL, GgufValue::String("none".into()))).unwrap(),
        None
    );
}

#[test]
fn unknown_model_and_pre_are_named() {
    let e = error(&with(MODEL, GgufValue::String("llama".into())));
    assert!(matches!(e, GgufError::UnsupportedTokenizer { key: MODEL, ref value, .. } if value == "llama"));
    assert!(e.to_string().contains("gpt2"), "{e}");
    let e = error(&with(PRE, GgufValue::String("falcon".into())));
    let msg = e.to_string();
    assert!(
        msg.contains("`falcon`") && msg.contains("deepseek-v3") && msg.contains(PRE),
        "{msg}"
    );
}

#[test]
fn arrays_of_the_wrong_type() {
    let e = error(&with(TOKENS, GgufValue::Array(GgufArray::U32(vec![1, 2, 3]))));
    assert_eq!(
        e,
        GgufError::WrongValueType {
            key: TOKENS.into(),
            expected: "an array of strings",
            found: "array of 3 u32".into()
        }
    );
    let e = error(&with(TOKENS, GgufValue::String("a".into())));
    assert!(
        matches!(e, GgufError::WrongValueType { ref key, .. } if key == TOKENS),
        "{e}"
    );
    let e = error(&with(MERGES, GgufValue::Array(GgufArray::Bool(vec![true]))));
    assert!(
        matches!(e, GgufError::WrongValueType { ref key, .. } if key == MERGES),
        "{e}"
    );
    let e = error(&with(TYPES, strings(&["1"; 8])));
    assert!(
        matches!(e, GgufError::WrongValueType { ref key, .. } if key == TYPES),
        "{e}"
    );
    let e = error(&with(PRE, GgufValue::U32(2)));
    assert!(
        matches!(e, GgufError::WrongValueType { ref key, .. } if key == PRE),
        "{e}"
    );
}

#[test]
fn token_types_must_match_the_tokens() {
    let e = error(&with(TYPES, GgufValue::Array(GgufArray::I32(vec![1; 7]))));
    assert_eq!(
        e,
        GgufError::LengthMismatch {
            key: TYPES,
            len: 7,
            other: TOKENS,
            other_len: 8
        }
    );
    assert!(e.to_string().contains("has 7 entries"), "{e}");
    let e = error(&with(
        TYPES,
        GgufValue::Array(GgufArray::I32(vec![1, 1, 1, 9, 1, 1, 1, 1])),
    ));
    assert_eq!(e, GgufError::BadTokenType { index: 3, value: 9 });
    let e = error(&with(
        TYPES,
        GgufValue::Array(GgufArray::I32(vec![1, 1, 1, -1, 1, 1, 1, 1])),
    ));
    assert_eq!(e, GgufError::BadTokenType { index: 3, value: -1 });
    // Absent: every token is normal, so nothing is an added token.
    let json = hf_tokenizer(&without(TYPES)).unwrap().unwrap();
    assert_eq!(json["added_tokens"], json!([]));
}

#[test]
fn ids_out_of_range() {
    for key in [BOS, EOS, PAD] {
        let e = error(&with(key, GgufValue::U32(8)));
        assert_eq!(
            e,
            GgufError::TokenIdOutOfRange {
                key: key.into(),
                id: 8,
                n_tokens: 8
            }
        );
        let e = text(&with(key, GgufValue::U32(8))).expect_err("text() checks too");
        assert!(e.to_string().contains(key), "{e}");
    }
    let e = error(&with(BOS, GgufValue::I32(-1)));
    assert!(
        matches!(e, GgufError::ValueOutOfRange { ref key, .. } if key == BOS),
        "{e}"
    );
}

#[test]
fn merges_must_be_two_known_tokens() {
    for (merge, needle) in [
        ("ab", "separated by a space"),
        ("a  b", "separated by a space"),
        ("a b c", "separated by a space"),
        (" a", "separated by a space"),
        ("a x", "`x` is not in"),
        ("b a", "`ba` is not in"),
    ] {
        let e = error(&with(MERGES, strings(&["a b", merge])));
        assert!(
            matches!(e, GgufError::BadMerge { index: 1, merge: ref m, .. } if m == merge),
            "{merge}: {e}"
        );
        assert!(e.to_string().contains(needle), "{merge}: {e}");
    }
    assert_eq!(error(&without(MERGES)), GgufError::MissingKey { key: MERGES.into() });
}

#[test]
fn duplicate_and_empty_token_lists() {
    let e = error(&with(
        TOKENS,
        strings(&["<s>", "</s>", "a", "b", "c", "ab", "a", "<think>"]),
    ));
    assert_eq!(
        e,
        GgufError::DuplicateToken {
            token: "a".into(),
            first: 2,
            second: 6
        }
    );
    let e = error(&with(TOKENS, strings(&[])));
    assert!(
        matches!(e, GgufError::ValueOutOfRange { ref key, .. } if key == TOKENS),
        "{e}"
    );
    assert_eq!(error(&without(TOKENS)), GgufError::MissingKey { key: TOKENS.into() });
}

#[test]
fn text_reads_the_template_and_special_tokens() {
    let t = text(&valid()).unwrap();
    assert_eq!(t.chat_template.as_deref(), Some("{{ bos_token }}"));
    assert_eq!(t.bos_token.as_deref(), Some("<s>"));
    assert_eq!(t.eos_token.as_deref(), Some("</s>"));
    assert_eq!(t.pad_token, None);
    assert_eq!(text(&Metadata::default()).unwrap(), GgufText::default());
    let e = text(&with(CHAT_TEMPLATE, GgufValue::U32(1))).unwrap_err();
    assert!(
        matches!(e, GgufError::WrongValueType { ref key, .. } if key == CHAT_TEMPLATE),
        "{e}"
    );
}
