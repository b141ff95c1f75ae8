//! A small, non-generic facade over fhirbolt's R4 model.
//!
//! fhirbolt's (de)serializers are generic; every crate that calls them re-monomorphises
//! the code for all 146 resource types, which takes minutes. This crate is the only place
//! that instantiates them, behind plain functions of `serde_json::Value`, so editing the
//! server never recompiles the model. Swapping fhirbolt for another R4 model means
//! rewriting this file only.

use fhirbolt::element::{from_element, Element};
use fhirbolt::model::r4::Resource;
use fhirbolt::serde::{DeserializationConfig, DeserializationMode};
use fhirbolt::FhirReleases;
use serde_json::Value;

/// The FHIR version of the model.
pub const FHIR_VERSION: &str = "4.0.1";

/// Every R4 resource type, in alphabetical order.
pub const RESOURCE_TYPES: [&str; 146] = [
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// True for an R4 resource type name (case-sensitive).
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// Parses `resource` strictly as an R4 resource and returns fhirbolt's own serialization
/// of the typed result.
///
/// The input goes JSON → element model → typed resource, not straight to the typed
/// resource: fhirbolt 0.4.0's typed JSON path rejects a singleton decimal under
/// serde_json's `arbitrary_precision`, the element path does not.
///
/// The returned JSON lets callers compare shapes (fhirbolt accepts an object where R4
/// requires an array). Errors are fhirbolt's messages, which carry no element path.
pub fn parse(resource: &Value) -> Result<Value, String> {
    // fhirbolt 0.4 panics (an `unwrap` on `None` in its element deserializer) on some
    // malformed input, e.g. a string where an object with a choice element is expected:
    // that is the client's error, not the server's, so it becomes an `Err`.
    std::panic::catch_unwind(|| {
        let config = || Some(DeserializationConfig { mode: DeserializationMode::Strict });
        let element: Element<{ FhirReleases::R4 }> =
            fhirbolt::json::from_json_value(resource.clone(), config()).map_err(|e| e.to_string())?;
        let typed: Resource = from_element(element, config()).map_err(|e| e.to_string())?;
        fhirbolt::json::to_json_value(typed, None).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|_| Err("the resource's structure does not match R4".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_input_that_makes_fhirbolt_panic_is_an_error() {
        let v = serde_json::json!({"resourceType":"Group","type":"person","actual":true,"member":["Patient/1"]});
        assert!(parse(&v).is_err());
    }

    #[test]
    fn resource_types_are_sorted_for_binary_search() {
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert!(is_resource_type("Group") && !is_resource_type("group"));
    }

    #[test]
    fn parses_a_singleton_decimal() {
        let v: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","status":"final","code":{"text":"w"},"valueQuantity":{"value":70.50}}"#,
        )
        .unwrap();
        let out = parse(&v).unwrap();
        assert_eq!(out["valueQuantity"]["value"].to_string(), "70.50");
    }

    #[test]
    fn rejects_unknown_elements_and_missing_required() {
        let unknown: Value = serde_json::from_str(r#"{"resourceType":"Patient","foo":1}"#).unwrap();
        assert!(parse(&unknown).unwrap_err().contains("foo"));
        let missing: Value = serde_json::from_str(r#"{"resourceType":"Group","type":"person"}"#).unwrap();
        assert!(parse(&missing).unwrap_err().contains("actual"));
    }
}
