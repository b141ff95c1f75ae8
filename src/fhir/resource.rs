//! Instance-level interactions: create, read, vread, update, patch, delete.

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;

use super::format::{self, Format, Wanted};
use super::headers::{self, VersionResponse};
use super::{conditional, group, known_type, search, valid_id, PATCH_CONTENT_TYPES, RESOURCE_CONTENT_TYPES};
use crate::error::FhirError;
use crate::model::patching::Patch;
use crate::model::{fhirpath_patch, patch};
use crate::pipeline::{Change, Detached, RequestContext, SaveOutcome, SaveRequest};
use crate::state::AppState;
use crate::store::Version;

/// Reads a request body in JSON or XML (415 for any other `Content-Type`), within the
/// body limit.
async fn decoded_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<(Format, Bytes), FhirError> {
    headers::require_content_type(headers, RESOURCE_CONTENT_TYPES)?;
    let format = format::body_format(headers).unwrap_or(Format::Json);
    Ok((format, headers::read_body(headers, body, state.body_limit).await?))
}

/// A POST/PUT body, with empty elements dropped (or refused under `handling=strict`). A
/// type that keeps an element out of its stored content (a Group whose members are
/// events) reads its own bodies (`Behaviour::read_body`: a huge member array stays
/// compact); every other body is plain JSON.
async fn resource_body(
    state: &AppState,
    rt: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Value, Option<Detached>), FhirError> {
    let strict = headers::prefer_strict(headers);
    let (format, bytes) = decoded_body(state, headers, body).await?;
    let behaviour = state.writer.behaviour(rt);
    if behaviour.detached_element().is_some() {
        let read = match format {
            Format::Json => {
                format::require_content(&bytes)?;
                behaviour.read_body(&bytes, strict)
            }
            // Read whole, then as JSON (XML bodies are not streamed).
            Format::Xml => behaviour.read_body(format::decode(format, &bytes)?.to_string().as_bytes(), strict),
        };
        if let Some(read) = read {
            return read;
        }
    }
    let mut value = format::decode(format, &bytes)?;
    headers::drop_empty(&mut value, rt, strict)?;
    Ok((value, None))
}

/// A PATCH body in one of the three formats, by `Content-Type` (see `model::patching`):
/// `application/json-patch+json` is JSON Patch; `application/merge-patch+json` is a merge
/// patch; `application/json` and `application/fhir+json` are a merge patch when the body is
/// a plain object and a FHIRPath Patch when it is a `Parameters` resource (also in XML).
async fn patch_body(state: &AppState, rt: &str, headers: &HeaderMap, body: Body) -> Result<Patch, FhirError> {
    headers::require_content_type(headers, PATCH_CONTENT_TYPES)?;
    let essence = headers::media_type(headers);
    let bytes = headers::read_body(headers, body, state.body_limit).await?;
    let format = format::body_format(headers).unwrap_or(Format::Json);
    let doc = format::decode(format, &bytes)?;
    if essence == "application/json-patch+json" {
        return patch::parse(&doc)
            .map(Patch::Json)
            .map_err(|e| FhirError::bad_request(format!("invalid JSON Patch: {e}")));
    }
    if fhirpath_patch::is_fhirpath_patch(&doc) {
        return fhirpath_patch::parse(&doc, rt)
            .map(Patch::FhirPath)
            .map_err(|e| FhirError::bad_request(format!("invalid FHIRPath Patch: {e}")));
    }
    match doc {
        Value::Object(map) if essence != "application/merge-patch+json" || format == Format::Json => {
            Ok(Patch::Merge(map))
        }
        Value::Array(_) => Err(FhirError::unsupported_media_type(format!(
            "a JSON array is a JSON Patch: send it as application/json-patch+json, not {essence}"
        ))),
        _ => Err(FhirError::bad_request(
            "a PATCH body must be a JSON Patch array, a merge-patch object or a FHIRPath Patch Parameters resource",
        )),
    }
}

pub async fn read(
    State(state): State<AppState>,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    Extension(wanted): Extension<Wanted>,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    let current = state.store.read(rt, id).await?;
    match current {
        None => Err(FhirError::not_found(format!("{rt}/{id} does not exist"))),
        Some(v) if v.deleted => {
            Err(FhirError::gone(format!("{rt}/{id} was deleted in version {}", v.version), v.version))
        }
        Some(v) if assembled(&state, rt) => {
            state.writer.behaviour(rt).before_read(id, &v).await?;
            group::read_response(&state, &v, None, group::wants_summary(query.as_deref())?, wanted).await
        }
        Some(v) => Ok(version_response(StatusCode::OK, &v, None, headers::Return::Representation, "")),
    }
}

pub async fn vread(
    State(state): State<AppState>,
    Path((rt, id, vid)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    Extension(wanted): Extension<Wanted>,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    let version: i64 = vid
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| FhirError::bad_request(format!("'{vid}' is not a version id (a positive integer)")))?;
    // One read of the current version serves both: it may be the version asked for, and a
    // Group's pending member events must be in place before any version is shown.
    let current = state.store.read(rt, id).await?;
    if let Some(c) = &current {
        state.writer.behaviour(rt).before_read(id, c).await?;
    }
    let found = match current {
        Some(c) if c.version == version => Some(c),
        _ => state.store.history_version(rt, id, version).await?,
    };
    match found {
        None => Err(FhirError::not_found(format!("{rt}/{id} has no version {version}"))),
        Some(v) if v.deleted => {
            Err(FhirError::gone(format!("version {version} of {rt}/{id} is a deletion"), v.version))
        }
        Some(v) if assembled(&state, rt) => {
            let as_of = u32::try_from(version).map_err(|_| FhirError::bad_request("version id out of range"))?;
            group::read_response(&state, &v, Some(as_of), group::wants_summary(query.as_deref())?, wanted).await
        }
        Some(v) => Ok(version_response(StatusCode::OK, &v, None, headers::Return::Representation, "")),
    }
}

pub async fn create(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let (resource, detached) = resource_body(&state, rt, &headers, body).await?;
    let prefer = headers::prefer_return(&headers);
    if let Some(condition) = headers.get("if-none-exist") {
        let condition = condition
            .to_str()
            .map_err(|_| FhirError::bad_request("If-None-Exist must be a visible-ASCII query string"))?;
        let condition = search::condition_query(condition);
        // One request per condition at a time (see `conditional`): the search then sees
        // what an earlier one created.
        return conditional::holding(&state, rt, condition, async || {
            if let Some(existing) = search::conditional_match(&state, rt, condition).await? {
                let location = format!("{}/{rt}/{}/_history/{}", state.fhir_base(), existing.id, existing.version);
                return Ok(version_response(
                    StatusCode::OK,
                    &existing,
                    Some(location),
                    prefer,
                    "the resource already exists; nothing was created",
                ));
            }
            create_new(&state, &ctx, rt, resource, detached, prefer).await
        })
        .await;
    }
    create_new(&state, &ctx, rt, resource, detached, prefer).await
}

async fn create_new(
    state: &AppState,
    ctx: &RequestContext,
    rt: &str,
    resource: Value,
    detached: Option<Detached>,
    prefer: headers::Return,
) -> Result<Response, FhirError> {
    let id = uuid::Uuid::new_v4().to_string();
    let outcome = state
        .writer
        .save(
            ctx,
            SaveRequest { resource_type: rt, id: &id, change: Change::Create(resource), if_match: None, detached },
        )
        .await?;
    Ok(written(state, rt, &outcome, StatusCode::CREATED, prefer))
}

pub async fn update(
    State(state): State<AppState>,
    Path((rt, id)): Path<(String, String)>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    let if_match = headers::if_match(&headers)?;
    let (resource, detached) = resource_body(&state, rt, &headers, body).await?;
    put_resource(&state, &ctx, rt, id, if_match, resource, detached, &headers).await
}

/// An update (or a create with the client's id) of `rt/id`.
#[allow(clippy::too_many_arguments)]
async fn put_resource(
    state: &AppState,
    ctx: &RequestContext,
    rt: &str,
    id: &str,
    if_match: Option<i64>,
    resource: Value,
    detached: Option<Detached>,
    headers: &HeaderMap,
) -> Result<Response, FhirError> {
    match resource.get("id") {
        Some(Value::String(body_id)) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::bad_request(format!(
                "the body's id {body_id} does not match the id '{id}' in the URL"
            ))
            .at(format!("{rt}.id")))
        }
        None => return Err(FhirError::bad_request("an update body must carry the resource id").at(format!("{rt}.id"))),
    }
    let outcome = state
        .writer
        .save(ctx, SaveRequest { resource_type: rt, id, change: Change::Update(resource), if_match, detached })
        .await?;
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(written(state, rt, &outcome, status, headers::prefer_return(headers)))
}

/// The type and the condition of a conditional write (a 405 without a condition).
fn type_and_condition<'a>(rt: &'a str, query: Option<String>, method: &str) -> Result<(&'a str, String), FhirError> {
    let rt = known_type(rt)?;
    match query.filter(|q| !q.is_empty()) {
        Some(condition) => Ok((rt, condition)),
        None => Err(FhirError::method_not_allowed(format!("{method} /{rt} needs an id or a search condition"))),
    }
}

/// `PUT /{type}?condition` (R4 conditional update): no match creates (with the body's id,
/// or a new one), one match updates it, several are a 412.
pub async fn conditional_update(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let (rt, condition) = type_and_condition(&rt, query, "PUT")?;
    let if_match = headers::if_match(&headers)?;
    let (mut resource, detached) = resource_body(&state, rt, &headers, body).await?;
    conditional::holding(&state, rt, &condition, async || {
        let found = search::conditional_matches(&state, rt, &condition, 2).await?;
        let id = match (found.as_slice(), resource.get("id").and_then(Value::as_str)) {
            ([], Some(id)) => valid_id(id)?.to_string(),
            ([], None) => uuid::Uuid::new_v4().to_string(),
            ([one], Some(id)) if id != one.id => {
                return Err(FhirError::bad_request(format!(
                    "the body's id '{id}' is not {rt}/{}, which the condition matches",
                    one.id
                ))
                .at(format!("{rt}.id")))
            }
            ([one], _) => one.id.clone(),
            _ => {
                return Err(FhirError::precondition_failed(format!(
                    "the condition '{condition}' matches more than one {rt}; nothing was updated"
                )))
            }
        };
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        put_resource(&state, &ctx, rt, &id, if_match, resource, detached, &headers).await
    })
    .await
}

pub async fn patch(
    State(state): State<AppState>,
    Path((rt, id)): Path<(String, String)>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    let if_match = headers::if_match(&headers)?;
    let ops = patch_body(&state, rt, &headers, body).await?;
    if ops.len() > state.max_patch_ops {
        return Err(FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::error::IssueCode::TooCostly,
            format!(
                "the patch has {} operations; at most {} are accepted in one PATCH (split it)",
                ops.len(),
                state.max_patch_ops
            ),
        ));
    }
    let outcome = state
        .writer
        .save(&ctx, SaveRequest { resource_type: rt, id, change: Change::Patch(ops), if_match, detached: None })
        .await?;
    Ok(written(&state, rt, &outcome, StatusCode::OK, headers::prefer_return(&headers)))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((rt, id)): Path<(String, String)>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    let if_match = headers::if_match(&headers)?;
    delete_resource(&state, &ctx, rt, id, if_match, &headers).await
}

/// `DELETE /{type}?condition` (R4 conditional delete): deletes every match, at most
/// `fhir.max_conditional_delete` of them (more: 412); when none matches, a 200 with an
/// OperationOutcome saying so.
pub async fn conditional_delete(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let (rt, condition) = type_and_condition(&rt, query, "DELETE")?;
    let max = state.max_conditional_delete;
    let found = search::conditional_matches(&state, rt, &condition, max + 1).await?;
    if found.len() > max {
        return Err(FhirError::precondition_failed(format!(
            "the condition '{condition}' matches more than {max} {rt}; nothing was deleted \
             (fhir.max_conditional_delete allows {max})"
        )));
    }
    let mut last = None;
    for v in &found {
        last = Some(delete_resource(&state, &ctx, rt, &v.id, None, &headers).await?);
    }
    match (found.len(), last) {
        (1, Some(response)) => Ok(response),
        (n, _) => {
            let message = format!("{n} {rt} matched '{condition}' and were deleted");
            let outcome =
                crate::error::operation_outcome("information", crate::error::IssueCode::Informational, &message, None);
            Ok(headers::fhir_json(StatusCode::OK, &outcome))
        }
    }
}

async fn delete_resource(
    state: &AppState,
    ctx: &RequestContext,
    rt: &str,
    id: &str,
    if_match: Option<i64>,
    headers: &HeaderMap,
) -> Result<Response, FhirError> {
    let outcome = state
        .writer
        .save(ctx, SaveRequest { resource_type: rt, id, change: Change::Delete, if_match, detached: None })
        .await?;
    let v = &outcome.version;
    let message = if outcome.changed {
        format!("deleted {rt}/{id}; the tombstone is version {}", v.version)
    } else {
        format!("{rt}/{id} was already deleted (version {})", v.version)
    };
    Ok(VersionResponse {
        status: match headers::prefer_return(headers) {
            headers::Return::OperationOutcome => StatusCode::OK,
            _ => StatusCode::NO_CONTENT,
        },
        version: v.version,
        last_updated: v.last_updated,
        resource: None,
        location: None,
        prefer: headers::prefer_return(headers),
        outcome_message: &message,
    }
    .into_response_with_outcome())
}

impl VersionResponse<'_> {
    /// A delete has no resource, but `Prefer: return=OperationOutcome` still gets one.
    fn into_response_with_outcome(self) -> Response {
        if self.prefer == headers::Return::OperationOutcome {
            let outcome = crate::error::operation_outcome(
                "information",
                crate::error::IssueCode::Informational,
                self.outcome_message,
                None,
            );
            let mut r = headers::fhir_json(self.status, &outcome);
            if let Ok(v) = axum::http::HeaderValue::from_str(&headers::etag(self.version)) {
                r.headers_mut().insert(axum::http::header::ETAG, v);
            }
            return r;
        }
        self.into_response()
    }
}

/// Whether reads of `rt` are assembled from more than its stored content: the type keeps
/// an element apart (a Group's event-sourced members, put back by `fhir::group`).
fn assembled(state: &AppState, rt: &str) -> bool {
    state.writer.behaviour(rt).detached_element().is_some()
}

fn written(state: &AppState, rt: &str, outcome: &SaveOutcome, status: StatusCode, prefer: headers::Return) -> Response {
    let location = format!("{}/{rt}/{}/_history/{}", state.fhir_base(), outcome.version.id, outcome.version.version);
    let message = format!("{rt}/{} is now version {}", outcome.version.id, outcome.version.version);
    if let (true, Some(resource)) = (assembled(state, rt), &outcome.version.resource) {
        // A Group write answers without its (possibly huge) member array: read it with GET.
        let mut v = outcome.version.clone();
        let mut shown = resource.clone();
        state.writer.behaviour(rt).abridge(&mut shown, outcome.version.member_count.active());
        v.resource = Some(shown);
        return version_response(status, &v, Some(location), prefer, &message);
    }
    version_response(status, &outcome.version, Some(location), prefer, &message)
}

fn version_response(
    status: StatusCode,
    v: &Version,
    location: Option<String>,
    prefer: headers::Return,
    message: &str,
) -> Response {
    let resource = v.resource.clone().map(Value::Object);
    VersionResponse {
        status,
        version: v.version,
        last_updated: v.last_updated,
        resource: resource.as_ref(),
        location,
        prefer,
        outcome_message: message,
    }
    .into_response()
}
