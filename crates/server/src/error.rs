//! Errors: [`ApiError`] is what a request gets back (an HTTP status and an OpenAI-shaped body,
//! `{"error": {"message", "type", "param", "code"}}`); [`ServerError`] is what starting or
//! stopping the server can fail with.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use r1serve_chat::ChatError;
use r1serve_engine::EngineError;
use serde::Serialize;

/// A request that cannot be served, mapped to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a field of the wrong type or out of range, a prompt over the context.
    #[error("{message}")]
    BadRequest {
        message: String,
        /// The request field at fault, when known.
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("too many requests: {in_flight} sequences are running or queued (limit {limit}); retry later")]
    TooManyRequests {
        in_flight: usize,
        limit: usize,
        retry_after_s: u64,
    },
    #[error("the model is still loading")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A field's value is wrong: the message should say what was expected and what came.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_owned()),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body's `error` object.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::BadRequest { param, code, .. } => ("invalid_request_error", param.clone(), *code),
            Self::Unauthorized(_) => ("authentication_error", None, Some("invalid_api_key")),
            Self::ModelNotFound(_) => ("not_found_error", Some("model".to_owned()), Some("model_not_found")),
            Self::NotFound(_) => ("not_found_error", None, None),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", None, Some("request_too_large")),
            Self::TooManyRequests { .. } => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            Self::NotReady | Self::ShuttingDown => ("service_unavailable_error", None, None),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::TooManyRequests { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::ExceedsContext { .. } | EngineError::ExceedsKvCache { .. } => Self::BadRequest {
                message: e.to_string(),
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            EngineError::TokenOutOfVocab { .. } | EngineError::InvalidRequest(_) => Self::bad_request(e.to_string()),
            EngineError::ShutDown => Self::ShuttingDown,
            EngineError::Model(_) | EngineError::Config(_) | EngineError::UnknownSequence(_) => {
                Self::Internal(e.to_string())
            }
        }
    }
}

impl From<ChatError> for ApiError {
    /// A template or tokenizer failure on a request's messages is the request's fault; one
    /// about the model's own files is the server's.
    fn from(e: ChatError) -> Self {
        match &e {
            ChatError::Load { .. } | ChatError::Read { .. } | ChatError::Json { .. } | ChatError::Config { .. } => {
                Self::Internal(e.to_string())
            }
            ChatError::InvalidMessage { index, .. } => {
                Self::invalid_param(&format!("messages[{index}]"), e.to_string())
            }
            _ => Self::bad_request(e.to_string()),
        }
    }
}

/// Starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the model is already loaded")]
    AlreadyReady,
    #[error("the model's tokenizer: {0}")]
    Chat(#[from] ChatError),
    /// The model's file could not be read for its tokenizer metadata.
    #[error("{0}")]
    Model(#[from] r1serve_model::ModelError),
    #[error("the server task failed: {0}")]
    Task(String),
}
