//! Type-level search: `_id`, `_lastUpdated`, `_count`, `_sort`, `_summary=count`, with
//! cursor paging (`_cursor`) so a page boundary never shifts under concurrent inserts.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bson::{doc, Bson, Document};

use super::bundle::{searchset, Links};
use super::headers::{self, fhir_json};
use super::known_type;
use crate::error::{operation_outcome, FhirError, IssueCode};
use crate::model::datetime::{self, parse_date_time, FhirDateTime};
use crate::model::validate::is_valid_id;
use crate::state::AppState;
use crate::store::mongo::Order;
use crate::store::Version;

pub const DEFAULT_COUNT: i64 = 20;
pub const MAX_COUNT: i64 = 1000;

/// Parameters that are accepted but change nothing in a JSON-only server.
const IGNORED: &[&str] = &["_format", "_pretty"];

#[derive(Debug, Default)]
pub struct SearchParams {
    /// Conditions ANDed together (each is an OR of one parameter's comma-separated values).
    filter: Vec<Document>,
    /// Canonical `name=value` pairs for self/next links.
    canonical: Vec<(String, String)>,
    count: Option<i64>,
    sort: Sort,
    summary_count: bool,
    cursor: Option<String>,
    /// Parameters ignored because this server does not support them.
    unknown: Vec<String>,
    /// `Group?member=`: answered from the ClickHouse reverse index.
    member: Option<String>,
}

/// Escapes a string for a MongoDB regular expression.
fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// `identifier=[system]|[value]` on `resource.identifier`.
fn identifier_condition(value: &str) -> Document {
    match value.split_once('|') {
        None => doc! { "resource.identifier.value": value },
        Some(("", v)) => {
            doc! { "resource.identifier": { "$elemMatch": { "system": { "$exists": false }, "value": v } } }
        }
        Some((sys, "")) => doc! { "resource.identifier.system": sys },
        Some((sys, v)) => doc! { "resource.identifier": { "$elemMatch": { "system": sys, "value": v } } },
    }
}

/// Parameters of one resource type beyond the common ones: (name, modifier, value) →
/// condition. `None` = not a parameter of this type.
fn type_condition(rt: &str, name: &str, modifier: Option<&str>, value: &str) -> Result<Option<Document>, FhirError> {
    let code = |v: &str| v.rsplit('|').next().unwrap_or(v).to_string();
    Ok(Some(match (rt, name, modifier) {
        (_, "identifier", None) => identifier_condition(value),
        ("Group", "type", None) => doc! { "resource.type": code(value) },
        ("Group", "actual", None) => match value {
            "true" => doc! { "resource.actual": true },
            "false" => doc! { "resource.actual": false },
            other => return Err(FhirError::bad_request(format!("actual: '{other}' is not true or false"))),
        },
        ("Group", "name", None) => {
            doc! { "resource.name": { "$regex": format!("^{}", regex_escape(value)), "$options": "i" } }
        }
        ("Group", "name", Some("contains")) => {
            doc! { "resource.name": { "$regex": regex_escape(value), "$options": "i" } }
        }
        ("Group", "name", Some("exact")) => doc! { "resource.name": value },
        _ => return Ok(None),
    }))
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Sort {
    #[default]
    Id,
    LastUpdated {
        descending: bool,
    },
}

fn parse_prefix(value: &str) -> (&str, &str) {
    for p in ["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"] {
        if let Some(rest) = value.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                return (p, rest);
            }
        }
    }
    ("eq", value)
}

fn last_updated_condition(value: &str) -> Result<Document, FhirError> {
    let (prefix, date) = parse_prefix(value);
    let parsed: FhirDateTime = parse_date_time(date)
        .ok_or_else(|| FhirError::bad_request(format!("_lastUpdated: '{date}' is not a FHIR date or dateTime")))?;
    let (start, end) = parsed.range();
    let (s, e) = (Bson::DateTime(datetime::to_bson(start)), Bson::DateTime(datetime::to_bson(end)));
    Ok(match prefix {
        "eq" => doc! { "lastUpdated": { "$gte": s, "$lt": e } },
        "ne" => doc! { "$or": [ { "lastUpdated": { "$lt": s } }, { "lastUpdated": { "$gte": e } } ] },
        "lt" | "eb" => doc! { "lastUpdated": { "$lt": s } },
        "le" => doc! { "lastUpdated": { "$lt": e } },
        "gt" | "sa" => doc! { "lastUpdated": { "$gte": e } },
        "ge" => doc! { "lastUpdated": { "$gte": s } },
        _ => return Err(FhirError::bad_request(format!("_lastUpdated: prefix '{prefix}' is not supported"))),
    })
}

impl SearchParams {
    pub fn parse(rt: &str, query: &str, strict: bool) -> Result<SearchParams, FhirError> {
        let mut p = SearchParams::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let (name, value) = (name.into_owned(), value.into_owned());
            let (base, modifier) = match name.split_once(':') {
                Some((b, m)) => (b, Some(m)),
                None => (name.as_str(), None),
            };
            if rt == "Group" && base == "member" && modifier.is_none() {
                p.member = Some(value.clone());
                p.canonical.push((name, value));
                continue;
            }
            let any: Vec<Option<Document>> =
                value.split(',').map(|v| type_condition(rt, base, modifier, v)).collect::<Result<_, _>>()?;
            if any.iter().all(Option::is_some) && !any.is_empty() {
                let mut any: Vec<Document> = any.into_iter().flatten().collect();
                p.filter.push(if any.len() == 1 {
                    any.remove(0)
                } else {
                    doc! { "$or": any }
                });
                p.canonical.push((name, value));
                continue;
            }
            match name.as_str() {
                "_id" => {
                    let ids: Vec<&str> = value.split(',').collect();
                    if let Some(bad) = ids.iter().find(|i| !is_valid_id(i)) {
                        return Err(FhirError::bad_request(format!("_id: '{bad}' is not a valid id")));
                    }
                    p.filter.push(doc! { "_id": { "$in": ids } });
                }
                "_lastUpdated" => {
                    let any: Vec<Document> = value.split(',').map(last_updated_condition).collect::<Result<_, _>>()?;
                    p.filter.push(if any.len() == 1 {
                        any.into_iter().next().unwrap_or_default()
                    } else {
                        doc! { "$or": any }
                    });
                }
                "_count" => {
                    let n: i64 = value.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                        FhirError::bad_request(format!("_count: '{value}' is not a non-negative integer"))
                    })?;
                    p.count = Some(n.min(MAX_COUNT));
                    continue; // `_count` is re-added with the effective value
                }
                "_sort" => {
                    p.sort = match value.as_str() {
                        "_id" => Sort::Id,
                        "_lastUpdated" => Sort::LastUpdated { descending: false },
                        "-_lastUpdated" => Sort::LastUpdated { descending: true },
                        other => {
                            return Err(FhirError::bad_request(format!(
                                "_sort: '{other}' is not supported (use _id, _lastUpdated or -_lastUpdated)"
                            )))
                        }
                    };
                }
                "_summary" => match value.as_str() {
                    "count" => p.summary_count = true,
                    "false" => {}
                    other => {
                        return Err(FhirError::bad_request(format!(
                            "_summary: '{other}' is not supported (count, false)"
                        )))
                    }
                },
                "_cursor" => {
                    p.cursor = Some(value);
                    continue;
                }
                n if IGNORED.contains(&n) => continue,
                _ if strict => {
                    return Err(FhirError::bad_request(format!("unknown or unsupported search parameter '{name}'")))
                }
                _ => {
                    p.unknown.push(name);
                    continue;
                }
            }
            p.canonical.push((name, value));
        }
        Ok(p)
    }

    fn filter(&self) -> Document {
        match self.filter.len() {
            0 => Document::new(),
            _ => doc! { "$and": self.filter.clone() },
        }
    }

    fn order(&self) -> Result<Order, FhirError> {
        let bad = || FhirError::bad_request("_cursor: this paging cursor is not valid for this search");
        Ok(match self.sort {
            Sort::Id => Order::Id {
                after: match &self.cursor {
                    None => None,
                    Some(c) => Some(c.strip_prefix("id:").filter(|i| is_valid_id(i)).ok_or_else(bad)?.to_string()),
                },
            },
            Sort::LastUpdated { descending } => Order::LastUpdated {
                descending,
                after: match &self.cursor {
                    None => None,
                    Some(c) => {
                        let rest = c.strip_prefix("lu:").ok_or_else(bad)?;
                        let (ms, id) = rest.split_once(':').ok_or_else(bad)?;
                        let at = ms.parse().ok().and_then(datetime::bson_from_millis).ok_or_else(bad)?;
                        Some((at, id.to_string()))
                    }
                },
            },
        })
    }

    fn cursor_after(&self, last: &Version) -> String {
        match self.sort {
            Sort::Id => format!("id:{}", last.id),
            Sort::LastUpdated { .. } => format!("lu:{}:{}", last.last_updated.timestamp_millis(), last.id),
        }
    }

    fn link(&self, base: &str, count: i64, cursor: Option<&str>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.canonical {
            q.append_pair(k, v);
        }
        q.append_pair("_count", &count.to_string());
        if let Some(c) = cursor {
            q.append_pair("_cursor", c);
        }
        format!("{base}?{}", q.finish())
    }
}

pub async fn search_type(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let query = query.unwrap_or_default();
    let mut params = SearchParams::parse(rt, &query, headers::prefer_strict(&headers))?;
    // With `member`, the candidate ids are known: when a first page can hold them all, the
    // page itself is the total and the count query is skipped.
    let mut page_is_total = false;
    if let Some(member) = &params.member {
        // The reverse index answers which groups hold the member; MongoDB then applies the
        // other parameters, hides deleted groups, sorts and pages.
        // Pending batches that may name the member are finished first. The query starts only
        // once they are known: a batch not seen then was already in ClickHouse when it left
        // MongoDB, so the query sees its rows; if some were flushed now, it is asked again.
        let unavailable =
            |e: &dyn std::fmt::Display| FhirError::unavailable("the member store is unavailable; retry", e);
        let started = std::time::Instant::now();
        let concerned = state.flusher.pending_touching(Some(member)).await.map_err(|e| unavailable(&e))?;
        let pending_at = started.elapsed();
        let (flushed, ids) = tokio::join!(
            state.flusher.flush_each(&concerned),
            crate::group::read::groups_of(&state.clickhouse, member)
        );
        flushed.map_err(|e| unavailable(&e))?;
        let ids = match concerned.is_empty() {
            true => ids.map_err(|e| unavailable(&e))?,
            false => crate::group::read::groups_of(&state.clickhouse, member).await.map_err(|e| unavailable(&e))?,
        };
        // Where a member search's time goes (`ROSTER_LOG=roster::fhir=debug`), cumulative;
        // the MongoDB query of the candidates follows.
        tracing::debug!(
            groups = ids.len(),
            flushed = concerned.len(),
            pending_us = pending_at.as_micros() as u64,
            indexed_us = started.elapsed().as_micros() as u64,
            "member search timings"
        );
        page_is_total = params.cursor.is_none() && (ids.len() as i64) <= params.count.unwrap_or(DEFAULT_COUNT);
        params.filter.push(doc! { "_id": { "$in": ids } });
    }
    let base = format!("{}/{rt}", state.fhir_base());
    let filter = params.filter();
    let count = params.count.unwrap_or(DEFAULT_COUNT);
    let only_total = params.summary_count || count == 0;
    // The total and the page are independent queries: asked together.
    let order = params.order()?;
    let (total, page) = tokio::join!(
        async {
            match page_is_total && !only_total {
                true => Ok(None), // the page below is the total
                false => state.store.count(rt, filter.clone()).await.map(Some),
            }
        },
        async {
            match only_total {
                true => Ok(Vec::new()),
                false => state.store.search(rt, filter.clone(), &order, count + 1).await,
            }
        }
    );
    let total = total?;
    let outcome = (!params.unknown.is_empty()).then(|| {
        operation_outcome(
            "warning",
            IssueCode::NotSupported,
            &format!("ignored unsupported search parameters: {}", params.unknown.join(", ")),
            None,
        )
    });
    if only_total {
        let links = Links { self_link: params.link(&base, count, params.cursor.as_deref()), next: None };
        return Ok(fhir_json(StatusCode::OK, &searchset(&state.fhir_base(), rt, &[], total, &links, outcome)));
    }
    let mut page = page?;
    let total = total.or(Some(page.len() as u64));
    let more = page.len() as i64 > count;
    page.truncate(count as usize);
    let next = match page.last() {
        Some(last) if more => Some(params.link(&base, count, Some(&params.cursor_after(last)))),
        _ => None,
    };
    let behaviour = state.writer.behaviour(rt);
    if behaviour.detached_element().is_some() {
        // Members are never inlined in a searchset (a page could hold millions): each Group
        // carries its quantity (recorded with its version) and the SUBSETTED tag.
        for v in &mut page {
            let quantity = v.member_count.active();
            if let Some(resource) = v.resource.as_mut() {
                behaviour.abridge(resource, quantity);
            }
        }
    }
    let links = Links { self_link: params.link(&base, count, params.cursor.as_deref()), next };
    Ok(fhir_json(StatusCode::OK, &searchset(&state.fhir_base(), rt, &page, total, &links, outcome)))
}

/// For `If-None-Exist`: the one existing match, `None` when there is none, 412 when
/// several match.
pub async fn conditional_match(state: &AppState, rt: &str, condition: &str) -> Result<Option<Version>, FhirError> {
    let condition = condition.trim_start_matches('?');
    let condition = condition.rsplit_once('?').map_or(condition, |(_, q)| q);
    let params = SearchParams::parse(rt, condition, true)?;
    if params.member.is_some() {
        return Err(FhirError::bad_request("If-None-Exist does not support the member parameter"));
    }
    if params.filter.is_empty() {
        return Err(FhirError::bad_request("If-None-Exist must contain at least one search parameter"));
    }
    let found = state.store.search(rt, params.filter(), &Order::Id { after: None }, 2).await?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => Err(FhirError::precondition_failed(format!(
            "If-None-Exist '{condition}' matches more than one {rt}; the create is ambiguous"
        ))),
    }
}

/// Value of a query parameter (first occurrence).
pub fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_params_are_reported_or_rejected() {
        let p = SearchParams::parse("Patient", "name=x&_count=5", false).unwrap();
        assert_eq!(p.unknown, vec!["name".to_string()]);
        assert_eq!(p.count, Some(5));
        assert!(SearchParams::parse("Patient", "name=x", true).is_err());
    }

    #[test]
    fn bad_values_are_400() {
        for q in ["_count=-1", "_lastUpdated=yesterday", "_sort=name", "_id=a/b", "_lastUpdated=ap2020"] {
            let e = SearchParams::parse("Patient", q, false).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{q}");
        }
    }

    #[test]
    fn last_updated_prefixes() {
        let d = last_updated_condition("ge2024-01").unwrap();
        assert!(d.get_document("lastUpdated").unwrap().contains_key("$gte"));
        let d = last_updated_condition("2024").unwrap();
        let inner = d.get_document("lastUpdated").unwrap();
        assert!(inner.contains_key("$gte") && inner.contains_key("$lt"));
    }
}
