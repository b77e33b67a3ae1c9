//! `r1serve serve` as a user runs it: the binary on a free loopback port (`--port 0`, address
//! read from its log), completions equal to `r1serve generate --format json` on the same prompt
//! ids (greedy: tokens, log-probabilities, prompt log-probabilities), and SIGTERM → exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A server process, killed if the test fails before shutting it down.
struct ServeProcess {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(extra: &[&str]) -> ServeProcess {
    let args = ["--model", "tests/fixtures/llama-f32", "--served-model-name", "tiny"];
    spawn_serve(&[&args[..], extra].concat(), None)
}

/// `r1serve serve --port 0 ARGS`, with `XDG_CACHE_HOME` set to `cache` if given.
fn spawn_serve(args: &[&str], cache: Option<&Path>) -> ServeProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_r1serve"));
    if let Some(cache) = cache {
        command.env("XDG_CACHE_HOME", cache);
    }
    let mut child = command
        .args(["serve", "--port", "0", "--kv-cache-mib", "8"])
        .args(args)
        .current_dir(repo_root())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start r1serve serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log.recv_timeout(left).expect("the server never said where it listens");
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on http://".len()..];
            break rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                .collect::<String>();
        }
    };
    ServeProcess { child, addr, log }
}

/// One HTTP/1.1 exchange (`Connection: close`); returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("no header end");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(rest) } else { rest.to_owned() })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

fn wait_healthy(addr: &str) {
    for _ in 0..600 {
        if http(addr, "GET", "/health", None).0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server never became healthy");
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

fn assert_close(a: Option<f64>, b: Option<f64>, what: &str) {
    match (a, b) {
        (None, None) => {}
        (Some(a), Some(b)) => assert!((a - b).abs() < 1e-4, "{what}: {a} vs {b}"),
        _ => panic!("{what}: {a:?} vs {b:?}"),
    }
}

#[test]
fn completions_match_generate_and_sigterm_exits_zero() {
    let server = spawn_server(&[]);
    wait_healthy(&server.addr);
    let prompt = [0u32, 300, 40, 50, 61, 7];
    let max_tokens = 10;
    let request = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "echo": true, "logprobs": 3, "return_tokens_as_token_ids": true});
    let (status, body) = http(&server.addr, "POST", "/v1/completions", Some(&request));
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    let lp = &reply["choices"][0]["logprobs"];

    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let generated = Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args([
            "generate",
            "--format",
            "json",
            "--model",
            "tests/fixtures/llama-f32",
            "--echo",
            "--ignore-eos",
        ])
        .args([
            "--top-logprobs",
            "3",
            "--max-tokens",
            &max_tokens.to_string(),
            "--prompt-ids",
            &ids.join(","),
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(generated.status.success());
    let reference: Value = serde_json::from_slice(&generated.stdout).unwrap();

    let tokens: Vec<u32> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap()["token_id:".len()..].parse().unwrap())
        .collect();
    let (echoed, completion) = tokens.split_at(prompt.len());
    assert_eq!(echoed, prompt);
    let reference_tokens: Vec<u32> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    assert_eq!(completion, reference_tokens);
    let ours = floats(&lp["token_logprobs"]);
    for (i, want) in floats(&reference["prompt_logprobs"]).into_iter().enumerate() {
        assert_close(ours[i], want, &format!("prompt token {i}"));
    }
    for (i, want) in floats(&reference["logprobs"]).into_iter().enumerate() {
        assert_close(ours[prompt.len() + i], want, &format!("token {i}"));
        // The best alternative agrees too.
        let best = &reference["top_logprobs"][i][0];
        let key = format!("token_id:{}", best[0]);
        assert_close(
            lp["top_logprobs"][prompt.len() + i][&key].as_f64(),
            best[1].as_f64(),
            "top-1",
        );
    }
    assert_eq!(reply["usage"]["completion_tokens"], max_tokens);

    // One log line per request, with its numbers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_request_line = false;
    while let Ok(line) = server
        .log
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if line.contains("request") && line.contains("completion_tokens=10") && line.contains("ttft_ms") {
            saw_request_line = true;
            break;
        }
    }
    assert!(saw_request_line, "no per-request log line");

    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_missing_model_exits_non_zero_after_listening() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args(["serve", "--model", "tests/fixtures/no-such-model", "--port", "0"])
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such-model") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn without_a_model_it_serves_the_embedded_r1_tiny() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-default-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let server = spawn_serve(&[], Some(&cache));
    wait_healthy(&server.addr);
    let (status, body) = http(&server.addr, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "r1-tiny", "{body}");
    let request = json!({"model": "r1-tiny", "messages": [{"role": "user", "content": "What is 12 + 7?"}],
        "max_tokens": 300});
    let (status, body) = http(&server.addr, "POST", "/v1/chat/completions", Some(&request));
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    let message = &reply["choices"][0]["message"];
    assert!(
        message["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert!(message["content"].as_str().is_some_and(|c| c.contains('=')), "{body}");
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
}
