//! Server-sent events: `data: {json}` per chunk, `data: [DONE]` at the end, and an error object
//! in place of a chunk when a sequence fails mid-stream.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;

use crate::error::ApiError;

pub fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => error_event(&ApiError::Internal(format!("cannot serialize a chunk: {e}"))),
    }
}

pub fn error_event(error: &ApiError) -> Event {
    Event::default().data(serde_json::to_string(&error.body()).unwrap_or_default())
}

pub fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// The response for a stream of event batches.
pub fn response<S>(batches: S) -> Response
where
    S: Stream<Item = Vec<Event>> + Send + 'static,
{
    let events = batches
        .flat_map(|batch| stream::iter(batch.into_iter().map(Ok::<_, Infallible>)))
        .boxed();
    Sse::new(events).into_response()
}
