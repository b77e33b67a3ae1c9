//! What the handlers share: the configuration, the loaded model (absent while it loads), and the
//! admission counter behind the 429 limit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use r1serve_chat::{ChatTemplate, ThinkTokens, Tokenizer};
use r1serve_engine::Engine;

use crate::auth::KeyDigest;
use crate::error::{ApiError, ServerError};
use crate::ServerConfig;

/// A loaded model, ready to serve.
pub struct ModelContext {
    pub(crate) engine: Arc<Engine>,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) template: Arc<ChatTemplate>,
    pub(crate) think: Option<ThinkTokens>,
    /// Ids of `"\n</think>\n\n"` (empty for a model without reasoning tokens).
    pub(crate) forced_think_end: Vec<u32>,
    pub(crate) eos: Vec<u32>,
    pub(crate) max_num_seqs: usize,
    pub(crate) root: String,
}

impl ModelContext {
    /// `max_num_seqs`: what the engine was started with (running sequences at most).
    pub fn new(
        engine: Engine,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        max_num_seqs: usize,
    ) -> Result<Self, ServerError> {
        let think = tokenizer.think_tokens();
        let forced_think_end = match think {
            Some(_) => match r1serve_chat::budget::forced_ids(&tokenizer) {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "thinking budgets are disabled");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let eos = engine.model_info().eos_token_ids.clone();
        Ok(Self {
            engine: Arc::new(engine),
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            think,
            forced_think_end,
            eos,
            max_num_seqs: max_num_seqs.max(1),
            root: String::new(),
        })
    }

    /// Where the model came from (`root` in `/v1/models`).
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into().display().to_string();
        self
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// For front ends other than HTTP (`r1serve chat`, `eval`) that render and decode themselves.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
}

pub struct AppState {
    pub(crate) config: ServerConfig,
    pub(crate) key: Option<KeyDigest>,
    pub(crate) model: OnceLock<Arc<ModelContext>>,
    in_flight: AtomicUsize,
    next_request: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        let key = config.api_key.as_deref().map(KeyDigest::of);
        Self {
            config,
            key,
            model: OnceLock::new(),
            in_flight: AtomicUsize::new(0),
            next_request: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The model, or 503 while it loads or once shutdown began.
    pub fn ready(&self) -> Result<Arc<ModelContext>, ApiError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        self.model.get().cloned().ok_or(ApiError::NotReady)
    }

    /// 404 unless `model` is absent or the served name.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None | Some("") => Ok(()),
            Some(name) if name == self.config.served_model_name => Ok(()),
            Some(name) => Err(ApiError::ModelNotFound(name.to_owned())),
        }
    }

    /// A fresh request id with `prefix` ("chatcmpl", "cmpl").
    pub fn request_id(&self, prefix: &str) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!("{prefix}-{nanos:016x}{n:08x}")
    }

    /// Reserves `n` sequence slots among the `max_num_seqs + max_waiting` the server takes at
    /// once; 429 when they are taken.
    pub fn admit(self: &Arc<Self>, ctx: &ModelContext, n: usize) -> Result<Admission, ApiError> {
        let limit = ctx.max_num_seqs.saturating_add(self.config.max_waiting);
        if n > limit {
            return Err(ApiError::invalid_param(
                "n",
                format!("{n} sequences are more than this server runs at once ({limit})"),
            ));
        }
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current + n > limit {
                return Err(ApiError::TooManyRequests {
                    in_flight: current,
                    limit,
                    retry_after_s: 1,
                });
            }
            match self
                .in_flight
                .compare_exchange_weak(current, current + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Admission {
                        state: Arc::clone(self),
                        n,
                    })
                }
                Err(actual) => current = actual,
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Sequence slots held by one request; released on drop.
pub struct Admission {
    state: Arc<AppState>,
    n: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}
