//! Every error path answers in OpenAI's shape with the right status: 401, 404, 400s, 413, 429,
//! and the refused request chat template. None of them disturbs the server.

mod common;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

fn assert_error(reply: &Reply, status: u16, needles: &[&str]) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    let error = &body["error"];
    let message = error["message"].as_str().unwrap();
    for needle in needles {
        assert!(message.contains(needle), "{message:?} should mention {needle:?}");
    }
    assert!(error["type"].is_string() && error.get("param").is_some() && error.get("code").is_some());
    error.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_v1_only() {
    let mut options = Options::default();
    options.config.api_key = Some("sk-test-123".into());
    let server = start(&fixture("llama-f32"), options).await;
    let addr = server.local_addr();
    let body = chat_body("hi", 2).to_string().into_bytes();
    let missing = call(addr, Method::POST, "/v1/chat/completions", body.clone(), &[]).await;
    let e = assert_error(&missing, 401, &["missing API key"]);
    assert_eq!(e["type"], "authentication_error");
    let wrong = call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        body.clone(),
        &[("authorization", "Bearer sk-test-12")],
    )
    .await;
    assert_error(&wrong, 401, &["invalid API key"]);
    let models = call(
        addr,
        Method::GET,
        "/v1/models",
        Vec::new(),
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(models.status, 401);
    let ok = call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        body,
        &[("authorization", "Bearer sk-test-123")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(get(addr, "/health").await.status, 200);
    assert_eq!(get(addr, "/metrics").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_naming_the_problem() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let chat = "/v1/chat/completions";
    let raw = |body: &str| call(addr, Method::POST, chat, body.as_bytes().to_vec(), &[]);
    assert_error(&raw("{\"model\": ").await, 400, &["malformed JSON"]);
    assert_error(&raw("[1, 2]").await, 400, &["invalid"]);
    let e = assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}"#).await,
        400,
        &["max_tokens"],
    );
    assert_eq!(e["param"], "max_tokens");
    assert_error(&raw(r#"{"messages": "hello"}"#).await, 400, &["messages"]);
    assert_error(&raw(r#"{"max_tokens": 3}"#).await, 400, &["messages"]);

    let with = |field: &str, value: Value| {
        let mut body = chat_body("hi", 4);
        body[field] = value;
        body
    };
    for (field, value, needle) in [
        ("n", json!(0), "n must be in 1..=128, got 0"),
        ("n", json!(129), "got 129"),
        ("top_logprobs", json!(21), "top_logprobs must be in 0..=20"),
        ("top_logprobs", json!(2), "logprobs: true"),
        ("temperature", json!(-1), "temperature"),
        ("top_p", json!(0), "top_p"),
        ("top_k", json!(-5), "top_k"),
        ("max_tokens", json!(0), "max_tokens"),
        ("max_tokens", json!(-3), "max_tokens"),
        ("messages", json!([]), "messages"),
        ("thinking_budget", json!(-7), "thinking_budget"),
        (
            "chat_template",
            json!("{{ messages }}"),
            "--trust-request-chat-template",
        ),
    ] {
        assert_error(&post(addr, chat, &with(field, value)).await, 400, &[needle]);
    }
    let e = assert_error(
        &post(addr, chat, &with("max_tokens", json!(10_000))).await,
        400,
        &["10000", "512"],
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let bad_role = json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
    assert_error(&post(addr, chat, &bad_role).await, 400, &["image_url"]);

    let completions = "/v1/completions";
    for (body, needle) in [
        (json!({"prompt": "x", "logprobs": 21}), "logprobs must be in 0..=20"),
        (json!({"prompt": "x", "logprobs": -1}), "logprobs"),
        (json!({"prompt": [1, 2, 999_999]}), "999999"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [[]]}), "prompt"),
        (json!({"prompt": "x", "max_tokens": 0}), "echo"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "x", "max_tokens": 600}), "600"),
    ] {
        assert_error(&post(addr, completions, &body).await, 400, &[needle]);
    }
    // Still serving.
    assert_eq!(post(addr, chat, &chat_body("hi", 2)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_and_route_are_404() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let mut body = chat_body("hi", 2);
    body["model"] = json!("gpt-17");
    let e = assert_error(&post(addr, "/v1/chat/completions", &body).await, 404, &["gpt-17"]);
    assert_eq!(e["code"], "model_not_found");
    let e = assert_error(
        &post(addr, "/v1/completions", &json!({"model": "x", "prompt": "a"})).await,
        404,
        &["x"],
    );
    assert_eq!(e["param"], "model");
    assert_error(&get(addr, "/v1/nothing").await, 404, &["/v1/nothing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_2_mb_are_413() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let big = "a".repeat(2 * 1024 * 1024 + 1);
    let body = json!({"model": MODEL, "prompt": big}).to_string().into_bytes();
    let reply = call(addr, Method::POST, "/v1/completions", body, &[]).await;
    assert_error(&reply, 413, &["2097152"]);
    assert_eq!(get(addr, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_with_retry_after() {
    let mut options = Options::default();
    options.engine.max_num_seqs = 1;
    options.config.max_waiting = 0;
    let server = start(&fixture("llama-f32"), options).await;
    let addr = server.local_addr();
    let mut long = chat_body("Tell me everything", 400);
    long["ignore_eos"] = json!(true);
    long["stream"] = json!(true);
    let mut stream = open_stream(addr, "/v1/chat/completions", &long).await;
    assert_eq!(stream.status, 200);
    assert!(stream.next_event().await.is_some());
    let reply = post(addr, "/v1/chat/completions", &chat_body("me too", 2)).await;
    let e = assert_error(&reply, 429, &["retry later"]);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(reply.headers["retry-after"], "1");
    // n larger than the server ever takes is the request's fault.
    let mut many = chat_body("hi", 2);
    many["n"] = json!(2);
    assert_error(
        &post(addr, "/v1/chat/completions", &many).await,
        400,
        &["more than this server runs at once"],
    );
    drop(stream);
    // Once the first request is gone, the slot is free again.
    let mut status = 0;
    for _ in 0..200 {
        status = post(addr, "/v1/chat/completions", &chat_body("me too", 2))
            .await
            .status
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_request_template_is_used() {
    let mut options = Options::default();
    options.config.trust_request_chat_template = true;
    let server = start(&fixture("llama-f32"), options).await;
    let addr = server.local_addr();
    let mut body = chat_body("hi", 2);
    body["chat_template"] = json!("{% for m in messages %}{{ m.content }}{{ suffix }}{% endfor %}");
    body["chat_template_kwargs"] = json!({"suffix": "!!"});
    let reply = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let prompt_tokens = reply.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    // "hi!!" in byte-level tokens: far shorter than the built-in template's prompt.
    assert!(prompt_tokens <= 4, "{prompt_tokens}");
    body["chat_template"] = json!("{% for %}");
    assert_error(&post(addr, "/v1/chat/completions", &body).await, 400, &["syntax error"]);
    body["chat_template"] = json!("{{ raise_exception('no thanks') }}");
    assert_error(&post(addr, "/v1/chat/completions", &body).await, 400, &["no thanks"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
    let boom = || async {
        if true {
            panic!("kaboom");
        }
        "unreachable"
    };
    let app = axum::Router::new()
        .route("/boom", axum::routing::get(boom))
        .route("/fine", axum::routing::get(|| async { "fine" }))
        .layer(axum::middleware::from_fn(r1serve_server::routes::catch_panic));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let e = assert_error(&get(addr, "/boom").await, 500, &["panicked"]);
    assert_eq!(e["type"], "server_error");
    assert_eq!(get(addr, "/fine").await.text(), "fine");
    task.abort();
}
