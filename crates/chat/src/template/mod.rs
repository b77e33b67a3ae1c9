//! Chat templates: a model's `chat_template` (Jinja) rendered with minijinja, or a built-in R1 one.

mod env;
mod load;

use minijinja::value::{Serde, Value};
use minijinja::{Environment, ErrorKind};

use crate::message::TemplateMessage;
use crate::tokenizer::THINK_START;
use crate::{ChatError, ChatMessage, Tokenizer};

pub use load::TemplateSource;

/// What the generation prompt of a DeepSeek-V3/R1 template ends with.
pub const ASSISTANT_TAG: &str = "<｜Assistant｜>";
pub const R1_BOS: &str = "<｜begin▁of▁sentence｜>";
pub const R1_EOS: &str = "<｜end▁of▁sentence｜>";

/// Instructions one render may execute (minijinja fuel; data a template creates costs one per 64
/// bytes, so this also bounds its memory to about 128 MiB). A message of a few hundred bytes costs
/// about 70 through the DeepSeek templates: the default fits conversations of ~25k such messages.
pub const DEFAULT_FUEL: u64 = 2_000_000;
/// Largest rendered prompt accepted, in bytes.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 32 << 20;

const BUILTIN_R1: &str = include_str!("builtin_r1.jinja");

/// Per-request inputs to a render besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// End the prompt with the assistant's turn opener so the model answers.
    pub add_generation_prompt: bool,
    /// OpenAI `tools` (each `{"type": "function", "function": {...}}`), exposed as `tools`; `none` when
    /// absent, as `transformers` passes it.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Extra template variables (`chat_template_kwargs`); they never replace the standard ones.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template. `Send + Sync` and cheap to share: render from any thread
/// (e.g. `spawn_blocking`) through an `Arc<ChatTemplate>`.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    name: String,
    bos_token: String,
    eos_token: String,
    /// A reasoning model: a prompt ending in `<｜Assistant｜>` gets `<think>\n` appended.
    reasoning: bool,
    fuel: u64,
    max_output_bytes: usize,
}

impl ChatTemplate {
    /// Compiles `source`. `name` says where it came from (a file path) in error messages.
    pub fn new(
        source: impl Into<String>,
        name: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatError> {
        let name = name.into();
        let mut env = env::environment(DEFAULT_FUEL);
        env.add_template_owned(env::TEMPLATE_NAME, source.into())
            .map_err(|e| ChatError::TemplateSyntax {
                name: name.clone(),
                line: e.line(),
                message: error_message(&e),
            })?;
        Ok(Self {
            env,
            name,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            reasoning: false,
            fuel: DEFAULT_FUEL,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        })
    }

    /// Compiles a template found somewhere (a model directory's files, a GGUF file's metadata).
    pub fn from_source(found: TemplateSource) -> Result<Self, ChatError> {
        Self::new(found.source, found.name, found.bos_token, found.eos_token)
    }

    /// The template a model directory ships (`chat_template.jinja`, `chat_template.json`, or
    /// `tokenizer_config.json`'s `chat_template`), with its BOS/EOS tokens; `None` if it has none.
    pub fn from_model_dir(dir: &std::path::Path) -> Result<Option<Self>, ChatError> {
        load::find(dir)?.map(Self::from_source).transpose()
    }

    /// What a server loads for a model: its own template, else the built-in R1 one; a reasoning
    /// model (the tokenizer has `<think>`/`</think>`) gets `<think>\n` after the generation prompt.
    pub fn for_model(dir: &std::path::Path, tokenizer: Option<&Tokenizer>) -> Result<Self, ChatError> {
        Self::for_model_with(dir, None, tokenizer)
    }

    /// [`ChatTemplate::for_model`] with a second source: `embedded` (a GGUF file's
    /// `tokenizer.chat_template` and special tokens) is used when the directory has no template of
    /// its own, before falling back to the built-in one.
    pub fn for_model_with(
        dir: &std::path::Path,
        embedded: Option<TemplateSource>,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Self, ChatError> {
        let template = match load::find(dir)?.or(embedded) {
            Some(found) => Self::from_source(found)?,
            None => Self::builtin_r1(),
        };
        let reasoning = tokenizer.is_some_and(Tokenizer::is_reasoning_model);
        Ok(template.with_reasoning(reasoning))
    }

    /// The built-in DeepSeek-R1-style template, for models that ship none. It is a reasoning
    /// template (`with_reasoning(false)` turns the `<think>\n` opener off).
    pub fn builtin_r1() -> Self {
        match Self::new(BUILTIN_R1, "builtin-r1", R1_BOS, R1_EOS) {
            Ok(template) => template.with_reasoning(true),
            // The built-in source is fixed and covered by tests; this arm is unreachable.
            Err(e) => unreachable!("built-in template does not compile: {e}"),
        }
    }

    /// Whether the generation prompt opens a reasoning segment (`<think>\n`).
    pub fn with_reasoning(mut self, reasoning: bool) -> Self {
        self.reasoning = reasoning;
        self
    }

    /// Instruction budget of one render.
    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.fuel = fuel;
        self.env.set_fuel(Some(fuel));
        self
    }

    pub fn with_max_output_bytes(mut self, limit: usize) -> Self {
        self.max_output_bytes = limit;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    pub fn is_reasoning(&self) -> bool {
        self.reasoning
    }

    /// Renders a conversation to the prompt text. The prompt includes the BOS token: tokenize it
    /// with `add_special_tokens = false`. Earlier assistant turns lose their reasoning.
    pub fn render(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, ChatError> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| TemplateMessage::from_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let standard = [
            ("messages", Value::from(Serde(&messages))),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
            ("add_generation_prompt", Value::from(opts.add_generation_prompt)),
            ("tools", Value::from(Serde(&opts.tools))),
        ];
        let extra = opts
            .extra
            .iter()
            .filter(|(key, _)| !standard.iter().any(|(name, _)| name == key))
            .map(|(key, value)| (key.clone(), Value::from(Serde(value))));
        let ctx = Value::from_pairs(
            standard
                .iter()
                .map(|(key, value)| ((*key).to_owned(), value.clone()))
                .chain(extra),
        );

        let mut out = env::LimitedWriter {
            buf: Vec::new(),
            limit: self.max_output_bytes,
            exceeded: false,
        };
        let result = self
            .env
            .get_template(env::TEMPLATE_NAME)
            .and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ()));
        if let Err(e) = result {
            return Err(self.render_error(&e, out.exceeded));
        }
        let mut prompt = String::from_utf8(out.buf).map_err(|e| ChatError::TemplateRender {
            name: self.name.clone(),
            line: None,
            message: e.to_string(),
        })?;
        if self.reasoning && opts.add_generation_prompt && prompt.ends_with(ASSISTANT_TAG) {
            prompt.push_str(THINK_START);
            prompt.push('\n');
        }
        Ok(prompt)
    }

    fn render_error(&self, e: &minijinja::Error, output_exceeded: bool) -> ChatError {
        let name = self.name.clone();
        if output_exceeded {
            return ChatError::TemplateOutputTooLarge {
                name,
                limit: self.max_output_bytes,
            };
        }
        if e.kind() == ErrorKind::OutOfFuel {
            return ChatError::TemplateFuel { name, limit: self.fuel };
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(raised) = err.downcast_ref::<env::Raised>() {
                return ChatError::TemplateRaised {
                    message: raised.0.clone(),
                };
            }
            source = err.source();
        }
        ChatError::TemplateRender {
            name,
            line: e.line(),
            message: error_message(e),
        }
    }
}

/// minijinja's message without its own "(in template:line)" suffix: the error names the line.
fn error_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// Whether a rendered prompt leaves the model inside a reasoning segment (it ends with an open
/// `<think>`), so that generated text starts as reasoning.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_START)
}
