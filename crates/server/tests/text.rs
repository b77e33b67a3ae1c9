//! `load_text`: a GGUF model without HF text files gets its tokenizer and chat template from the
//! file's metadata, and they behave exactly like the HF files the metadata was converted from;
//! HF files next to the model still win.

use std::path::{Path, PathBuf};

use r1serve_chat::{ChatMessage, ChatTemplate, RenderOptions, Tokenizer};
use r1serve_server::{load_text, load_tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh directory holding a copy of `tests/fixtures/gguf/{file}` and nothing else.
fn lone_gguf(file: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::copy(fixtures().join("gguf").join(file), &path).unwrap();
    (dir, path)
}

fn conversations() -> Vec<(Vec<ChatMessage>, RenderOptions)> {
    let generation = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    let mut answer = ChatMessage::new("assistant", "<think>\nAdd them.\n</think>\n\n4");
    answer.reasoning_content = Some("Add them.".into());
    vec![
        (vec![ChatMessage::new("user", "What is 2+2?")], generation.clone()),
        (
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "What is 2+2?"),
                answer,
                ChatMessage::new("user", "And 3+3? 日本語 😀"),
            ],
            generation,
        ),
        (vec![ChatMessage::new("user", "no prompt")], RenderOptions::default()),
    ]
}

/// qwen2-f32.gguf carries an R1-style tokenizer and chat template; its HF files are kept in
/// `tests/fixtures/gguf/qwen2-f32-tokenizer/`. Loaded from the GGUF alone, both must give what the
/// HF files give: the same ids, and the same rendered prompts (with `<think>\n` opened).
#[test]
fn lone_gguf_serves_its_own_tokenizer_and_template() {
    let (dir, path) = lone_gguf("qwen2-f32.gguf");
    let reference = fixtures().join("gguf/qwen2-f32-tokenizer");
    let hf_tokenizer = Tokenizer::from_model_dir(&reference).unwrap().unwrap();
    let hf_template = ChatTemplate::for_model(&reference, Some(&hf_tokenizer)).unwrap();

    for model in [path.as_path(), dir.path()] {
        let (tokenizer, template) = load_text(model).unwrap();
        let tokenizer = tokenizer.expect("the GGUF has a tokenizer");
        assert!(
            template.name().contains("tokenizer.chat_template"),
            "{}",
            template.name()
        );
        assert!(template.is_reasoning());
        assert_eq!(template.bos_token(), hf_template.bos_token());
        assert_eq!(template.eos_token(), hf_template.eos_token());
        for (messages, opts) in conversations() {
            let prompt = template.render(&messages, &opts).unwrap();
            assert_eq!(prompt, hf_template.render(&messages, &opts).unwrap());
            assert_eq!(
                tokenizer.encode(&prompt, false).unwrap(),
                hf_tokenizer.encode(&prompt, false).unwrap(),
                "{prompt:?}"
            );
        }
        assert_eq!(tokenizer.think_tokens(), hf_tokenizer.think_tokens());
        let ids = tokenizer.encode("Hi", true).unwrap();
        assert_eq!(ids[0], 284, "BOS prepended, as add_bos_token says");
    }
}

/// No chat template in the metadata: the built-in one, without the reasoning opener (the vocabulary
/// has no `<think>`).
#[test]
fn gguf_without_a_template_gets_the_builtin_one() {
    let (_dir, path) = lone_gguf("llama-f32.gguf");
    let (tokenizer, template) = load_text(&path).unwrap();
    let tokenizer = tokenizer.unwrap();
    let hf = Tokenizer::from_model_dir(&fixtures().join("llama-f32"))
        .unwrap()
        .unwrap();
    let text = "The model reads tokens, not letters.";
    assert_eq!(tokenizer.encode(text, true).unwrap(), hf.encode(text, true).unwrap());
    assert_eq!(template.name(), "builtin-r1");
    assert!(!template.is_reasoning());
}

/// HF files beside the GGUF override its metadata, file by file.
#[test]
fn files_beside_the_gguf_win() {
    let (dir, path) = lone_gguf("qwen2-f32.gguf");
    std::fs::copy(
        fixtures().join("llama-f32/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tokenizer = load_tokenizer(&path).unwrap().unwrap();
    assert_eq!(
        tokenizer.vocab_size(),
        320,
        "llama-f32's tokenizer.json, not the GGUF's 288"
    );
    let (_, template) = load_text(&path).unwrap();
    assert!(
        template.name().contains("tokenizer.chat_template"),
        "template still from the GGUF"
    );

    let config = r#"{"chat_template": "[{{ messages[0].content }}]", "bos_token": "<s>", "eos_token": "</s>"}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
    let (_, template) = load_text(&path).unwrap();
    let prompt = template
        .render(&[ChatMessage::new("user", "x")], &RenderOptions::default())
        .unwrap();
    assert_eq!(prompt, "[x]");
}

/// A safetensors model directory keeps working as before; a directory with nothing gives no
/// tokenizer and the built-in template.
#[test]
fn directories_without_gguf() {
    let (tokenizer, _) = load_text(&fixtures().join("llama-f32")).unwrap();
    assert_eq!(tokenizer.unwrap().vocab_size(), 320);
    let empty = tempfile::tempdir().unwrap();
    let (tokenizer, template) = load_text(empty.path()).unwrap();
    assert!(tokenizer.is_none());
    assert_eq!(template.name(), "builtin-r1");
}

/// A GGUF whose tokenizer metadata is unusable is an error naming the file, not a silent fallback.
#[test]
fn bad_tokenizer_metadata_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let mut bytes = std::fs::read(fixtures().join("gguf/qwen2-f32.gguf")).unwrap();
    let needle = b"deepseek-r1-qwen";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at..at + needle.len()].copy_from_slice(b"deepseek-r9-qwen");
    std::fs::write(&path, bytes).unwrap();
    let e = load_text(&path).unwrap_err().to_string();
    assert!(e.contains("bad.gguf") && e.contains("deepseek-r9-qwen"), "{e}");
}
