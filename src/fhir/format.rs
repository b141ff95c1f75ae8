//! The two normative FHIR formats, JSON and XML, in and out.
//!
//! Handlers speak JSON only. Every request under `/4_0_0` passes [`negotiate`], which
//! decides the response format from `_format` (which wins, as the spec says) or `Accept`,
//! answers 406 when neither JSON nor XML is acceptable, records the choice in the request's
//! extensions, and turns a JSON FHIR response into XML (or pretty JSON for `_pretty=true`)
//! on the way out. A handler that streams a large body (a Group's members) reads the
//! choice and streams XML itself; its response then already has the XML content type and
//! passes untouched.
//!
//! Request bodies are decoded by [`decode`]: XML (`application/fhir+xml`, `application/xml`)
//! becomes the JSON the rest of the server reads, through fhirbolt's element model in the
//! `fhir-model` facade.
//!
//! Failure modes: a response body that cannot be written as XML (it would have to be a
//! resource fhirbolt does not know) is logged and answered as a 500 OperationOutcome in
//! XML; a buffered JSON body is at most one search page or one resource, since the large
//! bodies stream.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::{FhirError, IssueCode};

/// The content type of FHIR XML responses.
pub const FHIR_XML: &str = "application/fhir+xml; charset=utf-8";

/// Largest JSON response turned into XML or pretty JSON in memory (larger bodies stream
/// and are produced in the right format by their handler).
const MAX_CONVERTED: usize = 256 * 1024 * 1024;

/// The format of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

/// What the client asked to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub format: Format,
    pub pretty: bool,
}

impl Default for Wanted {
    fn default() -> Self {
        Wanted { format: Format::Json, pretty: false }
    }
}

/// Classifies a media type or `_format` value; `None` for anything but JSON or XML.
fn classify(value: &str, wildcard: bool) -> Option<Format> {
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir" | "text/json" => {
            Some(Format::Json)
        }
        "xml" | "application/xml" | "application/fhir+xml" | "application/xml+fhir" | "text/xml" => Some(Format::Xml),
        "*/*" | "application/*" | "" if wildcard => Some(Format::Json),
        _ => None,
    }
}

/// The media types of request bodies, by format.
pub fn body_format(headers: &HeaderMap) -> Option<Format> {
    classify(&super::headers::media_type(headers), false)
}

/// The response format asked for by `_format` or `Accept` (406 when neither JSON nor XML
/// is acceptable). `Accept` entries are taken in order of their `q` values.
pub fn wanted(headers: &HeaderMap, query: Option<&str>) -> Result<Wanted, FhirError> {
    let mut wanted = Wanted::default();
    let params = query.map(|q| form_urlencoded::parse(q.as_bytes()).collect::<Vec<_>>()).unwrap_or_default();
    if let Some((_, pretty)) = params.iter().find(|(k, _)| k == "_pretty") {
        wanted.pretty = match pretty.as_ref() {
            "true" => true,
            "false" => false,
            other => return Err(FhirError::bad_request(format!("_pretty '{other}' is not true or false"))),
        };
    }
    if let Some((_, f)) = params.iter().find(|(k, _)| k == "_format") {
        wanted.format = classify(f, false)
            .ok_or_else(|| FhirError::not_acceptable(format!("_format '{f}' is not supported; use json or xml")))?;
        return Ok(wanted);
    }
    let Some(accept) = headers.get(header::ACCEPT) else { return Ok(wanted) };
    let accept = accept.to_str().map_err(|_| FhirError::bad_request("Accept must be visible ASCII"))?;
    let mut ranked: Vec<(f32, usize, Format)> = Vec::new();
    for (i, entry) in accept.split(',').enumerate() {
        let q = entry
            .split(';')
            .skip(1)
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if let Some(f) = classify(entry, true) {
            if q > 0.0 {
                ranked.push((q, i, f));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    match ranked.first() {
        Some((_, _, f)) => wanted.format = *f,
        None if accept.trim().is_empty() => {}
        None => {
            return Err(FhirError::not_acceptable(format!(
                "Accept '{accept}' names neither JSON (application/fhir+json) nor XML (application/fhir+xml)"
            )))
        }
    }
    Ok(wanted)
}

/// 400 for a body that is empty or only whitespace.
pub fn require_content(bytes: &[u8]) -> Result<(), FhirError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(FhirError::bad_request("the request body is empty"));
    }
    Ok(())
}

/// Decodes a request body in `format` into JSON.
pub fn decode(format: Format, bytes: &[u8]) -> Result<Value, FhirError> {
    require_content(bytes)?;
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| {
            FhirError::new(StatusCode::BAD_REQUEST, IssueCode::Structure, format!("the body is not valid JSON: {e}"))
        }),
        Format::Xml => {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                FhirError::new(StatusCode::BAD_REQUEST, IssueCode::Structure, format!("the XML body is not UTF-8: {e}"))
            })?;
            fhir_model::from_xml(text).map_err(|e| {
                FhirError::new(
                    StatusCode::BAD_REQUEST,
                    IssueCode::Structure,
                    format!("the body is not a FHIR R4 resource in XML: {e}"),
                )
            })
        }
    }
}

/// One resource (given as JSON) as XML text.
pub fn to_xml(resource: &Value) -> Result<String, FhirError> {
    fhir_model::to_xml(resource)
        .map_err(|e| FhirError::internal(format!("the response could not be written as XML: {e}")))
}

/// The middleware: negotiates the format, then converts a JSON FHIR response.
pub async fn negotiate(mut request: Request, next: Next) -> Response {
    let wanted = match wanted(request.headers(), request.uri().query()) {
        Ok(w) => w,
        // The refusal itself is in JSON: the client accepts neither format.
        Err(e) => return e.into_response(),
    };
    request.extensions_mut().insert(wanted);
    let response = next.run(request).await;
    if wanted == Wanted::default() || !is_fhir_json(response.headers()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_CONVERTED).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "response body could not be read for conversion");
            return FhirError::internal(e).into_response();
        }
    };
    if bytes.is_empty() {
        return Response::from_parts(parts, Body::empty());
    }
    match convert(&bytes, wanted) {
        Ok(converted) => with_body(parts, converted),
        Err(e) => {
            // Not the client's fault: say so in the format it asked for (as is, if even the
            // OperationOutcome cannot be converted).
            let (parts, body) = e.into_response().into_parts();
            let bytes = axum::body::to_bytes(body, MAX_CONVERTED).await.unwrap_or_default();
            match convert(&bytes, wanted) {
                Ok(converted) => with_body(parts, converted),
                Err(_) => Response::from_parts(parts, Body::from(bytes)),
            }
        }
    }
}

/// A response with a converted body and its content type.
fn with_body(mut parts: axum::http::response::Parts, (body, content_type): (Vec<u8>, &'static str)) -> Response {
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

fn is_fhir_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/fhir+json"))
}

fn convert(bytes: &Bytes, wanted: Wanted) -> Result<(Vec<u8>, &'static str), FhirError> {
    let value: Value = serde_json::from_slice(bytes).map_err(FhirError::internal)?;
    match wanted.format {
        Format::Json => Ok((serde_json::to_vec_pretty(&value).map_err(FhirError::internal)?, super::FHIR_JSON)),
        Format::Xml => {
            let xml = to_xml(&value)?;
            let xml = if wanted.pretty { indent(&xml) } else { xml };
            Ok((xml.into_bytes(), FHIR_XML))
        }
    }
}

/// Indents XML that has no mixed content except inside `<div>` (the narrative's XHTML,
/// left as it is).
fn indent(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len() + xml.len() / 4);
    let mut depth = 0usize;
    let mut in_div = 0usize;
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        let Some(len) = rest[start..].find('>') else { break };
        let tag = &rest[start..=start + len];
        rest = &rest[start + len + 1..];
        if in_div > 0 {
            out.push_str(text);
            out.push_str(tag);
            if tag.starts_with("<div") && !tag.ends_with("/>") {
                in_div += 1;
            } else if tag.starts_with("</div") {
                in_div -= 1;
                if in_div == 0 {
                    depth = depth.saturating_sub(1);
                }
            }
            continue;
        }
        out.push_str(text.trim());
        let closing = tag.starts_with("</");
        let self_closing = tag.ends_with("/>") || tag.starts_with("<?");
        if closing {
            depth = depth.saturating_sub(1);
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&"  ".repeat(depth));
        out.push_str(tag);
        if tag.starts_with("<div") && !self_closing {
            in_div = 1;
            depth += 1;
        } else if !closing && !self_closing {
            depth += 1;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
        h
    }

    #[test]
    fn format_comes_from_format_parameter_then_accept() {
        let xml = Wanted { format: Format::Xml, pretty: false };
        assert_eq!(wanted(&headers("application/fhir+xml"), None).unwrap(), xml);
        assert_eq!(wanted(&headers("application/fhir+json"), Some("_format=xml")).unwrap(), xml);
        assert_eq!(wanted(&headers("text/html, application/xml;q=0.9, */*;q=0.8"), None).unwrap(), xml);
        assert_eq!(wanted(&headers("application/xml;q=0.5, application/json"), None).unwrap().format, Format::Json);
        assert!(wanted(&HeaderMap::new(), Some("_format=json&_pretty=true")).unwrap().pretty);
        assert_eq!(wanted(&headers("text/html"), None).unwrap_err().status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(wanted(&HeaderMap::new(), Some("_format=turtle")).unwrap_err().status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(wanted(&HeaderMap::new(), Some("_pretty=yes")).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn indents_but_leaves_narrative_alone() {
        let xml = r#"<Patient xmlns="http://hl7.org/fhir"><id value="1"/><text><div xmlns="http://www.w3.org/1999/xhtml"><p>a <b>b</b></p></div></text></Patient>"#;
        let pretty = indent(xml);
        assert!(pretty.contains("\n  <id value=\"1\"/>"), "{pretty}");
        assert!(pretty.contains("<p>a <b>b</b></p></div>"), "{pretty}");
        assert!(pretty.ends_with("</Patient>"), "{pretty}");
    }
}
