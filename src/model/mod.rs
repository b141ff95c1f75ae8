//! FHIR data handling independent of HTTP and storage.

pub mod datetime;
pub mod fhirpath_patch;
pub mod json_bson;
pub mod lenient;
pub mod patch;
pub mod patching;
pub mod validate;
