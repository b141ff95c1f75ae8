//! Reading a whole request body under a size limit, for handlers whose limit is not axum's
//! default (2 MB) and whose refusal must be in their own error format.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};

pub enum BodyError {
    /// Longer than the limit, declared or as read.
    TooLarge,
    /// The body paused, or took in all, longer than the server's limits (see `server`).
    TimedOut,
    /// The connection failed while reading.
    Unreadable(String),
}

/// The whole body, at most `limit` bytes; a declared `Content-Length` over it is refused
/// before reading.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // axum wraps http-body-util's `LengthLimitError`, which it does not re-export.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<tower_http::timeout::TimeoutError>() {
                return BodyError::TimedOut;
            }
            if s.to_string().contains("length limit exceeded") {
                return BodyError::TooLarge;
            }
            source = s.source();
        }
        BodyError::Unreadable(e.to_string())
    })
}
