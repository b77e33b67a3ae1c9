//! Shared helpers for the engine's integration tests: fixtures, the `generate()` reference, and
//! collecting a request's events.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use r1serve_engine::{
    generate, EngineError, EventReceiver, FinishReason, GenerateOutput, GenerateRequest, Request, SamplingParams,
    TokenEvent, TokenLogprob, Usage,
};
use r1serve_kernels::{CpuBackend, PagedKvCache};
use r1serve_model::{load_model, Batch, CausalLm, ModelError, ModelInfo};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn load(name: &str) -> Arc<dyn CausalLm> {
    Arc::from(load_model(fixture(name), Arc::new(CpuBackend::default())).unwrap_or_else(|e| panic!("{name}: {e}")))
}

#[derive(serde::Deserialize)]
pub struct Golden {
    pub cases: Vec<GoldenCase>,
}

#[derive(serde::Deserialize)]
pub struct GoldenCase {
    pub prompt_ids: Vec<u32>,
    pub greedy: Vec<u32>,
}

pub fn golden(name: &str) -> Golden {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap()
}

/// Deterministic pseudo-random prompt tokens in `1..vocab` (no BOS/EOS games).
pub fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            2 + ((x >> 33) % (vocab as u64 - 2)) as u32
        })
        .collect()
}

/// `generate()` alone on the same request: the reference the engine must agree with.
pub fn reference(model: &dyn CausalLm, request: &Request) -> GenerateOutput {
    let mut stop = request.stop_token_ids.clone();
    if !request.ignore_eos {
        stop.extend_from_slice(&model.info().eos_token_ids);
    }
    let single = GenerateRequest {
        prompt: request.prompt.clone(),
        max_tokens: request.max_tokens,
        sampling: request.sampling.clone(),
        stop_token_ids: stop,
        top_logprobs: request.logprobs.unwrap_or(0),
        echo: request.prompt_logprobs.is_some(),
        kv_cache_dtype: Default::default(),
    };
    generate(model, &single, |_| {}).unwrap()
}

/// Everything one request reported.
#[derive(Debug, Default)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub forced: Vec<bool>,
    pub logprobs: Vec<Option<TokenLogprob>>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<String>,
}

/// Reads events until `Finished`; panics if the channel closes first or order is broken.
pub fn collect(mut events: EventReceiver) -> Outcome {
    let mut out = Outcome::default();
    while let Some(event) = events.blocking_recv() {
        assert!(out.finish.is_none(), "event after Finished: {event:?}");
        match event {
            TokenEvent::PromptLogprobs(scores) => {
                assert!(out.tokens.is_empty() && out.prompt_logprobs.is_none());
                out.prompt_logprobs = Some(scores);
            }
            TokenEvent::Token(t) => {
                out.tokens.push(t.id);
                out.forced.push(t.forced);
                out.logprobs.push(t.logprob);
            }
            TokenEvent::Finished { reason, usage, error } => {
                out.finish = Some(reason);
                out.usage = usage;
                out.error = error;
            }
        }
    }
    assert!(out.finish.is_some(), "channel closed without Finished");
    out
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request::new(prompt, max_tokens)
}

pub fn sampled(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> Request {
    Request {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..Request::new(prompt, max_tokens)
    }
}

/// Submits everything at once, then collects every outcome.
pub fn run_all(engine: &r1serve_engine::Engine, requests: &[Request]) -> Vec<Outcome> {
    let receivers: Vec<EventReceiver> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).map(|(_, rx)| rx))
        .collect::<Result<_, EngineError>>()
        .unwrap();
    receivers.into_iter().map(collect).collect()
}

/// Delegates to a real model, but fails any batch containing `poison`, sleeps `delay` per
/// forward pass (so a test can act while a request is surely still running) and waits for
/// `gate` (so a test holding it can queue requests while a step is under way).
pub struct TestModel {
    pub inner: Arc<dyn CausalLm>,
    pub poison: Option<u32>,
    pub delay: std::time::Duration,
    pub gate: Arc<std::sync::Mutex<()>>,
}

impl TestModel {
    pub fn slow(inner: Arc<dyn CausalLm>) -> Arc<dyn CausalLm> {
        Arc::new(Self {
            inner,
            poison: None,
            delay: std::time::Duration::from_millis(2),
            gate: Arc::default(),
        })
    }
}

impl CausalLm for TestModel {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn kv_entry_widths(&self) -> Vec<usize> {
        self.inner.kv_entry_widths()
    }
    fn weight_bytes_per_token(&self) -> u64 {
        self.inner.weight_bytes_per_token()
    }
    fn weight_format(&self) -> &'static str {
        self.inner.weight_format()
    }
    fn forward(&self, batch: &Batch, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        std::thread::sleep(self.delay);
        drop(self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        if let Some(poison) = self.poison.filter(|p| batch.seqs.iter().any(|s| s.tokens.contains(p))) {
            return Err(ModelError::Batch(format!("poison token {poison} in the batch")));
        }
        self.inner.forward(batch, cache, logits)
    }
}
