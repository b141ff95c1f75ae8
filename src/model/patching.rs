//! The three PATCH formats behind one type, chosen by the body's `Content-Type`:
//!
//! * JSON Patch (RFC 6902, `application/json-patch+json`): `model::patch`;
//! * JSON Merge Patch (RFC 7386, `application/merge-patch+json`, and a JSON *object* sent
//!   as `application/json` or `application/fhir+json`, which is what fhirpy sends);
//! * FHIRPath Patch (a `Parameters` body, JSON or XML): `model::fhirpath_patch`.
//!
//! Each applies atomically: the document changes only when every operation succeeds.
//! Results go through `lenient::drop_empty` (a merge patch's `null` removes; a delete can
//! leave an empty parent) and, for FHIRPath Patch, `validate::repeat_as_arrays` before the
//! usual validation.

use serde_json::{Map, Value};

use super::{fhirpath_patch, patch};

/// A parsed PATCH body.
#[derive(Debug, Clone)]
pub enum Patch {
    Json(Vec<patch::Operation>),
    /// The merge document (an object).
    Merge(Map<String, Value>),
    FhirPath(Vec<fhirpath_patch::Operation>),
}

impl Patch {
    /// Operations (for the per-request limit): a merge document counts its members.
    pub fn len(&self) -> usize {
        match self {
            Patch::Json(ops) => ops.len(),
            Patch::Merge(doc) => doc.len(),
            Patch::FhirPath(ops) => ops.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the patch to `doc` whole or not at all; the error names the failing
    /// operation (index and path) where the format has operations.
    pub fn apply(&self, doc: &mut Value) -> Result<(), String> {
        self.apply_numbered(doc, &[])
    }

    /// [`Self::apply`] for a patch that is part of a larger one (the operations left after a
    /// Group's member operations are split off): `numbers[i]` is operation `i`'s index in the
    /// patch the client sent, so an error names the operation the client wrote.
    pub fn apply_numbered(&self, doc: &mut Value, numbers: &[usize]) -> Result<(), String> {
        let number = |i: usize| numbers.get(i).copied().unwrap_or(i);
        match self {
            Patch::Json(ops) => patch::apply(doc, ops).map_err(|mut e| {
                e.index = number(e.index);
                e.to_string()
            }),
            Patch::Merge(m) => {
                merge(doc, m);
                Ok(())
            }
            Patch::FhirPath(ops) => {
                fhirpath_patch::apply(doc, ops).map_err(|mut e| {
                    e.index = number(e.index);
                    e.to_string()
                })?;
                super::validate::repeat_as_arrays(doc);
                Ok(())
            }
        }
    }

    /// The name of the format, for messages.
    pub fn format(&self) -> &'static str {
        match self {
            Patch::Json(_) => "JSON Patch",
            Patch::Merge(_) => "JSON Merge Patch",
            Patch::FhirPath(_) => "FHIRPath Patch",
        }
    }
}

/// RFC 7386 MergePatch(target, patch) for an object patch: `null` removes a member, an
/// object merges recursively, anything else (arrays included) replaces.
pub fn merge(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else { unreachable!("made an object above") };
    for (key, value) in patch {
        match value {
            Value::Null => {
                map.shift_remove(key);
            }
            Value::Object(inner) => merge(map.entry(key.clone()).or_insert(Value::Null), inner),
            other => {
                map.insert(key.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(target: Value, patch: Value) -> Value {
        let mut t = target;
        merge(&mut t, patch.as_object().unwrap());
        t
    }

    #[test]
    fn rfc_7386_appendix_a() {
        // The RFC's own examples (Appendix A), those with an object patch.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(merged(target.clone(), patch.clone()), expected, "{target} + {patch}");
        }
    }
}
