//! The batched engine must give every request exactly what `generate()` gives it alone: under
//! heavy concurrency, chunked prefill, preemption, prefix caching, seeded sampling and penalties.

mod common;

use common::*;
use r1serve_engine::{Engine, EngineConfig, FinishReason, KvCacheSize, Request, SamplingParams};
use r1serve_model::CausalLm;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// 16 requests: the fixture's golden prompts, and 14 others of lengths 1..=40, a third of them
/// sharing a 21-token prefix, with different max_tokens.
fn sixteen_requests(name: &str, vocab: usize) -> Vec<Request> {
    let mut requests: Vec<Request> = golden(name)
        .cases
        .iter()
        .map(|c| Request {
            ignore_eos: true,
            ..greedy(c.prompt_ids.clone(), c.greedy.len())
        })
        .collect();
    let shared = prompt(99, 21, vocab);
    for i in 0..14u64 {
        let p = if i % 3 == 0 {
            let mut p = shared[..17 + i as usize / 3].to_vec();
            p.extend(prompt(i, 1 + i as usize % 5, vocab));
            p
        } else {
            prompt(1000 + i, 1 + (i as usize * 7) % 40, vocab)
        };
        requests.push(greedy(p, 6 + (i as usize * 5) % 20));
    }
    requests
}

fn config(block_size: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        ..EngineConfig::default()
    }
}

/// Runs `requests` concurrently on an engine over `model` and checks each against `generate()`.
/// The requests are all queued while the engine's first step waits (on a gate around the
/// model), so however the threads are scheduled, all but the first join by the second step.
fn check_matches_generate(model: &Arc<dyn CausalLm>, config: EngineConfig, requests: &[Request]) -> Engine {
    let gate = Arc::new(Mutex::new(()));
    let gated: Arc<dyn CausalLm> = Arc::new(TestModel {
        inner: model.clone(),
        poison: None,
        delay: Duration::ZERO,
        gate: gate.clone(),
    });
    let engine = Engine::start(gated, config).unwrap();
    let held = gate.lock().unwrap();
    let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap().1).collect();
    drop(held);
    let outcomes: Vec<_> = receivers.into_iter().map(collect).collect();
    for (i, (request, outcome)) in requests.iter().zip(&outcomes).enumerate() {
        let expected = reference(model.as_ref(), request);
        assert_eq!(outcome.tokens, expected.tokens, "request {i}: {request:?}");
        assert_eq!(outcome.finish, Some(expected.finish_reason), "request {i}");
        assert_eq!(outcome.usage.prompt_tokens, request.prompt.len());
        assert_eq!(outcome.usage.completion_tokens, outcome.tokens.len());
        assert!(outcome.forced.iter().all(|f| !f));
    }
    let stats = engine.stats();
    assert_eq!(stats.num_running + stats.num_waiting, 0);
    assert_eq!(stats.kv_cache_usage, 0.0, "every block is free once all finished");
    assert_eq!(stats.requests_finished.total(), requests.len() as u64);
    engine
}

#[test]
fn sixteen_concurrent_requests_match_generate_qwen2() {
    let model = load("qwen2-f32");
    let requests = sixteen_requests("qwen2-f32", model.info().vocab_size);
    let engine = check_matches_generate(&model, config(4), &requests);
    // The golden prompts also give the transformers reference's greedy tokens.
    let stats = engine.stats();
    let outputs: usize = requests.iter().map(|r| reference(model.as_ref(), r).tokens.len()).sum();
    assert_eq!(stats.generation_tokens_total, outputs as u64);
    let prompts: usize = requests.iter().map(|r| r.prompt.len()).sum();
    assert_eq!(stats.prompt_tokens_total, prompts as u64);
    assert_eq!(stats.time_to_first_token.count, 16);
    // All 16 ran side by side: one step per token of the longest request (plus the first step,
    // which may have held only the first request), not one per token.
    let longest = requests.iter().map(|r| r.max_tokens).max().unwrap() as u64;
    assert!(stats.steps_total <= longest + 1, "{} steps", stats.steps_total);
}

#[test]
fn sixteen_concurrent_requests_match_generate_deepseek_v3() {
    let model = load("dsv3-f32");
    let requests = sixteen_requests("dsv3-f32", model.info().vocab_size);
    check_matches_generate(&model, config(16), &requests);
}

/// A warmed-up model (its packed weights built by a throw-away prompt) answers exactly as before.
#[test]
fn warm_up_changes_no_answer() {
    for name in ["qwen2-bf16", "dsv3-fp8"] {
        let model = load(name);
        r1serve_engine::warm_up(model.as_ref()).unwrap();
        let engine = Engine::start(model, config(4)).unwrap();
        for case in golden(name).cases {
            let (_, rx) = engine
                .submit(Request {
                    ignore_eos: true,
                    ..greedy(case.prompt_ids.clone(), case.greedy.len())
                })
                .unwrap();
            assert_eq!(collect(rx).tokens, case.greedy, "{name}");
        }
    }
}

#[test]
fn golden_prompts_give_the_reference_greedy_tokens() {
    let model = load("qwen2-f32");
    let engine = Engine::start(model, config(4)).unwrap();
    for case in golden("qwen2-f32").cases {
        let (_, rx) = engine
            .submit(Request {
                ignore_eos: true,
                ..greedy(case.prompt_ids.clone(), case.greedy.len())
            })
            .unwrap();
        assert_eq!(collect(rx).tokens, case.greedy);
    }
}

#[test]
fn chunked_prefill_with_a_tiny_token_budget_matches_generate() {
    let model = load("qwen2-f32");
    let requests = sixteen_requests("qwen2-f32", model.info().vocab_size);
    let engine = check_matches_generate(
        &model,
        EngineConfig {
            max_num_batched_tokens: 7,
            max_num_seqs: 16,
            ..config(4)
        },
        &requests,
    );
    let stats = engine.stats();
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap();
    assert!(
        stats.steps_total as usize >= longest / 7,
        "prompts were split across steps"
    );
    // Admitted over several steps, later requests find the shared prefix already computed.
    assert!(stats.prefix_cache_hits_total > 0, "the shared prefix was reused");
}

#[test]
fn preemption_in_a_tiny_block_pool_matches_generate() {
    let model = load("qwen2-f32");
    let requests = sixteen_requests("qwen2-f32", model.info().vocab_size);
    let block_size = 4;
    let most = requests
        .iter()
        .map(|r| (r.prompt.len() + r.max_tokens - 1).div_ceil(block_size))
        .max()
        .unwrap();
    let engine = check_matches_generate(
        &model,
        EngineConfig {
            kv_cache: KvCacheSize::Blocks(most + 4),
            ..config(block_size)
        },
        &requests,
    );
    assert!(
        engine.stats().preemptions_total > 0,
        "the pool was too small for all at once"
    );
}

#[test]
fn preemption_without_prefix_caching_matches_generate() {
    let model = load("dsv3-f32");
    let requests = sixteen_requests("dsv3-f32", model.info().vocab_size);
    let most = requests
        .iter()
        .map(|r| (r.prompt.len() + r.max_tokens - 1).div_ceil(4))
        .max()
        .unwrap();
    let engine = check_matches_generate(
        &model,
        EngineConfig {
            kv_cache: KvCacheSize::Blocks(most + 1),
            enable_prefix_caching: false,
            max_num_batched_tokens: 16,
            ..config(4)
        },
        &requests,
    );
    let stats = engine.stats();
    assert!(stats.preemptions_total > 0);
    assert_eq!(stats.prefix_cache_hits_total, 0);
}

#[test]
fn prefix_cache_reports_cached_tokens_and_matches_generate() {
    let model = load("qwen2-f32");
    let vocab = model.info().vocab_size;
    let engine = Engine::start(model.clone(), config(4)).unwrap();
    let shared = prompt(7, 21, vocab);
    let mut a_prompt = shared.clone();
    a_prompt.extend([3, 4, 5]);
    let a = greedy(a_prompt.clone(), 10);
    let first = collect(engine.submit(a.clone()).unwrap().1);
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(first.tokens, reference(model.as_ref(), &a).tokens);

    // Shares 21 tokens: the 5 full blocks among them are reused.
    let mut b_prompt = shared.clone();
    b_prompt.extend([9, 9, 9, 9, 9]);
    let b = greedy(b_prompt, 10);
    let second = collect(engine.submit(b.clone()).unwrap().1);
    assert_eq!(second.usage.cached_tokens, 20);
    assert_eq!(second.tokens, reference(model.as_ref(), &b).tokens);

    // The very same prompt: all 24 tokens are cached, but the last block is recomputed to get
    // the logits of the first new token.
    let third = collect(engine.submit(a.clone()).unwrap().1);
    assert_eq!(third.usage.cached_tokens, 20);
    assert_eq!(third.tokens, first.tokens);

    // A prompt extending A's prompt with A's own output hits the blocks A's decode filled.
    let mut c_prompt = a_prompt.clone();
    c_prompt.extend(&first.tokens[..6]);
    let c = greedy(c_prompt, 4);
    let fourth = collect(engine.submit(c.clone()).unwrap().1);
    assert_eq!(fourth.usage.cached_tokens, 28);
    assert_eq!(fourth.tokens, reference(model.as_ref(), &c).tokens);
    assert_eq!(fourth.tokens, first.tokens[6..10]);

    let stats = engine.stats();
    assert_eq!(stats.prefix_cache_hits_total, 20 + 20 + 28);
    assert_eq!(stats.kv_cache_usage, 0.0);
}

#[test]
fn seeded_sampling_is_reproducible_and_matches_generate() {
    let model = load("qwen2-f32");
    let vocab = model.info().vocab_size;
    let engine = Engine::start(model.clone(), config(4)).unwrap();
    let mut requests: Vec<Request> = (0..6)
        .map(|i| sampled(prompt(50 + i, 5 + i as usize * 3, vocab), 20, i))
        .collect();
    requests.extend(requests.clone()); // the same six again, concurrently
    requests.push(greedy(prompt(3, 9, vocab), 12));
    let outcomes = run_all(&engine, &requests);
    for i in 0..6 {
        assert_eq!(outcomes[i].tokens, outcomes[i + 6].tokens, "seed {i}");
        assert_eq!(
            outcomes[i].tokens,
            reference(model.as_ref(), &requests[i]).tokens,
            "seed {i}"
        );
    }
    let same_prompt = |seed| sampled(prompt(50, 5, vocab), 20, seed);
    let a = collect(engine.submit(same_prompt(1)).unwrap().1).tokens;
    let b = collect(engine.submit(same_prompt(2)).unwrap().1).tokens;
    assert_ne!(a, b, "different seeds, different draws");
}

#[test]
fn penalties_in_the_engine_match_generate() {
    let model = load("qwen2-f32");
    let vocab = model.info().vocab_size;
    let engine = Engine::start(model.clone(), config(4)).unwrap();
    let penalised = |p: Vec<u32>, sampling: SamplingParams| Request {
        sampling,
        ignore_eos: true,
        ..greedy(p, 24)
    };
    let requests = vec![
        penalised(
            prompt(1, 8, vocab),
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::default()
            },
        ),
        penalised(
            prompt(2, 8, vocab),
            SamplingParams {
                presence_penalty: 1.0,
                frequency_penalty: 0.5,
                ..SamplingParams::default()
            },
        ),
        penalised(
            prompt(3, 8, vocab),
            SamplingParams {
                temperature: 0.7,
                min_p: 0.1,
                frequency_penalty: 1.0,
                seed: Some(5),
                ..SamplingParams::default()
            },
        ),
    ];
    let outcomes = run_all(&engine, &requests);
    for (request, outcome) in requests.iter().zip(&outcomes) {
        assert_eq!(outcome.tokens, reference(model.as_ref(), request).tokens);
    }
    // A strong presence penalty forbids repeats within the window it dominates.
    let plain = collect(
        engine
            .submit(penalised(prompt(2, 8, vocab), SamplingParams::default()))
            .unwrap()
            .1,
    );
    assert_ne!(plain.tokens, outcomes[1].tokens, "the penalty changed the output");
}

#[test]
fn logprobs_and_chunked_prompt_logprobs_match_generate() {
    let model = load("qwen2-f32");
    let vocab = model.info().vocab_size;
    let engine = Engine::start(
        model.clone(),
        EngineConfig {
            max_num_batched_tokens: 5,
            ..config(4)
        },
    )
    .unwrap();
    let request = Request {
        logprobs: Some(3),
        prompt_logprobs: Some(2),
        ..greedy(prompt(11, 17, vocab), 8)
    };
    // A second request runs alongside so batches mix scoring and decoding.
    let outcomes = run_all(&engine, &[request.clone(), greedy(prompt(12, 9, vocab), 8)]);
    let got = &outcomes[0];
    let expected = reference(model.as_ref(), &request);
    assert_eq!(got.tokens, expected.tokens);
    let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
    let prompt_scores = got.prompt_logprobs.as_ref().expect("prompt logprobs sent");
    let expected_scores = expected.prompt_logprobs.as_ref().unwrap();
    assert_eq!(prompt_scores.len(), request.prompt.len());
    assert!(prompt_scores[0].is_none());
    for (i, (g, e)) in prompt_scores.iter().zip(expected_scores).enumerate().skip(1) {
        let g = g.as_ref().unwrap_or_else(|| panic!("prompt token {i} unscored"));
        assert_eq!(g.token, request.prompt[i]);
        assert!(close(g.logprob, e.unwrap()), "prompt token {i}: {} vs {e:?}", g.logprob);
        assert_eq!(g.top.len(), 2);
        assert!(g.top[0].1 >= g.logprob - 1e-6);
    }
    for (i, lp) in got.logprobs.iter().enumerate() {
        let lp = lp.as_ref().expect("logprobs asked for");
        assert!(close(lp.logprob, expected.token_logprobs[i]));
        assert_eq!(lp.top.len(), 3);
        for (g, e) in lp.top.iter().zip(&expected.top_logprobs[i]) {
            assert_eq!(g.0, e.0);
            assert!(close(g.1, e.1));
        }
    }
    assert!(outcomes[1].prompt_logprobs.is_none() && outcomes[1].logprobs.iter().all(Option::is_none));
    assert_eq!(got.finish, Some(FinishReason::Length));
}
