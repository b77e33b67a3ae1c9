//! DeepSeek V2/V3 (R1): MLA attention, DeepSeekMoE. Being written.
use std::sync::Arc;

use r1serve_kernels::Backend;

use crate::config::ModelDir;
use crate::error::Result;
use crate::model::{CausalLm, ModelSummary};

pub fn load(dir: &ModelDir, _backend: Arc<dyn Backend>) -> Result<Box<dyn CausalLm>> {
    Err(dir.error("DeepSeek loading is not implemented yet"))
}

pub fn summarize(dir: &ModelDir) -> Result<ModelSummary> {
    Err(dir.error("DeepSeek summary is not implemented yet"))
}
