//! Stage 2, draft: the new content of a write, from the change and the base version:
//! a body checked once, a patch applied and validated, `id` and `meta` stamped, and the
//! BSON document the commit stores. Pure: no store is touched here.

use axum::http::StatusCode;
use bson::{DateTime, Document};
use serde_json::{Map, Value};

use super::load::Loaded;
use super::{Change, Interaction, SaveOutcome, Stop};
use crate::error::{FhirError, IssueCode};
use crate::model::patching::Patch;
use crate::model::{datetime, json_bson, lenient, validate};
use crate::store::{SearchKeys, Version, Writes};

/// The drafted version of one attempt.
pub(super) struct Content {
    pub interaction: Interaction,
    pub version: i64,
    pub last_updated: DateTime,
    /// The stamped resource; `None` for a delete.
    pub resource: Option<Map<String, Value>>,
    /// `resource` as stored.
    pub document: Option<Document>,
    /// The version's search index keys (empty for a delete) and what the index lacks of
    /// them; `None` when not indexing.
    pub search: Option<SearchKeys>,
}

/// What a draft is made from.
pub(super) struct Drafting<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub change: &'a Change,
    /// See `Begun::patch_numbers`.
    pub patch_numbers: &'a [usize],
    pub writes: Writes,
    pub if_match: Option<i64>,
    /// This server's base URL when writes are indexed for search (its absolute references
    /// are indexed as relative ones).
    pub search_base: Option<&'a str>,
    /// The highest version of the resource whose search keys this process put in the index
    /// (see `SearchKeys::next`).
    pub search_indexed: Option<i64>,
}

/// Checks a POST/PUT body before any attempt: it does not depend on the current version.
pub(super) fn check_body(rt: &str, id: &str, change: &Change) -> Result<(), FhirError> {
    let (Change::Create(body) | Change::Update(body)) = change else { return Ok(()) };
    let mut body = body.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.insert("id".into(), Value::String(id.to_string()));
    }
    refuse_subset(rt, &body, StatusCode::BAD_REQUEST)?;
    validate::validate_resource(rt, &body)?;
    Ok(())
}

pub(super) fn draft(d: &Drafting<'_>, loaded: &Loaded) -> Result<Content, Stop> {
    let (rt, id) = (d.resource_type, d.id);
    let current = loaded.current.as_ref();
    let live = loaded.live();
    let (interaction, resource) = match d.change {
        Change::Create(body) => (Interaction::Create, Some(body.clone())),
        Change::Update(body) => {
            if let (Some(c), Some(sent)) = (live, body.pointer("/meta/versionId").and_then(Value::as_str)) {
                if d.if_match.is_none() && sent != c.version.to_string() {
                    return Err(FhirError::conflict(format!(
                        "meta.versionId {sent} in the body is not the current version {}; \
                         re-read the resource or send If-Match",
                        c.version
                    ))
                    .at(format!("{rt}.meta.versionId"))
                    .into());
                }
            }
            (Interaction::Update, Some(body.clone()))
        }
        Change::Patch(ops) => {
            let Some(c) = current else {
                return Err(FhirError::not_found(format!("{rt}/{id} does not exist")).into());
            };
            let Some(old) = live.and_then(|c| c.resource.clone()) else {
                return Err(FhirError::gone(format!("{rt}/{id} is deleted"), c.version).into());
            };
            // Only what the type handles itself changes: the stored content stays, but for meta.
            let resource = match d.writes {
                Writes::MetaOnly => Value::Object(old),
                Writes::Content => patched(rt, id, old, ops, d.patch_numbers)?,
            };
            (Interaction::Patch, Some(resource))
        }
        Change::Delete => match current {
            None => return Err(FhirError::not_found(format!("{rt}/{id} does not exist")).into()),
            Some(c) if c.deleted => {
                return Err(Stop::Unchanged(Box::new(SaveOutcome {
                    version: c.clone(),
                    created: false,
                    changed: false,
                })))
            }
            Some(_) => (Interaction::Delete, None),
        },
    };
    let version = current.map_or(1, |c| c.version + 1);
    let last_updated = next_timestamp(current);
    let (mut stored, mut document) = (None, None);
    let mut search_keys = d.search_base.map(|_| Vec::new());
    if let Some(Value::Object(mut obj)) = resource {
        stamp(&mut obj, id, version, last_updated);
        if let Some(base) = d.search_base {
            let value = Value::Object(obj);
            search_keys = Some(crate::search::index_keys(&value, base));
            let Value::Object(o) = value else { unreachable!("built as an object just above") };
            obj = o;
        }
        let status = match interaction {
            Interaction::Patch => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        let doc = json_bson::to_document(&obj)
            .map_err(|e| FhirError::new(status, IssueCode::Value, e.to_string()).at(format!("{rt}.{}", e.path)))?;
        document = Some(doc);
        stored = Some(obj);
    }
    // An indexed version newer than the base means the base is stale (its commit will fail).
    let indexed = d.search_indexed.filter(|f| current.is_some_and(|c| *f <= c.version));
    let search =
        search_keys.map(|keys| SearchKeys::next(base_keys(current, d.search_base).as_ref(), keys, version, indexed));
    Ok(Content { interaction, version, last_updated, resource: stored, document, search })
}

/// The base version's search keys: as stored, or, for a version stored before keys were
/// (no `_s`; `search::reindex` put its keys in the index only), from its content, so the
/// keys this write drops are removed from the index.
fn base_keys(current: Option<&Version>, search_base: Option<&str>) -> Option<SearchKeys> {
    let c = current?;
    match search_base {
        Some(base) => Some(SearchKeys {
            keys: crate::search::stored_keys(c, base),
            added: c.search.added.clone(),
            removed: c.search.removed.clone(),
            changed: c.search.changed.clone(),
        }),
        None => Some(c.search.clone()),
    }
}

/// The current version, when the drafted write would change nothing (an empty patch, a PUT
/// of the same content) and its type adds nothing either: no version, no history entry.
pub(super) fn unchanged(loaded: &Loaded, content: &Content) -> Option<Version> {
    let (c, new) = (loaded.live()?, content.resource.as_ref()?);
    let old = c.resource.as_ref()?;
    (content.interaction != Interaction::Create && same_content(old, new)).then(|| {
        let mut version = c.clone();
        version.outbox.clear();
        version.version_log.clear();
        version
    })
}

/// Whether two versions of a resource have the same content: equal but for
/// `meta.versionId` and `meta.lastUpdated`, which every write sets.
fn same_content(old: &Map<String, Value>, new: &Map<String, Value>) -> bool {
    fn meta_rest(resource: &Map<String, Value>) -> Vec<(&String, &Value)> {
        match resource.get("meta") {
            Some(Value::Object(meta)) => {
                meta.iter().filter(|(k, _)| !matches!(k.as_str(), "versionId" | "lastUpdated")).collect()
            }
            _ => Vec::new(),
        }
    }
    let content = |r: &Map<String, Value>| r.iter().filter(|(k, _)| *k != "meta").count();
    content(old) == content(new) && new.iter().filter(|(k, _)| *k != "meta").all(|(k, v)| old.get(k) == Some(v)) && {
        let (mut a, mut b) = (meta_rest(old), meta_rest(new));
        a.sort_by_key(|(k, _)| *k);
        b.sort_by_key(|(k, _)| *k);
        a == b
    }
}

/// Applies a patch and validates the result (422 when either fails). Empty elements the
/// patch leaves behind are dropped, as on every write. `numbers`: see `Patch::apply_numbered`.
fn patched(rt: &str, id: &str, old: Map<String, Value>, ops: &Patch, numbers: &[usize]) -> Result<Value, FhirError> {
    let mut doc = Value::Object(old);
    ops.apply_numbered(&mut doc, numbers)
        .map_err(|e| FhirError::unprocessable(format!("the {} cannot be applied: {e}", ops.format())))?;
    lenient::drop_empty(&mut doc, rt);
    if doc.get("id").and_then(Value::as_str) != Some(id) {
        return Err(FhirError::unprocessable("a patch may not change or remove the resource id").at(format!("{rt}.id")));
    }
    if doc.get("resourceType").and_then(Value::as_str) != Some(rt) {
        return Err(
            FhirError::unprocessable("a patch may not change the resourceType").at(format!("{rt}.resourceType"))
        );
    }
    refuse_subset(rt, &doc, StatusCode::UNPROCESSABLE_ENTITY)?;
    validate::validate_resource(rt, &doc).map_err(|e| {
        let mut e = FhirError::from(e);
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e.diagnostics = format!("the patched resource is not valid: {}", e.diagnostics);
        e
    })?;
    Ok(doc)
}

/// The tag FHIR puts on a resource shown in part (`_summary`, `_elements`, a Group without
/// its members).
const SUBSETTED: &str = "SUBSETTED";

/// Refuses to store a resource tagged `SUBSETTED`: it is a partial copy, and storing it
/// (a PUT is a full replacement) would delete what was left out, e.g. every member of a
/// Group read from a search result or a write response. FHIR: subsetted resources must
/// not be used for updates.
fn refuse_subset(rt: &str, resource: &Value, status: StatusCode) -> Result<(), FhirError> {
    let tags = resource.pointer("/meta/tag").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let Some(i) = tags.iter().position(|t| t.get("code").and_then(Value::as_str) == Some(SUBSETTED)) else {
        return Ok(());
    };
    Err(FhirError::new(
        status,
        IssueCode::Invalid,
        format!(
            "this {rt} is tagged SUBSETTED: it is a partial copy (from a search, a write response, \
             _summary or _elements) and writing it would delete what it leaves out. Read the \
             full resource with GET [base]/{rt}/[id] and write that, or change it with PATCH"
        ),
    )
    .at(format!("{rt}.meta.tag[{i}]")))
}

/// Now, at millisecond precision, and strictly after the previous version, so a resource's
/// versions are ordered by `lastUpdated` even when the clock stalls or steps back.
fn next_timestamp(previous: Option<&Version>) -> DateTime {
    let now = DateTime::now();
    match previous {
        Some(p) if p.last_updated >= now => DateTime::from_millis(p.last_updated.timestamp_millis() + 1),
        _ => now,
    }
}

/// Sets id and the server-owned `meta` elements, keeping the client's other `meta`
/// elements, with `resourceType`, `id`, `meta` first.
fn stamp(resource: &mut Map<String, Value>, id: &str, version: i64, last_updated: DateTime) {
    let mut meta = match resource.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(datetime::format_bson_instant(last_updated)));
    let resource_type = resource.shift_remove("resourceType");
    resource.shift_remove("id");
    let rest = std::mem::take(resource);
    if let Some(rt) = resource_type {
        resource.insert("resourceType".into(), rt);
    }
    resource.insert("id".into(), Value::String(id.to_string()));
    resource.insert("meta".into(), Value::Object(meta));
    resource.extend(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn content_ignores_server_meta_but_not_client_meta() {
        let old =
            map(json!({"resourceType": "Patient", "meta": {"versionId": "1", "tag": [{"code": "a"}]}, "active": true}));
        let new =
            map(json!({"resourceType": "Patient", "active": true, "meta": {"tag": [{"code": "a"}], "versionId": "2"}}));
        assert!(same_content(&old, &new));
        let retagged = map(json!({"resourceType": "Patient", "active": true, "meta": {"tag": [{"code": "b"}]}}));
        assert!(!same_content(&old, &retagged));
        let more =
            map(json!({"resourceType": "Patient", "active": true, "gender": "male", "meta": {"tag": [{"code": "a"}]}}));
        assert!(!same_content(&old, &more));
    }

    #[test]
    fn stamping_orders_the_head_and_keeps_client_meta() {
        let mut r = map(json!({"active": true, "meta": {"source": "x"}, "id": "wrong", "resourceType": "Patient"}));
        stamp(&mut r, "p1", 3, DateTime::from_millis(0));
        let keys: Vec<&str> = r.keys().map(String::as_str).collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "active"]);
        assert_eq!(r["id"], "p1");
        assert_eq!(r["meta"]["versionId"], "3");
        assert_eq!(r["meta"]["source"], "x");
        assert_eq!(r["meta"]["lastUpdated"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn timestamps_never_go_back() {
        let future = DateTime::from_millis(DateTime::now().timestamp_millis() + 60_000);
        let previous = Version {
            id: "p".into(),
            version: 1,
            last_updated: future,
            deleted: false,
            method: "PUT".into(),
            resource: None,
            outbox: Vec::new(),
            member_count: Default::default(),
            version_log: Vec::new(),
            history_pending: false,
            search: Default::default(),
        };
        assert_eq!(next_timestamp(Some(&previous)).timestamp_millis(), future.timestamp_millis() + 1);
    }

    #[test]
    fn subsetted_copies_are_refused() {
        let tagged = json!({"resourceType": "Group", "meta": {"tag": [{"code": "x"}, {"code": "SUBSETTED"}]}});
        let e = refuse_subset("Group", &tagged, StatusCode::BAD_REQUEST).unwrap_err();
        assert_eq!(e.expression.as_deref(), Some("Group.meta.tag[1]"));
        assert!(refuse_subset("Group", &json!({"resourceType": "Group"}), StatusCode::BAD_REQUEST).is_ok());
    }
}
