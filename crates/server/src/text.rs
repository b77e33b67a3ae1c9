//! Which tokenizer and chat template a model is served with. The HF files next to the model come
//! first (`tokenizer.json`, `tokenizer_config.json`, ...), so a user can always override; a GGUF
//! model's own metadata fills in what they lack; the built-in R1 template is the last resort.
//!
//! This lives here, not in `chat` or `model`: it is the one place that needs both (the chat crate
//! never reads GGUF, the model crate never tokenizes), and the server is what serves the result.

use std::path::{Path, PathBuf};

use r1serve_chat::template::TemplateSource;
use r1serve_chat::{ChatTemplate, Tokenizer};
use r1serve_model::gguf::{self, GgufFile};

use crate::error::ServerError;

/// The tokenizer and chat template for a model path (a model directory, a `.gguf` file, or a
/// directory holding one `.gguf`): `tokenizer.json` and the template files of the model's
/// directory when present, else the GGUF metadata; the template falls back to the built-in R1 one.
/// The tokenizer is `None` only when neither source has one.
pub fn load_text(model: &Path) -> Result<(Option<Tokenizer>, ChatTemplate), ServerError> {
    let dir = text_dir(model);
    let gguf = open_gguf(model)?;
    let tokenizer = tokenizer_from(&dir, gguf.as_ref())?;
    let embedded = match &gguf {
        Some(file) => embedded_template(file)?,
        None => None,
    };
    let template = ChatTemplate::for_model_with(&dir, embedded, tokenizer.as_ref())?;
    Ok((tokenizer, template))
}

/// The tokenizer alone, by the same rule as [`load_text`].
pub fn load_tokenizer(model: &Path) -> Result<Option<Tokenizer>, ServerError> {
    tokenizer_from(&text_dir(model), open_gguf(model)?.as_ref())
}

/// Where a model's HF text files live: the model directory, or a `.gguf` file's folder.
pub fn text_dir(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.to_path_buf()
    } else {
        model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

fn open_gguf(model: &Path) -> Result<Option<GgufFile>, ServerError> {
    match gguf::resolve(model)? {
        Some(path) => Ok(Some(GgufFile::open(&path)?)),
        None => Ok(None),
    }
}

fn tokenizer_from(dir: &Path, gguf: Option<&GgufFile>) -> Result<Option<Tokenizer>, ServerError> {
    if let Some(tokenizer) = Tokenizer::from_model_dir(dir)? {
        return Ok(Some(tokenizer));
    }
    let Some(file) = gguf else {
        return Ok(None);
    };
    match file.hf_tokenizer()? {
        Some(json) => Ok(Some(Tokenizer::from_json(&json, origin(file, "tokenizer.ggml.*"))?)),
        None => Ok(None),
    }
}

/// The GGUF file's `tokenizer.chat_template` with its BOS/EOS strings (empty when absent, as for a
/// `tokenizer_config.json` without them).
fn embedded_template(file: &GgufFile) -> Result<Option<TemplateSource>, ServerError> {
    let text = file.text()?;
    Ok(text.chat_template.map(|source| TemplateSource {
        source,
        name: origin(file, "tokenizer.chat_template").display().to_string(),
        bos_token: text.bos_token.unwrap_or_default(),
        eos_token: text.eos_token.unwrap_or_default(),
    }))
}

/// `model.gguf (key)`, how errors name a value read from the file's metadata.
fn origin(file: &GgufFile, key: &str) -> PathBuf {
    PathBuf::from(format!("{} ({key})", file.path.display()))
}
