//! Bundle assembly for search and history results.

use serde_json::{json, Map, Value};

use super::headers::etag;
use crate::model::datetime::{format_bson_instant, format_instant};
use crate::store::Version;

pub struct Links {
    pub self_link: String,
    pub next: Option<String>,
}

fn links(l: &Links) -> Value {
    let mut out = vec![json!({ "relation": "self", "url": l.self_link })];
    if let Some(next) = &l.next {
        out.push(json!({ "relation": "next", "url": next }));
    }
    Value::Array(out)
}

/// One entry of a searchset: a current version of type `rt`, a match or an include.
pub struct Entry<'a> {
    pub rt: &'a str,
    pub version: &'a Version,
    pub include: bool,
}

/// A `searchset` Bundle of current versions of one type (see [`searchset_entries`]).
pub fn searchset(
    fhir_base: &str,
    rt: &str,
    entries: &[Version],
    total: Option<u64>,
    l: &Links,
    outcome: Option<Value>,
) -> Value {
    let entries: Vec<Entry> = entries.iter().map(|version| Entry { rt, version, include: false }).collect();
    searchset_entries(fhir_base, &entries, total, l, outcome)
}

/// A `searchset` Bundle: matches and includes (`search.mode` `match`/`include`); `outcome`
/// (warnings about the request, e.g. ignored parameters) becomes an entry with
/// `search.mode = outcome`.
pub fn searchset_entries(
    fhir_base: &str,
    entries: &[Entry],
    total: Option<u64>,
    l: &Links,
    outcome: Option<Value>,
) -> Value {
    let mut items: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "fullUrl": format!("{fhir_base}/{}/{}", e.rt, e.version.id),
                "resource": e.version.resource.clone().map(Value::Object).unwrap_or(Value::Null),
                "search": { "mode": if e.include { "include" } else { "match" } },
            })
        })
        .collect();
    if let Some(outcome) = outcome {
        items.push(json!({ "resource": outcome, "search": { "mode": "outcome" } }));
    }
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
    bundle.insert("meta".into(), json!({ "lastUpdated": format_instant(time::OffsetDateTime::now_utc()) }));
    bundle.insert("type".into(), json!("searchset"));
    if let Some(total) = total {
        bundle.insert("total".into(), json!(total));
    }
    bundle.insert("link".into(), links(l));
    if !items.is_empty() {
        bundle.insert("entry".into(), Value::Array(items));
    }
    Value::Object(bundle)
}

/// A `history` Bundle, newest first.
pub fn history(fhir_base: &str, rt: &str, entries: &[Version], total: u64, l: &Links) -> Value {
    let entries: Vec<(&str, &Version)> = entries.iter().map(|v| (rt, v)).collect();
    history_of(fhir_base, &entries, total, l)
}

/// A `history` Bundle of entries of any types, newest first.
pub fn history_of(fhir_base: &str, entries: &[(&str, &Version)], total: u64, l: &Links) -> Value {
    let items: Vec<Value> = entries
        .iter()
        .map(|&(rt, v)| {
            let (url, status) = match v.method.as_str() {
                "POST" => (rt.to_string(), "201 Created"),
                "DELETE" => (format!("{rt}/{}", v.id), "204 No Content"),
                _ if v.version == 1 => (format!("{rt}/{}", v.id), "201 Created"),
                _ => (format!("{rt}/{}", v.id), "200 OK"),
            };
            let mut entry = Map::new();
            entry.insert("fullUrl".into(), json!(format!("{fhir_base}/{rt}/{}", v.id)));
            if let Some(resource) = &v.resource {
                entry.insert("resource".into(), Value::Object(resource.clone()));
            }
            entry.insert("request".into(), json!({ "method": v.method, "url": url }));
            entry.insert(
                "response".into(),
                json!({ "status": status, "etag": etag(v.version), "lastModified": format_bson_instant(v.last_updated) }),
            );
            Value::Object(entry)
        })
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": format_instant(time::OffsetDateTime::now_utc()) },
        "type": "history",
        "total": total,
        "link": links(l),
    });
    if !items.is_empty() {
        bundle["entry"] = Value::Array(items);
    }
    bundle
}
