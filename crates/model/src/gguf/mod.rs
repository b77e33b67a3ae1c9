//! GGUF files (llama.cpp's single-file format): a hostile-input-safe header parser over a memory
//! map, the translation of its metadata into the HF `config.json` the architectures parse (and
//! into the `tokenizer.json` and chat template the text side needs), and its tensors under HF
//! names.
//!
//! A GGUF model is opened with [`crate::ModelDir::open`] (a `.gguf` path, or a directory holding
//! exactly one `.gguf` and no `config.json`) and loaded by the registry like any other:
//! `load_model("model.gguf", backend)`.

mod error;
mod hf_config;
mod mapping;
mod metadata;
mod pretokenizer;
mod reader;
mod rope;
mod tokenizer;
mod types;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

pub use error::GgufError;
pub use metadata::{GgufArray, GgufValue, Metadata};
pub use pretokenizer::SUPPORTED as SUPPORTED_PRE_TOKENIZERS;
pub use reader::{parse, Header, TensorInfo, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN, MAX_STRING_LEN};
pub use tokenizer::{hf_tokenizer, text, GgufText, SUPPORTED_MODELS as SUPPORTED_TOKENIZER_MODELS};
pub use types::GgmlType;
pub use weights::GgufWeights;

use crate::config::ModelDir;
use crate::error::{ModelError, Result};

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<Mmap>,
}

impl GgufFile {
    /// Maps `path` and parses its header; every tensor's byte range is checked to lie in the file.
    pub fn open(path: &Path) -> Result<Self> {
        let map = crate::weights::map_readonly(path)?;
        let header = parse(&map).map_err(|source| ModelError::Gguf {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            header,
            map: Arc::new(map),
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The HF `config.json` equivalent of the metadata.
    pub fn hf_config(&self) -> Result<Value> {
        hf_config::hf_config(&self.header, self.bytes()).map_err(|e| self.error(e))
    }

    /// The HF `tokenizer.json` equivalent of the tokenizer metadata; `None` when the file has no
    /// vocabulary.
    pub fn hf_tokenizer(&self) -> Result<Option<Value>> {
        tokenizer::hf_tokenizer(&self.header.metadata).map_err(|e| self.error(e))
    }

    /// The chat template and the BOS/EOS/PAD token strings.
    pub fn text(&self) -> Result<GgufText> {
        tokenizer::text(&self.header.metadata).map_err(|e| self.error(e))
    }

    fn error(&self, source: GgufError) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            source,
        }
    }
}

/// Whether `path` names a GGUF file by its extension.
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF file a model path stands for: the path itself when it names a `.gguf` file, else the
/// one `.gguf` in a directory without a `config.json` (the rule [`ModelDir::open`] follows).
pub fn resolve(path: &Path) -> Result<Option<PathBuf>> {
    if is_gguf_path(path) && !path.is_dir() {
        return Ok(Some(path.to_owned()));
    }
    if path.is_dir() && !path.join("config.json").exists() {
        return single_gguf_in(path);
    }
    Ok(None)
}

/// The one `.gguf` file in `dir`: `None` when there is none, an error naming them when there are
/// several.
pub fn single_gguf_in(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| is_gguf_path(p) && p.is_file())
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ModelError::Config {
            path: dir.to_owned(),
            message: format!(
                "directory holds {} .gguf files ({}); pass the path of the one to load",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// A [`ModelDir`] whose config is synthesised from the GGUF metadata; its `config_path` is the
/// `.gguf` file, so config errors name it.
pub fn model_dir(path: &Path) -> Result<ModelDir> {
    let file = GgufFile::open(path)?;
    let config = file.hf_config()?;
    Ok(ModelDir {
        dir: path.parent().map(Path::to_owned).unwrap_or_default(),
        config_path: path.to_owned(),
        config,
        generation_config: None,
    })
}
