//! Many clients at once, and clients that go away: 16 concurrent streams each get exactly their
//! greedy tokens alone; a dropped stream frees its KV blocks; shutdown drains or aborts.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Token ids of a streamed completion (`return_tokens_as_token_ids` with `logprobs: 0`).
async fn streamed_ids(addr: std::net::SocketAddr, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "logprobs": 0, "return_tokens_as_token_ids": true});
    let mut stream = open_stream(addr, "/v1/completions", &body).await;
    assert_eq!(stream.status, 200);
    let mut ids = Vec::new();
    while let Some(event) = stream.next_event().await {
        if event == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&event).unwrap();
        for t in v["choices"][0]["logprobs"]["tokens"].as_array().into_iter().flatten() {
            ids.push(t.as_str().unwrap()["token_id:".len()..].parse().unwrap());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_match_each_alone() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let prompts: Vec<(Vec<u32>, usize)> = (0..16u32)
        .map(|i| {
            let len = 1 + (i as usize * 7) % 30;
            let prompt = (0..len as u32).map(|j| 2 + (i * 31 + j * 17) % 300).collect();
            (prompt, 8 + (i as usize * 5) % 17)
        })
        .collect();
    let mut alone = Vec::new();
    for (prompt, max) in &prompts {
        alone.push(streamed_ids(addr, prompt, *max).await);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|(prompt, max)| tokio::spawn(async move { streamed_ids(addr, &prompt, max).await }))
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let together = task.await.unwrap();
        assert_eq!(together.len(), prompts[i].1);
        assert_eq!(together, alone[i], "stream {i}");
    }
    assert_eq!(wait_for_metric(addr, "vllm:kv_cache_usage_perc{", 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_blocks() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let mut body = chat_body("Write a very long story", 400);
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    let mut stream = open_stream(addr, "/v1/chat/completions", &body).await;
    assert_eq!(stream.status, 200);
    for _ in 0..3 {
        assert!(stream.next_event().await.is_some());
    }
    let mut usage = 0.0;
    for _ in 0..400 {
        usage = metric(&get(addr, "/metrics").await.text(), "vllm:kv_cache_usage_perc{");
        if usage > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(usage > 0.0, "the running request holds blocks");
    drop(stream);
    assert_eq!(wait_for_metric(addr, "vllm:kv_cache_usage_perc{", 0.0).await, 0.0);
    assert_eq!(wait_for_metric(addr, "vllm:num_requests_running{", 0.0).await, 0.0);
    let aborted = "vllm:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"}";
    assert_eq!(metric(&get(addr, "/metrics").await.text(), aborted), 1.0);
    assert_eq!(server.in_flight(), 0);
}

/// Reads a stream to its end: (finish reason, whether `[DONE]` came).
async fn finish_of(stream: &mut Streaming) -> (Value, bool) {
    let (mut finish, mut done) = (Value::Null, false);
    while let Some(e) = stream.next_event().await {
        done |= e == "[DONE]";
        if let Ok(v) = serde_json::from_str::<Value>(&e) {
            if !v["choices"][0]["finish_reason"].is_null() {
                finish = v["choices"][0]["finish_reason"].clone();
            }
        }
    }
    (finish, done)
}

async fn long_stream(addr: std::net::SocketAddr) -> Streaming {
    let body = json!({"model": MODEL, "prompt": [0, 5], "max_tokens": 500, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut stream = open_stream(addr, "/v1/completions", &body).await;
    assert_eq!(stream.status, 200);
    assert!(stream.next_event().await.is_some());
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_requests() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let mut stream = long_stream(addr).await;
    let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(30)));
    assert_eq!(finish_of(&mut stream).await, (json!("length"), true));
    tokio::time::timeout(TIMEOUT, shutdown).await.unwrap().unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_what_outlasts_the_drain_period() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let mut stream = long_stream(addr).await;
    let shutdown = tokio::spawn(server.shutdown(Duration::ZERO));
    assert_eq!(finish_of(&mut stream).await, (json!("abort"), true));
    tokio::time::timeout(TIMEOUT, shutdown).await.unwrap().unwrap().unwrap();
}
