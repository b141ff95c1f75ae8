//! FHIR R4 REST API under `/4_0_0`.

pub mod batch;
pub mod bundle;
pub mod compartment;
pub mod conditional;
pub mod format;
pub mod group;
pub mod headers;
pub mod history;
pub mod metadata;
pub mod resource;
pub mod search;
pub mod transaction;

use axum::extract::Request;
use axum::routing::get;
use axum::Router;

use crate::error::FhirError;
use crate::model::validate::is_valid_id;
use crate::state::AppState;

/// The content type of every FHIR response.
pub use crate::error::FHIR_JSON;

/// Content types accepted for resource bodies.
pub const RESOURCE_CONTENT_TYPES: &[&str] =
    &["application/fhir+json", "application/json", "application/fhir+xml", "application/xml"];

/// Content types accepted for PATCH bodies (see `resource::patch_body`).
pub const PATCH_CONTENT_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/fhir+json",
    "application/json",
    "application/fhir+xml",
    "application/xml",
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/4_0_0/metadata", get(metadata::capability_statement))
        .route("/4_0_0/_history", get(history::system_history))
        .route("/4_0_0", axum::routing::post(batch::bundle))
        .route("/4_0_0/", axum::routing::post(batch::bundle))
        .route(
            "/4_0_0/{rt}",
            get(search::search_type)
                .post(resource::create)
                .put(resource::conditional_update)
                .delete(resource::conditional_delete),
        )
        .route("/4_0_0/{rt}/_history", get(history::type_history))
        .route("/4_0_0/{rt}/_search", axum::routing::post(search::search_post))
        .route(
            "/4_0_0/{rt}/{id}",
            get(resource::read).put(resource::update).patch(resource::patch).delete(resource::delete),
        )
        .route("/4_0_0/{rt}/{id}/_history", get(history::instance_history))
        .route("/4_0_0/{rt}/{id}/{ctype}", get(compartment::compartment))
        .route("/4_0_0/{rt}/{id}/_history/{vid}", get(resource::vread))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::rejection::fhir_panic))
        .layer(axum::middleware::from_fn(crate::rejection::fhir))
        .layer(axum::middleware::from_fn(format::negotiate))
}

async fn method_not_allowed(request: Request) -> FhirError {
    FhirError::method_not_allowed(format!("{} is not supported on {}", request.method(), request.uri().path()))
}

/// 404 for a type this server does not know.
pub fn known_type(rt: &str) -> Result<&str, FhirError> {
    if fhir_model::is_resource_type(rt) {
        Ok(rt)
    } else {
        Err(FhirError::not_found(format!("'{rt}' is not a FHIR R4 resource type")))
    }
}

/// 400 for a malformed id.
pub fn valid_id(id: &str) -> Result<&str, FhirError> {
    if is_valid_id(id) {
        Ok(id)
    } else {
        Err(FhirError::bad_request(format!("'{id}' is not a valid resource id ([A-Za-z0-9-.]{{1,64}})")))
    }
}
