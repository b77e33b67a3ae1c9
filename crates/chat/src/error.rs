//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong on the text side. Each variant names the file, template line or limit
/// involved, so a message can be shown to the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("chat template {name}{}: syntax error: {message}", at_line(*line))]
    TemplateSyntax {
        name: String,
        line: Option<usize>,
        message: String,
    },
    #[error("chat template {name}{}: {message}", at_line(*line))]
    TemplateRender {
        name: String,
        line: Option<usize>,
        message: String,
    },
    /// The template called `raise_exception(message)`: the conversation is not one it accepts.
    #[error("chat template rejected the conversation: {message}")]
    TemplateRaised { message: String },
    #[error("chat template {name}: render exceeded the fuel limit of {limit} instructions")]
    TemplateFuel { name: String, limit: u64 },
    #[error("chat template {name}: rendered prompt exceeds the limit of {limit} bytes")]
    TemplateOutputTooLarge { name: String, limit: usize },
    #[error("messages[{index}]: {message}")]
    InvalidMessage { index: usize, message: String },
    #[error("tokenizer has no token {token:?}")]
    MissingToken { token: String },
}

fn at_line(line: Option<usize>) -> String {
    match line {
        Some(line) => format!(" line {line}"),
        None => String::new(),
    }
}
