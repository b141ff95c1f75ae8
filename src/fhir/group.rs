//! HTTP responses for Groups whose members are event-sourced: the MongoDB document plus
//! `quantity` and `member` from ClickHouse. The member array is streamed row by row, so a
//! read of a million-member Group holds one 64 KiB chunk in memory, not the group.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use clickhouse::query::RowCursor;
use serde_json::{json, Value};

use super::format::{self, Format, Wanted};
use super::headers::{etag, http_date};
use super::FHIR_JSON;
use crate::error::FhirError;
use crate::group::read::{self, MemberRow};
use crate::state::AppState;
use crate::store::Version;

const CHUNK: usize = 64 * 1024;

/// Whether a read asked to leave `member` out (`_summary=true|count`, or `_elements`
/// without `member`).
pub fn wants_summary(query: Option<&str>) -> Result<bool, FhirError> {
    let Some(q) = query else { return Ok(false) };
    let mut summary = false;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("_summary", "true" | "count") => summary = true,
            ("_summary", "false") => {}
            ("_summary", other) => {
                return Err(FhirError::bad_request(format!(
                    "_summary '{other}' is not supported on read (true, false)"
                )))
            }
            ("_elements", list) => summary |= !list.split(',').any(|e| e.trim() == "member"),
            _ => {}
        }
    }
    Ok(summary)
}

/// The response to a read or vread of a Group version. `as_of` = an older version.
pub async fn read_response(
    state: &AppState,
    v: &Version,
    as_of: Option<u32>,
    summary: bool,
    wanted: Wanted,
) -> Result<Response, FhirError> {
    let mut resource = v.resource.clone().unwrap_or_default();
    // Each version records its member count; older data is counted in ClickHouse.
    let count = read::active_members(&state.clickhouse, &v.id, as_of, v.member_count).await?;
    if let Some(count) = count {
        resource.insert("quantity".into(), json!(count));
    }
    let xml = wanted.format == Format::Xml;
    let body = if summary {
        crate::group::read::subsetted(&mut resource, None);
        // JSON; the format layer turns a small body into XML when asked.
        Body::from(Value::Object(resource).to_string())
    } else {
        let cursor = read::members(&state.clickhouse, &v.id, as_of)?;
        let prefix = if xml {
            // `member` is the last element of a Group in R4's order: members follow the rest.
            let mut prefix = format::to_xml(&Value::Object(resource))?;
            prefix.truncate(prefix.rfind("</Group>").unwrap_or(prefix.len()));
            prefix
        } else {
            let mut prefix = Value::Object(resource).to_string();
            prefix.pop(); // the closing brace: members may follow
            prefix
        };
        Body::from_stream(member_stream(prefix, wanted.format, cursor, v.id.clone()))
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    let content_type = if xml && !summary { format::FHIR_XML } else { FHIR_JSON };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(e) = HeaderValue::from_str(&etag(v.version)) {
        headers.insert(header::ETAG, e);
    }
    if let Ok(d) = HeaderValue::from_str(&http_date(v.last_updated)) {
        headers.insert(header::LAST_MODIFIED, d);
    }
    Ok(response)
}

/// Where a member stream is: the document's text before its members, then the rows (in
/// JSON, `true` until the first member opened the array), then done.
enum Stage {
    Prefix(String, RowCursor<MemberRow>),
    Rows(RowCursor<MemberRow>, bool),
    Done,
}

/// One member (its stored JSON) as a `<member>` element: written inside a minimal Group by
/// the model's XML writer, then cut out, so members follow the same rules as everything
/// else in XML.
fn member_xml(member_json: &str) -> Result<String, std::io::Error> {
    let member: Value = serde_json::from_str(member_json).map_err(std::io::Error::other)?;
    let group = crate::group::body::group_of(vec![member]);
    let xml = fhir_model::to_xml(&group).map_err(std::io::Error::other)?;
    match (xml.find("<member>"), xml.rfind("</member>")) {
        (Some(start), Some(end)) => Ok(xml[start..end + "</member>".len()].to_string()),
        _ => Err(std::io::Error::other("a member could not be written as XML")),
    }
}

fn member_stream(
    prefix: String,
    format: Format,
    cursor: RowCursor<MemberRow>,
    group: String,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let xml = format == Format::Xml;
    futures_util::stream::unfold(Stage::Prefix(prefix, cursor), move |stage| {
        let group = group.clone();
        async move {
            match stage {
                Stage::Prefix(p, c) => Some((Ok(Bytes::from(p)), Stage::Rows(c, true))),
                Stage::Rows(mut c, mut first) => {
                    let mut buf = Vec::with_capacity(CHUNK + 1024);
                    loop {
                        match c.next().await {
                            Ok(Some(row)) if xml => match member_xml(&row.member_json) {
                                Ok(m) => {
                                    buf.extend_from_slice(m.as_bytes());
                                    if buf.len() >= CHUNK {
                                        return Some((Ok(Bytes::from(buf)), Stage::Rows(c, false)));
                                    }
                                }
                                Err(e) => {
                                    tracing::error!(group, error = %e, "member stream failed mid-response");
                                    return Some((Err(e), Stage::Done));
                                }
                            },
                            Ok(Some(row)) => {
                                // The array opens with its first member: FHIR JSON has no empty arrays.
                                buf.extend_from_slice(if first { b",\"member\":[" } else { b"," });
                                first = false;
                                buf.extend_from_slice(row.member_json.as_bytes());
                                if buf.len() >= CHUNK {
                                    return Some((Ok(Bytes::from(buf)), Stage::Rows(c, first)));
                                }
                            }
                            Ok(None) if xml => {
                                buf.extend_from_slice(b"</Group>");
                                return Some((Ok(Bytes::from(buf)), Stage::Done));
                            }
                            Ok(None) => {
                                buf.extend_from_slice(if first { b"}" } else { b"]}" });
                                return Some((Ok(Bytes::from(buf)), Stage::Done));
                            }
                            Err(e) => {
                                // Headers are gone already: the only honest signal left is to
                                // cut the body, which no JSON parser will accept.
                                tracing::error!(group, error = %e, "member stream failed mid-response");
                                return Some((Err(std::io::Error::other(e)), Stage::Done));
                            }
                        }
                    }
                }
                Stage::Done => None,
            }
        }
    })
}
