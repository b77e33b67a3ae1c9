//! The one place architectures are registered.

use std::path::Path;
use std::sync::Arc;

use r1serve_kernels::Backend;

use crate::config::ModelDir;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, ModelSummary};
use crate::weights::WeightStore;
use crate::{deepseek, llama};

/// Builds a runnable model from a directory.
pub type LoadFn = fn(&ModelDir, Arc<dyn Backend>) -> Result<Box<dyn CausalLm>>;

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
    let model_dir = ModelDir::open(dir)?;
    let arch = find(&model_dir)?;
    tracing::info!(architecture = arch.name, dir = %model_dir.dir.display(), "loading model");
    (arch.load)(&model_dir, backend)
}

/// The model's shape from its config; with `with_weights`, the dtype mix of its files too.
pub fn summarize(model_dir: &ModelDir, with_weights: bool) -> Result<ModelSummary> {
    let arch = find(model_dir)?;
    let mut summary = (arch.summarize)(model_dir)?;
    if with_weights {
        let store = WeightStore::open(&model_dir.dir, model_dir.fp8_block_size()?)?;
        summary.weight_dtypes = store.dtype_counts();
    }
    Ok(summary)
}
