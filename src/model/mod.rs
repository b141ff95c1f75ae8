//! FHIR data handling independent of HTTP and storage.

pub mod datetime;
pub mod fhirpath_patch;
pub mod json_bson;
pub mod json_primitives;
pub mod lenient;
pub mod patch;
pub mod patching;
mod summary_elements;
mod typed_elements;
pub mod validate;

/// A 128-bit digest of text: FNV-1a twice, with two offsets (high and low 64 bits). Stable
/// across versions: deduplication tokens and event ids are made of it.
pub fn digest128(text: &str) -> u128 {
    let fnv = |offset: u64| text.bytes().fold(offset, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (fnv(0xcbf29ce484222325) as u128) << 64 | fnv(0x84222325cbf29ce4) as u128
}

/// Whether the JSON property `name` (or its `_name` primitive extension) is one of `rt`'s
/// summary elements (R4 `isSummary`, top level): what `_summary=true` keeps. A choice
/// element `value[x]` is every `value` + type name (`valueQuantity`).
pub fn is_summary_element(rt: &str, name: &str) -> bool {
    use summary_elements::SUMMARY_ELEMENTS;
    let Ok(i) = SUMMARY_ELEMENTS.binary_search_by(|(t, _)| t.cmp(&rt)) else { return false };
    let name = name.strip_prefix('_').unwrap_or(name);
    SUMMARY_ELEMENTS[i].1.iter().any(|e| match e.strip_suffix("[x]") {
        Some(stem) => name.strip_prefix(stem).is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase())),
        None => *e == name,
    })
}

/// Tags a resource shown in part (FHIR's `SUBSETTED` tag in `meta.tag`), once.
pub fn tag_subsetted(resource: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::{json, Value};
    let meta = resource.entry("meta").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else { return };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    let Some(tags) = tags.as_array_mut() else { return };
    if !tags.iter().any(|t| t.get("code").and_then(Value::as_str) == Some("SUBSETTED")) {
        tags.push(json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED",
            "display": "subsetted"
        }));
    }
}
