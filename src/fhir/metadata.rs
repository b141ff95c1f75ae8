//! `GET /4_0_0/metadata`: a CapabilityStatement built from what this server implements, so
//! it cannot drift from the routes.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::search::{DEFAULT_COUNT, MAX_COUNT};
use super::FHIR_JSON;
use crate::model::datetime::format_instant;
use crate::state::AppState;

/// Interactions every resource type supports.
pub const TYPE_INTERACTIONS: &[&str] =
    &["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"];

pub fn capability_statement_json(fhir_base: &str) -> Value {
    let search_params = json!([
        { "name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token",
          "documentation": "Logical id; a comma-separated list matches any." },
        { "name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated", "type": "date",
          "documentation": "Prefixes eq, ne, lt, le, gt, ge, sa, eb; partial dates cover their whole range." },
    ]);
    let group_params = json!([
        { "name": "member", "definition": "http://hl7.org/fhir/SearchParameter/Group-member", "type": "reference",
          "documentation": "Current members only, from the ClickHouse reverse index." },
        { "name": "name", "definition": "http://hl7.org/fhir/SearchParameter/Group-name", "type": "string",
          "documentation": "Starts with, case-insensitive; :exact and :contains." },
        { "name": "type", "definition": "http://hl7.org/fhir/SearchParameter/Group-type", "type": "token" },
        { "name": "actual", "definition": "http://hl7.org/fhir/SearchParameter/Group-actual", "type": "token" },
    ]);
    let identifier = json!({ "name": "identifier", "type": "token",
        "documentation": "system|value on the resource's identifier element" });
    let resources: Vec<Value> = fhir_model::RESOURCE_TYPES
        .iter()
        .map(|rt| {
            let mut params = search_params.as_array().cloned().unwrap_or_default();
            params.push(identifier.clone());
            if *rt == "Group" {
                params.extend(group_params.as_array().cloned().unwrap_or_default());
            }
            json!({
                "type": rt,
                "interaction": TYPE_INTERACTIONS.iter().map(|c| json!({ "code": c })).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            })
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
                 Unknown search parameters are ignored (reported in an OperationOutcome entry) unless Prefer: handling=strict."
            ),
            "resource": resources,
        }],
    })
}

pub async fn capability_statement(State(state): State<AppState>) -> Response {
    let rendered = state
        .capability_statement
        .get_or_init(|| capability_statement_json(&state.fhir_base()).to_string().into())
        .to_string();
    let mut response = (StatusCode::OK, rendered).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn capability_statement_is_valid_r4() {
        let cs = super::capability_statement_json("http://localhost/4_0_0");
        crate::model::validate::validate_resource("CapabilityStatement", &cs).unwrap();
        assert_eq!(cs["rest"][0]["resource"].as_array().unwrap().len(), 146);
    }
}
