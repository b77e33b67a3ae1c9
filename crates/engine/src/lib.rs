//! Sequences, scheduling, sampling and the engine loop.
//!
//! - [`generate()`]: one sequence from prompt to finish over a private cache (the reference).
//! - [`Engine`]: continuous batching on its own thread: [`Engine::submit`] a [`Request`], read
//!   [`TokenEvent`]s, [`Engine::abort`], [`Engine::stats`], [`Engine::shutdown`].
//! - Inside: [`Scheduler`] (policy) over a [`BlockManager`] (paged KV blocks, prefix cache), the
//!   [`ModelRunner`] (batch building, forward), per-sequence [`Sampler`]s, all driven by
//!   [`EngineCore::step`].

pub mod block_manager;
pub mod config;
pub mod engine;
pub mod engine_core;
mod error;
pub mod generate;
pub mod logprobs;
pub mod metrics;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

pub use block_manager::{BlockId, BlockManager, BlockTable};
pub use config::{EngineConfig, KvCacheSize, Limits};
pub use engine::{Engine, ShutdownMode};
pub use engine_core::{EngineCore, EventReceiver, EventSender};
pub use error::EngineError;
pub use generate::{generate, warm_up, FinishReason, GenerateOutput, GenerateRequest};
pub use metrics::{EngineStats, FinishCounts, Histogram};
pub use runner::ModelRunner;
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use sequence::{
    GeneratedToken, Hook, Request, SeqId, SeqStatus, Sequence, TokenEvent, TokenHook, TokenLogprob, Usage,
};
