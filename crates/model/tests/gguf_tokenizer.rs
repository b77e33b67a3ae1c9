//! GGUF tokenizer metadata → `tokenizer.json`: the result must encode and decode exactly like the
//! HF tokenizer the metadata was converted from. Checked on the two GGUF fixtures that carry a
//! tokenizer (written by the `gguf` package from HF files kept next to them), on DeepSeek-V3/R1's
//! real vocabulary when `/work/shared` is present, and, for every `pre` family, on the
//! pre-tokenizer's splits as Python `tokenizers` computes them.

mod gguf_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use gguf_support::Writer;
use r1serve_model::gguf::{hf_tokenizer, parse, text, GgufFile};
use serde_json::Value;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Text that exercises every branch of the splits: contractions, digit runs, punctuation runs,
/// whitespace runs and line breaks, accents (one decomposed, for NFC), Greek, Cyrillic, Hebrew,
/// Arabic, Devanagari, CJK, kana, Hangul, full-width forms, emoji with joiners and modifiers, and
/// the special tokens of both fixture vocabularies and of DeepSeek's.
const SAMPLES: &[&str] = &[
    "Hello, world! It's a test: don't, I'LL, we've... OK?!",
    "1 12 123 1234 12345678 3.14159 -42 +7% 2024-06-01 0x1F",
    "\tTabs\tand  double  spaces   \n\n\r\nline\r\nbreaks \n ",
    "naïve café déjà vu — “quotes” ‘single’ «guillemets» Straße e\u{301}te ﬁ",
    "Ελληνικά κείμενο, русский текст, עברית, العربية, हिन्दी",
    "日本語のテキスト、カタカナ、中文测试。한국어 텍스트 ＡＢＣ１２３！",
    "emoji 😀👍🏽🦙 👨\u{200d}👩\u{200d}👧 ✅ 🇫🇷",
    "<s>special</s> <think>\nreasoning\n</think>\n\nanswer",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>ok<｜end▁of▁sentence｜>",
    "fn main() { println!(\"{}\", x[0] >= 1 && y != -2); } // code",
    "   leading and trailing   ",
];

fn from_value(json: &Value) -> Tokenizer {
    Tokenizer::from_bytes(serde_json::to_vec(json).unwrap()).unwrap()
}

fn ids(tokenizer: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tokenizer.encode(text, special).unwrap().get_ids().to_vec()
}

/// Every sample (and all of them joined) encodes to the same ids and decodes to the same text.
/// `bos_added`: the GGUF side prepends this id where the HF file's post-processor adds nothing.
fn assert_same(ours: &Tokenizer, hf: &Tokenizer, bos_added: Option<u32>, compare_skip_special: bool) {
    let joined = SAMPLES.concat();
    for text in SAMPLES.iter().copied().chain([joined.as_str()]) {
        let expected = ids(hf, text, false);
        assert_eq!(ids(ours, text, false), expected, "{text:?}");
        let mut expected_special = ids(hf, text, true);
        if let Some(bos) = bos_added {
            expected_special.insert(0, bos);
        }
        assert_eq!(ids(ours, text, true), expected_special, "{text:?} with special tokens");
        assert_eq!(
            ours.decode(&expected, false).unwrap(),
            hf.decode(&expected, false).unwrap(),
            "{text:?}"
        );
        if compare_skip_special {
            assert_eq!(
                ours.decode(&expected, true).unwrap(),
                hf.decode(&expected, true).unwrap(),
                "{text:?}"
            );
        }
    }
    assert_eq!(ours.get_vocab_size(true), hf.get_vocab_size(true));
}

fn gguf_tokenizer(file: &str) -> (Tokenizer, GgufFile) {
    let gguf = GgufFile::open(&fixtures().join("gguf").join(file)).unwrap();
    let json = gguf.hf_tokenizer().unwrap().expect("the fixture has a tokenizer");
    (from_value(&json), gguf)
}

#[test]
fn llama_fixture_gpt2_split_encodes_like_its_tokenizer_json() {
    let (ours, _) = gguf_tokenizer("llama-f32.gguf");
    let hf = Tokenizer::from_file(fixtures().join("llama-f32/tokenizer.json")).unwrap();
    assert_same(&ours, &hf, None, true);
    assert_eq!(
        ids(&ours, "hi", true)[0],
        0,
        "<s> prepended, as the HF post-processor does"
    );
}

/// qwen2-f32.gguf carries an R1-Distill-Qwen-style tokenizer (pre `deepseek-r1-qwen`: Qwen2's
/// split and NFC) with R1's added tokens: BOS/EOS special, `<｜User｜>`/`<｜Assistant｜>` marked
/// control by the converter because they look special, `<think>`/`</think>` user-defined.
#[test]
fn qwen2_fixture_r1_distill_tokenizer_encodes_like_its_tokenizer_json() {
    let (ours, gguf) = gguf_tokenizer("qwen2-f32.gguf");
    let reference = fixtures().join("gguf/qwen2-f32-tokenizer");
    let hf = Tokenizer::from_file(reference.join("tokenizer.json")).unwrap();
    // HF decodes `<｜User｜>` even when skipping special tokens (it is not special there); llama.cpp
    // made it a control token, so skipping drops it here: only the full decode is compared.
    assert_same(&ours, &hf, None, false);
    for token in ["<think>", "</think>", "<｜User｜>", "<｜Assistant｜>"] {
        assert_eq!(ours.token_to_id(token), hf.token_to_id(token), "{token}");
    }
    assert_eq!(ids(&ours, "e\u{301}", false), ids(&ours, "\u{e9}", false), "NFC first");
    let meta = gguf.text().unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(reference.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(meta.chat_template.as_deref(), config["chat_template"].as_str());
    assert_eq!(meta.bos_token.as_deref(), config["bos_token"].as_str());
    assert_eq!(meta.eos_token.as_deref(), config["eos_token"].as_str());
}

fn shared(name: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/tokenizers")
        .join(name);
    if dir.join("tokenizer.json").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} is absent (only the shared workspace has it)",
            dir.display()
        );
        None
    }
}

/// What llama.cpp's converter writes for an HF tokenizer directory (`get_vocab_base` +
/// `SpecialVocab`), as GGUF bytes.
fn convert_like_llama_cpp(dir: &Path, pre: &str) -> Vec<u8> {
    let read = |name: &str| -> Value { serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap() };
    let tok = read("tokenizer.json");
    let config = read("tokenizer_config.json");
    let mut by_id: BTreeMap<usize, String> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(token, id)| (id.as_u64().unwrap() as usize, token.clone()))
        .collect();
    let mut added: HashMap<usize, bool> = HashMap::new();
    for t in tok["added_tokens"].as_array().unwrap() {
        let id = t["id"].as_u64().unwrap() as usize;
        by_id.insert(id, t["content"].as_str().unwrap().to_owned());
        added.insert(id, t["special"].as_bool().unwrap());
    }
    let n = by_id.keys().last().unwrap() + 1;
    let (mut tokens, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for id in 0..n {
        match (by_id.get(&id), added.get(&id)) {
            (None, _) => {
                tokens.push(format!("[PAD{id}]"));
                types.push(5);
            }
            (Some(token), Some(&special)) => {
                let looks_special = (token.starts_with("<｜") && token.ends_with("｜>"))
                    || (token.starts_with("<|") && token.ends_with("|>"));
                types.push(if special || looks_special { 3 } else { 4 });
                tokens.push(token.clone());
            }
            (Some(token), None) => {
                tokens.push(token.clone());
                types.push(1);
            }
        }
    }
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    let id_of = |field: &str| {
        let content = config[field]["content"].as_str().or(config[field].as_str()).unwrap();
        tokens.iter().position(|t| t == content).unwrap() as u32
    };
    Writer::new()
        .string("general.architecture", "deepseek2")
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", pre)
        .strings("tokenizer.ggml.tokens", &tokens)
        .i32s("tokenizer.ggml.token_type", &types)
        .strings("tokenizer.ggml.merges", &merges)
        .u32("tokenizer.ggml.bos_token_id", id_of("bos_token"))
        .u32("tokenizer.ggml.eos_token_id", id_of("eos_token"))
        .bool(
            "tokenizer.ggml.add_bos_token",
            config["add_bos_token"].as_bool().unwrap(),
        )
        .string("tokenizer.chat_template", config["chat_template"].as_str().unwrap())
        .build()
}

/// DeepSeek-V3's vocabulary through the converter's rules and back: the pre-tokenizer and
/// normalizer come out identical to the published file's, and every sample encodes to the same
/// ids. The published `tokenizer.json` has a byte-level post-processor and leaves BOS to
/// `tokenizer_config.json`'s `add_bos_token`, which GGUF records: with special tokens the GGUF
/// side prepends BOS, as transformers does.
#[test]
fn deepseek_v3_and_r1_vocabularies_round_trip() {
    for name in ["deepseek-v3", "deepseek-r1"] {
        let Some(dir) = shared(name) else { return };
        let header = parse(&convert_like_llama_cpp(&dir, "deepseek-v3")).unwrap();
        let json = hf_tokenizer(&header.metadata).unwrap().unwrap();
        let published: Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
        assert_eq!(json["pre_tokenizer"], published["pre_tokenizer"], "{name}");
        assert_eq!(json["normalizer"], published["normalizer"], "{name}");
        let ours = from_value(&json);
        let hf = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        for text in SAMPLES {
            let expected = ids(&hf, text, false);
            assert_eq!(ids(&ours, text, false), expected, "{name}: {text:?}");
            assert_eq!(ids(&ours, text, true)[1..], expected[..], "{name}: {text:?}");
            assert_eq!(
                ours.decode(&expected, false).unwrap(),
                hf.decode(&expected, false).unwrap()
            );
        }
        assert_eq!(ids(&ours, "x", true)[0], 0, "{name}: BOS");
        if name == "deepseek-r1" {
            assert_eq!(ours.token_to_id("<think>"), Some(128798));
            assert_eq!(ids(&ours, "a<think>b", false), ids(&hf, "a<think>b", false));
        }
        let meta = text(&header.metadata).unwrap();
        assert_eq!(meta.bos_token.as_deref(), Some("<｜begin▁of▁sentence｜>"));
        assert_eq!(meta.eos_token.as_deref(), Some("<｜end▁of▁sentence｜>"));
    }
}

/// A two-letter vocabulary with the given `pre`; only its pre-tokenizer is used.
fn pre_tokenizer(pre: &str) -> PreTokenizerWrapper {
    let bytes = Writer::new()
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", pre)
        .strings("tokenizer.ggml.tokens", &["a", "b", "ab"])
        .strings("tokenizer.ggml.merges", &["a b"])
        .build();
    let json = hf_tokenizer(&parse(&bytes).unwrap().metadata).unwrap().unwrap();
    serde_json::from_value(json["pre_tokenizer"].clone()).unwrap()
}

fn pieces(pre: &PreTokenizerWrapper, text: &str) -> Vec<String> {
    let mut s = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut s).unwrap();
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(piece, _, _)| piece.to_owned())
        .collect()
}

/// Each family's splits, as Python `tokenizers` 0.23.3 (Oniguruma regexes) computes them for that
/// family's published pre-tokenizer; this build's regex engine must agree. Note DeepSeek LLM's
/// punctuation class `[!-/:-~…]` includes the ASCII letters, so it cuts words at any non-ASCII
/// letter ("na", "ï", "ve"), in HF as here.
#[test]
fn pre_tokenizer_splits_match_the_published_families() {
    let text = "Hello World's DON'T 12345 naïve Ωmega Straße ＡＢＣ！ 世界한국어カタカナ\n\n  x\t1.5%  ";
    let gpt2: &[&str] = &[
        "Hello",
        "ĠWorld",
        "'s",
        "ĠDON",
        "'",
        "T",
        "Ġ12345",
        "ĠnaÃ¯ve",
        "ĠÎ©mega",
        "ĠStraÃŁe",
        "Ġï¼¡ï¼¢ï¼£",
        "ï¼ģ",
        "Ġä¸ĸçķĮíķľêµŃìĸ´ãĤ«ãĤ¿ãĤ«ãĥĬ",
        "ĊĊĠ",
        "Ġx",
        "ĉ",
        "1",
        ".",
        "5",
        "%",
        "ĠĠ",
    ];
    let llama3: &[&str] = &[
        "Hello",
        "ĠWorld",
        "'s",
        "ĠDON",
        "'T",
        "Ġ",
        "123",
        "45",
        "ĠnaÃ¯ve",
        "ĠÎ©mega",
        "ĠStraÃŁe",
        "Ġï¼¡ï¼¢ï¼£",
        "ï¼ģ",
        "Ġä¸ĸçķĮíķľêµŃìĸ´ãĤ«ãĤ¿ãĤ«ãĥĬ",
        "ĊĊ",
        "Ġ",
        "Ġx",
        "ĉ",
        "1",
        ".",
        "5",
        "%",
        "ĠĠ",
    ];
    let qwen2: &[&str] = &[
        "Hello",
        "ĠWorld",
        "'s",
        "ĠDON",
        "'T",
        "Ġ",
        "1",
        "2",
        "3",
        "4",
        "5",
        "ĠnaÃ¯ve",
        "ĠÎ©mega",
        "ĠStraÃŁe",
        "Ġï¼¡ï¼¢ï¼£",
        "ï¼ģ",
        "Ġä¸ĸçķĮíķľêµŃìĸ´ãĤ«ãĤ¿ãĤ«ãĥĬ",
        "ĊĊ",
        "Ġ",
        "Ġx",
        "ĉ",
        "1",
        ".",
        "5",
        "%",
        "ĠĠ",
    ];
    let deepseek_llm: &[&str] = &[
        "Hello",
        "ĠWorld",
        "'",
        "s",
        "ĠDON",
        "'",
        "T",
        "Ġ",
        "1",
        "2",
        "3",
        "4",
        "5",
        "Ġna",
        "Ã¯",
        "ve",
        "ĠÎ©",
        "mega",
        "ĠStra",
        "ÃŁ",
        "e",
        "Ġï¼¡ï¼¢ï¼£",
        "ï¼ģ",
        "Ġ",
        "ä¸ĸçķĮíķľêµŃìĸ´ãĤ«ãĤ¿ãĤ«ãĥĬ",
        "Ċ",
        "Ċ",
        "Ġ",
        "Ġx",
        "ĉ",
        "1",
        ".",
        "5",
        "%",
        "ĠĠ",
    ];
    let deepseek_v3: &[&str] = &[
        "Hello",
        "ĠWorld",
        "'s",
        "ĠDON",
        "'T",
        "Ġ",
        "123",
        "45",
        "ĠnaÃ¯ve",
        "ĠÎ©mega",
        "ĠStraÃŁe",
        "Ġï¼¡ï¼¢ï¼£",
        "ï¼ģ",
        "Ġ",
        "ä¸ĸçķĮ",
        "íķľêµŃìĸ´",
        "ãĤ«ãĤ¿ãĤ«ãĥĬ",
        "ĊĊ",
        "Ġ",
        "Ġx",
        "ĉ",
        "1",
        ".",
        "5",
        "%",
        "ĠĠ",
    ];
    for (pre, expected) in [
        ("gpt-2", gpt2),
        ("default", gpt2),
        ("llama-bpe", llama3),
        ("llama3", llama3),
        ("qwen2", qwen2),
        ("deepseek-r1-qwen", qwen2),
        ("deepseek-llm", deepseek_llm),
        ("deepseek-v3", deepseek_v3),
    ] {
        assert_eq!(pieces(&pre_tokenizer(pre), text), expected, "{pre}");
    }
}
