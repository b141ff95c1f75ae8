//! FHIR search over every R4 search parameter (issue 18).
//!
//! - `definitions`: the shipped R4 SearchParameters and the Patient compartment.
//! - `fhirpath`: the evaluator of their expressions over a resource's JSON.
//! - `elements`: the generated R4 element table the evaluator navigates by.
//! - `extract`: typed index values of a resource, per parameter; `ucum`: canonical units.

pub mod definitions;
pub mod detached;
pub(crate) mod elements;
pub mod execute;
pub mod extract;
pub(crate) mod fhirpath;
pub mod flusher;
mod implicit_systems;
pub mod keys;
pub mod matcher;
pub mod plan;
pub mod query;
pub mod reindex;
pub mod sql;
pub mod ucum;

/// Every index key of a resource (sorted, without duplicates): what a write stores with the
/// version so that search finds it (see `keys` for their form). `base` is this server's
/// FHIR base URL, whose absolute references are indexed as relative ones.
pub fn index_keys(resource: &serde_json::Value, base: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (definition, values) in extract::extract(resource, base) {
        keys::keys(&definition.code, &values, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A stored version's keys: as stored (`_s`), or, for a version stored before keys were
/// (`search::reindex` put those in the index only), from its content.
pub fn stored_keys(v: &crate::store::Version, base: &str) -> Vec<String> {
    match &v.resource {
        Some(resource) if v.search.keys.is_empty() => index_keys(&serde_json::Value::Object(resource.clone()), base),
        _ => v.search.keys.clone(),
    }
}

#[cfg(test)]
mod tests {
    /// Every HL7 R4 example indexes without a panic, and most yield keys.
    #[test]
    fn every_hl7_example_indexes() {
        // The checkout cargo runs the test in (a binary compiled in another clone sharing the
        // target directory is reused as is, with that clone's compile-time path).
        let checkout = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
        let dir = std::path::Path::new(&checkout).join("../shared/fhir-r4-examples");
        let mut examples = 0;
        let mut keyed = 0;
        let mut total = 0;
        let started = std::time::Instant::now();
        for entry in std::fs::read_dir(&dir).expect("../shared/fhir-r4-examples") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.ends_with(".json") || name == "search-parameters.json" {
                continue;
            }
            let resource: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let keys = super::index_keys(&resource, "http://hl7.org/fhir");
            examples += 1;
            keyed += usize::from(!keys.is_empty());
            total += keys.len();
        }
        eprintln!("{examples} examples, {keyed} with keys, {total} keys, {:?}", started.elapsed());
        assert!(examples >= 750 && keyed * 10 >= examples * 9, "{keyed} of {examples} yield keys");
    }
}
