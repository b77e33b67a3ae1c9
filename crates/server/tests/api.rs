//! The endpoints end to end over loopback HTTP against the tiny `llama-f32` fixture: chat
//! (streamed and not), completions in every prompt form, echo and log-probabilities, stop
//! strings, n > 1, /health, /v1/models, /metrics.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_then_200() {
    let server = r1serve_server::Server::bind(Options::default().config).await.unwrap();
    let addr = server.local_addr();
    let reply = get(addr, "/health").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["type"], "service_unavailable_error");
    assert_eq!(
        post(addr, "/v1/chat/completions", &chat_body("hi", 2)).await.status,
        503
    );
    let ctx = tokio::task::spawn_blocking(|| load(&fixture("llama-f32"), Options::default().engine))
        .await
        .unwrap();
    server.set_ready(ctx).unwrap();
    assert_eq!(get(addr, "/health").await.status, 200);
    let models = get(addr, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 512);
    server.shutdown(std::time::Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streamed_and_not_give_the_same_reply() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let whole = post(addr, "/v1/chat/completions", &chat_body("Hello there", 12)).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], MODEL);
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert!(
        message.get("reasoning_content").is_none(),
        "no reasoning without <think> tokens"
    );
    let usage = &whole["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 12
    );
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    let mut body = chat_body("Hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let streamed = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(streamed.status, 200);
    assert!(streamed.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = streamed.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(join_deltas(&events, "content"), message["content"].as_str().unwrap());
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 12);
    let finish: Value = serde_json::from_str(&events[events.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_and_token_ids() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let mut body = chat_body("Hi", 5);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    body["return_tokens_as_token_ids"] = json!(true);
    let reply = post(server.local_addr(), "/v1/chat/completions", &body).await.json();
    let content = reply["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for entry in content {
        assert!(entry["token"].as_str().unwrap().starts_with("token_id:"));
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the best one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_accept_every_prompt_form() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let ask = |prompt: Value| json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let one = post(addr, "/v1/completions", &ask(json!("The quick"))).await.json();
    assert_eq!(one["object"], "text_completion");
    assert_eq!(one["choices"].as_array().unwrap().len(), 1);
    assert_eq!(one["usage"]["completion_tokens"], 4);
    let texts = post(addr, "/v1/completions", &ask(json!(["The quick", "A"])))
        .await
        .json();
    assert_eq!(texts["choices"].as_array().unwrap().len(), 2);
    assert_eq!(texts["choices"][0]["text"], one["choices"][0]["text"]);
    assert_eq!(texts["choices"][1]["index"], 1);
    let ids = post(addr, "/v1/completions", &ask(json!([0, 300, 40, 50])))
        .await
        .json();
    assert_eq!(ids["usage"]["prompt_tokens"], 4);
    let lists = post(addr, "/v1/completions", &ask(json!([[0, 300, 40, 50], [0, 7]])))
        .await
        .json();
    assert_eq!(lists["choices"].as_array().unwrap().len(), 2);
    assert_eq!(lists["choices"][0]["text"], ids["choices"][0]["text"]);
    assert_eq!(lists["usage"]["prompt_tokens"], 6);
    assert_eq!(lists["usage"]["completion_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_max_tokens_zero_scores_the_prompt() {
    // The lm-eval-harness loglikelihood request.
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let prompt = [0u32, 300, 40, 50, 61];
    let body = json!({"model": MODEL, "prompt": [prompt], "max_tokens": 0, "echo": true, "logprobs": 1,
        "temperature": 0, "return_tokens_as_token_ids": true});
    let reply = post(server.local_addr(), "/v1/completions", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    let lp = &reply["choices"][0]["logprobs"];
    let tokens: Vec<String> = prompt.iter().map(|id| format!("token_id:{id}")).collect();
    assert_eq!(lp["tokens"], json!(tokens));
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for i in 1..prompt.len() {
        let own = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(own < 0.0);
        // The chosen token is always among the alternatives, with its own log-probability.
        assert_eq!(lp["top_logprobs"][i][&tokens[i]].as_f64().unwrap(), own);
    }
    assert_eq!(reply["usage"]["completion_tokens"], 0);
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    // Streamed: the echo comes with the prompt's scores.
    let mut body = body;
    body["stream"] = json!(true);
    let events = post(server.local_addr(), "/v1/completions", &body).await.events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["logprobs"]["tokens"], json!(tokens));
}

/// A stop string cut from the middle of the greedy reply ends it there, streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_content() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let body = json!({"model": MODEL, "prompt": "The quick", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let full = post(addr, "/v1/completions", &body).await.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "{full:?}");
    let stop: String = chars[5..7].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = body.clone();
        body["stop"] = json!(["never-there", stop]);
        body["stream"] = json!(stream);
        let reply = post(addr, "/v1/completions", &body).await;
        let (text, finish) = if stream {
            let events = reply.events();
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
            (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = reply.json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_owned(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, expected, "stream={stream}");
        assert_eq!(finish, "stop");
    }
    let mut body = body.clone();
    body["stop"] = json!(stop);
    body["include_stop_str_in_output"] = json!(true);
    let reply = post(addr, "/v1/completions", &body).await.json();
    assert_eq!(
        reply["choices"][0]["text"].as_str().unwrap(),
        format!("{expected}{stop}")
    );
    // The engine finished the sequence: nothing keeps running.
    assert_eq!(wait_for_metric(addr, "vllm:num_requests_running{", 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_runs_that_many_sequences() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    let mut body = chat_body("Count", 6);
    body["n"] = json!(3);
    let reply = post(addr, "/v1/chat/completions", &body).await.json();
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["message"]["content"], choices[0]["message"]["content"],
            "greedy choices agree"
        );
    }
    assert_eq!(reply["usage"]["completion_tokens"], 18);
    // Sampled with a seed: reproducible, and each choice draws its own stream.
    let sampled = json!({"model": MODEL, "prompt": "The", "max_tokens": 12, "temperature": 1.0, "seed": 7,
        "n": 2, "ignore_eos": true, "stream": true});
    let run = || async {
        let events = post(addr, "/v1/completions", &sampled).await.events();
        let mut texts = [String::new(), String::new()];
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            let i = v["choices"][0]["index"].as_u64().unwrap() as usize;
            texts[i].push_str(v["choices"][0]["text"].as_str().unwrap());
        }
        texts
    };
    let a = run().await;
    assert_eq!(a, run().await);
    assert_ne!(a[0], a[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_vllm_names() {
    let server = start(&fixture("llama-f32"), Options::default()).await;
    let addr = server.local_addr();
    post(addr, "/v1/chat/completions", &chat_body("Hello", 4)).await;
    post(addr, "/v1/chat/completions", &chat_body("Hello", 4)).await;
    // The engine publishes its counters after each step: wait for the one that finished both.
    assert_eq!(wait_for_metric(addr, "vllm:num_requests_running{", 0.0).await, 0.0);
    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    let m = |name: &str| metric(&text, &format!("{name}{{model_name=\"{MODEL}\""));
    assert_eq!(m("vllm:num_requests_running"), 0.0);
    assert_eq!(m("vllm:num_requests_waiting"), 0.0);
    assert_eq!(m("vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(m("vllm:generation_tokens_total"), 8.0);
    assert!(m("vllm:prompt_tokens_total") > 0.0);
    assert!(
        m("vllm:prefix_cache_hits_total") > 0.0,
        "the second identical prompt hits the cache"
    );
    assert!(m("vllm:prefix_cache_queries_total") >= m("vllm:prefix_cache_hits_total"));
    assert_eq!(m("vllm:time_to_first_token_seconds_count"), 2.0);
    assert_eq!(m("vllm:inter_token_latency_seconds_count"), 6.0);
    assert_eq!(m("vllm:time_per_output_token_seconds_count"), 6.0);
    assert_eq!(
        metric(
            &text,
            &format!("vllm:request_success_total{{model_name=\"{MODEL}\",finished_reason=\"length\"}}")
        ),
        2.0
    );
    assert!(text.contains("# TYPE vllm:time_to_first_token_seconds histogram"));
}
