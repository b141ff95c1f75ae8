//! `_history` at system, type and instance level: a `history` Bundle, newest first, paged
//! by a cursor on `(lastUpdated, version key)` (system level: `(lastUpdated, type,
//! version key)`, merged from every type's history) so pages stay stable while writes
//! continue.
//! A page holds at most `_count` entries (default 20, at most 1000), whatever the history
//! length; Group entries leave their members out (vread a version for them).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bson::DateTime;

use super::bundle::{history, history_of, Links};
use super::headers::{self, fhir_json};
use super::search::{param, DEFAULT_COUNT, MAX_COUNT};
use super::{known_type, valid_id};
use crate::error::FhirError;
use crate::model::datetime::{self, parse_instant};
use crate::state::AppState;
use crate::store::mongo::history_key;

struct HistoryParams {
    count: i64,
    since: Option<DateTime>,
    since_raw: Option<String>,
    cursor: Option<(DateTime, String)>,
}

impl HistoryParams {
    /// A page's link: these parameters, at `cursor`.
    fn link(&self, base: &str, cursor: Option<String>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(s) = &self.since_raw {
            q.append_pair("_since", s);
        }
        q.append_pair("_count", &self.count.to_string());
        if let Some(c) = cursor {
            q.append_pair("_cursor", &c);
        }
        format!("{base}?{}", q.finish())
    }
}

/// The parameters; `cursor_tag` is the level's cursor prefix (`h` type and instance, `s`
/// system).
fn parse(query: &str, strict: bool, cursor_tag: &str) -> Result<HistoryParams, FhirError> {
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "_count" | "_since" | "_cursor" | "_format" | "_pretty" => {}
            "_at" | "_list" | "_sort" => {
                return Err(FhirError::bad_request(format!("history parameter '{name}' is not supported")))
            }
            other if strict => return Err(FhirError::bad_request(format!("unknown history parameter '{other}'"))),
            _ => {}
        }
    }
    let count = match param(query, "_count") {
        None => DEFAULT_COUNT as i64,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| FhirError::bad_request(format!("_count: '{v}' is not a positive integer")))?
            .min(MAX_COUNT as i64),
    };
    let since_raw = param(query, "_since");
    let since = match &since_raw {
        None => None,
        Some(v) => {
            let t = parse_instant(v)
                .ok_or_else(|| FhirError::bad_request(format!("_since: '{v}' is not a FHIR instant")))?;
            Some(datetime::to_bson(t.start))
        }
    };
    let cursor = match param(query, "_cursor") {
        None => None,
        Some(c) => {
            let bad = || FhirError::bad_request("_cursor: this paging cursor is not valid for this history");
            let (ms, key) = c
                .strip_prefix(cursor_tag)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.split_once(':'))
                .ok_or_else(bad)?;
            Some((ms.parse().ok().and_then(datetime::bson_from_millis).ok_or_else(bad)?, key.to_string()))
        }
    };
    Ok(HistoryParams { count, since, since_raw, cursor })
}

async fn respond(
    state: &AppState,
    rt: &str,
    id: Option<&str>,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Response, FhirError> {
    let query = query.unwrap_or_default();
    let p = parse(&query, headers::prefer_strict(headers), "h")?;
    if let Some(id) = id {
        if state.store.read(rt, id).await?.is_none() {
            return Err(FhirError::not_found(format!("{rt}/{id} does not exist")));
        }
    }
    let (mut entries, total) = state.store.history_page(rt, id, p.since, p.cursor.clone(), p.count + 1).await?;
    let more = entries.len() as i64 > p.count;
    entries.truncate(p.count as usize);
    let behaviour = state.writer.behaviour(rt);
    if behaviour.detached_element().is_some() {
        // History pages stay small whatever the group size: an entry carries the Group
        // without members (tagged SUBSETTED); vread a version for its members.
        for v in &mut entries {
            if let Some(resource) = v.resource.as_mut() {
                behaviour.abridge(resource, None);
            }
        }
    }
    let base = match id {
        Some(id) => format!("{}/{rt}/{id}/_history", state.fhir_base()),
        None => format!("{}/{rt}/_history", state.fhir_base()),
    };
    let link = |cursor: Option<String>| p.link(&base, cursor);
    let next = entries
        .last()
        .filter(|_| more)
        .map(|v| link(Some(format!("h:{}:{}", v.last_updated.timestamp_millis(), history_key(&v.id, v.version)))));
    let current = p.cursor.as_ref().map(|(t, k)| format!("h:{}:{k}", t.timestamp_millis()));
    let links = Links { self_link: link(current), next };
    Ok(fhir_json(StatusCode::OK, &history(&state.fhir_base(), rt, &entries, total, &links)))
}

/// `GET /_history`: every type's history merged, newest first. Each type that has a
/// history collection gives its page after the cursor; the merge keeps the first
/// `_count`. Equal instants order by type, then version key, both descending.
pub async fn system_history(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let query = query.unwrap_or_default();
    let p = parse(&query, headers::prefer_strict(&headers), "s")?;
    let cursor = match &p.cursor {
        None => None,
        Some((t, rest)) => {
            let (rt, key) = rest
                .split_once(':')
                .ok_or_else(|| FhirError::bad_request("_cursor: this paging cursor is not valid for this history"))?;
            Some((*t, rt.to_string(), key.to_string()))
        }
    };
    let mut merged: Vec<(String, crate::store::Version)> = Vec::new();
    let mut total = 0;
    for rt in state.store.history_types().await? {
        // After the cursor: at its instant, a type after it (in descending order) gives
        // all its entries, its own type those after the key, a type before it none.
        let before = cursor.as_ref().map(|(t, crt, key)| (*t, key_bound(&rt, crt, key)));
        let (entries, n) = state.store.history_page(&rt, None, p.since, before, p.count + 1).await?;
        total += n;
        merged.extend(entries.into_iter().map(|v| (rt.clone(), v)));
    }
    merged.sort_by(|(ra, a), (rb, b)| {
        (b.last_updated, rb, history_key(&b.id, b.version)).cmp(&(a.last_updated, ra, history_key(&a.id, a.version)))
    });
    let more = merged.len() as i64 > p.count;
    merged.truncate(p.count as usize);
    for (rt, v) in &mut merged {
        let behaviour = state.writer.behaviour(rt);
        if let (Some(_), Some(resource)) = (behaviour.detached_element(), v.resource.as_mut()) {
            behaviour.abridge(resource, None);
        }
    }
    let base = format!("{}/_history", state.fhir_base());
    let link = |cursor: Option<String>| p.link(&base, cursor);
    let next = merged.last().filter(|_| more).map(|(rt, v)| {
        link(Some(format!("s:{}:{rt}:{}", v.last_updated.timestamp_millis(), history_key(&v.id, v.version))))
    });
    let current = cursor.as_ref().map(|(t, rt, k)| format!("s:{}:{rt}:{k}", t.timestamp_millis()));
    let links = Links { self_link: link(current), next };
    let entries: Vec<(&str, &crate::store::Version)> = merged.iter().map(|(rt, v)| (rt.as_str(), v)).collect();
    Ok(fhir_json(StatusCode::OK, &history_of(&state.fhir_base(), &entries, total, &links)))
}

/// The version-key bound of `rt`'s entries at the cursor's instant: a type before the
/// cursor's (in ascending order, so after it in the page's descending one) gives all of
/// them (`~` sorts after every id and `/`), the cursor's type those below its key, a type
/// after it none.
fn key_bound(rt: &str, cursor_rt: &str, cursor_key: &str) -> String {
    match rt.cmp(cursor_rt) {
        std::cmp::Ordering::Less => "~".to_string(),
        std::cmp::Ordering::Equal => cursor_key.to_string(),
        std::cmp::Ordering::Greater => String::new(),
    }
}

pub async fn type_history(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    respond(&state, rt, None, query, &headers).await
}

pub async fn instance_history(
    State(state): State<AppState>,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let id = valid_id(&id)?;
    respond(&state, rt, Some(id), query, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_one_instant_the_next_page_takes_exactly_what_sorts_below_the_cursor() {
        // The store's filter at the cursor's instant is `key < bound`; the page's order is
        // (type, key) descending. Both must agree for every pair.
        let keys = ["a/1", "a/2", "b-x/10", "z.9/1"];
        for (crt, ckey) in [("Observation", "a/2"), ("Patient", "b-x/10")] {
            for rt in ["Encounter", "Observation", "Patient", "Practitioner"] {
                for key in keys {
                    let filtered = key < key_bound(rt, crt, ckey).as_str();
                    let below = (rt, key) < (crt, ckey);
                    assert_eq!(filtered, below, "{rt} {key} against {crt} {ckey}");
                }
            }
        }
    }
}
