//! Framework rejections, and handler panics, in the API's own error formats.
//!
//! axum answers a request its extractors cannot take (a path segment that is not UTF-8
//! after percent-decoding, a query string `serde` cannot read, a body that fails to arrive)
//! with a `text/plain` response before any handler runs. Clients of `/4_0_0` expect an
//! OperationOutcome for every error and clients of `/events` the event store's JSON error,
//! so these middlewares turn such a response into one, keeping its status and its text as
//! the diagnostic. Invariant: no handler of this server answers an error as `text/plain`,
//! so only the framework's rejections are rewritten.
//!
//! A handler that panics (a bug: none is known) would drop the connection without an
//! answer; each API's router catches it (`CatchPanicLayer` with [`fhir_panic`] or
//! [`events_panic`]) and answers a logged 500 instead, as for any other server fault.

use std::any::Any;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{FhirError, IssueCode};

/// Longest rejection text kept (axum's are one line).
const MAX_TEXT: usize = 4096;

/// The status and text of a framework rejection, or the response unchanged.
async fn rejection(response: Response) -> Result<(StatusCode, String), Response> {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return Err(response);
    }
    let bytes = axum::body::to_bytes(response.into_body(), MAX_TEXT).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    Ok((status, if text.is_empty() { status.canonical_reason().unwrap_or("rejected").to_string() } else { text }))
}

/// Under `/4_0_0`: an OperationOutcome.
pub async fn fhir(request: Request, next: Next) -> Response {
    match rejection(next.run(request).await).await {
        Err(response) => response,
        Ok((status, text)) => {
            let code = match status {
                StatusCode::REQUEST_TIMEOUT => IssueCode::Timeout,
                StatusCode::PAYLOAD_TOO_LARGE => IssueCode::TooLong,
                s if s.is_server_error() => IssueCode::Exception,
                _ => IssueCode::Invalid,
            };
            FhirError::new(status, code, text).into_response()
        }
    }
}

/// Under `/events`: `{"error": …}`.
pub async fn events(request: Request, next: Next) -> Response {
    match rejection(next.run(request).await).await {
        Err(response) => response,
        Ok((status, text)) => {
            let body = serde_json::json!({ "error": text }).to_string();
            (status, [(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response()
        }
    }
}

/// What a panic carried, for the log.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("?")
}

/// A panicked handler under `/4_0_0`: a 500 OperationOutcome (the cause is logged).
pub fn fhir_panic(panic: Box<dyn Any + Send + 'static>) -> Response {
    FhirError::internal(format!("a handler panicked: {}", panic_message(&*panic))).into_response()
}

/// A panicked handler under `/events`: a 500 `{"error": …}` (the cause is logged).
pub fn events_panic(panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!(panic = panic_message(&*panic), "an event store handler panicked");
    let body = serde_json::json!({ "error": "internal error; it has been logged" }).to_string();
    (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;
    use tower_http::catch_panic::CatchPanicLayer;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_in_its_api_format() {
        let router = Router::new().route("/4_0_0/boom", get(boom)).layer(CatchPanicLayer::custom(fhir_panic));
        let request = axum::http::Request::get("/4_0_0/boom").body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert!(!outcome.to_string().contains("boom"), "internals are logged, not shown: {outcome}");

        let response = events_panic(Box::new("boom"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("\"error\""));
    }
}
