//! Finding a model's chat template and special tokens in its directory.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::ChatError;

/// A template's source and the special tokens rendered with it.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSource {
    pub source: String,
    /// Where it came from (file, and the entry of a list of named templates).
    pub name: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// Template files larger than this are refused.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Looks, in order, for `chat_template.jinja`, `chat_template.json` and the `chat_template` field
/// of `tokenizer_config.json`. BOS/EOS always come from `tokenizer_config.json` when it exists.
pub(crate) fn find(dir: &Path) -> Result<Option<TemplateSource>, ChatError> {
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        Some(read_json(&config_path)?)
    } else {
        None
    };
    let (bos_token, eos_token) = match &config {
        Some(config) => (
            special_token(&config_path, config, "bos_token")?,
            special_token(&config_path, config, "eos_token")?,
        ),
        None => (String::new(), String::new()),
    };

    let jinja_path = dir.join("chat_template.jinja");
    let json_path = dir.join("chat_template.json");
    let found = if jinja_path.exists() {
        Some((read_text(&jinja_path)?, jinja_path.display().to_string()))
    } else if json_path.exists() {
        template_field(&json_path, &read_json(&json_path)?)?
    } else if let Some(config) = &config {
        template_field(&config_path, config)?
    } else {
        None
    };
    Ok(found.map(|(source, name)| TemplateSource {
        source,
        name,
        bos_token,
        eos_token,
    }))
}

fn read_text(path: &Path) -> Result<String, ChatError> {
    let read_err = |source| ChatError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(ChatError::Config {
            path: path.to_owned(),
            field: "(file)",
            message: format!("{len} bytes is over the limit of {MAX_CONFIG_BYTES}"),
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

fn read_json(path: &Path) -> Result<Json, ChatError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| ChatError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `chat_template` as a string, or as a list of `{"name", "template"}` of which "default" is used.
fn template_field(path: &Path, config: &Json) -> Result<Option<(String, String)>, ChatError> {
    let bad = |message: String| ChatError::Config {
        path: PathBuf::from(path),
        field: "chat_template",
        message,
    };
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(source)) => Ok(Some((source.clone(), path.display().to_string()))),
        Some(Json::Array(entries)) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(Json::as_str);
                let source = entry.get("template").and_then(Json::as_str);
                match (name, source) {
                    (Some("default"), Some(source)) => {
                        return Ok(Some((source.to_owned(), format!("{} (\"default\")", path.display()))))
                    }
                    (Some(name), Some(_)) => names.push(name.to_owned()),
                    _ => {
                        return Err(bad(
                            "list entries must be {\"name\": string, \"template\": string}".into()
                        ))
                    }
                }
            }
            Err(bad(format!("no template named \"default\" (found {names:?})")))
        }
        Some(other) => Err(bad(format!("expected a string or a list, found {}", kind(other)))),
    }
}

/// A special token written as a string or as an `AddedToken` object `{"content": ...}`; absent or
/// null is the empty string.
fn special_token(path: &Path, config: &Json, field: &'static str) -> Result<String, ChatError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Object(map)) => match map.get("content") {
            Some(Json::String(s)) => Ok(s.clone()),
            _ => Err(ChatError::Config {
                path: path.to_owned(),
                field,
                message: "object has no string \"content\"".into(),
            }),
        },
        Some(other) => Err(ChatError::Config {
            path: path.to_owned(),
            field,
            message: format!("expected a string or {{\"content\": ...}}, found {}", kind(other)),
        }),
    }
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}
