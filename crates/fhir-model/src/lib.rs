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
/// JSON property order carries no meaning, but fhirbolt reads `resourceType` as the
/// object's tag and only where it comes first; clients such as fhirpy send it last. A copy
/// with `resourceType` moved to the front of every (nested) resource is parsed instead.
///
/// The returned JSON lets callers compare shapes (fhirbolt accepts an object where R4
/// requires an array). Errors are fhirbolt's messages, which carry no element path.
pub fn parse(resource: &Value) -> Result<Value, String> {
    let mut resource = resource.clone();
    resource_type_first(&mut resource);
    // fhirbolt 0.4 panics (an `unwrap` on `None` in its element deserializer) on some
    // malformed input, e.g. a string where an object with a choice element is expected:
    // that is the client's error, not the server's, so it becomes an `Err`.
    guarded(move || {
        let element = to_element_model(resource, DeserializationMode::Strict)?;
        let typed: Resource = from_element(element, config(DeserializationMode::Strict)).map_err(|e| e.to_string())?;
        fhirbolt::json::to_json_value(typed, None).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|| Err("the resource's structure does not match R4".to_string()))
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs fhirbolt, turning its panics on malformed input into `None`. While it runs,
/// [`panic_is_expected`] is true on this thread, so the application's panic hook can log
/// such a panic quietly: it is the client's error, and one request may cause hundreds
/// (validation re-parses to locate a problem).
fn guarded<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    GUARDED.with(|g| g.set(true));
    let result = std::panic::catch_unwind(f).ok();
    GUARDED.with(|g| g.set(false));
    result
}

/// True while this thread runs fhirbolt under [`guarded`] (for the panic hook).
pub fn panic_is_expected() -> bool {
    GUARDED.with(|g| g.get())
}

fn config(mode: DeserializationMode) -> Option<DeserializationConfig> {
    Some(DeserializationConfig { mode })
}

fn to_element_model(resource: Value, mode: DeserializationMode) -> Result<Element<{ FhirReleases::R4 }>, String> {
    fhirbolt::json::from_json_value(resource, config(mode)).map_err(|e| e.to_string())
}

/// Moves `resourceType` to the front of every object that has one, at any depth
/// (contained resources, `Bundle.entry.resource`, `Parameters.parameter.resource`).
pub fn resource_type_first(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.keys().next().is_some_and(|k| k != "resourceType") {
                if let Some(rt) = map.shift_remove("resourceType") {
                    map.shift_insert(0, "resourceType".into(), rt);
                }
            }
            map.values_mut().for_each(resource_type_first);
        }
        Value::Array(items) => items.iter_mut().for_each(resource_type_first),
        _ => {}
    }
}

/// Serializes an R4 resource given as JSON to FHIR XML (elements in the order the R4
/// definitions give, as XML requires). Goes through fhirbolt's element model only, so the
/// typed model is not built: the resource is assumed valid (it was validated when stored);
/// unknown elements are an error.
///
/// fhirbolt's writer re-indents the narrative's XHTML; each well-formed `div` is written
/// verbatim instead (placeholders swapped back after writing), so XML and JSON carry the
/// same narrative text. A `div` that is not well-formed XML is left to fhirbolt.
pub fn to_xml(resource: &Value) -> Result<String, String> {
    let mut resource = resource.clone();
    resource_type_first(&mut resource);
    let mut divs = Vec::new();
    lower_narratives(&mut resource, &mut divs);
    let mut xml = guarded(move || {
        let element = to_element_model(resource, DeserializationMode::Lax)?;
        fhirbolt::xml::to_string(&element, None).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|| Err("the resource cannot be written as XML".to_string()))?;
    for (n, div) in divs.iter().enumerate().rev() {
        let marker = format!("{PLACEHOLDER}{n}<");
        let Some(at) =
            xml.find(&format!("{PLACEHOLDER}{n}")).filter(|at| xml[*at..].starts_with(&marker[..marker.len() - 1]))
        else {
            return Err("a narrative placeholder was lost".into());
        };
        let start = xml[..at].rfind("<div").ok_or("a narrative placeholder was lost")?;
        let end = at + xml[at..].find("</div>").ok_or("a narrative placeholder was lost")? + "</div>".len();
        xml.replace_range(start..end, div);
    }
    Ok(xml)
}

/// Swaps every well-formed XHTML `div` string for a numbered placeholder `div`.
fn lower_narratives(value: &mut Value, divs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(s) if k == "div" && is_well_formed_div(s) => {
                        let placeholder = format!("{XHTML_DIV}>{PLACEHOLDER}{}</div>", divs.len());
                        divs.push(std::mem::replace(s, placeholder));
                    }
                    other => lower_narratives(other, divs),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| lower_narratives(i, divs)),
        _ => {}
    }
}

/// An XHTML `div` whose tags balance, with no declarations, processing instructions or
/// CDATA, and whose `&` all start entity references: safe to put into the XML verbatim.
fn is_well_formed_div(div: &str) -> bool {
    if !div.starts_with(XHTML_DIV) || div_length(div) != Some(div.len()) {
        return false;
    }
    let mut stack: Vec<&str> = Vec::new();
    let mut rest = div;
    while let Some(lt) = rest.find('<') {
        if !entities_ok(&rest[..lt]) {
            return false;
        }
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            let Some(end) = after.find("-->") else { return false };
            rest = &after[end + 3..];
            continue;
        }
        let Some(gt) = rest.find('>') else { return false };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if tag.starts_with(['!', '?']) {
            return false;
        }
        if let Some(name) = tag.strip_prefix('/') {
            if stack.pop() != Some(name.trim()) {
                return false;
            }
        } else if !tag.ends_with('/') {
            let name = tag.split(|c: char| c.is_ascii_whitespace()).next().unwrap_or("");
            if name.is_empty() || tag.contains('<') {
                return false;
            }
            stack.push(name);
        }
    }
    stack.is_empty() && entities_ok(rest)
}

fn entities_ok(text: &str) -> bool {
    text.split('&').skip(1).all(|after| {
        after.find(';').is_some_and(|end| {
            let name = &after[..end];
            !name.is_empty() && name.len() <= 10 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '#')
        })
    })
}

/// Reads an R4 resource in FHIR XML into its JSON form (strict: unknown elements are an
/// error). The result is then validated like any JSON body.
///
/// fhirbolt's XML reader trims the text of every node, which is right for FHIR elements
/// (values live in attributes) but loses the spaces of the narrative's XHTML (`Mapping
/// from <a>` became `Mapping from<a>`). Each XHTML `<div>` is therefore cut out of the
/// text before parsing, replaced by a placeholder, and put back verbatim afterwards: the
/// JSON form of `div` is exactly that XHTML text.
pub fn from_xml(xml: &str) -> Result<Value, String> {
    let (xml, divs) = lift_narratives(xml);
    let mut value = guarded(|| {
        let element: Element<{ FhirReleases::R4 }> =
            fhirbolt::xml::from_str(&xml, config(DeserializationMode::Strict)).map_err(|e| e.to_string())?;
        fhirbolt::json::to_json_value(element, None).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|| Err("the XML's structure does not match R4".to_string()))?;
    if !divs.is_empty() {
        restore_narratives(&mut value, &divs);
    }
    Ok(value)
}

const XHTML_DIV: &str = "<div xmlns=\"http://www.w3.org/1999/xhtml\"";
const PLACEHOLDER: &str = "roster-narrative-";

/// Replaces every XHTML `<div …>…</div>` (nested `div`s included in it) by a placeholder.
fn lift_narratives(xml: &str) -> (std::borrow::Cow<'_, str>, Vec<String>) {
    if !xml.contains(XHTML_DIV) {
        return (xml.into(), Vec::new());
    }
    let mut out = String::with_capacity(xml.len());
    let mut divs = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(XHTML_DIV) {
        let Some(len) = div_length(&rest[start..]) else { break };
        out.push_str(&rest[..start]);
        out.push_str(&format!("{XHTML_DIV}>{PLACEHOLDER}{}</div>", divs.len()));
        divs.push(rest[start..start + len].to_string());
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    (out.into(), divs)
}

/// The length of the `div` element `text` starts with, counting nested `div`s.
fn div_length(text: &str) -> Option<usize> {
    let open_end = text.find('>')?;
    if text[..open_end].ends_with('/') {
        return Some(open_end + 1);
    }
    let mut depth = 1usize;
    let mut at = open_end + 1;
    while depth > 0 {
        let next = text[at..].find("<div").map(|i| (i, true));
        let close = text[at..].find("</div").map(|i| (i, false));
        let (i, opening) = match (next, close) {
            (Some(n), Some(c)) => std::cmp::min_by_key(n, c, |x| x.0),
            (None, Some(c)) => c,
            _ => return None,
        };
        let tag_end = at + i + text[at + i..].find('>')?;
        let name_end = text.as_bytes().get(at + i + if opening { 4 } else { 5 }).copied();
        if name_end.is_some_and(|b| b == b'>' || b == b'/' || b.is_ascii_whitespace()) {
            if opening && !text[..tag_end].ends_with('/') {
                depth += 1;
            } else if !opening {
                depth -= 1;
            }
        }
        at = tag_end + 1;
    }
    Some(at)
}

fn restore_narratives(value: &mut Value, divs: &[String]) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if let (true, Value::String(s)) = (k == "div", &*v) {
                    let n = s.split(PLACEHOLDER).nth(1).and_then(|t| t.split('<').next()).and_then(|t| t.parse().ok());
                    if let Some(original) = n.and_then(|n: usize| divs.get(n)) {
                        *v = Value::String(original.clone());
                    }
                } else {
                    restore_narratives(v, divs);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| restore_narratives(i, divs)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_under_guard_are_marked_expected_only_while_it_runs() {
        assert!(!panic_is_expected());
        assert_eq!(guarded(panic_is_expected), Some(true));
        assert_eq!(guarded(|| -> bool { panic!("fhirbolt") }), None);
        assert!(!panic_is_expected(), "reset after a caught panic");
    }

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
    fn resource_type_may_come_last_at_any_depth() {
        let v: Value = serde_json::from_str(
            r#"{"name":[{"family":"X"}],"contained":[{"id":"o","resourceType":"Organization"}],"resourceType":"Patient"}"#,
        )
        .unwrap();
        let out = parse(&v).unwrap();
        assert_eq!(out["name"][0]["family"], "X");
        assert_eq!(out["contained"][0]["id"], "o");
    }

    #[test]
    fn xml_round_trip() {
        let v: Value = serde_json::from_str(
            r#"{"gender":"female","resourceType":"Patient","id":"p1","name":[{"given":["Ada","B"],"family":"L"}],"birthDate":"1815-12-10","_birthDate":{"extension":[{"url":"http://x","valueString":"s"}]}}"#,
        )
        .unwrap();
        let xml = to_xml(&v).unwrap();
        assert!(xml.contains("<Patient xmlns=\"http://hl7.org/fhir\">"), "{xml}");
        assert!(xml.find("<name>").unwrap() < xml.find("<gender").unwrap(), "R4 order: {xml}");
        let back = from_xml(&xml).unwrap();
        assert_eq!(back["name"][0]["given"][1], "B");
        assert_eq!(back["_birthDate"]["extension"][0]["valueString"], "s");
        assert_eq!(back["gender"], "female");
        assert!(from_xml("<Patient xmlns=\"http://hl7.org/fhir\"><foo value=\"1\"/></Patient>").is_err());
        assert!(from_xml("<notxml").is_err());
        // Narrative XHTML keeps its text exactly, spaces and nested divs included.
        let div = r#"<div xmlns="http://www.w3.org/1999/xhtml">Mapping from <a href="x">here</a> <div class="n"> to <b>there</b> </div>&lt;1000</div>"#;
        let xml = format!(
            r#"<Basic xmlns="http://hl7.org/fhir"><text><status value="generated"/>{div}</text><code><text value="c"/></code></Basic>"#
        );
        let back = from_xml(&xml).unwrap();
        assert_eq!(back["text"]["div"], div);
        assert_eq!(back["code"]["text"], "c");
        let out = to_xml(&back).unwrap();
        assert!(out.contains(div), "{out}");
        assert_eq!(from_xml(&out).unwrap(), back);
        // A div that would break out of its element is written by fhirbolt, escaped.
        let mut hostile = back.clone();
        hostile["text"]["div"] = Value::String(format!("{XHTML_DIV}></text><evil/><div></div>"));
        assert!(!is_well_formed_div(hostile["text"]["div"].as_str().unwrap()));
        assert!(is_well_formed_div(div));
    }

    #[test]
    fn rejects_unknown_elements_and_missing_required() {
        let unknown: Value = serde_json::from_str(r#"{"resourceType":"Patient","foo":1}"#).unwrap();
        assert!(parse(&unknown).unwrap_err().contains("foo"));
        let missing: Value = serde_json::from_str(r#"{"resourceType":"Group","type":"person"}"#).unwrap();
        assert!(parse(&missing).unwrap_err().contains("actual"));
    }
}
