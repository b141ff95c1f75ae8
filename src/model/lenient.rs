//! Being liberal in what the server accepts: `null`, empty arrays and empty objects.
//!
//! FHIR's JSON rules forbid all three, yet JavaScript and Python clients that build a
//! resource field by field send them (`"member": []`, `"telecom": null`). Like the servers
//! those clients were written against, this one drops them on the way in, so they are
//! never stored and never sent back; `Prefer: handling=strict` refuses them instead, naming
//! the element.
//!
//! `null` *inside* an array is kept: FHIR JSON uses it to line up a primitive array with
//! its `_element` array of ids and extensions (`"given": ["Ann", null]`). An array made
//! only of such nulls is kept too; fhirbolt decides whether it is valid.

use serde_json::Value;

use super::validate::{Invalid, Problem};

/// Whether a value is one of the empty forms this module drops.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

/// Drops every `null`, empty array and empty object member of an object, at any depth,
/// including objects that become empty once their own empty members are gone. Returns the
/// path (`path.element[i].child`) of the first element dropped, for `handling=strict`.
///
/// The common case, a body with nothing to drop, is one read-only pass that allocates
/// nothing, not even the path, which is only formatted when something is dropped (this
/// runs on every member of a million-member Group body).
pub fn drop_empty(value: &mut Value, path: impl std::fmt::Display) -> Option<String> {
    if !has_empty(value) {
        return None;
    }
    let mut first = None;
    walk(value, &path.to_string(), &mut first);
    first
}

/// Whether anything in `value` would be dropped.
fn has_empty(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.values().any(|child| is_empty(child) || has_empty(child)),
        Value::Array(items) => items.iter().any(|item| match item {
            Value::Object(map) => map.is_empty() || has_empty(item),
            Value::Array(_) => has_empty(item),
            _ => false,
        }),
        _ => false,
    }
}

fn walk(value: &mut Value, path: &str, first: &mut Option<String>) {
    match value {
        Value::Object(map) => {
            map.retain(|key, child| {
                let here = format!("{path}.{key}");
                walk(child, &here, first);
                let empty = is_empty(child);
                if empty && first.is_none() {
                    *first = Some(here);
                }
                !empty
            });
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                if item.is_object() || item.is_array() {
                    walk(item, &format!("{path}[{i}]"), first);
                }
            }
            // An object item that lost everything is dropped; a null item is alignment.
            let before = items.len();
            items.retain(|item| !(item.is_object() && is_empty(item)));
            if items.len() != before && first.is_none() {
                *first = Some(path.to_string());
            }
        }
        _ => {}
    }
}

/// The 400 for an empty element refused under `Prefer: handling=strict`.
pub fn refusal(path: String) -> Invalid {
    let diagnostics = format!(
        "{path} is null, an empty array or an empty object, which FHIR JSON forbids; without \
         'Prefer: handling=strict' such elements are dropped"
    );
    Invalid::new(Problem::Structure, diagnostics).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drops_nulls_and_empty_containers_at_any_depth() {
        let mut v = json!({
            "resourceType": "Patient",
            "telecom": null,
            "name": [{"given": [], "family": "X", "period": {"start": null}}, {}],
            "contact": [{"name": {"given": []}}],
            "gender": "female"
        });
        let first = drop_empty(&mut v, "Patient");
        assert_eq!(first.as_deref(), Some("Patient.telecom"));
        assert_eq!(v, json!({"resourceType": "Patient", "name": [{"family": "X"}], "gender": "female"}));
    }

    #[test]
    fn the_quick_check_agrees_with_the_walk() {
        for v in [
            json!({"a": [{"b": {}}]}),
            json!({"a": [[{}]]}),
            json!({"a": [null, 1]}),
            json!({"a": {"b": {"c": null}}}),
            json!({"a": [{"b": 1}], "c": "d"}),
        ] {
            let mut walked = v.clone();
            let mut first = None;
            walk(&mut walked, "X", &mut first);
            assert_eq!(has_empty(&v), first.is_some(), "{v}");
        }
    }

    #[test]
    fn keeps_alignment_nulls_and_reports_nothing_when_clean() {
        let mut v = json!({"name": [{"given": ["A", null], "_given": [null, {"id": "x"}]}]});
        let before = v.clone();
        assert_eq!(drop_empty(&mut v, "Patient"), None);
        assert_eq!(v, before);
    }

    #[test]
    fn names_an_emptied_object_inside_an_array() {
        let mut v = json!({"identifier": [{"value": "1"}, {"system": null}]});
        assert_eq!(drop_empty(&mut v, "Patient").as_deref(), Some("Patient.identifier[1].system"));
        assert_eq!(v, json!({"identifier": [{"value": "1"}]}));
    }
}
