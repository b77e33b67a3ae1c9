//! Model configs, weights and architectures: `config.json` + safetensors in, `forward` out.

pub mod config;
pub mod deepseek;
mod error;
pub mod gguf;
pub mod llama;
pub mod model;
pub mod registry;
pub mod weights;

pub use weights::convert::{parse_format as parse_weight_format, FORMAT_NAMES as WEIGHT_FORMAT_NAMES};

pub use config::ModelDir;
pub use error::{ModelError, Result};
pub use model::{Batch, CausalLm, LogitsWanted, ModelInfo, ModelSummary, SeqInput};
pub use registry::{load_model, load_model_with, summarize, LoadFormat, LoadOptions, ARCHITECTURES};
pub use weights::set_memory_mapping;
