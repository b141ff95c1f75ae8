//! Type-level search over every R4 search parameter (`GET /{type}?…`, `POST
//! /{type}/_search` with a form body): the request is parsed into clauses
//! (`search::query`), run by the engine (`search::execute`), and shaped here: paging
//! links with an opaque cursor (a page boundary never shifts under concurrent writes),
//! `_total`, `_summary`, `_elements`, `_include` and `_revinclude`.
//!
//! `Group?member=` and `_has:Group:member:` are answered from the Group's member events
//! in ClickHouse (the type keeps its members out of the stored resource; see
//! `search::detached`).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value};

use super::bundle::{searchset_entries, Entry, Links};
use super::headers::{self, fhir_json};
use super::known_type;
use crate::error::{operation_outcome, FhirError, IssueCode};
use crate::search::definitions::{registry, ParamType};
use crate::search::execute::{self, Engine, Position, Request, SortKey, Total};
use crate::search::query::{self, Clause, Test};
use crate::state::AppState;
use crate::store::Version;

pub const DEFAULT_COUNT: usize = 20;
pub const MAX_COUNT: usize = 1000;
/// Most resources `_include` and `_revinclude` add to one page.
pub const MAX_INCLUDES: usize = 1000;
/// Most `_include:iterate` rounds.
const MAX_ITERATE: usize = 3;

/// Parameters that are accepted but change nothing in a JSON-only server.
const IGNORED: &[&str] = &["_format", "_pretty"];

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Summary {
    #[default]
    False,
    /// The type's summary elements only (R4 `isSummary`).
    True,
    Count,
    Text,
    Data,
}

/// `_include` / `_revinclude` = `Source:param[:Target]`, or `*`.
#[derive(Debug, Clone)]
struct Include {
    source: String,
    /// `None`: every reference parameter of the source (`Source:*`, `*`).
    param: Option<String>,
    target: Option<String>,
    iterate: bool,
}

#[derive(Debug, Default)]
pub struct SearchParams {
    clauses: Vec<Clause>,
    /// Canonical `name=value` pairs for self/next links.
    canonical: Vec<(String, String)>,
    count: Option<usize>,
    sort: Vec<SortKey>,
    summary: Summary,
    total: Option<Total>,
    elements: Option<Vec<String>>,
    cursor: Option<String>,
    includes: Vec<Include>,
    revincludes: Vec<Include>,
    /// Parameters ignored because this server does not support them.
    unknown: Vec<String>,
}

fn bad(msg: String) -> FhirError {
    FhirError::bad_request(msg)
}

impl Include {
    /// The reference parameters it follows.
    fn definitions(&self) -> Vec<std::sync::Arc<crate::search::definitions::Definition>> {
        match &self.param {
            Some(p) => registry().get(&self.source, p).into_iter().cloned().collect(),
            None => registry().of_type(&self.source).filter(|d| d.kind == ParamType::Reference).cloned().collect(),
        }
    }
}

fn parse_include(name: &str, value: &str, rt: &str, rev: bool) -> Result<Include, FhirError> {
    let iterate = match name.split_once(':') {
        None => false,
        Some((_, "iterate" | "recurse")) => true,
        Some((_, m)) => return Err(bad(format!("{name}: modifier :{m} is not supported (iterate)"))),
    };
    if value == "*" {
        return Ok(Include { source: rt.to_string(), param: None, target: None, iterate });
    }
    let mut parts = value.split(':');
    let (Some(source), Some(param)) = (parts.next(), parts.next()) else {
        return Err(bad(format!("{name}: '{value}' is not Type:parameter[:targetType]")));
    };
    let target = parts.next().map(str::to_string);
    if parts.next().is_some() || !fhir_model::is_resource_type(source) {
        return Err(bad(format!("{name}: '{value}' is not Type:parameter[:targetType]")));
    }
    if !rev && !iterate && source != rt {
        return Err(bad(format!("{name}: '{source}' is not the searched type {rt} (use :iterate)")));
    }
    if let Some(t) = &target {
        if !fhir_model::is_resource_type(t) {
            return Err(bad(format!("{name}: '{t}' is not a resource type")));
        }
    }
    let param = match param {
        "*" => None,
        p => {
            let def = registry()
                .get(source, p)
                .ok_or_else(|| bad(format!("{name}: '{p}' is not a search parameter of {source}")))?;
            if def.kind != ParamType::Reference {
                return Err(bad(format!("{name}: '{p}' is not a reference parameter of {source}")));
            }
            Some(p.to_string())
        }
    };
    Ok(Include { source: source.to_string(), param, target, iterate })
}

fn parse_sort(rt: &str, value: &str) -> Result<Vec<SortKey>, FhirError> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let (descending, code) = match part.strip_prefix('-') {
            Some(c) => (true, c),
            None => (false, part),
        };
        if code == "_id" {
            out.push(SortKey { def: None, descending });
            continue;
        }
        let def = registry()
            .get(rt, code)
            .ok_or_else(|| bad(format!("_sort: '{code}' is not a search parameter of {rt}")))?;
        if !execute::sortable(def) {
            return Err(bad(format!("_sort: '{code}' is a {} parameter, which cannot sort", def.kind.as_str())));
        }
        out.push(SortKey { def: Some(def.clone()), descending });
    }
    if out.len() > execute::MAX_SORTS {
        return Err(bad(format!("_sort: at most {} keys", execute::MAX_SORTS)));
    }
    // `_id` ends every order anyway: named last, it sets the direction of ids (see
    // `execute::ids_descending`); alone, only ascending (the order without `_sort`).
    if out.iter().rev().skip(1).any(|s| s.def.is_none()) {
        return Err(bad("_sort: _id may only be the last key".into()));
    }
    match out.as_slice() {
        [only] if only.def.is_none() && only.descending => {
            return Err(bad("_sort: -_id is supported only after another key (_id alone sorts ascending)".into()))
        }
        [only] if only.def.is_none() => out.clear(),
        _ => {}
    }
    Ok(out)
}

impl SearchParams {
    pub fn parse(rt: &str, query: &str, strict: bool, base: &str) -> Result<SearchParams, FhirError> {
        let mut p = SearchParams::default();
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        if pairs.len() > query::MAX_CLAUSES * 2 {
            return Err(bad(format!("at most {} search parameters", query::MAX_CLAUSES * 2)));
        }
        for (name, value) in pairs {
            let base_name = name.split(':').next().unwrap_or(&name);
            match base_name {
                "_count" => {
                    let n: usize =
                        value.parse().map_err(|_| bad(format!("_count: '{value}' is not a non-negative integer")))?;
                    p.count = Some(n.min(MAX_COUNT));
                    continue; // re-added with the effective value
                }
                "_cursor" => {
                    p.cursor = Some(value);
                    continue;
                }
                "_sort" => p.sort = parse_sort(rt, &value)?,
                "_summary" => {
                    p.summary = match value.as_str() {
                        "count" => Summary::Count,
                        "true" => Summary::True,
                        "false" => Summary::False,
                        "text" => Summary::Text,
                        "data" => Summary::Data,
                        other => {
                            return Err(bad(format!(
                                "_summary: '{other}' is not supported (true, count, text, data, false)"
                            )))
                        }
                    }
                }
                "_total" => {
                    p.total = Some(match value.as_str() {
                        "none" => Total::None,
                        "estimate" | "accurate" => Total::Accurate,
                        other => return Err(bad(format!("_total: '{other}' is not none, estimate or accurate"))),
                    })
                }
                "_elements" => {
                    let list: Vec<String> =
                        value.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
                    if let Some(bad_name) =
                        list.iter().find(|e| !e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                    {
                        return Err(bad(format!("_elements: '{bad_name}' is not an element name")));
                    }
                    p.elements = Some(list);
                }
                "_include" => p.includes.push(parse_include(&name, &value, rt, false)?),
                "_revinclude" => p.revincludes.push(parse_include(&name, &value, rt, true)?),
                n if IGNORED.contains(&n) => continue,
                _ => match query::parse_clause(rt, &name, &value, base, 0)? {
                    Some(clause) => {
                        if p.clauses.len() >= query::MAX_CLAUSES {
                            return Err(bad(format!("at most {} search parameters", query::MAX_CLAUSES)));
                        }
                        p.clauses.push(clause);
                    }
                    None if strict => {
                        return Err(bad(format!("unknown or unsupported search parameter '{name}' on {rt}")))
                    }
                    None => {
                        p.unknown.push(name);
                        continue;
                    }
                },
            }
            p.canonical.push((name, value));
        }
        Ok(p)
    }

    fn link(&self, base: &str, count: usize, cursor: Option<&str>) -> String {
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

pub fn engine(state: &AppState) -> Engine {
    Engine {
        ch: state.clickhouse.clone(),
        store: state.store.clone(),
        base: state.fhir_base().into(),
        detached: state.detached.clone(),
        listed_ids: state.search_listed_ids,
    }
}

pub async fn search_type(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let base = format!("{}/{rt}", state.fhir_base());
    search(&state, rt, &query.unwrap_or_default(), &headers, &base, Vec::new()).await
}

/// `POST /{type}/_search`: the parameters in an `application/x-www-form-urlencoded` body
/// (and the URL), as a GET.
pub async fn search_post(
    State(state): State<AppState>,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, FhirError> {
    let rt = known_type(&rt)?;
    let form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form && !body.is_empty() {
        return Err(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueCode::NotSupported,
            "POST _search takes an application/x-www-form-urlencoded body",
        ));
    }
    let body = std::str::from_utf8(&body).map_err(|_| bad("the _search body is not UTF-8".into()))?;
    let mut all = query.unwrap_or_default();
    if !body.is_empty() {
        if !all.is_empty() {
            all.push('&');
        }
        all.push_str(body.trim());
    }
    let base = format!("{}/{rt}", state.fhir_base());
    search(&state, rt, &all, &headers, &base, Vec::new()).await
}

/// A search of `rt` whose links start with `link_base`; `extra` clauses narrow it (a
/// compartment).
pub(super) async fn search(
    state: &AppState,
    rt: &str,
    query: &str,
    headers: &HeaderMap,
    link_base: &str,
    extra: Vec<Clause>,
) -> Result<Response, FhirError> {
    let fhir_base = state.fhir_base();
    let mut params = SearchParams::parse(rt, query, headers::prefer_strict(headers), &fhir_base)?;
    params.clauses.extend(extra);
    let count = params.count.unwrap_or(DEFAULT_COUNT);
    let only_total = params.summary == Summary::Count || count == 0;
    let cursor = match &params.cursor {
        Some(c) => Some(Position::decode(c, params.sort.iter().filter(|s| s.def.is_some()).count())?),
        None => None,
    };
    let request = Request {
        rt: rt.to_string(),
        clauses: params.clauses.clone(),
        sort: params.sort.clone(),
        count: if only_total { 0 } else { count },
        cursor,
        total: match (only_total, params.total) {
            (true, _) => Total::Accurate,
            (false, Some(t)) => t,
            (false, None) => Total::WhenCheap,
        },
    };
    let started = std::time::Instant::now();
    let engine = engine(state);
    let page = engine.search(&request).await?;
    let searched_at = started.elapsed();
    let outcome = (!params.unknown.is_empty()).then(|| {
        operation_outcome(
            "warning",
            IssueCode::NotSupported,
            &format!("ignored unsupported search parameters: {}", params.unknown.join(", ")),
            None,
        )
    });
    let self_link = params.link(link_base, count, params.cursor.as_deref());
    let next = page.next.as_ref().map(|p| params.link(link_base, count, Some(&p.encode())));
    let mut matches = page.matches;
    let included = match only_total {
        true => Vec::new(),
        false => includes(state, &engine, rt, &matches, &params).await?,
    };
    let included_at = started.elapsed();
    for v in &mut matches {
        shape(state, rt, v, &params);
    }
    let mut included = included;
    for (t, v) in &mut included {
        shape(state, t, v, &params);
    }
    let mut entries: Vec<Entry> = matches.iter().map(|version| Entry { rt, version, include: false }).collect();
    entries.extend(included.iter().map(|(t, version)| Entry { rt: t, version, include: true }));
    let links = Links { self_link, next };
    let bundle = searchset_entries(&fhir_base, &entries, page.total, &links, outcome);
    let response = fhir_json(StatusCode::OK, &bundle);
    // The engine's share and the rest (`ROSTER_LOG=roster::fhir=debug`), cumulative.
    tracing::debug!(
        resource_type = rt,
        searched_us = searched_at.as_micros() as u64,
        included_us = included_at.as_micros() as u64,
        answered_us = started.elapsed().as_micros() as u64,
        entries = entries.len(),
        "search answer timings"
    );
    Ok(response)
}

/// A version as a searchset shows it: a detached element left out (a Group's members),
/// `_summary` and `_elements` applied.
fn shape(state: &AppState, rt: &str, v: &mut Version, params: &SearchParams) {
    abridge(state, rt, v);
    let Some(resource) = v.resource.as_mut() else { return };
    match params.summary {
        Summary::True => keep_where(resource, |name| crate::model::is_summary_element(rt, name)),
        Summary::Text => keep_only(resource, &["text", "id", "meta"]),
        Summary::Data => {
            if resource.remove("text").is_some() {
                crate::model::tag_subsetted(resource);
            }
        }
        Summary::False | Summary::Count => {}
    }
    if let Some(elements) = &params.elements {
        let keep: Vec<&str> = elements.iter().map(String::as_str).collect();
        keep_only(resource, &keep);
    }
}

/// A version as any searchset shows it: without the element its type keeps apart.
/// Members are never inlined (a page could hold millions): each Group carries its
/// quantity (recorded with its version) and the SUBSETTED tag.
pub(super) fn abridge(state: &AppState, rt: &str, v: &mut Version) {
    let behaviour = state.writer.behaviour(rt);
    let quantity = v.member_count.active();
    if let (Some(_), Some(resource)) = (behaviour.detached_element(), v.resource.as_mut()) {
        behaviour.abridge(resource, quantity);
    }
}

/// Keeps `keep` and what every resource must show (`resourceType`, `id`, `meta`), and
/// tags the result SUBSETTED when anything went.
fn keep_only(resource: &mut Map<String, Value>, keep: &[&str]) {
    keep_where(resource, |name| keep.contains(&name.strip_prefix('_').unwrap_or(name)));
}

/// Keeps the elements `keep` accepts and `resourceType`, `id`, `meta`; tags the result
/// SUBSETTED when anything went.
fn keep_where(resource: &mut Map<String, Value>, keep: impl Fn(&str) -> bool) {
    let before = resource.len();
    resource.retain(|k, _| {
        let name = k.strip_prefix('_').unwrap_or(k);
        matches!(name, "resourceType" | "id" | "meta") || keep(k)
    });
    if resource.len() < before {
        crate::model::tag_subsetted(resource);
    }
}

/// The reference targets (`Type/id` on this server) of a version through an include.
fn targets_of(version: &Version, inc: &Include, base: &str) -> Vec<(String, String)> {
    let Some(resource) = version.resource.as_ref() else { return Vec::new() };
    let resource = Value::Object(resource.clone());
    let mut out = Vec::new();
    for def in inc.definitions() {
        for value in crate::search::extract::values_of(&def, &resource, base) {
            let crate::search::extract::IndexValue::Reference(r) = value else { continue };
            let (Some(target), Some(ty)) = (r.target, r.target_type) else { continue };
            if target.contains(':') || inc.target.as_ref().is_some_and(|t| *t != ty) {
                continue;
            }
            let id = target.rsplit('/').next().unwrap_or_default().to_string();
            out.push((ty, id));
        }
    }
    out
}

/// `_include` and `_revinclude` of a page (and `:iterate` over what they add), at most
/// [`MAX_INCLUDES`] resources, none twice, none that is a match.
async fn includes(
    state: &AppState,
    engine: &Engine,
    rt: &str,
    matches: &[Version],
    params: &SearchParams,
) -> Result<Vec<(String, Version)>, FhirError> {
    if params.includes.is_empty() && params.revincludes.is_empty() {
        return Ok(Vec::new());
    }
    let base = state.fhir_base();
    let mut seen: std::collections::HashSet<String> = matches.iter().map(|v| format!("{rt}/{}", v.id)).collect();
    let mut out: Vec<(String, Version)> = Vec::new();
    // The resources the current round looks from.
    let mut frontier: Vec<(String, Version)> = matches.iter().map(|v| (rt.to_string(), v.clone())).collect();
    for round in 0..=MAX_ITERATE {
        let mut added: Vec<(String, Version)> = Vec::new();
        for inc in params.includes.iter().filter(|i| round == 0 || i.iterate) {
            let mut wanted: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (_, v) in frontier.iter().filter(|(t, _)| *t == inc.source) {
                for (ty, id) in targets_of(v, inc, &base) {
                    if seen.insert(format!("{ty}/{id}")) {
                        wanted.entry(ty).or_default().push(id);
                    }
                }
            }
            for (ty, ids) in wanted {
                for v in state.store.by_ids(&ty, &ids).await? {
                    if !v.deleted {
                        added.push((ty.clone(), v));
                    }
                }
            }
        }
        for inc in params.revincludes.iter().filter(|i| round == 0 || i.iterate) {
            let refs: Vec<String> = frontier.iter().map(|(t, v)| format!("{t}/{}", v.id)).collect();
            if refs.is_empty() {
                continue;
            }
            for def in inc.definitions() {
                let clause = Clause::Param { def, not: false, any: vec![Test::RefAny(refs.clone())] };
                let req = Request {
                    rt: inc.source.clone(),
                    clauses: vec![clause],
                    sort: Vec::new(),
                    count: MAX_INCLUDES,
                    cursor: None,
                    total: Total::None,
                };
                for v in engine.search(&req).await?.matches {
                    if seen.insert(format!("{}/{}", inc.source, v.id)) {
                        added.push((inc.source.clone(), v));
                    }
                }
            }
        }
        if added.is_empty() {
            break;
        }
        out.extend(added.iter().cloned());
        if out.len() > MAX_INCLUDES {
            out.truncate(MAX_INCLUDES);
            break;
        }
        frontier = added;
    }
    Ok(out)
}

/// The query of a condition: `If-None-Exist` may carry `?query` or `Type?query`.
pub fn condition_query(condition: &str) -> &str {
    let condition = condition.trim_start_matches('?');
    condition.rsplit_once('?').map_or(condition, |(_, q)| q)
}

/// For `If-None-Exist`: the one existing match, `None` when there is none, 412 when
/// several match.
pub async fn conditional_match(state: &AppState, rt: &str, condition: &str) -> Result<Option<Version>, FhirError> {
    let found = conditional_matches(state, rt, condition, 2).await?;
    match found.len() {
        0 | 1 => Ok(found.into_iter().next()),
        _ => Err(FhirError::precondition_failed(format!(
            "If-None-Exist '{condition}' matches more than one {rt}; the create is ambiguous"
        ))),
    }
}

/// The resources a condition matches, at most `limit`. A condition must name at least one
/// search parameter, and every parameter must be understood (a condition that ignored
/// one would match too much).
pub async fn conditional_matches(
    state: &AppState,
    rt: &str,
    condition: &str,
    limit: usize,
) -> Result<Vec<Version>, FhirError> {
    let base = state.fhir_base();
    let params = SearchParams::parse(rt, condition_query(condition), true, &base)?;
    if params.clauses.is_empty() {
        return Err(bad("a condition must contain at least one search parameter".into()));
    }
    let req = Request {
        rt: rt.to_string(),
        clauses: params.clauses,
        sort: Vec::new(),
        count: limit,
        cursor: None,
        total: Total::None,
    };
    Ok(engine(state).search(&req).await?.matches)
}

/// Value of a query parameter (first occurrence).
pub fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str, strict: bool) -> Result<SearchParams, FhirError> {
        SearchParams::parse("Patient", q, strict, "http://h/4_0_0")
    }

    #[test]
    fn unknown_params_are_reported_or_rejected() {
        let p = parse("nonsense=x&_count=5", false).unwrap();
        assert_eq!(p.unknown, vec!["nonsense".to_string()]);
        assert_eq!(p.count, Some(5));
        assert!(parse("nonsense=x", true).is_err());
        assert!(parse("name=x", true).is_ok());
    }

    #[test]
    fn bad_values_are_400() {
        for q in [
            "_count=-1",
            "_lastUpdated=yesterday",
            "_sort=nonsense",
            "_id=a/b,",
            "birthdate=ap20x",
            "family:below=x",
            "_include=Observation:nope",
            "_summary=maybe",
            "_total=some",
            "_elements=a.b",
        ] {
            let e = parse(q, false).err().unwrap_or_else(|| panic!("{q} was accepted"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{q}");
        }
    }

    #[test]
    fn sorts_and_includes_parse() {
        let p = parse(
            "_sort=-birthdate,family,_id&_include=Patient:general-practitioner&_revinclude=Observation:subject",
            false,
        )
        .unwrap();
        assert_eq!(p.sort.len(), 3);
        assert!(p.sort[0].descending && !p.sort[1].descending);
        assert!(p.sort[2].def.is_none() && !p.sort[2].descending, "a named _id stays: it orders the ids");
        assert!(parse("_sort=-date,-_id", false).is_err(), "no date on Patient");
        assert!(parse("_sort=-birthdate,-_id", false).unwrap().sort[1].descending);
        assert!(parse("_sort=-_id", false).is_err());
        assert!(parse("_sort=_id", false).unwrap().sort.is_empty());
        assert!(parse("_sort=_id,family", false).is_err());
        assert_eq!(p.includes[0].param.as_deref(), Some("general-practitioner"));
        assert_eq!(p.revincludes[0].source, "Observation");
    }
}
