//! The router: endpoints, the API-key check on `/v1/*`, the body limit, and the panic guard that
//! turns a panicking handler into a 500 instead of a dropped connection.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::FutureExt;

use crate::error::ApiError;
use crate::extract::BodyLimit;
use crate::protocol::{unix_now, ModelCard, ModelList};
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/chat/completions", post(crate::chat::chat_completions))
        .route("/v1/completions", post(crate::completions::completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::auth::require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |mut request: Request, next: Next| {
            request.extensions_mut().insert(BodyLimit(limit));
            next.run(request)
        }))
        .layer(middleware::from_fn(catch_panic))
        .with_state(state)
}

/// A handler that panics answers 500; the server and the other requests go on.
pub async fn catch_panic(request: Request, next: Next) -> Response {
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(panic = %message, "a request handler panicked");
            ApiError::Internal("the request handler panicked".into()).into_response()
        }
    }
}

/// 200 once the model is loaded; 503 while it loads or the server shuts down.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.ready() {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let ctx = state.ready()?;
    let name = state.config.served_model_name.clone();
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            root: if ctx.root.is_empty() {
                name.clone()
            } else {
                ctx.root.clone()
            },
            id: name,
            object: "model",
            created: unix_now(),
            owned_by: "r1serve",
            max_model_len: ctx.engine.limits().max_model_len,
        }],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let Some(ctx) = state.model.get() else {
        return ApiError::NotReady.into_response();
    };
    let text = crate::metrics::render(&ctx.engine.stats(), &state.config.served_model_name);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
}
