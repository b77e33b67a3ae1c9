//! Shared by the server's integration tests: tiny fixture models, an in-process server on a free
//! loopback port, and a small HTTP/1.1 client (plain and SSE) with bounded waits.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use r1serve_chat::{ChatTemplate, Tokenizer};
use r1serve_engine::{Engine, EngineConfig, KvCacheSize};
use r1serve_server::{ModelContext, Server, ServerConfig};
use serde_json::{json, Value};

pub const MODEL: &str = "tiny";
/// Any single wait in a test.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Tokens given the reasoning markers, and the template rendering the R1 layout.
pub const THINK_TOKENS: [(&str, usize); 4] = [
    ("<think>", 316),
    ("</think>", 317),
    ("<｜User｜>", 318),
    ("<｜Assistant｜>", 319),
];
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}\
{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

/// A copy of the `llama-f32` fixture whose tokenizer has `<think>`, `</think>`, `<｜User｜>` and
/// `<｜Assistant｜>` as single tokens (ids 316–319, taken over from merged BPE tokens so they stay
/// inside the model's 320-token vocabulary) and a `tokenizer_config.json` with an R1-style chat
/// template: a reasoning model, so the prompt ends with `<think>\n`.
pub fn reasoning_model() -> tempfile::TempDir {
    let src = fixture("llama-f32");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "tokenizer.json" && name != "golden.json" {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let mut tok: Value = serde_json::from_slice(&std::fs::read(src.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let mut replaced = Vec::new();
    for (content, id) in THINK_TOKENS {
        let old = vocab
            .iter()
            .find(|(_, v)| v.as_u64() == Some(id as u64))
            .map(|(k, _)| k.clone())
            .unwrap();
        vocab.remove(&old);
        vocab.insert(content.to_owned(), json!(id));
        replaced.push(old);
    }
    // Merges that build or use a replaced token would point outside the vocabulary.
    let merges = tok["model"]["merges"].as_array_mut().unwrap();
    merges.retain(|m| {
        let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
        let joined = format!("{a}{b}");
        !replaced.iter().any(|r| r == a || r == b || *r == joined)
    });
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for (content, id) in THINK_TOKENS {
        added.push(json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false
        }));
    }
    std::fs::write(dir.path().join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

pub struct Options {
    pub config: ServerConfig,
    pub engine: EngineConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: ServerConfig {
                addr: "127.0.0.1:0".into(),
                served_model_name: MODEL.into(),
                ..ServerConfig::default()
            },
            engine: EngineConfig {
                kv_cache: KvCacheSize::Blocks(256),
                max_num_seqs: 32,
                ..EngineConfig::default()
            },
        }
    }
}

/// Loads the model in `dir` the way `r1serve serve` does.
pub fn load(dir: &Path, engine: EngineConfig) -> ModelContext {
    let model_dir = r1serve_model::ModelDir::open(dir).unwrap();
    let model = r1serve_model::load_model_with(
        &model_dir,
        &r1serve_model::LoadOptions::default(),
        Arc::new(r1serve_kernels::CpuBackend::default()),
    )
    .unwrap();
    let tokenizer = Tokenizer::from_model_dir(dir).unwrap().unwrap();
    let template = ChatTemplate::for_model(dir, Some(&tokenizer)).unwrap();
    let max_num_seqs = engine.max_num_seqs;
    let engine = Engine::start(Arc::from(model), engine).unwrap();
    ModelContext::new(engine, tokenizer, template, max_num_seqs).unwrap()
}

/// A ready server on a free loopback port.
pub async fn start(dir: &Path, options: Options) -> Server {
    let server = Server::bind(options.config).await.unwrap();
    let dir = dir.to_owned();
    let ctx = tokio::task::spawn_blocking(move || load(&dir, options.engine))
        .await
        .unwrap();
    server.set_ready(ctx).unwrap();
    server
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body.
    pub fn events(&self) -> Vec<String> {
        sse_payloads(&self.text())
    }
}

pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        })
        .map(str::to_owned)
        .collect()
}

/// A response whose body is read as it arrives.
pub struct Streaming {
    pub status: StatusCode,
    body: hyper::body::Incoming,
    buf: String,
}

impl Streaming {
    /// The next SSE `data:` payload; `None` at the end of the body.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(p) = sse_payloads(&block).into_iter().next() {
                    return Some(p);
                }
                continue;
            }
            let frame = tokio::time::timeout(TIMEOUT, self.body.frame())
                .await
                .expect("stream stalled")?;
            if let Ok(data) = frame.unwrap().into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}

async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tokio::time::timeout(TIMEOUT, sender.send_request(request))
        .await
        .expect("no response")
        .unwrap()
}

pub fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

pub async fn call(addr: SocketAddr, method: Method, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
    let response = send(addr, request(method, addr, path, body, headers)).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .expect("body stalled")
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply { status, headers, body }
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(addr, Method::POST, path, body.to_string().into_bytes(), &[]).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, Method::GET, path, Vec::new(), &[]).await
}

pub async fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> Streaming {
    let response = send(
        addr,
        request(Method::POST, addr, path, body.to_string().into_bytes(), &[]),
    )
    .await;
    Streaming {
        status: response.status(),
        body: response.into_body(),
        buf: String::new(),
    }
}

/// A metric's value (the first sample whose name and labels start with `prefix`).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{text}"))
}

/// The greedy chat request most tests use.
pub fn chat_body(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// Concatenated `delta.<field>` over chat chunks, and the finish reason.
pub fn join_deltas(events: &[String], field: &str) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"][field].as_str().map(str::to_owned))
        .collect()
}

/// Polls /metrics until `name` reads `want` (the engine publishes its stats after each step);
/// returns the last value read.
pub async fn wait_for_metric(addr: std::net::SocketAddr, name: &str, want: f64) -> f64 {
    let mut value = f64::NAN;
    for _ in 0..400 {
        value = metric(&get(addr, "/metrics").await.text(), name);
        if value == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    value
}
