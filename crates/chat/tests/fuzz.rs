//! No input panics: random bytes and random Jinja token soup as templates, random messages, random
//! token ids.

use r1serve_chat::{
    parse_tool_calls, split_reasoning, ChatMessage, ChatTemplate, ContentPart, MessageContent, ReasoningParser,
    RenderOptions,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PIECES: &[&str] = &[
    "{%",
    "%}",
    "{{",
    "}}",
    "{#",
    "#}",
    "{%-",
    "-%}",
    " for ",
    " in ",
    " if ",
    " else ",
    " endif ",
    " endfor ",
    " set ",
    " = ",
    "messages",
    "m",
    ".content",
    ".role",
    "[0]",
    "[-1]",
    "(",
    ")",
    "[",
    "]",
    "'",
    "\"",
    "+",
    "*",
    "~",
    "range(",
    "99999",
    "namespace(",
    "loop.index",
    "|",
    "tojson",
    "length",
    "raise_exception(",
    " macro ",
    " endmacro ",
    " call ",
    " endcall ",
    "recursive",
    "loop(",
    " not ",
    " is ",
    "none",
    "defined",
    ".split(",
    ".strip()",
    ".startswith(",
    "bos_token",
    "tools",
    ",",
    ":",
    "{",
    "}",
    " and ",
    " or ",
    "\n",
    "x",
    "é",
    "🙂",
    "include",
    "import",
    "extends",
    "block",
    "endblock",
    "filter",
    "endfilter",
    "break",
    "continue",
    "super()",
    ".items()",
    "|join",
    "|map(",
    "attribute=",
    "|selectattr(",
    "-1",
    "0.5",
    "%",
    "//",
    "**",
];

fn random_messages(rng: &mut ChaCha8Rng) -> Vec<ChatMessage> {
    let roles = ["system", "user", "assistant", "tool", "", "weird"];
    (0..rng.random_range(0..6))
        .map(|_| {
            let text: String = (0..rng.random_range(0..5))
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect();
            let content = match rng.random_range(0..4) {
                0 => None,
                1 => Some(MessageContent::Parts(vec![ContentPart {
                    kind: "text".into(),
                    text: Some(text.clone()),
                }])),
                _ => Some(MessageContent::Text(text.clone())),
            };
            ChatMessage {
                role: roles[rng.random_range(0..roles.len())].into(),
                content,
                reasoning_content: rng.random_bool(0.2).then(|| text.clone()),
                ..ChatMessage::default()
            }
        })
        .collect()
}

fn opts(rng: &mut ChaCha8Rng) -> RenderOptions {
    RenderOptions {
        add_generation_prompt: rng.random_bool(0.5),
        tools: rng
            .random_bool(0.3)
            .then(|| vec![serde_json::json!({"function": {"name": "f"}})]),
        ..RenderOptions::default()
    }
}

#[test]
fn random_templates_and_messages_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut compiled = 0;
    for i in 0..3000 {
        let source = if i % 3 == 0 {
            let bytes: Vec<u8> = (0..rng.random_range(0..80)).map(|_| rng.random()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            (0..rng.random_range(0..30))
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect()
        };
        let Ok(template) = ChatTemplate::new(source, "fuzz", "<s>", "</s>") else {
            continue;
        };
        compiled += 1;
        let template = template
            .with_fuel(20_000)
            .with_max_output_bytes(1 << 16)
            .with_reasoning(true);
        for _ in 0..3 {
            let _ = template.render(&random_messages(&mut rng), &opts(&mut rng));
        }
    }
    assert!(compiled > 100, "only {compiled} templates compiled");
}

#[test]
fn real_templates_take_random_messages() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/tokenizers"));
    let templates = [
        ChatTemplate::builtin_r1(),
        ChatTemplate::from_model_dir(&dir.join("deepseek-r1")).unwrap().unwrap(),
        ChatTemplate::from_model_dir(&dir.join("deepseek-v3")).unwrap().unwrap(),
    ];
    for _ in 0..500 {
        let messages = random_messages(&mut rng);
        let opts = opts(&mut rng);
        for template in &templates {
            let _ = template.render(&messages, &opts);
        }
    }
}

#[test]
fn random_text_through_the_parsers() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..2000 {
        let bytes: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_tool_calls(&text);
        let _ = split_reasoning(&text, rng.random_bool(0.5));
        let mut parser = ReasoningParser::new(rng.random_bool(0.5));
        let _ = parser.push(&text);
        let _ = parser.finish();
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for (open, close) in [
        ("(", ")"),
        ("[", "]"),
        ("{% if x %}", "{% endif %}"),
        ("{% for x in y %}", "{% endfor %}"),
    ] {
        let source = format!("{{{{ {}1{} }}}}", open.repeat(20_000), close.repeat(20_000));
        let source = if open.starts_with("{%") {
            format!("{}{}", open.repeat(5_000), close.repeat(5_000))
        } else {
            source
        };
        if let Ok(template) = ChatTemplate::new(source, "deep", "", "") {
            let _ = template.render(&[], &RenderOptions::default());
        }
    }
    let recursive = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    let template = ChatTemplate::new(recursive, "recursive", "", "").unwrap();
    assert!(template.render(&[], &RenderOptions::default()).is_err());
}
