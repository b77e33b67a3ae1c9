//! Reasoning: `reasoning_content` beside `content`, streamed reasoning before content, replies
//! cut off inside thinking, and the thinking budget forcing `</think>` at exactly its limit.
//! The random fixture model is made deterministic by the prompt's forced `<think>\n` and the
//! budget's forced end of thinking.

mod common;

use std::sync::Arc;

use common::*;
use r1serve_chat::Tokenizer;
use r1serve_engine::{FinishReason, GeneratedToken, TokenEvent, Usage};
use r1serve_server::seq::{SeqOptions, SeqProcessor};
use serde_json::{json, Value};

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    Tokenizer::from_model_dir(dir).unwrap().unwrap()
}

/// Ids of "\n</think>\n\n", and how many of them belong to the reasoning (through `</think>`).
fn forced_end(tok: &Tokenizer) -> (Vec<u64>, usize) {
    let ids = r1serve_chat::budget::forced_ids(tok).unwrap();
    let through = ids.iter().position(|&i| i == 317).unwrap() + 1;
    (ids.into_iter().map(u64::from).collect(), through)
}

fn token_ids(reply: &Value) -> Vec<u64> {
    reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_str().unwrap()["token_id:".len()..].parse().unwrap())
        .collect()
}

fn budget_body(budget: Option<(&str, i64)>, max_tokens: usize) -> Value {
    let mut body = chat_body("Why is the sky blue?", max_tokens);
    body["ignore_eos"] = json!(true);
    body["logprobs"] = json!(true);
    body["return_tokens_as_token_ids"] = json!(true);
    if let Some((field, n)) = budget {
        body[field] = json!(n);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_budget_forces_the_end_at_exactly_its_limit() {
    let dir = reasoning_model();
    let tok = tokenizer(dir.path());
    let (forced, through) = forced_end(&tok);
    let server = start(dir.path(), Options::default()).await;
    let addr = server.local_addr();
    for budget in [1usize, 4, 9] {
        let reply = post(
            addr,
            "/v1/chat/completions",
            &budget_body(Some(("thinking_budget", budget as i64)), 24),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let reply = reply.json();
        let ids = token_ids(&reply);
        assert_eq!(ids.len(), 24);
        assert!(
            !ids[..budget].contains(&317),
            "the model closed thinking itself: pick another prompt"
        );
        assert_eq!(&ids[budget..budget + forced.len()], &forced[..], "budget {budget}");
        let message = &reply["choices"][0]["message"];
        assert!(
            message["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()),
            "{message}"
        );
        assert!(message["content"].is_string(), "{message}");
        let details = &reply["usage"]["completion_tokens_details"];
        assert_eq!(details["reasoning_tokens"], budget + through, "budget {budget}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_reasoning_comes_before_content_and_matches() {
    let dir = reasoning_model();
    let server = start(dir.path(), Options::default()).await;
    let addr = server.local_addr();
    let body = budget_body(Some(("thinking_budget", 6)), 30);
    let whole = post(addr, "/v1/chat/completions", &body).await.json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = post(addr, "/v1/chat/completions", &streamed).await.events();
    let mut seen_content = false;
    for e in &events[..events.len() - 1] {
        let delta = &serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"];
        if delta["content"].as_str().is_some_and(|c| !c.is_empty()) {
            seen_content = true;
        }
        if delta.get("reasoning_content").is_some() {
            assert!(!seen_content, "reasoning after content: {e}");
        }
    }
    let message = &whole["choices"][0]["message"];
    assert_eq!(
        join_deltas(&events, "reasoning_content"),
        message["reasoning_content"].as_str().unwrap()
    );
    assert_eq!(join_deltas(&events, "content"), message["content"].as_str().unwrap());
    assert!(!join_deltas(&events, "reasoning_content").contains("think>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_inside_thinking_has_only_reasoning() {
    let dir = reasoning_model();
    let server = start(dir.path(), Options::default()).await;
    let reply = post(server.local_addr(), "/v1/chat/completions", &budget_body(None, 5))
        .await
        .json();
    let ids = token_ids(&reply);
    assert!(
        !ids.contains(&317),
        "the model closed thinking itself: pick another prompt"
    );
    let choice = &reply["choices"][0];
    assert!(choice["message"]["content"].is_null(), "{choice}");
    assert!(choice["message"]["reasoning_content"].is_string());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens_details"]["reasoning_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_default_budget_and_vllm_field_name() {
    let dir = reasoning_model();
    let mut options = Options::default();
    options.config.reasoning_budget = Some(3);
    let server = start(dir.path(), options).await;
    let addr = server.local_addr();
    let default = post(addr, "/v1/chat/completions", &budget_body(None, 16)).await.json();
    let explicit = post(
        addr,
        "/v1/chat/completions",
        &budget_body(Some(("thinking_budget", 3)), 16),
    )
    .await
    .json();
    let vllm = post(
        addr,
        "/v1/chat/completions",
        &budget_body(Some(("thinking_token_budget", 3)), 16),
    )
    .await
    .json();
    assert_eq!(token_ids(&default), token_ids(&explicit));
    assert_eq!(token_ids(&vllm), token_ids(&explicit));
    // A request can lift the server's budget.
    let unlimited = post(
        addr,
        "/v1/chat/completions",
        &budget_body(Some(("thinking_budget", -1)), 5),
    )
    .await
    .json();
    assert!(unlimited["choices"][0]["message"]["content"].is_null());
    // Budget 0: thinking ends before anything is sampled.
    let zero = post(
        addr,
        "/v1/chat/completions",
        &budget_body(Some(("thinking_budget", 0)), 8),
    )
    .await
    .json();
    let (forced, through) = forced_end(&tokenizer(dir.path()));
    assert_eq!(&token_ids(&zero)[..forced.len()], &forced[..]);
    assert_eq!(zero["usage"]["completion_tokens_details"]["reasoning_tokens"], through);
    assert!(zero["choices"][0]["message"]["content"].is_string());
}

/// Feeds the tokens of `text` one event at a time; returns (reasoning, content, finish).
fn replay(
    tok: &Arc<Tokenizer>,
    text: &str,
    options: SeqOptions,
) -> (String, Option<String>, r1serve_server::seq::SeqFinish) {
    let ids = tok.encode(text, false).unwrap();
    let mut proc = SeqProcessor::new(Arc::clone(tok), options).unwrap();
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut events: Vec<TokenEvent> = ids
        .iter()
        .map(|&id| {
            TokenEvent::Token(GeneratedToken {
                id,
                logprob: None,
                forced: false,
            })
        })
        .collect();
    events.push(TokenEvent::Finished {
        reason: FinishReason::Stop,
        usage: Usage::default(),
        error: None,
    });
    let mut finish = None;
    for event in events {
        let delta = proc.on_event(event);
        for part in [&delta.reasoning, &delta.content].into_iter().flatten() {
            assert!(!part.contains('\u{fffd}'), "a character was split: {part:?}");
        }
        reasoning.push_str(delta.reasoning.as_deref().unwrap_or(""));
        content.push_str(delta.content.as_deref().unwrap_or(""));
        finish = delta.finish.or(finish);
    }
    let finish = finish.unwrap();
    let content = (!finish.content_is_none).then_some(content);
    (reasoning, content, finish)
}

#[test]
fn model_opening_think_itself_and_tool_calls() {
    let dir = reasoning_model();
    let tok = Arc::new(tokenizer(dir.path()));
    let options = SeqOptions {
        reasoning: true,
        ..SeqOptions::default()
    };
    let (reasoning, content, finish) = replay(
        &tok,
        "<think>\nLet me see: 数学 🙂</think>\n\nIt is 4.",
        options.clone(),
    );
    assert_eq!(reasoning, "Let me see: 数学 🙂");
    assert_eq!(content.as_deref(), Some("It is 4."));
    assert_eq!(
        finish.reasoning_tokens,
        tok.encode("<think>\nLet me see: 数学 🙂</think>", false).unwrap().len()
    );
    let (reasoning, content, _) = replay(&tok, "No thinking here.", options.clone());
    assert_eq!(
        (reasoning.as_str(), content.as_deref()),
        ("", Some("No thinking here."))
    );
    let (reasoning, content, _) = replay(&tok, "<think>still going", options.clone());
    assert_eq!((reasoning.as_str(), content), ("still going", None));

    let call = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let tools = SeqOptions {
        tool_calls: true,
        ..options
    };
    let (_, content, finish) = replay(&tok, &format!("<think>hmm</think>{call}"), tools);
    assert_eq!(content.as_deref(), Some("Sure."));
    assert_eq!(finish.reason, "tool_calls");
    assert_eq!(finish.tool_calls.len(), 1);
    assert_eq!(finish.tool_calls[0].name, "get_weather");
    assert_eq!(finish.tool_calls[0].arguments, "{\"city\": \"Paris\"}");
}

#[test]
fn stop_strings_apply_to_content_only() {
    let dir = reasoning_model();
    let tok = Arc::new(tokenizer(dir.path()));
    let options = SeqOptions {
        reasoning: true,
        started_in_thinking: true,
        stop: vec!["STOP".into()],
        ..SeqOptions::default()
    };
    let (reasoning, content, finish) = replay(&tok, "a STOP in thought</think>answer STOP more", options);
    assert_eq!(reasoning, "a STOP in thought");
    assert_eq!(content.as_deref(), Some("answer "));
    assert_eq!(finish.reason, "stop");
}
