//! `POST /4_0_0` with a Bundle (R4 http.html#transaction).
//!
//! A `batch`: each entry is a request of its own, dispatched through the same routes as
//! a standalone request, so validation, conditional headers (`ifMatch`, `ifNoneExist`;
//! `ifNoneMatch` and `ifModifiedSince` are passed on as headers, which this server's
//! handlers do not act on yet), conditional URLs, hooks and Group member events
//! behave exactly as they do outside a Bundle; its response becomes the entry of a
//! `batch-response`, in request order. Entries are independent: one that fails gets its
//! own status and OperationOutcome and the others still run. References between entries
//! (`urn:uuid:`) are not resolved: R4 allows interdependencies only in a transaction.
//!
//! Order: entries run in R4's transaction order (DELETE, POST, PUT/PATCH, GET/HEAD; request
//! order within each), one at a time, so a batch reads the same way a transaction would.
//!
//! Bounds: at most `fhir.max_bundle_entries` entries (413 beyond); the body limit holds
//! for the whole Bundle; response bodies are kept up to [`MAX_ENTRY_BODY`] per entry and
//! [`MAX_BATCH_BODY`] for the batch (beyond, e.g. a read of a million-member Group, the
//! entry keeps its status, location and etag with a warning outcome instead of its body:
//! the write happened, and a client must not take it for a failure).
//!
//! Failure modes: each entry is a complete write with that write's own guarantees; a
//! server killed during a batch leaves the entries done so far written and the rest not.
//! The client, having no response, sends it again; conditional entries make that safe.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::{Extension, Router};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::format::{self, Format};
use super::{headers, RESOURCE_CONTENT_TYPES};
use crate::error::{FhirError, IssueCode};
use crate::model::datetime::format_instant;
use crate::pipeline::RequestContext;
use crate::state::AppState;

/// Largest response body kept for one entry.
pub const MAX_ENTRY_BODY: usize = 64 * 1024 * 1024;

/// Most response body kept for all the entries of one batch (an XML or pretty answer is
/// converted in memory up to 256 MiB).
pub const MAX_BATCH_BODY: usize = 128 * 1024 * 1024;

/// One entry's request, checked.
#[derive(Debug)]
struct Entry {
    method: Method,
    /// Relative to the FHIR base, no leading `/` (`Patient/1`, `Patient?identifier=x`).
    url: String,
    body: Option<(String, Vec<u8>)>,
    conditions: Vec<(HeaderName, String)>,
}

pub async fn bundle(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    headers::require_content_type(&headers, RESOURCE_CONTENT_TYPES)?;
    let bytes = headers::read_body(&headers, body, state.body_limit).await?;
    format::require_content(&bytes)?;
    let bundle = format::decode(format::body_format(&headers).unwrap_or(Format::Json), &bytes)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::bad_request(
            "POST to the FHIR base takes a Bundle of type batch or transaction (resourceType must be Bundle)",
        ));
    }
    let entries = match bundle.get("entry") {
        None => &Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(FhirError::bad_request("Bundle.entry must be an array").at("Bundle.entry")),
    };
    if entries.len() > state.max_bundle_entries {
        return Err(FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooCostly,
            format!(
                "the Bundle has {} entries; at most {} are accepted in one Bundle (fhir.max_bundle_entries): split it",
                entries.len(),
                state.max_bundle_entries
            ),
        ));
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => Ok(headers::fhir_json(StatusCode::OK, &batch(&state, &ctx, &headers, entries).await)),
        Some("transaction") => {
            // Decided in full first (a 4xx names what cannot be); the atomic commit is
            // not built yet (docs/transactions.md), so nothing is written.
            super::transaction::prepare(entries, &state.fhir_base(), &Searches(&state)).await?;
            Err(FhirError::new(
                StatusCode::NOT_IMPLEMENTED,
                IssueCode::NotSupported,
                "transaction Bundles are checked but not yet committed (nothing was written); send a Bundle of type batch",
            ))
        }
        Some(other) => Err(FhirError::bad_request(format!(
            "a Bundle of type '{other}' cannot be processed: POST a batch or a transaction"
        ))
        .at("Bundle.type")),
        None => Err(FhirError::bad_request("Bundle.type is required (batch or transaction)").at("Bundle.type")),
    }
}

/// Conditions answered by the search engine.
struct Searches<'a>(&'a AppState);

impl super::transaction::Matches for Searches<'_> {
    fn matches<'a>(
        &'a self,
        rt: &'a str,
        condition: &'a str,
        limit: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<String>, FhirError>> {
        Box::pin(async move {
            let found = super::search::conditional_matches(self.0, rt, condition, limit).await?;
            Ok(found.into_iter().map(|v| v.id).collect())
        })
    }
}

/// Runs a batch's entries and answers them in a `batch-response`.
async fn batch(state: &AppState, ctx: &RequestContext, outer: &HeaderMap, entries: &[Value]) -> Value {
    let router = super::routes().with_state(state.clone());
    let base = state.fhir_base();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| rank(entries[i].pointer("/request/method").and_then(Value::as_str)));
    let mut responses = vec![Value::Null; entries.len()];
    let mut budget = MAX_BATCH_BODY;
    for i in order {
        let entry_ctx = RequestContext::new(format!("{}/{i}", ctx.request_id), ctx.actor.clone());
        responses[i] = match parse_entry(&entries[i], &base) {
            Ok(entry) => run(&router, entry_ctx, outer, &entry, &base, &mut budget).await,
            Err(e) => failed(&e.at(format!("Bundle.entry[{i}]"))),
        };
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": format_instant(time::OffsetDateTime::now_utc())},
        "type": "batch-response",
        "entry": responses,
    })
}

/// R4's processing order: DELETE, POST, PUT/PATCH, GET/HEAD (an unknown method last; its
/// entry fails).
fn rank(method: Option<&str>) -> u8 {
    match method {
        Some("DELETE") => 0,
        Some("POST") => 1,
        Some("PUT" | "PATCH") => 2,
        Some("GET" | "HEAD") => 3,
        _ => 4,
    }
}

/// An entry's request, or why it cannot be run.
fn parse_entry(entry: &Value, base: &str) -> Result<Entry, FhirError> {
    let bad = |msg: String| FhirError::bad_request(msg);
    let request = entry.get("request").ok_or_else(|| bad("the entry has no request".into()))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some(m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE")) => {
            Method::from_bytes(m.as_bytes()).expect("known")
        }
        Some(other) => {
            return Err(bad(format!("request.method '{other}' is not one of GET HEAD POST PUT PATCH DELETE")))
        }
        None => return Err(bad("request.method is required".into())),
    };
    let url = request.get("url").and_then(Value::as_str).ok_or_else(|| bad("request.url is required".into()))?;
    let url = relative_url(url, base)?;
    if url.is_empty() || url.starts_with('?') {
        return Err(bad(format!(
            "request.url '{url}' names no resource type: an entry cannot be a Bundle or a system-level request"
        )));
    }
    let resource = entry.get("resource");
    // R4: a batch has no dependencies between entries, and conditional references belong
    // to transactions; stored as given they would point nowhere.
    for reference in resource.map(super::transaction::references).unwrap_or_default() {
        let conditional = reference.split_once('?').is_some_and(|(t, _)| fhir_model::is_resource_type(t));
        if reference.starts_with("urn:") || conditional {
            return Err(bad(format!(
                "the reference '{reference}' can only be resolved in a transaction, not in a batch"
            )));
        }
    }
    let body = match (&method, resource) {
        (&Method::POST | &Method::PUT, Some(r)) => {
            Some(("application/fhir+json".to_string(), serde_json::to_vec(r).unwrap_or_default()))
        }
        (&Method::POST | &Method::PUT, None) => return Err(bad(format!("a {method} entry needs a resource"))),
        (&Method::PATCH, Some(r)) => Some(patch_body(r)?),
        (&Method::PATCH, None) => {
            return Err(bad(
                "a PATCH entry needs a resource: a Binary (JSON Patch) or a Parameters (FHIRPath Patch)".into()
            ))
        }
        _ => None,
    };
    let mut conditions = Vec::new();
    for (field, name) in [
        ("ifMatch", header::IF_MATCH),
        ("ifNoneMatch", header::IF_NONE_MATCH),
        ("ifModifiedSince", header::IF_MODIFIED_SINCE),
        ("ifNoneExist", HeaderName::from_static("if-none-exist")),
    ] {
        match request.get(field) {
            None => {}
            Some(Value::String(v)) => conditions.push((name, v.clone())),
            Some(_) => return Err(bad(format!("request.{field} must be a string"))),
        }
    }
    Ok(Entry { method, url, body, conditions })
}

/// A PATCH entry's body: a `Binary` carries a patch document in `data` (its `contentType`
/// says which kind); a `Parameters` is a FHIRPath Patch.
fn patch_body(resource: &Value) -> Result<(String, Vec<u8>), FhirError> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("Binary") => {
            let content_type =
                resource.get("contentType").and_then(Value::as_str).unwrap_or("application/json-patch+json");
            let data = resource.get("data").and_then(Value::as_str).unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| FhirError::bad_request(format!("the PATCH entry's Binary.data is not base64: {e}")))?;
            Ok((content_type.to_string(), bytes))
        }
        Some("Parameters") => Ok(("application/fhir+json".into(), serde_json::to_vec(resource).unwrap_or_default())),
        _ => Err(FhirError::bad_request(
            "a PATCH entry's resource must be a Binary (JSON Patch) or a Parameters (FHIRPath Patch)",
        )),
    }
}

/// `request.url` relative to the FHIR base: as given (a leading `/` dropped), or an
/// absolute URL of this server with the base cut off.
pub(crate) fn relative_url(url: &str, base: &str) -> Result<String, FhirError> {
    if let Some(rest) = url.strip_prefix(base) {
        if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
            return Ok(rest.trim_start_matches('/').to_string());
        }
    }
    if url.contains("://") {
        return Err(FhirError::bad_request(format!("request.url '{url}' is not on this server ({base})")));
    }
    Ok(url.trim_start_matches('/').to_string())
}

/// Percent-encodes what a request line may not carry as is (spaces, non-ASCII, quotes,
/// `|`, `#`), leaving the URL's own syntax (`/ ? & = % : ,`) alone: the search decodes
/// either form the same way.
fn uri_safe(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for b in url.bytes() {
        match b {
            b'!' | b'$'..=b';' | b'=' | b'?'..=b'Z' | b'_' | b'a'..=b'z' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The URL without `_format`/`_pretty`: an entry's answer is JSON inside the batch's,
/// which has the format the batch asked for.
fn without_format(url: &str) -> String {
    let Some((path, query)) = url.split_once('?') else { return url.to_string() };
    let kept: Vec<&str> =
        query.split('&').filter(|p| !p.starts_with("_format=") && !p.starts_with("_pretty=")).collect();
    match kept.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{}", kept.join("&")),
    }
}

/// Runs one entry through the routes and makes its response entry.
async fn run(
    router: &Router,
    ctx: RequestContext,
    outer: &HeaderMap,
    entry: &Entry,
    base: &str,
    budget: &mut usize,
) -> Value {
    let uri = format!("/4_0_0/{}", uri_safe(&without_format(&entry.url)));
    let mut request = Request::builder().method(entry.method.clone()).uri(&uri);
    request = request.header(header::ACCEPT, "application/fhir+json");
    if let Some(prefer) = outer.get("prefer") {
        request = request.header("prefer", prefer);
    }
    for (name, value) in &entry.conditions {
        // A search condition may hold any character; a header only visible ASCII.
        let value = if *name == "if-none-exist" { uri_safe(value) } else { value.clone() };
        match HeaderValue::from_str(&value) {
            Ok(v) => request = request.header(name, v),
            Err(_) => {
                return failed(&FhirError::bad_request(format!("the entry's {name} is not a valid header value")))
            }
        }
    }
    let body = match &entry.body {
        Some((content_type, bytes)) => {
            request = request.header(header::CONTENT_TYPE, content_type.as_str());
            Body::from(bytes.clone())
        }
        None => Body::empty(),
    };
    let mut request = match request.body(body) {
        Ok(r) => r,
        Err(e) => {
            return failed(&FhirError::bad_request(format!("request.url '{}' is not a valid URL: {e}", entry.url)))
        }
    };
    request.extensions_mut().insert(ctx);
    let response = match router.clone().oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    response_entry(response, base, budget).await
}

/// An entry's response from a response of the routes. Its body is kept within `budget`
/// (what is left of the batch's) and [`MAX_ENTRY_BODY`]; beyond, the entry keeps its
/// status, location and etag (the write happened) with a warning instead of the body.
async fn response_entry(response: Response, base: &str, budget: &mut usize) -> Value {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let header = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut out = Map::new();
    out.insert("status".into(), json!(status_line(status)));
    if let Some(location) = header(&header::LOCATION).or_else(|| header(&header::CONTENT_LOCATION)) {
        out.insert("location".into(), json!(location));
    }
    if let Some(etag) = header(&header::ETAG) {
        out.insert("etag".into(), json!(etag));
    }
    if let Some(instant) = header(&header::LAST_MODIFIED).and_then(|d| instant_of_http_date(&d)) {
        out.insert("lastModified".into(), json!(instant));
    }
    let limit = MAX_ENTRY_BODY.min(*budget);
    let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            let warning = crate::error::operation_outcome(
                "warning",
                IssueCode::TooCostly,
                &format!(
                    "the entry's response body is larger than this batch has room for ({limit} bytes); \
                     it was left out: read the resource on its own"
                ),
                None,
            );
            out.insert("outcome".into(), warning);
            Bytes::new()
        }
    };
    *budget = budget.saturating_sub(bytes.len());
    let resource: Option<Value> = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).ok()).flatten();
    // Last-Modified has seconds; the resource's own instant has milliseconds.
    if let Some(at) = resource.as_ref().and_then(|r| r.pointer("/meta/lastUpdated")).and_then(Value::as_str) {
        out.insert("lastModified".into(), json!(at));
    }
    let mut entry = Map::new();
    match resource {
        Some(r) if r.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome") => {
            out.insert("outcome".into(), r);
        }
        Some(r) => {
            if let (Some(rt), Some(id)) =
                (r.get("resourceType").and_then(Value::as_str), r.get("id").and_then(Value::as_str))
            {
                if rt != "Bundle" {
                    entry.insert("fullUrl".into(), json!(format!("{base}/{rt}/{id}")));
                }
            }
            entry.insert("resource".into(), r);
        }
        None => {}
    }
    if !entry.contains_key("fullUrl") {
        if let Some(full) = out.get("location").and_then(Value::as_str).and_then(|l| full_url_of(l, base)) {
            entry.insert("fullUrl".into(), json!(full));
        }
    }
    entry.insert("response".into(), Value::Object(out));
    Value::Object(entry)
}

/// `{base}/{type}/{id}` of a location (`…/{type}/{id}/_history/{v}`).
fn full_url_of(location: &str, base: &str) -> Option<String> {
    let rest = location.strip_prefix(base)?.trim_start_matches('/');
    let mut parts = rest.split('/');
    let (rt, id) = (parts.next()?, parts.next()?);
    (!rt.is_empty() && !id.is_empty()).then(|| format!("{base}/{rt}/{id}"))
}

/// An entry that failed before it ran.
fn failed(e: &FhirError) -> Value {
    json!({"response": {"status": status_line(e.status), "outcome": e.to_operation_outcome()}})
}

/// `201 Created`.
fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// An HTTP date (`Last-Modified`) as a FHIR instant.
fn instant_of_http_date(date: &str) -> Option<String> {
    let t = httpdate::parse_http_date(date).ok()?;
    Some(format_instant(time::OffsetDateTime::from(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_beyond_the_budget_keeps_the_entrys_status_and_location() {
        let response = Response::builder()
            .status(201)
            .header("location", "http://h/4_0_0/Patient/1/_history/1")
            .header("etag", "W/\"1\"")
            .body(Body::from(r#"{"resourceType":"Patient","id":"1"}"#))
            .unwrap();
        let mut budget = 10;
        let e = response_entry(response, "http://h/4_0_0", &mut budget).await;
        assert_eq!(e["response"]["status"], "201 Created");
        assert_eq!(e["response"]["etag"], "W/\"1\"");
        assert_eq!(e["response"]["outcome"]["issue"][0]["severity"], "warning");
        assert_eq!(e["fullUrl"], "http://h/4_0_0/Patient/1");
        assert!(e.get("resource").is_none());
        // Within the budget, the body is kept and counted.
        let response =
            Response::builder().status(200).body(Body::from(r#"{"resourceType":"Patient","id":"1"}"#)).unwrap();
        let mut budget = 1_000;
        let e = response_entry(response, "http://h/4_0_0", &mut budget).await;
        assert_eq!(e["resource"]["id"], "1");
        assert!(budget < 1_000);
    }

    #[test]
    fn urls_are_taken_relative_to_the_base() {
        let base = "http://h/4_0_0";
        assert_eq!(relative_url("Patient/1", base).unwrap(), "Patient/1");
        assert_eq!(relative_url("/Patient?name=x", base).unwrap(), "Patient?name=x");
        assert_eq!(relative_url("http://h/4_0_0/Patient/1", base).unwrap(), "Patient/1");
        assert!(relative_url("http://other/4_0_0/Patient/1", base).is_err());
        assert!(relative_url("http://h/4_0_0x/Patient/1", base).is_err());
    }

    #[test]
    fn processing_follows_r4s_order() {
        let methods = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];
        let mut order: Vec<usize> = (0..methods.len()).collect();
        order.sort_by_key(|&i| rank(Some(methods[i])));
        let sorted: Vec<&str> = order.iter().map(|&i| methods[i]).collect();
        assert_eq!(sorted, ["DELETE", "POST", "PUT", "PATCH", "GET", "HEAD"]);
    }

    #[test]
    fn a_url_is_made_safe_for_a_request_line_without_changing_its_syntax() {
        assert_eq!(uri_safe("Patient?name=Zoë Smith&identifier=a|b"), "Patient?name=Zo%C3%AB%20Smith&identifier=a%7Cb");
        assert_eq!(uri_safe("Observation?code=1%2C2"), "Observation?code=1%2C2");
    }

    #[test]
    fn a_patch_entry_carries_a_binary_or_parameters() {
        let ops = r#"[{"op":"replace","path":"/active","value":false}]"#;
        let binary = json!({"resourceType": "Binary", "contentType": "application/json-patch+json",
            "data": base64::engine::general_purpose::STANDARD.encode(ops)});
        assert_eq!(patch_body(&binary).unwrap(), ("application/json-patch+json".to_string(), ops.as_bytes().to_vec()));
        assert!(patch_body(&json!({"resourceType": "Binary", "data": "%%%"})).is_err());
        assert!(patch_body(&json!({"resourceType": "Patient"})).is_err());
        let http = instant_of_http_date("Thu, 03 Dec 2026 20:24:04 GMT").unwrap();
        assert_eq!(http, "2026-12-03T20:24:04.000Z");
    }
}
