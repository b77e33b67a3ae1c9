//! Request lifecycle: rejection at submit, abort and cancellation, early finish, forced tokens,
//! forward errors, shutdown, and the counters.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use r1serve_engine::{
    Engine, EngineConfig, EngineCore, EngineError, EngineStats, FinishReason, KvCacheSize, Request, SamplingParams,
    ShutdownMode, TokenEvent,
};
use r1serve_kernels::KvCacheDtype;
use r1serve_model::CausalLm;

fn small_engine(model: Arc<dyn CausalLm>) -> Engine {
    Engine::start(
        model,
        EngineConfig {
            block_size: 4,
            kv_cache: KvCacheSize::Blocks(64),
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

/// Polls the stats until `done` holds (the engine publishes them after each step).
fn wait_for(engine: &Engine, done: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = engine.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "timed out: {stats:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Engine>();
}

#[test]
fn requests_that_can_never_run_are_rejected_with_both_numbers() {
    let model = load("qwen2-f32"); // context 1024, vocab 288
    let engine = small_engine(model);
    let err = engine.submit(greedy(vec![5; 1000], 100)).unwrap_err();
    assert!(matches!(
        err,
        EngineError::ExceedsContext {
            prompt_tokens: 1000,
            max_tokens: 100,
            context: 1024
        }
    ));
    assert!(
        err.to_string().contains("1000") && err.to_string().contains("1024"),
        "{err}"
    );
    // 64 blocks of 4 = 256 slots; 200 + 100 - 1 slots need 75 blocks.
    let err = engine.submit(greedy(vec![5; 200], 100)).unwrap_err();
    assert!(matches!(
        err,
        EngineError::ExceedsKvCache {
            blocks_needed: 75,
            num_blocks: 64,
            ..
        }
    ));
    assert!(
        err.to_string().contains("75") && err.to_string().contains("64"),
        "{err}"
    );
    let err = engine.submit(greedy(vec![5, 288], 4)).unwrap_err();
    assert!(matches!(
        err,
        EngineError::TokenOutOfVocab {
            token: 288,
            vocab_size: 288
        }
    ));
    assert!(matches!(
        engine.submit(greedy(vec![], 4)),
        Err(EngineError::InvalidRequest(_))
    ));
    let bad = Request {
        sampling: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        },
        ..greedy(vec![5], 4)
    };
    assert!(engine.submit(bad).unwrap_err().to_string().contains("temperature"));
    assert!(engine.force_tokens(0, vec![999]).is_err());
    // Exactly filling the pool is fine.
    let (_, rx) = engine
        .submit(Request {
            ignore_eos: true,
            ..greedy(vec![5; 200], 57)
        })
        .unwrap();
    assert_eq!(collect(rx).tokens.len(), 57);
}

#[test]
fn abort_frees_blocks_and_reports_abort() {
    let engine = small_engine(TestModel::slow(load("qwen2-f32")));
    let long = Request {
        ignore_eos: true,
        ..greedy(prompt(1, 30, 288), 200)
    };
    let (id, mut rx) = engine.submit(long.clone()).unwrap();
    for _ in 0..3 {
        assert!(matches!(rx.blocking_recv(), Some(TokenEvent::Token(_))));
    }
    assert!(engine.stats().kv_cache_usage > 0.0);
    engine.abort(id);
    let rest = collect(rx);
    assert_eq!(rest.finish, Some(FinishReason::Abort));
    assert!(rest.usage.completion_tokens < 200);
    let stats = wait_for(&engine, |s| s.num_running == 0);
    assert_eq!(stats.kv_cache_usage, 0.0);
    assert_eq!(stats.requests_finished.abort, 1);

    // Dropping the receiver cancels the request too.
    let (_, rx) = engine.submit(long).unwrap();
    drop(rx);
    let stats = wait_for(&engine, |s| s.requests_finished.abort == 2);
    assert_eq!(stats.kv_cache_usage, 0.0);
    // Aborting an unknown or finished id is harmless.
    engine.abort(12345);
    engine.abort(id);
}

#[test]
fn finish_ends_a_request_with_stop() {
    let engine = small_engine(TestModel::slow(load("qwen2-f32")));
    let (id, mut rx) = engine
        .submit(Request {
            ignore_eos: true,
            ..greedy(prompt(2, 5, 288), 200)
        })
        .unwrap();
    assert!(matches!(rx.blocking_recv(), Some(TokenEvent::Token(_))));
    engine.finish(id); // e.g. the server matched a stop string in the text
    let rest = collect(rx);
    assert_eq!(rest.finish, Some(FinishReason::Stop));
    assert_eq!(wait_for(&engine, |s| s.num_running == 0).kv_cache_usage, 0.0);
}

#[test]
fn forced_tokens_are_emitted_in_order_and_computed_like_any_other() {
    let model = load("qwen2-f32");
    let mut core = EngineCore::new(
        model.clone(),
        &EngineConfig {
            block_size: 4,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = Request {
        ignore_eos: true,
        logprobs: Some(0),
        ..greedy(prompt(3, 9, 288), 10)
    };
    core.add_request(7, request.clone(), tx).unwrap();
    core.step(); // prefill: the first token
    core.force_tokens(7, &[5, 6, 7]).unwrap();
    assert!(matches!(
        core.force_tokens(8, &[5]),
        Err(EngineError::UnknownSequence(8))
    ));
    while core.has_work() {
        core.step();
    }
    let out = collect(rx);
    assert_eq!(out.tokens.len(), 10, "forced tokens count toward max_tokens");
    assert_eq!(&out.tokens[1..4], &[5, 6, 7]);
    assert_eq!(
        out.forced,
        [false, true, true, true, false, false, false, false, false, false]
    );
    assert!(out.logprobs.iter().all(Option::is_some), "forced tokens are scored too");
    // The rest continues from the forced tokens exactly as a prompt containing them would.
    let mut continued = request.prompt.clone();
    continued.extend(&out.tokens[..4]);
    let expected = reference(
        model.as_ref(),
        &Request {
            ignore_eos: true,
            ..greedy(continued, 6)
        },
    );
    assert_eq!(&out.tokens[4..], &expected.tokens[..]);
}

#[test]
fn max_tokens_zero_scores_the_prompt_only() {
    let engine = small_engine(load("qwen2-f32"));
    let (_, rx) = engine
        .submit(Request {
            prompt_logprobs: Some(1),
            ..greedy(prompt(4, 6, 288), 0)
        })
        .unwrap();
    let out = collect(rx);
    assert!(out.tokens.is_empty());
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert_eq!(out.prompt_logprobs.map(|p| p.len()), Some(6));
    assert_eq!(out.usage.completion_tokens, 0);
}

#[test]
fn a_failing_forward_finishes_its_batch_with_an_error_and_the_loop_goes_on() {
    let inner = load("qwen2-f32");
    let model: Arc<dyn CausalLm> = Arc::new(TestModel {
        inner: inner.clone(),
        poison: Some(77),
        delay: Duration::ZERO,
        gate: Arc::default(),
    });
    let engine = small_engine(model);
    let (_, rx) = engine.submit(greedy(vec![1, 2, 77, 3], 4)).unwrap();
    let failed = collect(rx);
    assert_eq!(failed.finish, Some(FinishReason::Error));
    assert!(failed.error.unwrap().contains("poison token 77"));
    let ok = Request {
        ignore_eos: true,
        ..greedy(prompt(5, 6, 288), 5)
    };
    let (_, rx) = engine.submit(ok.clone()).unwrap();
    assert_eq!(collect(rx).tokens, reference(inner.as_ref(), &ok).tokens);
    let stats = wait_for(&engine, |s| s.num_running == 0);
    assert_eq!(stats.requests_finished.error, 1);
    assert_eq!(stats.kv_cache_usage, 0.0);
}

#[test]
fn drain_shutdown_finishes_requests_then_refuses_new_ones() {
    let model = load("qwen2-f32");
    let engine = small_engine(model.clone());
    let requests: Vec<Request> = (0..3)
        .map(|i| Request {
            ignore_eos: true,
            ..greedy(prompt(20 + i, 7, 288), 12)
        })
        .collect();
    let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap().1).collect();
    engine.shutdown(ShutdownMode::Drain);
    for (r, rx) in requests.iter().zip(receivers) {
        let out = collect(rx);
        assert_eq!(out.finish, Some(FinishReason::Length));
        assert_eq!(out.tokens, reference(model.as_ref(), r).tokens);
    }
    assert!(matches!(engine.submit(requests[0].clone()), Err(EngineError::ShutDown)));
    engine.shutdown(ShutdownMode::Abort); // idempotent
}

#[test]
fn abort_shutdown_ends_every_request() {
    let engine = small_engine(TestModel::slow(load("qwen2-f32")));
    let receivers: Vec<_> = (0..3)
        .map(|i| {
            let request = Request {
                ignore_eos: true,
                ..greedy(prompt(30 + i, 7, 288), 60)
            };
            engine.submit(request).unwrap().1
        })
        .collect();
    engine.shutdown(ShutdownMode::Abort);
    for rx in receivers {
        assert_eq!(collect(rx).finish, Some(FinishReason::Abort));
    }
    let stats = engine.stats();
    assert_eq!(stats.num_running + stats.num_waiting, 0);
    assert_eq!(stats.kv_cache_usage, 0.0);
}

#[test]
fn stop_token_ids_and_eos_end_generation() {
    let model = load("qwen2-f32");
    let engine = small_engine(model.clone());
    let request = Request {
        ignore_eos: true,
        ..greedy(prompt(6, 5, 288), 12)
    };
    let free = collect(engine.submit(request.clone()).unwrap().1);
    let stop_at = free.tokens[4];
    let first = free.tokens.iter().position(|&t| t == stop_at).unwrap();
    let stopped = collect(
        engine
            .submit(Request {
                stop_token_ids: vec![stop_at],
                ..request.clone()
            })
            .unwrap()
            .1,
    );
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    assert_eq!(
        stopped.tokens,
        &free.tokens[..=first],
        "the stop token is emitted, then nothing"
    );
}

/// Forces `tokens` right after the `after`-th sampled token (and `start` before anything).
#[derive(Clone)]
struct ForceAfter {
    after: usize,
    tokens: Vec<u32>,
    start: Vec<u32>,
    seen: usize,
}

impl r1serve_engine::TokenHook for ForceAfter {
    fn on_start(&mut self) -> Option<Vec<u32>> {
        (!self.start.is_empty()).then(|| self.start.clone())
    }

    fn on_sampled(&mut self, _token: u32) -> Option<Vec<u32>> {
        self.seen += 1;
        (self.seen == self.after).then(|| self.tokens.clone())
    }

    fn clone_box(&self) -> Box<dyn r1serve_engine::TokenHook> {
        Box::new(self.clone())
    }
}

#[test]
fn a_hook_forces_tokens_at_exactly_the_step_it_asks() {
    let engine = small_engine(load("qwen2-f32"));
    let hook = |after: usize, tokens: Vec<u32>, start: Vec<u32>| {
        Some(r1serve_engine::Hook::new(ForceAfter {
            after,
            tokens,
            start,
            seen: 0,
        }))
    };
    let request = Request {
        ignore_eos: true,
        hook: hook(3, vec![5, 6], vec![9]),
        ..greedy(prompt(4, 7, 288), 9)
    };
    // Clones are independent: both runs force at the same place.
    for run in [request.clone(), request] {
        let (_, rx) = engine.submit(run).unwrap();
        let out = collect(rx);
        assert_eq!(out.tokens[0], 9);
        assert_eq!(&out.tokens[4..6], &[5, 6]);
        assert_eq!(out.forced, [true, false, false, false, true, true, false, false, false]);
    }
    // A hook forcing a token outside the vocabulary fails its request, not the engine.
    let bad = Request {
        ignore_eos: true,
        hook: hook(1, vec![100_000], Vec::new()),
        ..greedy(prompt(4, 7, 288), 9)
    };
    let (_, rx) = engine.submit(bad).unwrap();
    let out = collect(rx);
    assert_eq!(out.finish, Some(FinishReason::Error));
    assert!(out.error.unwrap().contains("100000"));
    let bad_start = Request {
        hook: hook(1, Vec::new(), vec![100_000]),
        ..greedy(prompt(4, 7, 288), 9)
    };
    let (_, rx) = engine.submit(bad_start).unwrap();
    assert_eq!(collect(rx).finish, Some(FinishReason::Error));
    // A panicking hook fails its request; the engine goes on.
    let panics = Request {
        hook: Some(r1serve_engine::Hook::new(Panics)),
        ..greedy(prompt(4, 7, 288), 9)
    };
    let (_, rx) = engine.submit(panics).unwrap();
    let out = collect(rx);
    assert_eq!(out.finish, Some(FinishReason::Error));
    assert!(out.error.unwrap().contains("panicked"));
    let (_, rx) = engine.submit(greedy(prompt(4, 7, 288), 3)).unwrap();
    assert_eq!(collect(rx).tokens.len(), 3);
}

#[derive(Clone)]
struct Panics;

impl r1serve_engine::TokenHook for Panics {
    fn on_sampled(&mut self, _token: u32) -> Option<Vec<u32>> {
        panic!("a buggy hook")
    }

    fn clone_box(&self) -> Box<dyn r1serve_engine::TokenHook> {
        Box::new(Panics)
    }
}

/// A float16 cache holds twice the blocks of a float32 one in the same bytes, and the engine's
/// steps decode exactly what `generate()` decodes over a float16 cache.
#[test]
fn a_float16_cache_holds_twice_the_tokens_and_decodes_like_generate() {
    let model = load("qwen2-f32");
    let start = |dtype| {
        Engine::start(
            model.clone(),
            EngineConfig {
                block_size: 4,
                kv_cache: KvCacheSize::Bytes(1 << 20),
                kv_cache_dtype: dtype,
                max_num_seqs: 1024,
                ..EngineConfig::default()
            },
        )
        .unwrap()
    };
    let (single, half) = (start(KvCacheDtype::F32), start(KvCacheDtype::F16));
    assert_eq!(half.limits().num_blocks, 2 * single.limits().num_blocks);
    let prompt = prompt(3, 12, model.info().vocab_size);
    let ours = collect(half.submit(greedy(prompt.clone(), 10)).unwrap().1);
    let reference = r1serve_engine::generate(
        model.as_ref(),
        &r1serve_engine::GenerateRequest {
            prompt,
            max_tokens: 10,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
            echo: false,
            kv_cache_dtype: KvCacheDtype::F16,
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(ours.tokens, reference.tokens);
}
