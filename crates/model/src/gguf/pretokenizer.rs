//! `tokenizer.ggml.pre` → the normalizer and pre-tokenizer of the HuggingFace `tokenizer.json` the
//! GGUF file was converted from.
//!
//! llama.cpp's converter does not store a byte-level BPE tokenizer's pre-tokenizer: it hashes the
//! HF tokenizer's output on a probe text and writes the name of the family it recognises. Each
//! entry below restates that family's published `tokenizer.json` components (regexes character
//! for character, split behaviour, `ignore_merges`), because a regex that differs in one class
//! changes token ids silently. The names and aliases are the ones llama.cpp's `llama-vocab.cpp`
//! maps to the same pre-tokenizer.

use serde_json::{json, Value};

/// The `pre` names this module knows, for error messages.
pub const SUPPORTED: &str =
    "gpt-2, default, llama-bpe (llama3, llama-v3), qwen2, deepseek-r1-qwen, deepseek-llm, deepseek-v3";

/// What a `pre` name stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct PreTokenizer {
    /// The `normalizer` entry (`Value::Null` for none).
    pub normalizer: Value,
    /// The `pre_tokenizer` entry.
    pub pre_tokenizer: Value,
    /// BPE `ignore_merges`: a word already in the vocabulary is one token, without merging.
    pub ignore_merges: bool,
    /// Whether BOS is prepended when the file has no `tokenizer.ggml.add_bos_token` (llama.cpp's
    /// default for the family; Llama 3's `tokenizer.json` prepends `<|begin_of_text|>`).
    pub add_bos_default: bool,
}

/// Llama 3 (`meta-llama/Meta-Llama-3-8B` `tokenizer.json`): cl100k's split, digits in runs of 3.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2 (transformers' `Qwen2Converter`, as in every Qwen2/2.5 `tokenizer.json`): the same split
/// with single digits.
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek-V3/R1: digits in runs of up to 3, then CJK ideographs and kana as whole runs, then
/// words (an ASCII punctuation mark may lead an ASCII word), punctuation runs and whitespace.
/// The `\r\n` inside the classes are the characters CR and LF, as in the published file.
const DSV3_DIGITS: &str = r"\p{N}{1,3}";
const DSV3_CJK: &str = "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+";
const DSV3_WORDS: &str = concat!(
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"##,
    "|[^\r\n",
    r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[",
    "\r\n",
    r"]*|\s*[",
    "\r\n",
    r"]+|\s+(?!\S)|\s+"
);

/// DeepSeek LLM / V2 (`deepseek-ai/deepseek-llm-7b-base` `tokenizer.json`): five isolated splits
/// (line breaks; letter runs of an explicit cased-letter class; ASCII and full-width punctuation;
/// trailing whitespace; CJK and Hangul runs), then every digit on its own. The letter class is
/// spelled with escapes because several of its members have identical-looking twins elsewhere in
/// Unicode (U+1F7D vs U+03CE, U+2126 vs U+03A9, U+212A vs `K`).
const DSLLM_NEWLINE: &str = "[\r\n]";
const DSLLM_LETTERS: &str = concat!(
    r"\s?[A-Za-z",
    "\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}",
    "\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}",
    "\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}",
    "\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}",
    "\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}",
    "\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}",
    "\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}",
    "\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}",
    "\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}",
    "\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}",
    "\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}",
    "\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}",
    "\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}",
    "\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+"
);
const DSLLM_PUNCT: &str = concat!(
    r"\s?[!-/:-~",
    "\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+"
);
const DSLLM_TRAILING_SPACE: &str = r"\s+$";
const DSLLM_CJK: &str = "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+";

/// The components for `pre`, or `None` for a name this module does not know.
pub fn lookup(pre: &str) -> Option<PreTokenizer> {
    let spec = match pre {
        // GPT-2's own tokenizer.json; llama.cpp's "default" is a fallback split that matches no
        // published tokenizer, so the conventional byte-level split stands in for it.
        "gpt-2" | "default" => PreTokenizer {
            normalizer: Value::Null,
            pre_tokenizer: byte_level(true, true),
            ignore_merges: false,
            add_bos_default: false,
        },
        "llama-bpe" | "llama3" | "llama-v3" => PreTokenizer {
            normalizer: Value::Null,
            pre_tokenizer: sequence(vec![split(LLAMA3), byte_level(true, false)]),
            ignore_merges: true,
            add_bos_default: true,
        },
        // R1-Distill-Qwen keeps Qwen2.5's tokenizer.json components; only its special tokens (and
        // so the converter's probe hash) changed. llama.cpp treats both names alike.
        "qwen2" | "deepseek-r1-qwen" => PreTokenizer {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: sequence(vec![split(QWEN2), byte_level(false, false)]),
            ignore_merges: false,
            add_bos_default: false,
        },
        "deepseek-llm" => PreTokenizer {
            normalizer: empty_normalizer(),
            pre_tokenizer: sequence(vec![
                split(DSLLM_NEWLINE),
                split(DSLLM_LETTERS),
                split(DSLLM_PUNCT),
                split(DSLLM_TRAILING_SPACE),
                split(DSLLM_CJK),
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true, false),
            ]),
            ignore_merges: false,
            add_bos_default: false,
        },
        "deepseek-v3" => PreTokenizer {
            normalizer: empty_normalizer(),
            pre_tokenizer: sequence(vec![
                split(DSV3_DIGITS),
                split(DSV3_CJK),
                split(DSV3_WORDS),
                byte_level(true, false),
            ]),
            ignore_merges: false,
            add_bos_default: false,
        },
        _ => return None,
    };
    Some(spec)
}

/// A split that keeps every match as its own piece (and the text between matches too).
fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn sequence(parts: Vec<Value>) -> Value {
    json!({"type": "Sequence", "pretokenizers": parts})
}

/// Bytes → the printable characters byte-level vocabularies are written in; `use_regex` adds
/// GPT-2's split. `trim_offsets` only affects offsets, and is set as each family's file sets it.
fn byte_level(trim_offsets: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

/// What DeepSeek's files declare: a normalizer sequence with nothing in it.
fn empty_normalizer() -> Value {
    json!({"type": "Sequence", "normalizers": []})
}
