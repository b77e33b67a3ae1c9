//! Chat templates against the shared DeepSeek tokenizers. The expected strings were worked out by
//! hand from the templates' logic and confirmed with Python's jinja2 configured as `transformers`
//! configures it: `python3 crates/chat/tests/fixtures/render_expected.py` prints them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use r1serve_chat::{ChatError, ChatMessage, ChatTemplate, FunctionCall, RenderOptions, Tokenizer, ToolCall};

fn shared(model: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/tokenizers")).join(model)
}

fn gen_prompt() -> RenderOptions {
    RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    }
}

fn two_turns() -> Vec<ChatMessage> {
    let mut answer = ChatMessage::new("assistant", "<think>\nSimple.\n</think>\n\n2+2 = 4.");
    answer.reasoning_content = Some("Simple.".into());
    vec![
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "What is 2+2?"),
        answer,
        ChatMessage::new("user", "And 3+3?"),
    ]
}

fn tool_turns() -> Vec<ChatMessage> {
    let call = ChatMessage {
        role: "assistant".into(),
        content: None,
        tool_calls: Some(vec![ToolCall {
            id: Some("c1".into()),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            },
        }]),
        ..ChatMessage::default()
    };
    let mut output = ChatMessage::new("tool", "18C, sunny");
    output.tool_call_id = Some("c1".into());
    vec![ChatMessage::new("user", "Weather in Paris?"), call, output]
}

const R1_TWO_TURNS: &str = "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is 2+2?<｜Assistant｜>2+2 = 4.<｜end▁of▁sentence｜><｜User｜>And 3+3?<｜Assistant｜><think>\n";
const V3_TOOLS: &str = "<｜begin▁of▁sentence｜><｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>";

#[test]
fn r1_template_renders_two_turns_exactly() {
    let dir = shared("deepseek-r1");
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap().unwrap();
    let template = ChatTemplate::for_model(&dir, Some(&tokenizer)).unwrap();
    assert!(template.is_reasoning());
    assert_eq!(template.bos_token(), "<｜begin▁of▁sentence｜>");
    let prompt = template.render(&two_turns(), &gen_prompt()).unwrap();
    assert_eq!(prompt, R1_TWO_TURNS);
    assert!(r1serve_chat::prompt_opens_thinking(&prompt));

    // The prompt holds its BOS: encode without special tokens.
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids.first(), Some(&0));
    assert_eq!(ids.iter().filter(|&&id| id == 128804).count(), 2, "<｜Assistant｜>");
    assert!(
        ids.ends_with(&[128798, tokenizer.encode("\n", false).unwrap()[0]]),
        "{ids:?}"
    );
}

#[test]
fn v3_template_is_not_a_reasoning_prompt() {
    let dir = shared("deepseek-v3");
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap().unwrap();
    assert!(tokenizer.think_tokens().is_none());
    let template = ChatTemplate::for_model(&dir, Some(&tokenizer)).unwrap();
    let prompt = template.render(&two_turns(), &gen_prompt()).unwrap();
    let expected = R1_TWO_TURNS.strip_suffix("<think>\n").unwrap();
    assert_eq!(prompt, expected);
    assert!(!r1serve_chat::prompt_opens_thinking(&prompt));
    // The same template serving a reasoning model opens thinking.
    let reasoning = template
        .with_reasoning(true)
        .render(&two_turns(), &gen_prompt())
        .unwrap();
    assert_eq!(reasoning, R1_TWO_TURNS);
    // No generation prompt: nothing appended.
    let opts = RenderOptions::default();
    let plain = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .unwrap()
        .with_reasoning(true);
    assert!(plain.render(&two_turns(), &opts).unwrap().ends_with("And 3+3?"));
}

#[test]
fn v3_template_renders_tool_turns() {
    let template = ChatTemplate::from_model_dir(&shared("deepseek-v3")).unwrap().unwrap();
    assert_eq!(template.render(&tool_turns(), &gen_prompt()).unwrap(), V3_TOOLS);
}

#[test]
fn builtin_r1_matches_the_r1_template() {
    let builtin = ChatTemplate::builtin_r1();
    assert_eq!(builtin.render(&two_turns(), &gen_prompt()).unwrap(), R1_TWO_TURNS);
    let system_twice = [
        ChatMessage::new("system", "A"),
        ChatMessage::new("system", "B"),
        ChatMessage::new("user", "u"),
    ];
    let r1 = ChatTemplate::from_model_dir(&shared("deepseek-r1")).unwrap().unwrap();
    assert_eq!(
        builtin.render(&system_twice, &gen_prompt()).unwrap(),
        r1.render(&system_twice, &gen_prompt()).unwrap()
    );
    // Tool turns: the call block is closed (the V3 template leaves a single call unclosed).
    let tools = builtin.render(&tool_turns(), &gen_prompt()).unwrap();
    let closed = V3_TOOLS.replace(
        "<｜tool▁call▁end｜><｜tool▁outputs▁begin｜>",
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜>",
    );
    assert_eq!(tools, closed);
}

#[test]
fn builtin_r1_lists_tools() {
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: Some(vec![serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})]),
        ..RenderOptions::default()
    };
    let prompt = ChatTemplate::builtin_r1()
        .render(&[ChatMessage::new("user", "hi")], &opts)
        .unwrap();
    let expected = "<｜begin▁of▁sentence｜>## Tools\nYou can call these functions:\n\n### get_weather\nDescription: Current weather\nParameters: {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}\n\nTo call functions, answer exactly in this form:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜User｜>hi<｜Assistant｜><think>\n";
    assert_eq!(prompt, expected);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn named_templates_and_token_forms() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}]}"#,
    );
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(
        template
            .render(&[ChatMessage::new("user", "x")], &gen_prompt())
            .unwrap(),
        "<s>x</s>"
    );

    write(dir.path(), "chat_template.jinja", "J{{ messages | length }}");
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.render(&[], &gen_prompt()).unwrap(), "J0");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();

    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
    );
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("default") && err.contains("rag"),
        "{err}"
    );

    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"bos_token": 5, "chat_template": "x"}"#,
    );
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("bos_token"), "{err}");

    write(dir.path(), "tokenizer_config.json", r#"{"bos_token": null}"#);
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
    let fallback = ChatTemplate::for_model(dir.path(), None).unwrap();
    assert_eq!(fallback.name(), "builtin-r1");

    write(dir.path(), "tokenizer_config.json", "{not json");
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ChatError::Json { .. }), "{err}");
}

fn compile(source: &str) -> Result<ChatTemplate, ChatError> {
    ChatTemplate::new(source, "test.jinja", "<s>", "</s>")
}

#[test]
fn syntax_errors_name_the_line() {
    let err = compile("line one\n{{ ok }}\n{% if %}\n").unwrap_err();
    match &err {
        ChatError::TemplateSyntax { name, line, .. } => assert_eq!((name.as_str(), *line), ("test.jinja", Some(3))),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("test.jinja line 3"), "{err}");
}

#[test]
fn render_errors_name_the_line() {
    let template = compile("a\nb\n{{ messages[0].content + 1 }}").unwrap();
    let err = template
        .render(&[ChatMessage::new("user", "x")], &gen_prompt())
        .unwrap_err();
    assert!(
        matches!(err, ChatError::TemplateRender { line: Some(3), .. }),
        "{err:?}"
    );
}

#[test]
fn raise_exception_rejects_the_conversation() {
    let template = compile(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}",
    )
    .unwrap();
    let err = template
        .render(&[ChatMessage::new("assistant", "x")], &gen_prompt())
        .unwrap_err();
    match err {
        ChatError::TemplateRaised { message } => assert_eq!(message, "Conversation must start with user"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fuel_bounds_a_render() {
    let template = compile("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}")
        .unwrap()
        .with_fuel(10_000);
    let err = template.render(&[], &gen_prompt()).unwrap_err();
    assert!(matches!(err, ChatError::TemplateFuel { limit: 10_000, .. }), "{err:?}");
    assert!(err.to_string().contains("10000"), "{err}");
}

#[test]
fn output_size_is_bounded() {
    let template = compile("{{ 'a' * 10000 }}").unwrap().with_max_output_bytes(100);
    let err = template.render(&[], &gen_prompt()).unwrap_err();
    assert!(
        matches!(err, ChatError::TemplateOutputTooLarge { limit: 100, .. }),
        "{err:?}"
    );
}

#[test]
fn no_file_access() {
    for source in [
        "{% include '/etc/passwd' %}",
        "{% import 'x.jinja' as x %}",
        "{% extends 'base' %}",
    ] {
        let result = compile(source).and_then(|t| t.render(&[], &gen_prompt()));
        assert!(result.is_err(), "{source}");
    }
    // Including itself recurses into the recursion limit, not forever.
    assert!(compile("{% include 'chat_template' %}")
        .unwrap()
        .render(&[], &gen_prompt())
        .is_err());
}

#[test]
fn extra_variables_do_not_replace_standard_ones() {
    let template = compile("{{ bos_token }}{{ thinking }}{{ tools is none }}").unwrap();
    let mut opts = gen_prompt();
    opts.extra.insert("thinking".into(), serde_json::json!(true));
    opts.extra.insert("bos_token".into(), serde_json::json!("EVIL"));
    assert_eq!(template.render(&[], &opts).unwrap(), "<s>TrueTrue");
}

#[test]
fn renders_from_many_threads() {
    let template = Arc::new(ChatTemplate::from_model_dir(&shared("deepseek-r1")).unwrap().unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let template = Arc::clone(&template);
            std::thread::spawn(move || template.render(&two_turns(), &gen_prompt()).unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), R1_TWO_TURNS);
    }
}

#[test]
fn long_conversations_fit_the_default_fuel() {
    let template = ChatTemplate::from_model_dir(&shared("deepseek-r1")).unwrap().unwrap();
    let messages: Vec<_> = (0..2000)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "some text ".repeat(20)))
        .collect();
    template.render(&messages, &gen_prompt()).unwrap();
}
