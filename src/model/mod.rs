//! FHIR data handling independent of HTTP and storage.

pub mod datetime;
pub mod json_bson;
pub mod patch;
pub mod validate;
