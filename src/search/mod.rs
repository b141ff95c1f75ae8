//! FHIR search over every R4 search parameter (issue 18).
//!
//! - `definitions`: the shipped R4 SearchParameters and the Patient compartment.
//! - `fhirpath`: the evaluator of their expressions over a resource's JSON.
//! - `elements`: the generated R4 element table the evaluator navigates by.
//! - `extract`: typed index values of a resource, per parameter; `ucum`: canonical units.

pub mod definitions;
pub(crate) mod elements;
pub mod extract;
pub(crate) mod fhirpath;
pub mod keys;
pub mod matcher;
pub mod query;
pub mod ucum;
