//! One error type for the HTTP layer. It renders itself as a FHIR `OperationOutcome` with
//! the right status, so handlers just return `Result<_, FhirError>`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::model::validate::{Invalid, Problem};

/// The media type of FHIR JSON bodies (the server's default answer).
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// The weak ETag of a version: `W/"3"`.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// `OperationOutcome.issue.code` values this server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Value,
    Required,
    NotFound,
    Deleted,
    Conflict,
    Processing,
    NotSupported,
    TooLong,
    TooCostly,
    Exception,
    Duplicate,
    Informational,
    Timeout,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Value => "value",
            IssueCode::Required => "required",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::Conflict => "conflict",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::TooLong => "too-long",
            IssueCode::TooCostly => "too-costly",
            IssueCode::Exception => "exception",
            IssueCode::Duplicate => "duplicate",
            IssueCode::Informational => "informational",
            IssueCode::Timeout => "timeout",
        }
    }
}

#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub code: IssueCode,
    pub diagnostics: String,
    /// FHIRPath-style location of the problem (e.g. `Patient.birthDate`), when known.
    pub expression: Option<String>,
    /// `ETag` to send along (a 410 names the deleted version).
    pub etag: Option<String>,
    /// What went wrong underneath (a driver's message): logged, never sent to the client.
    pub cause: Option<String>,
}

impl FhirError {
    pub fn new(status: StatusCode, code: IssueCode, diagnostics: impl Into<String>) -> Self {
        FhirError { status, code, diagnostics: diagnostics.into(), expression: None, etag: None, cause: None }
    }

    /// Names the element the problem is about.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, IssueCode::Invalid, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueCode::NotFound, msg)
    }
    pub fn gone(msg: impl Into<String>, version: i64) -> Self {
        let mut e = Self::new(StatusCode::GONE, IssueCode::Deleted, msg);
        e.etag = Some(etag(version));
        e
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, IssueCode::Conflict, msg)
    }
    pub fn precondition_failed(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, IssueCode::Conflict, msg)
    }
    pub fn unprocessable(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, IssueCode::Processing, msg)
    }
    pub fn unsupported_media_type(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, IssueCode::NotSupported, msg)
    }
    pub fn not_acceptable(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_ACCEPTABLE, IssueCode::NotSupported, msg)
    }
    pub fn method_not_allowed(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, IssueCode::NotSupported, msg)
    }
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooLong,
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }
    /// A genuine server fault: the cause is logged (with the request id, via the span) and
    /// the client gets a generic message.
    /// 408: the request body did not arrive in time (see `server`).
    pub fn request_timeout() -> Self {
        FhirError::new(
            StatusCode::REQUEST_TIMEOUT,
            IssueCode::Timeout,
            "the request body did not arrive in time; the client paused too long or sent too slowly",
        )
    }
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, IssueCode::Exception, cause.to_string())
    }
    /// A backing store did not answer: 503, so clients and proxies know to retry. `what`
    /// is shown (which store, what could not be done); `cause` is only logged.
    pub fn unavailable(what: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, IssueCode::Exception, what);
        e.cause = Some(cause.to_string());
        e
    }

    pub fn to_operation_outcome(&self) -> Value {
        operation_outcome(
            if self.status.is_server_error() { "fatal" } else { "error" },
            self.code,
            &self.diagnostics,
            self.expression.as_deref(),
        )
    }
}

impl std::fmt::Display for FhirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.diagnostics)
    }
}

impl std::error::Error for FhirError {}

/// Builds a one-issue `OperationOutcome`.
pub fn operation_outcome(severity: &str, code: IssueCode, diagnostics: &str, expression: Option<&str>) -> Value {
    let mut issue = json!({ "severity": severity, "code": code.as_str(), "diagnostics": diagnostics });
    if let Some(expr) = expression {
        issue["expression"] = json!([expr]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

/// The member store (ClickHouse) failed: a 503 whose body names the store, not the driver.
impl From<clickhouse::error::Error> for FhirError {
    fn from(e: clickhouse::error::Error) -> Self {
        FhirError::unavailable("the member store is unavailable; retry", e)
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            let cause = self.cause.as_deref().unwrap_or("");
            tracing::error!(status = self.status.as_u16(), error = %self.diagnostics, cause, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.diagnostics, "request rejected");
        }
        let mut body = self.to_operation_outcome();
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // Do not leak internals; the log line above carries the cause and request id.
            body["issue"][0]["diagnostics"] = json!("internal server error; see the server log for this request id");
        }
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if let Some(etag) = self.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
            response.headers_mut().insert(header::ETAG, etag);
        }
        response
    }
}

/// A validation finding becomes a 400 (413 for an element repeated past the bound) naming
/// the element.
impl From<Invalid> for FhirError {
    fn from(e: Invalid) -> FhirError {
        let (status, code) = match e.problem {
            Problem::NotAResource => (StatusCode::BAD_REQUEST, IssueCode::Invalid),
            Problem::Structure => (StatusCode::BAD_REQUEST, IssueCode::Structure),
            Problem::Value => (StatusCode::BAD_REQUEST, IssueCode::Value),
            Problem::TooLong => (StatusCode::PAYLOAD_TOO_LARGE, IssueCode::TooLong),
        };
        let error = FhirError::new(status, code, e.diagnostics);
        match e.expression {
            Some(at) => error.at(at),
            None => error,
        }
    }
}
