//! r1serve's OpenAI-compatible HTTP server (axum).
//!
//! - [`Server::bind`] starts listening at once: `/health` answers 503 until
//!   [`Server::set_ready`] hands over the loaded model ([`ModelContext`]), then 200.
//! - Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//!   `GET /health`, `GET /metrics` (Prometheus text, vLLM names).
//! - [`Server::shutdown`] stops accepting, lets running requests finish for a while, then aborts
//!   the rest.
//! - [`load_text`]: the tokenizer and chat template a model is served with (the HF files beside
//!   it, else a GGUF file's metadata).
//!
//! A request's path: [`extract`] (JSON, 400/413) → [`auth`] (401) → handler ([`chat`],
//! [`completions`]): validation ([`params`]), template and tokenizer on a blocking thread,
//! admission (429), [`generation`] (engine events → [`seq`] → deltas) → one JSON body or
//! [`sse`] chunks.

pub mod auth;
pub mod chat;
pub mod completions;
mod error;
pub mod extract;
pub mod generation;
pub mod logprobs;
pub mod metrics;
pub mod params;
pub mod protocol;
pub mod routes;
pub mod seq;
mod server;
pub mod sse;
pub mod state;
pub mod stop;
pub mod text;

pub use error::{ApiError, ErrorBody, ErrorObject, ServerError};
pub use server::Server;
pub use state::ModelContext;
pub use text::{load_text, load_tokenizer};

/// The body limit unless configured otherwise (2 MB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `host:port`; port 0 picks a free one (see [`Server::local_addr`]).
    pub addr: String,
    /// The name clients use in `model` (and `/v1/models` lists).
    pub served_model_name: String,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Sequences admitted beyond `max_num_seqs` to wait in the queue; past that, 429.
    pub max_waiting: usize,
    /// Accept a `chat_template` in requests (it runs sandboxed and fuel-limited, but is off by default).
    pub trust_request_chat_template: bool,
    /// Reasoning tokens at most before `</think>` is forced, unless a request says otherwise.
    pub reasoning_budget: Option<u32>,
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8000".into(),
            served_model_name: "r1serve".into(),
            api_key: None,
            max_waiting: 1024,
            trust_request_chat_template: false,
            reasoning_budget: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}
