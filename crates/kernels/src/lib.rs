//! The op set every r1serve backend implements, and the CPU backend.
//!
//! Kernels know weight formats and tensor shapes, never models: a model crate describes *what* to
//! compute through [`Backend`], and each backend decides *how*.

pub mod backend;
pub mod cpu;
pub mod dtype;
pub mod kv_cache;
pub mod quant;
pub mod rope;
pub mod weight;

pub use backend::{AttentionLayout, Backend, MatmulPrecision, SeqSpan};
pub use cpu::CpuBackend;
pub use dtype::WeightFormat;
pub use kv_cache::{KvCacheDtype, KvLayer, PagedKvCache};
pub use quant::PreparedActivations;
pub use rope::{RopeScaling, RopeStyle, RopeTable};
pub use weight::{ByteView, WeightError, WeightMatrix};
