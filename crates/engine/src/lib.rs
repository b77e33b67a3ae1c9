//! Sampling and the generation loop. The continuous-batching scheduler and block manager of the
//! server build on these.

mod error;
pub mod generate;
pub mod logprobs;
pub mod sampler;

pub use error::EngineError;
pub use generate::{generate, FinishReason, GenerateOutput, GenerateRequest};
pub use sampler::{Sampler, SamplingParams};
