//! Request/response header handling: content types, ETags, `Prefer`, body limits.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bson::DateTime;
use serde_json::Value;

use crate::body::BodyError;
use crate::error::{operation_outcome, FhirError, IssueCode};
use crate::fhir::FHIR_JSON;

pub use crate::error::etag;

/// Parses `W/"3"` (also `"3"`, and a bare `3` as some clients send it) to a version
/// number. Quotes must come in a pair around the digits (RFC 9110 entity-tag): `"3`, `3"`,
/// `W/3"` and `""3""` are not ETags, nor is anything but decimal digits inside.
pub fn parse_etag(value: &str) -> Option<i64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = match v.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => v,
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|n: &i64| *n > 0)
}

/// The version named by `If-Match`, if present (400 when it is not a version ETag).
pub fn if_match(headers: &HeaderMap) -> Result<Option<i64>, FhirError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_etag)
            .map(Some)
            .ok_or_else(|| FhirError::bad_request(format!("If-Match {v:?} is not a version ETag like W/\"3\""))),
    }
}

/// The media type of the body (`Content-Type` without parameters, lower case; empty when
/// absent).
pub fn media_type(headers: &HeaderMap) -> String {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    given.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Rejects a request whose `Content-Type` is not one of `allowed` (415).
pub fn require_content_type(headers: &HeaderMap, allowed: &[&str]) -> Result<(), FhirError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = media_type(headers);
    if allowed.contains(&essence.as_str()) {
        Ok(())
    } else if essence.is_empty() {
        Err(FhirError::unsupported_media_type(format!("missing Content-Type; expected one of {}", allowed.join(", "))))
    } else {
        Err(FhirError::unsupported_media_type(format!(
            "Content-Type '{given}' is not supported here; expected one of {}",
            allowed.join(", ")
        )))
    }
}

/// Reads the whole body, refusing more than `limit` bytes (413).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, FhirError> {
    crate::body::read_limited(headers, body, limit).await.map_err(|e| match e {
        BodyError::TooLarge => FhirError::payload_too_large(limit),
        BodyError::TimedOut => FhirError::request_timeout(),
        BodyError::Unreadable(e) => FhirError::bad_request(format!("could not read the request body: {e}")),
    })
}

/// Drops `null`, empty arrays and empty objects from a request body, or refuses them (400
/// naming the first) under `Prefer: handling=strict`.
pub fn drop_empty(value: &mut Value, resource_type: &str, strict: bool) -> Result<(), FhirError> {
    match crate::model::lenient::drop_empty(value, resource_type) {
        Some(path) if strict => Err(crate::model::lenient::refusal(path).into()),
        _ => Ok(()),
    }
}

/// `Prefer: return=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

fn prefer_values(headers: &HeaderMap) -> impl Iterator<Item = (String, String)> + '_ {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| {
        v.split([',', ';']).filter_map(|p| {
            let (k, val) = p.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), val.trim().trim_matches('"').to_string()))
        })
    })
}

pub fn prefer_return(headers: &HeaderMap) -> Return {
    prefer_values(headers)
        .find(|(k, _)| k == "return")
        .map(|(_, v)| match v.as_str() {
            "minimal" => Return::Minimal,
            "OperationOutcome" => Return::OperationOutcome,
            _ => Return::Representation,
        })
        .unwrap_or(Return::Representation)
}

/// `Prefer: handling=strict` makes unknown search parameters an error.
pub fn prefer_strict(headers: &HeaderMap) -> bool {
    prefer_values(headers).any(|(k, v)| k == "handling" && v == "strict")
}

pub fn http_date(t: DateTime) -> String {
    let secs = t.timestamp_millis().div_euclid(1000);
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

/// A JSON response with the FHIR content type.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// The response to a write or read of one resource version.
pub struct VersionResponse<'a> {
    pub status: StatusCode,
    pub version: i64,
    pub last_updated: DateTime,
    pub resource: Option<&'a Value>,
    pub location: Option<String>,
    pub prefer: Return,
    /// What to say when `Prefer: return=OperationOutcome`.
    pub outcome_message: &'a str,
}

impl IntoResponse for VersionResponse<'_> {
    fn into_response(self) -> Response {
        let mut response = match (self.prefer, self.resource) {
            (Return::Minimal, _) | (_, None) => {
                let mut r = self.status.into_response();
                *r.body_mut() = Body::empty();
                r
            }
            (Return::OperationOutcome, _) => fhir_json(
                self.status,
                &operation_outcome("information", IssueCode::Informational, self.outcome_message, None),
            ),
            (Return::Representation, Some(resource)) => fhir_json(self.status, resource),
        };
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&etag(self.version)) {
            headers.insert(header::ETAG, v);
        }
        if let Ok(v) = HeaderValue::from_str(&http_date(self.last_updated)) {
            headers.insert(header::LAST_MODIFIED, v);
        }
        if let Some(v) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(header::LOCATION, v.clone());
            if self.status == StatusCode::CREATED {
                headers.insert(header::CONTENT_LOCATION, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"12\""), Some(12));
        assert_eq!(parse_etag("\"3\""), Some(3));
        assert_eq!(parse_etag("W/\"x\""), None);
        assert_eq!(parse_etag("W/\"0\""), None);
        assert_eq!(parse_etag("3"), Some(3));
        for malformed in
            ["\"1", "1\"", "W/1\"", "\"\"1\"\"", "W/\"+1\"", "\" 1\"", "W/\"\"", "W/\"99999999999999999999\""]
        {
            assert_eq!(parse_etag(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn prefer_header() {
        let mut h = HeaderMap::new();
        h.insert("prefer", HeaderValue::from_static("return=minimal, handling=strict"));
        assert_eq!(prefer_return(&h), Return::Minimal);
        assert!(prefer_strict(&h));
    }
}
