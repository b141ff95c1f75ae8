//! The R4 search parameters this server knows, read once from the shipped copy of the
//! specification's SearchParameter bundle (`search-parameters.json`, made by
//! `scripts/gen_search_definitions.py`) and the Patient CompartmentDefinition.
//!
//! A parameter applies to a type when the type is in its `base`; `Resource` parameters
//! (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`, …) and
//! `DomainResource` ones (`_text`) apply to every type. Expressions are parsed here, once:
//! a definition that does not parse is a bug in the evaluator, caught by its tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use serde::Deserialize;

use super::fhirpath::{self, Expr};

/// A search parameter's type (R4 `SearchParamType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Composite => "composite",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Special => "special",
        }
    }
}

#[derive(Deserialize)]
struct RawComponent {
    definition: String,
    expression: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawParam {
    url: String,
    code: String,
    base: Vec<String>,
    #[serde(rename = "type")]
    kind: ParamType,
    expression: Option<String>,
    #[serde(default)]
    target: Vec<String>,
    #[serde(default)]
    component: Vec<RawComponent>,
}

/// One component of a composite parameter: the parameter it takes its type from and the
/// expression, relative to the composite's value, that yields it.
#[derive(Debug)]
pub struct Component {
    pub definition: String,
    pub expression: Expr,
}

/// A search parameter.
#[derive(Debug)]
pub struct Definition {
    pub url: String,
    pub code: String,
    pub kind: ParamType,
    /// `None` for the parameters no expression defines (`_text`, `_content`, `_query`).
    pub expression: Option<Expr>,
    /// Reference parameters: the types a reference may point to (empty: any).
    pub targets: Vec<String>,
    pub components: Vec<Component>,
}

/// Every parameter, by resource type and code.
pub struct Registry {
    by_type: HashMap<String, BTreeMap<String, Arc<Definition>>>,
    by_url: HashMap<String, Arc<Definition>>,
    /// Patient compartment: resource type → the parameters that link it to a patient.
    patient_compartment: BTreeMap<String, Vec<String>>,
}

/// Types every parameter of `Resource` and `DomainResource` applies to: all of them.
const ABSTRACT_BASES: &[&str] = &["Resource", "DomainResource"];

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    Registry::load(include_str!("search-parameters.json"), include_str!("compartment-patient.json"))
        .expect("the shipped search parameters parse")
});

/// The registry of the shipped R4 definitions.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

impl Registry {
    fn load(params: &str, compartment: &str) -> Result<Registry, String> {
        let raw: Vec<RawParam> = serde_json::from_str(params).map_err(|e| e.to_string())?;
        let mut by_url = HashMap::new();
        let mut common = Vec::new();
        let mut by_type: HashMap<String, BTreeMap<String, Arc<Definition>>> = HashMap::new();
        for p in raw {
            let expression = p
                .expression
                .as_deref()
                .filter(|e| !e.is_empty())
                .map(fhirpath::parse)
                .transpose()
                .map_err(|e| format!("{}: {e}", p.url))?;
            let components = p
                .component
                .iter()
                .map(|c| {
                    Ok(Component { definition: c.definition.clone(), expression: fhirpath::parse(&c.expression)? })
                })
                .collect::<Result<Vec<_>, fhirpath::ParseError>>()
                .map_err(|e| format!("{}: {e}", p.url))?;
            let d = Arc::new(Definition {
                url: p.url.clone(),
                code: p.code.clone(),
                kind: p.kind,
                expression,
                targets: p.target,
                components,
            });
            by_url.insert(p.url, d.clone());
            for base in &p.base {
                match ABSTRACT_BASES.contains(&base.as_str()) {
                    true => common.push(d.clone()),
                    false => {
                        by_type.entry(base.clone()).or_default().insert(p.code.clone(), d.clone());
                    }
                }
            }
        }
        for rt in fhir_model::RESOURCE_TYPES {
            let params = by_type.entry(rt.to_string()).or_default();
            for d in &common {
                params.entry(d.code.clone()).or_insert_with(|| d.clone());
            }
        }
        #[derive(Deserialize)]
        struct Compartment {
            resource: BTreeMap<String, Vec<String>>,
        }
        let c: Compartment = serde_json::from_str(compartment).map_err(|e| e.to_string())?;
        let patient_compartment = c.resource.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        Ok(Registry { by_type, by_url, patient_compartment })
    }

    /// The parameter `code` of `rt`.
    pub fn get(&self, rt: &str, code: &str) -> Option<&Arc<Definition>> {
        self.by_type.get(rt)?.get(code)
    }

    /// Every parameter of `rt`, by code.
    pub fn of_type(&self, rt: &str) -> impl Iterator<Item = &Arc<Definition>> {
        self.by_type.get(rt).into_iter().flat_map(|m| m.values())
    }

    pub fn by_url(&self, url: &str) -> Option<&Arc<Definition>> {
        self.by_url.get(url)
    }

    /// The parameters that put a resource of `rt` in a patient's compartment (empty when
    /// the type is not in it).
    pub fn patient_compartment(&self, rt: &str) -> &[String] {
        self.patient_compartment.get(rt).map_or(&[], Vec::as_slice)
    }

    /// The types in the Patient compartment.
    pub fn patient_compartment_types(&self) -> impl Iterator<Item = &str> {
        self.patient_compartment.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_the_common_parameters() {
        let r = registry();
        for rt in fhir_model::RESOURCE_TYPES {
            for code in ["_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"] {
                assert!(r.get(rt, code).is_some(), "{rt} lacks {code}");
            }
        }
        assert_eq!(r.get("Patient", "family").unwrap().kind, ParamType::String);
        assert_eq!(r.get("Observation", "subject").unwrap().kind, ParamType::Reference);
        assert_eq!(r.get("Observation", "code-value-quantity").unwrap().components.len(), 2);
        assert!(r.get("Patient", "nonsense").is_none());
        assert_eq!(r.patient_compartment("Observation"), ["subject", "performer"]);
        assert!(r.patient_compartment("Practitioner").is_empty());
    }
}
