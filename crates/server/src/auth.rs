//! API keys: `Authorization: Bearer KEY` on `/v1/*`. The key is kept only as its SHA-256 digest
//! and compared digest to digest in constant time, so neither the comparison's duration nor the
//! key's length tells anything.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Constant-time comparison with the digest of `candidate`.
    pub fn matches(&self, candidate: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        let diff = self
            .0
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// The bearer token of a request, if any.
fn bearer(request: &Request) -> Option<&str> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: 401 unless the request carries the server's key (when it has one).
pub async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.key {
        match bearer(&request) {
            None => return ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`").into_response(),
            Some(token) if !key.matches(token) => return ApiError::Unauthorized("invalid API key").into_response(),
            Some(_) => {}
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare() {
        let key = KeyDigest::of("sk-secret");
        assert!(key.matches("sk-secret"));
        assert!(!key.matches("sk-secreT"));
        assert!(!key.matches(""));
        assert!(!format!("{key:?}").contains("secret"));
    }
}
