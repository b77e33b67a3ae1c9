//! The embedded default model r1-tiny through the binary: `eval` on its held-out problems agrees
//! with the transformers reference, `chat` streams a fenced reasoning section and an answer from
//! piped input, the model is extracted to the cache once and re-extracted when the copy there is
//! damaged, and malformed problem files are reported by line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh directory under cargo's per-target temp folder, removed on drop.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("r1tiny-{tag}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("cannot create a temp dir")
}

/// Runs the binary from the repository root with its cache in `cache`, feeding `stdin`.
fn r1serve(args: &[&str], cache: &Path, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args(args)
        .current_dir(repo_root())
        .env("XDG_CACHE_HOME", cache)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start r1serve");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(args: &[&str], cache: &Path, stdin: &str) -> String {
    let out = r1serve(args, cache, stdin);
    assert!(out.status.success(), "r1serve {args:?}\n{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with a message naming every needle, and no panic.
fn run_err(args: &[&str], cache: &Path, needles: &[&str]) {
    let out = r1serve(args, cache, "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "r1serve {args:?}\n{}",
        describe(&out)
    );
    assert!(!stderr.contains("panicked"), "{}", describe(&out));
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr does not name `{needle}`:\n{}",
            describe(&out)
        );
    }
}

#[test]
fn eval_on_held_out_problems_matches_the_reference() {
    let cache = temp_dir("eval");
    let stdout = run_ok(
        &["eval", "--problems", "models/r1-tiny/held_out.jsonl", "--json"],
        cache.path(),
        "",
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let held_out = std::fs::read_to_string(repo_root().join("models/r1-tiny/held_out.jsonl")).unwrap();
    assert_eq!(
        report["problems"],
        held_out.lines().filter(|l| !l.trim().is_empty()).count()
    );
    for key in ["accuracy", "answer_agreement"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("no {key}: {report}"));
        assert!(value >= 0.95, "{key} {value} < 0.95: {report}");
    }
    assert!(report["token_agreement"].is_number(), "{report}");
    assert!(
        report["per_kind"].as_object().is_some_and(|k| !k.is_empty()),
        "{report}"
    );
}

#[test]
fn eval_reports_a_missed_min_accuracy_and_a_table() {
    let cache = temp_dir("eval-min");
    let args = ["eval", "--problems", "models/r1-tiny/held_out.jsonl", "--limit", "3"];
    let table = run_ok(&args, cache.path(), "");
    assert!(table.contains("accuracy") && table.contains("3 problems"), "{table}");
    run_err(
        &[&args[..], &["--min-accuracy", "1.01"]].concat(),
        cache.path(),
        &["below --min-accuracy 1.01"],
    );
}

#[test]
fn eval_names_the_line_of_a_malformed_problem() {
    let dir = temp_dir("eval-bad");
    let good = r#"{"prompt": "What is 1 + 2?", "answer": 3}"#;
    let cases = [
        (
            r#"{"prompt": "What is 1 + 2?", "answer": "3"}"#,
            "`answer` must be an integer",
        ),
        (r#"{"answer": 3}"#, "missing `prompt`"),
        (
            r#"{"prompt": "x", "answer": 3, "reply_token_ids": [1, "a"]}"#,
            "`reply_token_ids[1]`",
        ),
        ("not json", "not valid JSON"),
    ];
    for (i, (bad, needle)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&file, format!("{good}\n\n{bad}\n")).unwrap();
        let file = file.to_str().unwrap();
        run_err(
            &["eval", "--problems", file],
            dir.path(),
            &[&format!("bad{i}.jsonl:3"), needle],
        );
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    run_err(
        &["eval", "--problems", empty.to_str().unwrap()],
        dir.path(),
        &["no problems"],
    );
    run_err(&["eval", "--problems", "no/such.jsonl"], dir.path(), &["no/such.jsonl"]);
}

#[test]
fn chat_streams_thinking_then_an_answer_from_piped_input() {
    let cache = temp_dir("chat");
    let stdout = run_ok(
        &["chat", "--color", "never"],
        cache.path(),
        "What is 12 + 7?\n/exit\nWhat is 1 + 1?\n",
    );
    assert!(
        stdout.contains("r1-tiny") && stdout.contains("/exit"),
        "no banner: {stdout}"
    );
    let after_banner = stdout.split_once("/exit to quit").unwrap().1;
    let (thinking, answer) = after_banner.split_once("</think>\n").expect("no </think> line");
    assert!(thinking.contains("<think>\n"), "{stdout}");
    assert!(thinking.len() > "<think>\n".len() + 10, "empty thinking: {stdout}");
    let answer_line = answer.lines().next().unwrap_or_default();
    assert!(answer_line.contains(" = "), "no answer line: {stdout}");
    // Stopped at /exit: one reply only.
    assert_eq!(stdout.matches("</think>").count(), 1, "{stdout}");
}

#[test]
fn chat_survives_a_prompt_beyond_the_context() {
    let cache = temp_dir("chat-long");
    let long = " 7".repeat(3000);
    let stdin = format!("{long}\n/clear\nWhat is 2 + 2?\n");
    let out = r1serve(
        &["chat", "--color", "always", "--max-tokens", "200"],
        cache.path(),
        &stdin,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stderr.contains("context"), "no error for the long prompt: {stderr}");
    assert!(
        stdout.contains("\x1b[2m") && stdout.contains("\x1b[0m"),
        "no dimmed thinking: {stdout}"
    );
    assert!(!stderr.contains("panicked"));
}

/// The extracted copy: `<cache>/r1serve/r1-tiny-<hash>`; no other entry may be left there.
fn extracted(cache: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("r1serve"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let name = entries[0].file_name().unwrap().to_str().unwrap();
    let hash = name.strip_prefix("r1-tiny-").unwrap_or_else(|| panic!("{name}"));
    assert!(
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    entries[0].clone()
}

const FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn assert_same_as_source(dir: &Path) {
    for file in FILES {
        let source = std::fs::read(repo_root().join("models/r1-tiny").join(file)).unwrap();
        let copy = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(copy == source, "{file} differs from the embedded one");
    }
}

#[test]
fn default_model_is_extracted_once_and_repaired_when_damaged() {
    let cache = temp_dir("extract");
    let chat = ["chat", "--color", "never"];
    run_ok(&chat, cache.path(), "/exit\n");
    let dir = extracted(cache.path());
    assert_same_as_source(&dir);
    let stamp = |file: &str| std::fs::metadata(dir.join(file)).unwrap().modified().unwrap();
    let before: Vec<_> = FILES.iter().map(|f| stamp(f)).collect();
    run_ok(&chat, cache.path(), "/exit\n");
    assert_eq!(extracted(cache.path()), dir);
    assert_eq!(FILES.iter().map(|f| stamp(f)).collect::<Vec<_>>(), before, "rewritten");

    // A partial directory (only config.json), then a truncated weights file: both re-extracted.
    for file in &FILES[1..] {
        std::fs::remove_file(dir.join(file)).unwrap();
    }
    run_ok(&chat, cache.path(), "/exit\n");
    assert_eq!(extracted(cache.path()), dir);
    assert_same_as_source(&dir);
    let weights = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("model.safetensors"))
        .unwrap();
    weights.set_len(1000).unwrap();
    drop(weights);
    let stdout = run_ok(&chat, cache.path(), "What is 3 + 4?\n");
    assert!(stdout.contains("</think>"), "{stdout}");
    assert_same_as_source(&extracted(cache.path()));
}
