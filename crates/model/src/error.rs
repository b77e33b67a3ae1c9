use std::path::PathBuf;

use r1serve_kernels::kv_cache::KvCacheError;
use r1serve_kernels::WeightError;

/// Everything that can go wrong loading or running a model. Each variant names the file, tensor,
/// key or limit involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture `{name}`; supported: {supported}")]
    UnknownArchitecture {
        path: PathBuf,
        name: String,
        supported: String,
    },
    #[error(
        "{path}: pickle checkpoints (.bin/.pt/.pth/.ckpt) are never loaded, since unpickling runs code from the file; \
         convert the model to safetensors first"
    )]
    PickleRefused { path: PathBuf },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json found")]
    NoWeights { dir: PathBuf },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: shard `{shard}` listed in the index is missing")]
    MissingShard { path: PathBuf, shard: String },
    #[error("tensor `{name}` not found in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {path}: dtype {dtype} is not supported here (expected {expected})")]
    DType {
        name: String,
        path: PathBuf,
        dtype: String,
        expected: &'static str,
    },
    #[error("tensor `{name}` in {path}: {source}")]
    Weight {
        name: String,
        path: PathBuf,
        #[source]
        source: WeightError,
    },
    #[error("{path}: GGUF: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: crate::gguf::GgufError,
    },
    #[error("KV cache: {0}")]
    KvCache(#[from] KvCacheError),
    #[error("invalid batch: {0}")]
    Batch(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
