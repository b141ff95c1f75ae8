//! Transaction Bundles, the prepare step of the protocol in `docs/transactions.md`: what
//! every entry writes, decided before anything is written.
//!
//! - Each entry's target: `POST` gets a new server id (or, with `ifNoneExist`, the one
//!   existing match and no write); `PUT`/`PATCH`/`DELETE` name theirs, or a conditional URL
//!   (`Patient?identifier=…`) resolved by search (R4's conditional update and delete rules);
//!   `GET`/`HEAD` read after the writes.
//! - Every `fullUrl` (`urn:uuid:`, `urn:oid:`, an absolute URL of this server, relative)
//!   maps to the `Type/id` its entry writes; every `reference` in every resource (a Group's
//!   members too) that names one is rewritten to it. Conditional references
//!   (`Patient?identifier=x|1`) resolve to their one match.
//! - Refused with a 4xx before any write, naming the entry: a malformed entry, a duplicate
//!   `fullUrl`, two entries writing one resource, a `urn:` reference no entry declares, a
//!   condition that matches several (412), a conditional reference that matches none or
//!   several (412).
//!
//! The search behind conditions is a trait ([`Matches`]) so the rules are tested here
//! without stores.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::http::Method;
use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::error::FhirError;

/// Ids of `rt` matching a search condition, at most `limit`.
pub trait Matches: Send + Sync {
    fn matches<'a>(
        &'a self,
        rt: &'a str,
        condition: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, FhirError>>;
}

/// What one entry does, decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub index: usize,
    pub method: Method,
    pub rt: String,
    /// The resource written, deleted or read (`None`: a search, or a conditional delete
    /// that matched nothing).
    pub id: Option<String>,
    /// Whether the entry writes (a conditional create that found its match does not).
    pub writes: bool,
    /// The content, references rewritten (POST, PUT) or the patch resource (PATCH).
    pub resource: Option<Value>,
    /// `request.url` relative to the base (reads run it as is).
    pub url: String,
    pub if_match: Option<String>,
}

fn bad(index: usize, msg: impl Into<String>) -> FhirError {
    FhirError::bad_request(msg).at(format!("Bundle.entry[{index}]"))
}

fn ambiguous(index: usize, msg: impl Into<String>) -> FhirError {
    FhirError::precondition_failed(msg).at(format!("Bundle.entry[{index}]"))
}

/// Splits `Type/id`, `Type?query` or `Type` (relative to the base).
fn parse_url(url: &str) -> (String, Option<String>, Option<String>) {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let mut parts = path.splitn(2, '/');
    let rt = parts.next().unwrap_or_default().to_string();
    let id = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
    (rt, id, query)
}

/// Decides every entry of a transaction (see the module docs). `base` is this server's
/// FHIR base; `entries` are `Bundle.entry`.
pub async fn prepare(entries: &[Value], base: &str, search: &dyn Matches) -> Result<Vec<Planned>, FhirError> {
    let mut planned = Vec::with_capacity(entries.len());
    let mut full_urls: HashMap<String, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let request = entry.get("request").ok_or_else(|| bad(i, "the entry has no request"))?;
        let method = match request.get("method").and_then(Value::as_str) {
            Some(m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE")) => {
                Method::from_bytes(m.as_bytes()).expect("known method")
            }
            Some(other) => {
                return Err(bad(i, format!("request.method '{other}' is not one of GET HEAD POST PUT PATCH DELETE")))
            }
            None => return Err(bad(i, "request.method is required")),
        };
        let url = request.get("url").and_then(Value::as_str).ok_or_else(|| bad(i, "request.url is required"))?;
        let url = super::batch::relative_url(url, base).map_err(|e| bad(i, e.diagnostics))?;
        let (rt, id, query) = parse_url(&url);
        if !fhir_model::is_resource_type(&rt) {
            return Err(bad(i, format!("request.url '{url}' does not start with a resource type")));
        }
        let resource = entry.get("resource").cloned();
        let writes_content = method == Method::POST || method == Method::PUT;
        if writes_content {
            let body_type = resource.as_ref().and_then(|r| r.get("resourceType")).and_then(Value::as_str);
            match body_type {
                None => return Err(bad(i, format!("a {method} entry needs a resource"))),
                Some(t) if t != rt => {
                    return Err(bad(i, format!("the entry's resource is a {t}, but request.url names {rt}")))
                }
                Some(_) => {}
            }
        }
        if method == Method::PATCH && resource.is_none() {
            return Err(bad(i, "a PATCH entry needs a Binary or Parameters resource"));
        }
        if let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) {
            if let Some(first) = full_urls.insert(full_url.to_string(), i) {
                return Err(bad(i, format!("fullUrl '{full_url}' is also the fullUrl of entry {first}")));
            }
        }
        let if_match = request.get("ifMatch").and_then(Value::as_str).map(str::to_string);
        let p = match (&method, id, query) {
            (&Method::GET | &Method::HEAD, id, _) => Planned { id, writes: false, ..plan(i, &method, &rt, &url) },
            (&Method::POST, _, _) => {
                let existing = match request.get("ifNoneExist").and_then(Value::as_str) {
                    Some(condition) => one_or_none(search, i, &rt, super::search::condition_query(condition)).await?,
                    None => None,
                };
                match existing {
                    Some(id) => Planned { id: Some(id), writes: false, ..plan(i, &method, &rt, &url) },
                    None => Planned {
                        id: Some(uuid::Uuid::new_v4().to_string()),
                        writes: true,
                        resource,
                        ..plan(i, &method, &rt, &url)
                    },
                }
            }
            (_, Some(id), None) => Planned { id: Some(id), writes: true, resource, ..plan(i, &method, &rt, &url) },
            (_, None, Some(condition)) => {
                let found = one_or_none(search, i, &rt, &condition).await?;
                let id = match (&method, found) {
                    (_, Some(id)) => Some(id),
                    (&Method::PUT, None) => Some(
                        resource
                            .as_ref()
                            .and_then(|r| r.get("id"))
                            .and_then(Value::as_str)
                            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string),
                    ),
                    (&Method::PATCH, None) => {
                        return Err(FhirError::not_found(format!("the PATCH condition '{condition}' matches no {rt}"))
                            .at(format!("Bundle.entry[{i}]")))
                    }
                    _ => None,
                };
                Planned { writes: id.is_some(), id, resource, ..plan(i, &method, &rt, &url) }
            }
            _ => return Err(bad(i, format!("request.url '{url}' names no {rt} for a {method}"))),
        };
        planned.push(Planned { if_match, ..p });
    }
    // Two entries writing one resource cannot both apply.
    let mut written: HashMap<(String, String), usize> = HashMap::new();
    for p in planned.iter().filter(|p| p.writes) {
        let key = (p.rt.clone(), p.id.clone().unwrap_or_default());
        if let Some(first) = written.insert(key, p.index) {
            return Err(bad(
                p.index,
                format!("entries {first} and {} both write {}/{}", p.index, p.rt, p.id.as_deref().unwrap_or("")),
            ));
        }
    }
    // Every fullUrl names what its entry writes (or found).
    let mut targets: BTreeMap<String, String> = BTreeMap::new();
    for (full_url, i) in &full_urls {
        let p = &planned[*i];
        if let Some(id) = &p.id {
            targets.insert(full_url.clone(), format!("{}/{id}", p.rt));
        }
    }
    let mut conditional: BTreeMap<String, String> = BTreeMap::new();
    for p in &planned {
        if let Some(r) = &p.resource {
            for reference in references(r) {
                if targets.contains_key(&reference) || conditional.contains_key(&reference) {
                    continue;
                }
                if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
                    return Err(bad(
                        p.index,
                        format!("the reference '{reference}' names no entry of this transaction"),
                    ));
                }
                let (rt, _, query) = parse_url(&reference);
                if let (Some(query), true) = (query, fhir_model::is_resource_type(&rt)) {
                    let found = search.matches(&rt, &query, 2).await?;
                    match found.as_slice() {
                        [one] => {
                            conditional.insert(reference.clone(), format!("{rt}/{one}"));
                        }
                        [] => {
                            return Err(ambiguous(
                                p.index,
                                format!("the conditional reference '{reference}' matches no {rt}"),
                            ))
                        }
                        _ => {
                            return Err(ambiguous(
                                p.index,
                                format!("the conditional reference '{reference}' matches more than one {rt}"),
                            ))
                        }
                    }
                }
            }
        }
    }
    targets.extend(conditional);
    for p in &mut planned {
        if let Some(r) = p.resource.as_mut() {
            rewrite(r, &targets);
        }
        if let (true, Some(r), Some(id)) =
            (p.method == Method::PUT || p.method == Method::POST, p.resource.as_mut(), &p.id)
        {
            if let Some(obj) = r.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
            }
        }
    }
    Ok(planned)
}

fn plan(index: usize, method: &Method, rt: &str, url: &str) -> Planned {
    Planned {
        index,
        method: method.clone(),
        rt: rt.to_string(),
        id: None,
        writes: false,
        resource: None,
        url: url.to_string(),
        if_match: None,
    }
}

/// The one match of a condition, none, or 412 for several.
async fn one_or_none(search: &dyn Matches, i: usize, rt: &str, condition: &str) -> Result<Option<String>, FhirError> {
    let mut found = search.matches(rt, condition, 2).await?;
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(ambiguous(i, format!("the condition '{condition}' matches more than one {rt}"))),
    }
}

/// Every `reference` string in a resource (any depth), each once.
pub(crate) fn references(resource: &Value) -> Vec<String> {
    let mut out = HashSet::new();
    fn walk(v: &Value, out: &mut HashSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("reference", Value::String(s)) => {
                            out.insert(s.clone());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(resource, &mut out);
    let mut out: Vec<String> = out.into_iter().collect();
    out.sort();
    out
}

/// Replaces each `reference` that names a key of `targets`.
fn rewrite(v: &mut Value, targets: &BTreeMap<String, String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match (k.as_str(), &*v) {
                    ("reference", Value::String(s)) => {
                        if let Some(t) = targets.get(s) {
                            *v = Value::String(t.clone());
                        }
                    }
                    _ => rewrite(v, targets),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, targets)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Conditions answered from a fixed table.
    struct Table(Vec<(&'static str, &'static str, Vec<&'static str>)>);

    impl Matches for Table {
        fn matches<'a>(
            &'a self,
            rt: &'a str,
            condition: &'a str,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<String>, FhirError>> {
            let found = self.0.iter().find(|(t, c, _)| *t == rt && *c == condition).map(|(_, _, ids)| ids.clone());
            Box::pin(async move { Ok(found.unwrap_or_default().into_iter().map(str::to_string).collect()) })
        }
    }

    const BASE: &str = "http://h/4_0_0";

    fn entry(full_url: Option<&str>, method: &str, url: &str, resource: Value) -> Value {
        let mut e = json!({"request": {"method": method, "url": url}});
        if !resource.is_null() {
            e["resource"] = resource;
        }
        if let Some(f) = full_url {
            e["fullUrl"] = json!(f);
        }
        e
    }

    fn run(entries: Vec<Value>, table: Table) -> Result<Vec<Planned>, FhirError> {
        futures_executor(prepare(&entries, BASE, &table))
    }

    fn futures_executor<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn urn_uuid_references_become_the_ids_their_entries_write() {
        let planned = run(
            vec![
                entry(Some("urn:uuid:p"), "POST", "Patient", json!({"resourceType": "Patient"})),
                entry(
                    Some("urn:uuid:e"),
                    "POST",
                    "Encounter",
                    json!({"resourceType": "Encounter",
                    "subject": {"reference": "urn:uuid:p"}}),
                ),
                entry(
                    None,
                    "POST",
                    "Observation",
                    json!({"resourceType": "Observation",
                    "subject": {"reference": "urn:uuid:p"}, "encounter": {"reference": "urn:uuid:e"}}),
                ),
                entry(
                    None,
                    "PUT",
                    "Group/g",
                    json!({"resourceType": "Group", "id": "g",
                    "member": [{"entity": {"reference": "urn:uuid:p"}}]}),
                ),
            ],
            Table(vec![]),
        )
        .unwrap();
        let patient = format!("Patient/{}", planned[0].id.as_deref().unwrap());
        let encounter = format!("Encounter/{}", planned[1].id.as_deref().unwrap());
        assert_eq!(planned[1].resource.as_ref().unwrap()["subject"]["reference"], json!(patient));
        let obs = planned[2].resource.as_ref().unwrap();
        assert_eq!(
            (obs["subject"]["reference"].as_str(), obs["encounter"]["reference"].as_str()),
            (Some(patient.as_str()), Some(encounter.as_str()))
        );
        assert_eq!(planned[3].resource.as_ref().unwrap()["member"][0]["entity"]["reference"], json!(patient));
        assert_eq!(planned[0].resource.as_ref().unwrap()["id"], json!(planned[0].id.as_deref().unwrap()));
    }

    #[test]
    fn a_conditional_create_that_finds_its_match_writes_nothing_and_lends_its_id() {
        let planned = run(
            vec![
                entry(Some("urn:uuid:p"), "POST", "Patient", json!({"resourceType": "Patient"})),
                entry(
                    None,
                    "POST",
                    "Observation",
                    json!({"resourceType": "Observation",
                    "subject": {"reference": "urn:uuid:p"}}),
                ),
            ]
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                if i == 0 {
                    e["request"]["ifNoneExist"] = json!("Patient?identifier=x|1");
                }
                e
            })
            .collect(),
            Table(vec![("Patient", "identifier=x|1", vec!["p7"])]),
        )
        .unwrap();
        assert_eq!((planned[0].writes, planned[0].id.as_deref()), (false, Some("p7")));
        assert_eq!(planned[1].resource.as_ref().unwrap()["subject"]["reference"], "Patient/p7");
    }

    #[test]
    fn conditional_urls_and_references_resolve_by_search() {
        let planned = run(
            vec![
                entry(None, "PUT", "Patient?identifier=x|1", json!({"resourceType": "Patient"})),
                entry(None, "PUT", "Patient?identifier=x|2", json!({"resourceType": "Patient", "id": "given"})),
                entry(None, "DELETE", "Observation?code=gone", Value::Null),
                entry(
                    None,
                    "POST",
                    "Observation",
                    json!({"resourceType": "Observation",
                    "performer": [{"reference": "Practitioner?identifier=npi|9"}]}),
                ),
            ],
            Table(vec![("Patient", "identifier=x|1", vec!["p1"]), ("Practitioner", "identifier=npi|9", vec!["dr9"])]),
        )
        .unwrap();
        assert_eq!(planned[0].id.as_deref(), Some("p1"));
        assert_eq!(planned[1].id.as_deref(), Some("given"), "no match: created with the body's id");
        assert_eq!((planned[2].writes, planned[2].id.as_deref()), (false, None), "a delete of nothing");
        assert_eq!(planned[3].resource.as_ref().unwrap()["performer"][0]["reference"], "Practitioner/dr9");
    }

    #[test]
    fn what_cannot_be_decided_is_refused_before_any_write() {
        let p = || json!({"resourceType": "Patient"});
        let status = |entries: Vec<Value>, table: Table| run(entries, table).unwrap_err().status.as_u16();
        // A duplicate fullUrl.
        assert_eq!(
            status(
                vec![
                    entry(Some("urn:uuid:a"), "POST", "Patient", p()),
                    entry(Some("urn:uuid:a"), "POST", "Patient", p())
                ],
                Table(vec![])
            ),
            400
        );
        // Two entries writing one resource.
        assert_eq!(
            status(
                vec![entry(None, "PUT", "Patient/1", p()), entry(None, "DELETE", "Patient/1", Value::Null)],
                Table(vec![])
            ),
            400
        );
        // A urn: reference no entry declares.
        let dangling = json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:nobody"}});
        assert_eq!(status(vec![entry(None, "POST", "Observation", dangling)], Table(vec![])), 400);
        // A conditional reference that matches none, or several.
        let conditional = json!({"resourceType": "Observation", "subject": {"reference": "Patient?name=x"}});
        assert_eq!(status(vec![entry(None, "POST", "Observation", conditional.clone())], Table(vec![])), 412);
        assert_eq!(
            status(
                vec![entry(None, "POST", "Observation", conditional)],
                Table(vec![("Patient", "name=x", vec!["a", "b"])])
            ),
            412
        );
        // A condition that matches several.
        assert_eq!(
            status(vec![entry(None, "PUT", "Patient?name=x", p())], Table(vec![("Patient", "name=x", vec!["a", "b"])])),
            412
        );
        // A body of another type than the URL's.
        assert_eq!(status(vec![entry(None, "POST", "Observation", p())], Table(vec![])), 400);
        // No request.
        assert_eq!(status(vec![json!({"resource": p()})], Table(vec![])), 400);
    }
}
