use rand::{Rng, SeedableRng};

use super::*;

fn s(text: &str) -> Option<String> {
    Some(text.to_owned())
}

#[test]
fn split_forced_thinking() {
    let out = split("Okay, 2+2.\n</think>\n\nIt is 4.", true);
    assert_eq!(out.reasoning_content, s("Okay, 2+2.\n"));
    assert_eq!(out.content, s("It is 4."));
}

#[test]
fn split_model_opens_thinking() {
    let out = split("<think>\nhmm</think>answer", false);
    assert_eq!(out.reasoning_content, s("hmm"));
    assert_eq!(out.content, s("answer"));
    // `<think>` emitted again although the prompt opened it.
    let out = split("<think>\nhmm</think>answer", true);
    assert_eq!(out.reasoning_content, s("hmm"));
}

#[test]
fn split_cut_off_inside_thinking() {
    let out = split("still thinking about it", true);
    assert_eq!(out.reasoning_content, s("still thinking about it"));
    assert_eq!(out.content, None);
    let out = split("<think>still", false);
    assert_eq!(out.content, None);
}

#[test]
fn split_without_thinking_is_all_content() {
    let out = split("  plain <think> later", false);
    assert_eq!(out.reasoning_content, None);
    assert_eq!(out.content, s("  plain <think> later"));
    let out = split("</think>x", false);
    assert_eq!(out.content, s("</think>x"));
}

#[test]
fn split_empty_reasoning() {
    let out = split("</think>\n\nhi", true);
    assert_eq!(out.reasoning_content, None);
    assert_eq!(out.content, s("hi"));
}

const SAMPLES: &[&str] = &[
    "Okay, 2+2.\n</think>\n\nIt is 4.",
    "<think>\nhmm</think>answer",
    "  <think>\n\n<think>deep</think>  \n\t done </think> again",
    "reasoning with </thin and </think",
    "no markers at all, 数学 🙂 é",
    "<thi",
    "   ",
    "",
    "</think>",
    "<think></think>",
    "<<think>>",
    "x</think></think>y",
    "我在想 </think>\n答案是四。",
    "<think<think></think>",
];

/// Random character-boundary splits of `text`.
fn random_pieces(text: &str, rng: &mut impl Rng) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let n = rng
            .random_range(0..=4.min(chars.len() - i + 1))
            .max(usize::from(rng.random_bool(0.8)));
        let end = (i + n).min(chars.len());
        pieces.push(chars[i..end].iter().collect());
        i = end;
        if rng.random_bool(0.1) {
            pieces.push(String::new());
        }
    }
    pieces
}

fn stream(pieces: &[String], started: bool) -> (String, String, bool) {
    let mut parser = ReasoningParser::new(started);
    let (mut reasoning, mut content, mut any_content) = (String::new(), String::new(), false);
    let deltas = pieces.iter().map(|p| parser.push(p)).collect::<Vec<_>>();
    for delta in deltas.into_iter().chain(std::iter::once(parser.finish())) {
        assert_ne!(delta.reasoning.as_deref(), Some(""));
        assert_ne!(delta.content.as_deref(), Some(""));
        reasoning.push_str(delta.reasoning.as_deref().unwrap_or(""));
        if let Some(c) = delta.content {
            any_content = true;
            content.push_str(&c);
        }
    }
    (reasoning, content, any_content)
}

#[test]
fn streaming_equals_one_shot_for_random_splits() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for text in SAMPLES {
        for started in [false, true] {
            let expected = split(text, started);
            for _ in 0..200 {
                let pieces = random_pieces(text, &mut rng);
                let (reasoning, content, any_content) = stream(&pieces, started);
                assert_eq!(
                    reasoning,
                    expected.reasoning_content.clone().unwrap_or_default(),
                    "{text:?} {pieces:?}"
                );
                assert_eq!(
                    content,
                    expected.content.clone().unwrap_or_default(),
                    "{text:?} {pieces:?}"
                );
                if any_content {
                    assert!(expected.content.is_some());
                }
            }
        }
    }
}

#[test]
fn streaming_holds_back_only_a_partial_marker() {
    let mut parser = ReasoningParser::new(true);
    assert_eq!(parser.push("abc</th").reasoning, s("abc"));
    let delta = parser.push("ink>\n\nHi");
    assert_eq!((delta.reasoning, delta.content), (None, s("Hi")));
    assert!(parser.in_content());
    let mut parser = ReasoningParser::new(true);
    assert_eq!(parser.push("a<b").reasoning, s("a<b"));
}

#[test]
fn random_text_never_panics() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let alphabet: Vec<char> = "<>/thinkTHINK \n\té😀".chars().collect();
    for _ in 0..500 {
        let len = rng.random_range(0..40);
        let text: String = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        for started in [false, true] {
            let expected = split(&text, started);
            let (reasoning, content, _) = stream(&random_pieces(&text, &mut rng), started);
            assert_eq!(reasoning, expected.reasoning_content.unwrap_or_default(), "{text:?}");
            assert_eq!(content, expected.content.unwrap_or_default(), "{text:?}");
        }
    }
}
