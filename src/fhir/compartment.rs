//! The Patient compartment (R4 compartmentdefinition-patient): `GET /Patient/{id}/{type}`
//! searches one type within it, `GET /Patient/{id}/*` and `Patient/{id}/$everything` page
//! through every type in it (`_type`, `_since`, `_count`).
//!
//! A resource is in the compartment when any of its type's compartment parameters refers
//! to the patient (one "with" step over the union of their keys); the patient itself is in
//! it. Several types are paged one type after the other, in the order of [`types`]; the
//! cursor names the type and the position within it.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::bundle::{searchset_entries, Entry, Links};
use super::headers::fhir_json;
use super::search::{abridge, engine, param, search, DEFAULT_COUNT, MAX_COUNT};
use super::{known_type, valid_id};
use crate::error::FhirError;
use crate::search::definitions::registry;
use crate::search::execute::{Position, Request, Total};
use crate::search::query::{parse_clause, patient_compartment};
use crate::state::AppState;
use crate::store::Version;

/// `GET /{compartment type}/{id}/{type}` (also `*` and `$everything`).
pub async fn compartment(
    State(state): State<AppState>,
    Path((ct, id, rt)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let ct = known_type(&ct)?;
    let id = valid_id(&id)?;
    if ct != "Patient" {
        return Err(FhirError::not_found(format!("{ct} compartments are not supported (the Patient compartment is)")));
    }
    let query = query.unwrap_or_default();
    let link_base = format!("{}/{ct}/{id}/{rt}", state.fhir_base());
    match rt.as_str() {
        "*" => everything(&state, id, &query, &link_base, false).await,
        "$everything" => everything(&state, id, &query, &link_base, true).await,
        _ => {
            let rt = known_type(&rt)?;
            let clause = patient_compartment(rt, id)
                .ok_or_else(|| FhirError::bad_request(format!("{rt} is not in the Patient compartment")))?;
            search(&state, rt, &query, &headers, &link_base, vec![clause]).await
        }
    }
}

/// The types paged, in order: the patient first, then the compartment's types by name.
fn types() -> Vec<String> {
    let mut out: Vec<String> =
        registry().patient_compartment_types().filter(|t| *t != "Patient").map(str::to_string).collect();
    out.sort();
    out.insert(0, "Patient".into());
    out
}

/// Where a page of several types starts: the type (by name) and the position in it.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    t: String,
    p: Option<Position>,
}

async fn everything(
    state: &AppState,
    id: &str,
    query: &str,
    link_base: &str,
    operation: bool,
) -> Result<Response, FhirError> {
    let bad = |m: String| FhirError::bad_request(m);
    for (k, _) in form_urlencoded::parse(query.as_bytes()) {
        if !matches!(k.as_ref(), "_type" | "_since" | "_count" | "_cursor" | "_format" | "_pretty" | "start" | "end") {
            return Err(bad(format!("{k}: not a parameter of this request (_type, _since, _count)")));
        }
    }
    let count = match param(query, "_count") {
        None => DEFAULT_COUNT,
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| bad(format!("_count: '{c}' is not a non-negative integer")))?
            .clamp(1, MAX_COUNT),
    };
    let mut types = types();
    if !operation {
        types.retain(|t| t != "Patient");
    }
    if let Some(wanted) = param(query, "_type") {
        let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
        if let Some(t) = wanted.iter().find(|t| !types.iter().any(|x| x == *t)) {
            return Err(bad(format!("_type: '{t}' is not a type in the Patient compartment")));
        }
        types.retain(|t| wanted.contains(&t.as_str()));
    }
    let since = param(query, "_since");
    let cursor: Option<Cursor> = match param(query, "_cursor") {
        Some(c) => Some(serde_json::from_str(&c).map_err(|_| bad("_cursor: not a cursor of this request".into()))?),
        None => None,
    };
    let start = match &cursor {
        Some(c) => {
            types.iter().position(|t| *t == c.t).ok_or_else(|| bad("_cursor: not a cursor of this request".into()))?
        }
        None => 0,
    };
    if operation && state.store.read("Patient", id).await?.is_none_or(|v| v.deleted) {
        return Err(FhirError::not_found(format!("Patient/{id} does not exist")));
    }
    let engine = engine(state);
    let mut found: Vec<(String, Version)> = Vec::new();
    let mut next: Option<Cursor> = None;
    let mut after = cursor.and_then(|c| c.p);
    for t in &types[start..] {
        let want = count - found.len();
        let mut clauses = vec![patient_compartment(t, id).expect("a compartment type")];
        if let Some(since) = &since {
            let c = parse_clause(t, "_lastUpdated", &format!("ge{since}"), &state.fhir_base(), 0)?;
            clauses.extend(c);
        }
        let req =
            Request { rt: t.clone(), clauses, sort: Vec::new(), count: want, cursor: after.take(), total: Total::None };
        let page = engine.search(&req).await?;
        found.extend(page.matches.into_iter().map(|v| (t.clone(), v)));
        if let Some(p) = page.next {
            next = Some(Cursor { t: t.clone(), p: Some(p) });
            break;
        }
        if found.len() >= count {
            // Full: the next page starts at the next type (if any).
            let i = types.iter().position(|x| x == t).unwrap_or(0);
            next = types.get(i + 1).map(|t| Cursor { t: t.clone(), p: None });
            break;
        }
    }
    let link = |cursor: Option<&Cursor>| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k != "_cursor" && k != "_count" {
                q.append_pair(&k, &v);
            }
        }
        q.append_pair("_count", &count.to_string());
        if let Some(c) = cursor {
            q.append_pair("_cursor", &serde_json::to_string(c).unwrap_or_default());
        }
        format!("{link_base}?{}", q.finish())
    };
    let self_cursor: Option<Cursor> = param(query, "_cursor").and_then(|c| serde_json::from_str(&c).ok());
    let links = Links { self_link: link(self_cursor.as_ref()), next: next.as_ref().map(|c| link(Some(c))) };
    for (t, v) in &mut found {
        abridge(state, t, v);
    }
    let entries: Vec<Entry> = found.iter().map(|(t, version)| Entry { rt: t, version, include: false }).collect();
    Ok(fhir_json(StatusCode::OK, &searchset_entries(&state.fhir_base(), &entries, None, &links, None)))
}
