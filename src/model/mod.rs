//! FHIR data handling independent of HTTP and storage.

pub mod datetime;
pub mod fhirpath_patch;
pub mod json_bson;
pub mod json_primitives;
pub mod lenient;
pub mod patch;
pub mod patching;
mod typed_elements;
pub mod validate;
