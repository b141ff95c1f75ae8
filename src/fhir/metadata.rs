//! `GET /4_0_0/metadata`: a CapabilityStatement built from what this server implements, so
//! it cannot drift from the routes.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::search::{DEFAULT_COUNT, MAX_COUNT};
use super::FHIR_JSON;
use crate::model::datetime::format_instant;
use crate::search::definitions::{registry, Definition, ParamType};
use crate::state::AppState;

/// Interactions every resource type supports.
pub const TYPE_INTERACTIONS: &[&str] =
    &["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"];

/// Whether search supports a parameter (not `_text`/`_content`/`_query`, which no
/// expression defines, nor the special ones like `near`).
fn supported(d: &Definition) -> bool {
    d.expression.is_some() && d.kind != ParamType::Special
}

/// The `_revinclude` values that bring resources referring to `rt`: `Source:param` for
/// every reference parameter that may point to it.
fn revincludes(rt: &str) -> Vec<String> {
    let mut out = Vec::new();
    for source in fhir_model::RESOURCE_TYPES {
        for d in registry().of_type(source) {
            if d.kind == ParamType::Reference
                && supported(d)
                && (d.targets.is_empty() || d.targets.iter().any(|t| t == rt))
            {
                out.push(format!("{source}:{}", d.code));
            }
        }
    }
    out
}

pub fn capability_statement_json(fhir_base: &str, max_conditional_delete: usize) -> Value {
    let resources: Vec<Value> = fhir_model::RESOURCE_TYPES
        .iter()
        .map(|rt| {
            let mut params: Vec<Value> = registry()
                .of_type(rt)
                .filter(|d| supported(d))
                .map(|d| json!({ "name": d.code, "definition": d.url, "type": d.kind.as_str() }))
                .collect();
            // No SearchParameter defines it (search.html#list): a List's entries.
            params.push(json!({ "name": "_list", "type": "special",
                "documentation": "Resources that are entries of the given List ids (not functional lists)" }));
            let mut includes = vec!["*".to_string()];
            includes.extend(
                registry()
                    .of_type(rt)
                    .filter(|d| d.kind == ParamType::Reference && supported(d))
                    .map(|d| format!("{rt}:{}", d.code)),
            );
            let mut resource = json!({
                "type": rt,
                "interaction": TYPE_INTERACTIONS.iter().map(|c| json!({ "code": c })).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": if max_conditional_delete > 1 { "multiple" } else { "single" },
                "searchInclude": includes,
                "searchRevInclude": revincludes(rt),
                "searchParam": params,
            });
            if *rt == "Patient" {
                resource["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
                }]);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(time::OffsetDateTime::now_utc()),
        "publisher": "roster",
        "kind": "instance",
        "software": { "name": "roster", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "roster FHIR R4 server", "url": fhir_base },
        "fhirVersion": fhir_model::FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": format!(
                "Search pages hold {DEFAULT_COUNT} entries by default and at most {MAX_COUNT}; paging links use a cursor. \
                 Every R4 search parameter with modifiers, prefixes, chains and _has. Unknown search parameters \
                 are ignored (reported in an OperationOutcome entry) unless Prefer: handling=strict."
            ),
            "resource": resources,
            // `batch`: POST a Bundle to the base (`fhir::batch`); `GET /_history`.
            "interaction": [{ "code": "batch" }, { "code": "history-system" }],
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "searchParam": [
                { "name": "_count", "type": "number", "documentation": format!("page size, at most {MAX_COUNT}") },
                { "name": "_sort", "type": "string", "documentation": "any sortable parameter, several keys, - for descending" },
                { "name": "_total", "type": "token", "documentation": "none, estimate, accurate (the default)" },
                { "name": "_summary", "type": "token", "documentation": "count, text, data, false" },
                { "name": "_elements", "type": "string" },
                { "name": "_include", "type": "string", "documentation": ":iterate supported" },
                { "name": "_revinclude", "type": "string", "documentation": ":iterate supported" },
            ],
        }],
    })
}

pub async fn capability_statement(State(state): State<AppState>) -> Response {
    let rendered = state
        .capability_statement
        .get_or_init(|| capability_statement_json(&state.fhir_base(), state.max_conditional_delete).to_string().into())
        .to_string();
    let mut response = (StatusCode::OK, rendered).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn capability_statement_is_valid_r4() {
        let cs = super::capability_statement_json("http://localhost/4_0_0", 1);
        crate::model::validate::validate_resource("CapabilityStatement", &cs).unwrap();
        assert_eq!(cs["rest"][0]["resource"].as_array().unwrap().len(), 146);
        let patient = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap();
        let names: Vec<&str> =
            patient["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for n in ["family", "birthdate", "identifier", "general-practitioner", "_lastUpdated", "_tag"] {
            assert!(names.contains(&n), "Patient lacks {n}");
        }
        assert!(!names.contains(&"_text"), "_text is not supported");
        let revs = patient["searchRevInclude"].as_array().unwrap();
        assert!(revs.iter().any(|r| r == "Observation:subject"));
        assert!(patient["searchInclude"].as_array().unwrap().iter().any(|r| r == "Patient:general-practitioner"));
        assert_eq!(cs["rest"][0]["compartment"][0], "http://hl7.org/fhir/CompartmentDefinition/patient");
    }
}
