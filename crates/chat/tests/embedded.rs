//! Text that comes from somewhere other than the model directory's HF files (a GGUF file's
//! metadata): a tokenizer from a `tokenizer.json` value, and a template source that the directory's
//! own template overrides and that overrides the built-in one.

use r1serve_chat::template::TemplateSource;
use r1serve_chat::{ChatError, ChatMessage, ChatTemplate, RenderOptions, Tokenizer};
use serde_json::json;

fn tiny_tokenizer() -> serde_json::Value {
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 3, "content": "<think>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": true, "special": false},
                         {"id": 4, "content": "</think>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": true, "special": false}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": {"a": 0, "b": 1, "ab": 2, "<think>": 3, "</think>": 4}, "merges": [["a", "b"]]}
    })
}

fn embedded(source: &str) -> TemplateSource {
    TemplateSource {
        source: source.into(),
        name: "m.gguf (tokenizer.chat_template)".into(),
        bos_token: "<B>".into(),
        eos_token: "<E>".into(),
    }
}

fn render(template: &ChatTemplate) -> String {
    let opts = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    template.render(&[ChatMessage::new("user", "hi")], &opts).unwrap()
}

#[test]
fn tokenizer_from_a_json_value() {
    let tokenizer = Tokenizer::from_json(&tiny_tokenizer(), "m.gguf (tokenizer.ggml.*)").unwrap();
    assert_eq!(tokenizer.encode("ab<think>a", false).unwrap(), [2, 3, 0]);
    assert_eq!(tokenizer.decode(&[2, 3, 0], false).unwrap(), "ab<think>a");
    assert!(tokenizer.is_reasoning_model());

    let mut broken = tiny_tokenizer();
    broken["model"]["merges"] = json!([["a", "z"]]);
    let e = Tokenizer::from_json(&broken, "m.gguf (tokenizer.ggml.*)").unwrap_err();
    assert!(matches!(e, ChatError::Load { .. }), "{e}");
    assert!(e.to_string().contains("m.gguf (tokenizer.ggml.*)"), "{e}");
}

#[test]
fn embedded_template_fills_in_for_a_directory_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::from_json(&tiny_tokenizer(), "m.gguf").unwrap();
    let source = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}\
                  {% if add_generation_prompt %}<｜Assistant｜>{% endif %}";
    let template = ChatTemplate::for_model_with(dir.path(), Some(embedded(source)), Some(&tokenizer)).unwrap();
    assert_eq!(template.name(), "m.gguf (tokenizer.chat_template)");
    assert_eq!((template.bos_token(), template.eos_token()), ("<B>", "<E>"));
    // A reasoning vocabulary: the generation prompt opens the thinking segment.
    assert_eq!(render(&template), "<B>[hi]<｜Assistant｜><think>\n");
    // The same source through `from_source` renders the same (one code path).
    let direct = ChatTemplate::from_source(embedded(source))
        .unwrap()
        .with_reasoning(true);
    assert_eq!(render(&direct), render(&template));

    // Nothing embedded: the built-in template.
    let builtin = ChatTemplate::for_model_with(dir.path(), None, None).unwrap();
    assert_eq!(builtin.name(), "builtin-r1");

    // The directory's own template wins over the embedded one.
    let config = json!({"chat_template": "DIR{{ bos_token }}", "bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let own = ChatTemplate::for_model_with(dir.path(), Some(embedded(source)), None).unwrap();
    assert_eq!(render(&own), "DIR<s>");
}

#[test]
fn embedded_template_errors_name_their_origin() {
    let dir = tempfile::tempdir().unwrap();
    let e = ChatTemplate::for_model_with(dir.path(), Some(embedded("{% if %}")), None).unwrap_err();
    assert!(matches!(e, ChatError::TemplateSyntax { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer.chat_template"), "{e}");
}
