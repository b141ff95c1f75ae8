//! Reading a whole request body under a size limit, for handlers whose limit is not axum's
//! default (2 MB) and whose refusal must be in their own error format.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use futures_util::StreamExt;

pub enum BodyError {
    /// Longer than the limit, declared or as read.
    TooLarge,
    /// The body paused, or took in all, longer than the server's limits (see `server`).
    TimedOut,
    /// The connection failed while reading.
    Unreadable(String),
}

/// How much of an over-limit body is read and thrown away before the refusal is sent. A
/// client usually sends its whole body before reading the answer: if the server closed the
/// connection with unread data, the client would see a reset instead of the 413. Beyond
/// this the connection is cut (the body timeouts bound how long draining may take).
const DRAIN_MAX: u64 = 16 * 1024 * 1024;

/// The whole body, at most `limit` bytes. A body declared or found to be longer is refused
/// (after draining up to [`DRAIN_MAX`] more, see there).
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let limit = limit as u64;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    // A declared length is a claim, not a promise: reserve little up front.
    let mut kept = Vec::with_capacity(declared.unwrap_or(0).min(limit).min(1 << 20) as usize);
    let mut seen = 0u64;
    let mut frames = body.into_data_stream();
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_MAX)) {
        return Err(BodyError::TooLarge); // not worth draining: the connection is cut
    }
    while let Some(chunk) = frames.next().await {
        let chunk = chunk.map_err(classify)?;
        seen += chunk.len() as u64;
        if seen > limit.saturating_add(DRAIN_MAX) {
            break;
        }
        if seen <= limit && declared.is_none_or(|n| n <= limit) {
            kept.extend_from_slice(&chunk);
        }
    }
    if seen > limit || declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(kept))
}

/// A body read error: the server's timeouts, or the connection.
fn classify(e: axum::Error) -> BodyError {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        if s.is::<tower_http::timeout::TimeoutError>() {
            return BodyError::TimedOut;
        }
        source = s.source();
    }
    BodyError::Unreadable(e.to_string())
}
