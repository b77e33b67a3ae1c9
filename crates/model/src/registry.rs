//! The one place architectures are registered.

use std::path::Path;
use std::sync::Arc;

use r1serve_kernels::{Backend, WeightFormat};

use crate::config::ModelDir;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, ModelSummary};
use crate::weights::{DummyWeights, ProgressFn, WeightStore};
use crate::{deepseek, llama};

/// Builds a runnable model from its config and weights.
pub type LoadFn = fn(&ModelDir, &WeightStore, Arc<dyn Backend>) -> Result<Box<dyn CausalLm>>;

/// Where the weights come from.
#[derive(Clone, Debug, Default)]
pub enum LoadFormat {
    /// The model's files: the safetensors in its directory, or its GGUF file.
    #[default]
    Auto,
    /// Random weights of the right shapes and formats (benchmarks without the files).
    Dummy { seed: u64 },
}

#[derive(Clone, Default)]
pub struct LoadOptions {
    pub format: LoadFormat,
    /// Convert the weights to this format as they load (in-situ quantisation).
    pub quant: Option<WeightFormat>,
    /// Called with the number of weight matrices ready so far.
    pub progress: Option<ProgressFn>,
}

/// An architecture as named in `config.json`'s `architectures`.
pub struct Architecture {
    pub name: &'static str,
    pub load: LoadFn,
    pub summarize: fn(&ModelDir) -> Result<ModelSummary>,
}

pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: "LlamaForCausalLM",
        load: llama::load,
        summarize: llama::summarize,
    },
    Architecture {
        name: "Qwen2ForCausalLM",
        load: llama::load,
        summarize: llama::summarize,
    },
    Architecture {
        name: "DeepseekV2ForCausalLM",
        load: deepseek::load,
        summarize: deepseek::summarize,
    },
    Architecture {
        name: "DeepseekV3ForCausalLM",
        load: deepseek::load,
        summarize: deepseek::summarize,
    },
];

fn find(model_dir: &ModelDir) -> Result<&'static Architecture> {
    let name = model_dir.architecture()?;
    ARCHITECTURES
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ModelError::UnknownArchitecture {
            path: model_dir.config_path.clone(),
            name,
            supported: ARCHITECTURES.iter().map(|a| a.name).collect::<Vec<_>>().join(", "),
        })
}

/// Loads the model in `dir` onto `backend`.
pub fn load_model(dir: impl AsRef<Path>, backend: Arc<dyn Backend>) -> Result<Box<dyn CausalLm>> {
    load_model_with(&ModelDir::open(dir)?, &LoadOptions::default(), backend)
}

/// Loads a model with explicit options (dummy weights, ...).
pub fn load_model_with(
    model_dir: &ModelDir,
    options: &LoadOptions,
    backend: Arc<dyn Backend>,
) -> Result<Box<dyn CausalLm>> {
    let arch = find(model_dir)?;
    let fp8_block = model_dir.fp8_block_size()?;
    let store = match options.format {
        LoadFormat::Auto => open_store(model_dir, fp8_block)?,
        LoadFormat::Dummy { seed } => WeightStore::dummy(&model_dir.dir, dummy_weights(model_dir, seed, fp8_block)),
    };
    let mut store = store;
    store.set_conversion(options.quant, options.progress.clone());
    tracing::info!(architecture = arch.name, dir = %model_dir.dir.display(), dummy = store.is_dummy(), "loading model");
    (arch.load)(model_dir, &store, backend)
}

/// The model's files: its GGUF file, or the safetensors in its directory.
fn open_store(model_dir: &ModelDir, fp8_block: Option<(usize, usize)>) -> Result<WeightStore> {
    match model_dir.gguf_path() {
        Some(path) => WeightStore::open_gguf(path),
        None => WeightStore::open(&model_dir.dir, fp8_block),
    }
}

fn dummy_weights(model_dir: &ModelDir, seed: u64, fp8_block: Option<(usize, usize)>) -> DummyWeights {
    let config = &model_dir.config;
    let dtype = config
        .get("torch_dtype")
        .or_else(|| config.get("dtype"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("bfloat16");
    let tied = config.get("tie_word_embeddings").and_then(serde_json::Value::as_bool) == Some(true);
    DummyWeights {
        seed,
        dense_format: match dtype {
            "float32" => WeightFormat::F32,
            "float16" => WeightFormat::F16,
            _ => WeightFormat::Bf16,
        },
        fp8_block,
        absent: if tied {
            vec!["lm_head.weight".to_owned()]
        } else {
            Vec::new()
        },
    }
}

/// The model's shape from its config; with `with_weights`, the dtype mix of its files too.
pub fn summarize(model_dir: &ModelDir, with_weights: bool) -> Result<ModelSummary> {
    let arch = find(model_dir)?;
    let mut summary = (arch.summarize)(model_dir)?;
    if with_weights {
        let store = open_store(model_dir, model_dir.fp8_block_size()?)?;
        summary.weight_dtypes = store.dtype_counts();
    }
    Ok(summary)
}
