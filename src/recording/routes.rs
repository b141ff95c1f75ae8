//! Which FHIR writes become which events on which streams: the routing file (YAML).
//!
//! ```yaml
//! routes:
//!   - name: patient-timeline
//!     filter: { resource_types: [Patient, Encounter, Observation], event_types: [] }
//!     actions:
//!       - type: event_store
//!         config: { stream_template: "patient:{{Patient.MRN}}" }
//! ```
//!
//! A write yields `resource_created | resource_updated | resource_deleted` and the
//! clinical events derived from the change ([`derive()`]); each route whose filter admits
//! the resource type and the event type sends the event to the stream its template names.
//! Empty filter lists admit everything.
//!
//! Templates substitute `{{…}}`: `id`, `resourceType` or a dotted path into the resource
//! (`meta.source`, `status`); `Type.path` reads `path` from the resource if it is a `Type`,
//! else from the `Type` it refers to through `subject` or `patient` (an Encounter's
//! `{{Patient.MRN}}` is its patient's MRN). `MRN` is the Patient identifier whose type is
//! `MR` (v2-0203), else the first identifier, else the Patient id. A template whose value
//! is missing sends nothing for that write (logged), rather than to a wrong stream.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::pipeline::{Interaction, Saved};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default)]
    pub filter: Filter,
    pub actions: Vec<Action>,
    /// The actions' stream templates, parsed once when the file is read.
    #[serde(skip)]
    pub templates: Vec<Template>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default)]
    pub resource_types: Vec<String>,
    #[serde(default)]
    pub event_types: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", content = "config", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    EventStore { stream_template: String },
}

/// Every event type a write can yield.
pub const EVENT_TYPES: &[&str] = &[
    "resource_created",
    "resource_updated",
    "resource_deleted",
    "patient_admit",
    "patient_transfer",
    "patient_discharge",
    "lab_result",
    "claim_submitted",
    "claim_updated",
];

impl RoutingFile {
    /// The routing shipped with the server (`config/event-routes.yaml`, compiled in).
    pub fn builtin() -> RoutingFile {
        Self::parse(include_str!("../../config/event-routes.yaml")).expect("the shipped routing file parses")
    }

    pub fn load(path: &Path) -> Result<RoutingFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<RoutingFile, String> {
        let mut file: RoutingFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        for r in &mut file.routes {
            if let Some(t) = r.filter.resource_types.iter().find(|t| !fhir_model::is_resource_type(t)) {
                return Err(format!("route {}: '{t}' is not a FHIR R4 resource type", r.name));
            }
            if let Some(t) = r.filter.event_types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
                return Err(format!("route {}: unknown event type '{t}' (known: {})", r.name, EVENT_TYPES.join(", ")));
            }
            r.templates = r
                .actions
                .iter()
                .map(|Action::EventStore { stream_template }| Template::parse(stream_template))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("route {}: {e}", r.name))?;
        }
        Ok(file)
    }

    /// True when some route may take writes of `rt`.
    pub fn covers(&self, rt: &str) -> bool {
        self.routes
            .iter()
            .any(|r| r.filter.resource_types.is_empty() || r.filter.resource_types.iter().any(|t| t == rt))
    }

    /// The stream templates that take an event of `event_type` from a `rt` write.
    pub fn templates<'a>(&'a self, rt: &'a str, event_type: &'a str) -> impl Iterator<Item = &'a Template> + 'a {
        self.routes
            .iter()
            .filter(move |r| {
                let f = &r.filter;
                (f.resource_types.is_empty() || f.resource_types.iter().any(|t| t == rt))
                    && (f.event_types.is_empty() || f.event_types.iter().any(|t| t == event_type))
            })
            .flat_map(|r| r.templates.iter())
    }
}

/// A parsed stream template: literal text and `{{placeholders}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    /// (resource type it names, if any; dotted path)
    Field(Option<String>, Vec<String>),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            parts.push(Part::Text(rest[..start].to_string()));
            let end = rest[start..].find("}}").ok_or_else(|| format!("template '{text}': '{{{{' without '}}}}'"))?;
            let inner = rest[start + 2..start + end].trim();
            let mut path: Vec<String> = inner.split('.').map(str::to_string).collect();
            if inner.is_empty() || path.iter().any(String::is_empty) {
                return Err(format!("template '{text}': empty placeholder or path step"));
            }
            let typed = fhir_model::is_resource_type(&path[0]).then(|| path.remove(0));
            if path.is_empty() {
                return Err(format!("template '{text}': '{inner}' names a type but no field"));
            }
            parts.push(Part::Field(typed, path));
            rest = &rest[start + end + 2..];
        }
        parts.push(Part::Text(rest.to_string()));
        Ok(Template { text: text.to_string(), parts })
    }

    /// Resource types whose content the template needs besides the written resource.
    /// The template as written in the routing file.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn referenced_types(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(Some(t), _) => Some(t.as_str()),
            _ => None,
        })
    }

    /// The stream name for `resource` (of type `rt`); `related` holds referenced resources
    /// by type. `None` when a value is missing.
    pub fn render(
        &self,
        rt: &str,
        resource: &Map<String, Value>,
        related: &BTreeMap<String, Map<String, Value>>,
    ) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(ty, path) => {
                    let source = match ty {
                        None => resource,
                        Some(t) if t == rt => resource,
                        Some(t) => related.get(t)?,
                    };
                    out.push_str(&field(source, path)?);
                }
            }
        }
        Some(out)
    }
}

/// A field's text: `MRN` is computed, other paths follow objects (and first array items).
fn field(resource: &Map<String, Value>, path: &[String]) -> Option<String> {
    if path.len() == 1 && path[0] == "MRN" {
        return mrn(resource);
    }
    let mut at = resource.get(&path[0])?;
    for step in &path[1..] {
        at = match at {
            Value::Array(items) => items.first()?.get(step)?,
            v => v.get(step)?,
        };
    }
    let at = match at {
        Value::Array(items) => items.first()?,
        v => v,
    };
    match at {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The Patient's MRN: the identifier typed `MR` (v2-0203), else the first identifier,
/// else the id.
pub fn mrn(patient: &Map<String, Value>) -> Option<String> {
    let identifiers = patient.get("identifier").and_then(Value::as_array);
    let value = |i: &Value| i.get("value").and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_string);
    let is_mr = |i: &&Value| {
        i.pointer("/type/coding")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c.get("code").and_then(Value::as_str) == Some("MR")))
    };
    identifiers
        .and_then(|ids| ids.iter().find(is_mr).and_then(value).or_else(|| ids.first().and_then(value)))
        .or_else(|| patient.get("id").and_then(Value::as_str).map(str::to_string))
}

/// The id of the Patient a resource is about (`subject` or `patient` reference), or its
/// own id for a Patient.
pub fn patient_id(rt: &str, resource: &Map<String, Value>) -> Option<String> {
    if rt == "Patient" {
        return resource.get("id").and_then(Value::as_str).map(str::to_string);
    }
    ["subject", "patient"].iter().find_map(|k| {
        let reference = resource.get(*k)?.get("reference")?.as_str()?;
        reference.strip_prefix("Patient/").map(|id| id.split('/').next().unwrap_or(id).to_string())
    })
}

/// An event a write yields, before routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub event_type: &'static str,
    pub data: Value,
}

fn text<'a>(r: Option<&'a Map<String, Value>>, pointer: &str) -> Option<&'a str> {
    r.and_then(|r| lookup(r, pointer))
}

/// `pointer` (JSON Pointer) into an object without cloning it.
fn lookup<'a>(r: &'a Map<String, Value>, pointer: &str) -> Option<&'a str> {
    let mut steps = pointer.trim_start_matches('/').split('/');
    let mut at = r.get(steps.next()?)?;
    for s in steps {
        at = match s.parse::<usize>() {
            Ok(i) => at.get(i)?,
            Err(_) => at.get(s)?,
        };
    }
    at.as_str()
}

/// The events a committed write yields: the resource event, then clinical ones.
pub fn derive(saved: &Saved<'_>) -> Vec<Derived> {
    let rt = saved.resource_type;
    let now = saved.resource;
    let before = saved.previous;
    let mut out = Vec::new();
    let resource_event = match (saved.interaction, before) {
        (Interaction::Delete, _) => "resource_deleted",
        (Interaction::Create, _) | (_, None) => "resource_created",
        _ => "resource_updated",
    };
    out.push(Derived {
        event_type: resource_event,
        data: json!({ "resourceType": rt, "id": saved.id, "versionId": saved.version.to_string(),
                      "resource": now.map(|r| Value::Object(r.clone())) }),
    });
    let Some(now) = now else { return out };
    match rt {
        "Encounter" => {
            fn status(r: Option<&Map<String, Value>>) -> Option<&str> {
                text(r, "/status")
            }
            /// Where the encounter is: the location's reference, else its display, else its
            /// identifier (`system|value`, or the value alone): any of them is a valid
            /// Reference, and the active-encounters projection filters by it.
            fn location(r: Option<&Map<String, Value>>) -> Option<String> {
                let at = |p: &str| text(r, &format!("/location/0/location/{p}")).filter(|s| !s.is_empty());
                at("reference").or_else(|| at("display")).map(str::to_string).or_else(|| {
                    let value = at("identifier/value")?;
                    Some(at("identifier/system").map_or_else(|| value.to_string(), |s| format!("{s}|{value}")))
                })
            }
            let (was, is) = (status(before), status(Some(now)));
            let base = json!({
                "encounterId": saved.id,
                "patient": text(Some(now), "/subject/reference"),
                "class": text(Some(now), "/class/code"),
                "location": location(Some(now)),
                "provider": text(Some(now), "/participant/0/individual/reference"),
            });
            let with = |mut v: Value, k: &str, x: Option<&str>| {
                v[k] = json!(x);
                v
            };
            if is == Some("in-progress") && was != Some("in-progress") {
                let admitted = text(Some(now), "/period/start");
                out.push(Derived { event_type: "patient_admit", data: with(base.clone(), "admitTime", admitted) });
            } else if is == Some("in-progress") && location(before) != location(Some(now)) {
                out.push(Derived {
                    event_type: "patient_transfer",
                    data: with(base.clone(), "fromLocation", location(before).as_deref()),
                });
            }
            if is == Some("finished") && was != Some("finished") {
                let left = text(Some(now), "/period/end");
                out.push(Derived { event_type: "patient_discharge", data: with(base, "dischargeTime", left) });
            }
        }
        "Observation" => {
            let laboratory = now.get("category").and_then(Value::as_array).is_some_and(|cats| {
                cats.iter().any(|c| {
                    c.get("coding").and_then(Value::as_array).is_some_and(|codes| {
                        codes.iter().any(|x| x.get("code").and_then(Value::as_str) == Some("laboratory"))
                    })
                })
            });
            if laboratory {
                out.push(Derived {
                    event_type: "lab_result",
                    data: json!({
                        "observationId": saved.id,
                        "patient": text(Some(now), "/subject/reference"),
                        "code": text(Some(now), "/code/coding/0/code"),
                        "display": text(Some(now), "/code/coding/0/display").or(text(Some(now), "/code/text")),
                        "value": now.get("valueQuantity").and_then(|q| q.get("value")).cloned()
                            .or_else(|| now.get("valueString").cloned()),
                        "unit": text(Some(now), "/valueQuantity/unit"),
                        "effective": text(Some(now), "/effectiveDateTime"),
                        "status": text(Some(now), "/status"),
                    }),
                });
            }
        }
        "Claim" => {
            let event_type = if resource_event == "resource_created" { "claim_submitted" } else { "claim_updated" };
            out.push(Derived {
                event_type,
                data: json!({
                    "claimId": saved.id,
                    "patient": text(Some(now), "/patient/reference"),
                    "status": text(Some(now), "/status"),
                    "total": now.get("total").cloned(),
                }),
            });
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn saved<'a>(
        interaction: Interaction,
        rt: &'a str,
        now: Option<&'a Map<String, Value>>,
        before: Option<&'a Map<String, Value>>,
    ) -> Saved<'a> {
        Saved { interaction, resource_type: rt, id: "e1", version: 2, resource: now, previous: before }
    }

    fn types(events: &[Derived]) -> Vec<&str> {
        events.iter().map(|e| e.event_type).collect()
    }

    #[test]
    fn mrn_prefers_the_mr_identifier_then_the_first_then_the_id() {
        let mr = obj(json!({ "id": "p", "identifier": [
            { "value": "SSN-1" },
            { "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR" }] }, "value": "MRN-7" }
        ] }));
        assert_eq!(mrn(&mr).as_deref(), Some("MRN-7"));
        assert_eq!(mrn(&obj(json!({ "id": "p", "identifier": [{ "value": "X" }] }))).as_deref(), Some("X"));
        assert_eq!(mrn(&obj(json!({ "id": "p" }))).as_deref(), Some("p"));
    }

    #[test]
    fn templates_render_own_and_related_fields() {
        let t = Template::parse("patient:{{Patient.MRN}}").unwrap();
        let enc = obj(json!({ "resourceType": "Encounter", "id": "e1", "subject": { "reference": "Patient/p1" } }));
        let mut related = BTreeMap::new();
        assert_eq!(t.render("Encounter", &enc, &related), None, "a missing related patient sends nothing");
        related.insert("Patient".to_string(), obj(json!({ "id": "p1" })));
        assert_eq!(t.render("Encounter", &enc, &related).as_deref(), Some("patient:p1"));
        assert_eq!(t.referenced_types().collect::<Vec<_>>(), ["Patient"]);
        let own = Template::parse("encounter:{{Encounter.id}}/{{meta.source}}").unwrap();
        let with_source = obj(json!({ "id": "e1", "meta": { "source": "adt" } }));
        assert_eq!(own.render("Encounter", &with_source, &related).as_deref(), Some("encounter:e1/adt"));
        assert_eq!(own.render("Encounter", &enc, &related), None);
        assert!(Template::parse("x:{{Patient.id").is_err());
        assert!(Template::parse("x:{{}}").is_err());
        assert!(Template::parse("x:{{Patient}}").is_err());
        assert_eq!(patient_id("Encounter", &enc).as_deref(), Some("p1"));
    }

    #[test]
    fn routing_files_are_checked() {
        let ok = "routes:\n  - name: p\n    filter: { resource_types: [Patient] }\n    actions:\n      - type: event_store\n        config: { stream_template: 'patient:{{Patient.MRN}}' }\n";
        let file = RoutingFile::parse(ok).unwrap();
        assert!(file.covers("Patient") && !file.covers("Claim"));
        assert_eq!(
            file.templates("Patient", "resource_created").map(Template::text).collect::<Vec<_>>(),
            ["patient:{{Patient.MRN}}"]
        );
        assert!(RoutingFile::parse(&ok.replace("[Patient]", "[Patience]")).unwrap_err().contains("Patience"));
        let bad_event = ok.replace("resource_types: [Patient]", "event_types: [patient_fell]");
        assert!(RoutingFile::parse(&bad_event).unwrap_err().contains("patient_fell"));
        assert!(RoutingFile::parse(&ok.replace("event_store", "kafka")).is_err());
    }

    #[test]
    fn the_shipped_routing_follows_clinical_types_not_groups() {
        let builtin = RoutingFile::builtin();
        for rt in ["Patient", "Encounter", "Observation", "Claim"] {
            assert!(builtin.covers(rt), "{rt}");
        }
        // Every covered type pays for a durable mark on each write.
        assert!(!builtin.covers("Group") && !builtin.covers("Practitioner"));
    }

    #[test]
    fn an_encounter_location_is_its_reference_else_display_else_identifier() {
        let at = |location: Value| {
            let enc = obj(json!({ "status": "in-progress", "location": [{ "location": location }] }));
            derive(&saved(Interaction::Create, "Encounter", Some(&enc), None))[1].data["location"].clone()
        };
        assert_eq!(at(json!({ "reference": "Location/1", "display": "Ward 1" })), "Location/1");
        assert_eq!(at(json!({ "display": "Ward 1" })), "Ward 1");
        assert_eq!(at(json!({ "identifier": { "system": "urn:beds", "value": "B7" } })), "urn:beds|B7");
        assert_eq!(at(json!({ "identifier": { "value": "B7" }, "display": "" })), "B7");
    }

    #[test]
    fn encounter_status_changes_become_admit_transfer_discharge() {
        let planned = obj(json!({ "status": "planned", "subject": { "reference": "Patient/p1" } }));
        let admitted = obj(json!({ "status": "in-progress", "subject": { "reference": "Patient/p1" },
            "class": { "code": "IMP" }, "period": { "start": "2024-01-15T08:00:00Z" },
            "location": [{ "location": { "reference": "Location/ward-1" } }] }));
        let moved =
            obj(json!({ "status": "in-progress", "location": [{ "location": { "reference": "Location/icu" } }] }));
        let finished = obj(json!({ "status": "finished", "period": { "end": "2024-01-20T10:00:00Z" } }));
        let create = derive(&saved(Interaction::Create, "Encounter", Some(&admitted), None));
        assert_eq!(types(&create), ["resource_created", "patient_admit"]);
        assert_eq!(create[1].data["admitTime"], "2024-01-15T08:00:00Z");
        assert_eq!(create[1].data["location"], "Location/ward-1");
        assert_eq!(
            types(&derive(&saved(Interaction::Update, "Encounter", Some(&admitted), Some(&planned)))),
            ["resource_updated", "patient_admit"]
        );
        let transfer = derive(&saved(Interaction::Patch, "Encounter", Some(&moved), Some(&admitted)));
        assert_eq!(types(&transfer), ["resource_updated", "patient_transfer"]);
        assert_eq!(transfer[1].data["fromLocation"], "Location/ward-1");
        assert_eq!(
            types(&derive(&saved(Interaction::Update, "Encounter", Some(&admitted), Some(&admitted)))),
            ["resource_updated"]
        );
        assert_eq!(
            types(&derive(&saved(Interaction::Update, "Encounter", Some(&finished), Some(&moved)))),
            ["resource_updated", "patient_discharge"]
        );
        assert_eq!(
            types(&derive(&saved(Interaction::Delete, "Encounter", None, Some(&finished)))),
            ["resource_deleted"]
        );
    }

    #[test]
    fn laboratory_observations_and_claims() {
        let lab = obj(json!({ "category": [{ "coding": [{ "code": "laboratory" }] }],
            "code": { "coding": [{ "code": "2345-7", "display": "Glucose" }] },
            "valueQuantity": { "value": 5.4, "unit": "mmol/L" } }));
        let vital = obj(json!({ "category": [{ "coding": [{ "code": "vital-signs" }] }] }));
        let lab_events = derive(&saved(Interaction::Create, "Observation", Some(&lab), None));
        assert_eq!(types(&lab_events), ["resource_created", "lab_result"]);
        assert_eq!(
            (lab_events[1].data["code"].clone(), lab_events[1].data["unit"].clone()),
            (json!("2345-7"), json!("mmol/L"))
        );
        assert_eq!(
            types(&derive(&saved(Interaction::Create, "Observation", Some(&vital), None))),
            ["resource_created"]
        );
        let claim = obj(json!({ "status": "active" }));
        assert_eq!(
            types(&derive(&saved(Interaction::Create, "Claim", Some(&claim), None))),
            ["resource_created", "claim_submitted"]
        );
        assert_eq!(
            types(&derive(&saved(Interaction::Update, "Claim", Some(&claim), Some(&claim)))),
            ["resource_updated", "claim_updated"]
        );
    }
}
