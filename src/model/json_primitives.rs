//! The primitives FHIR JSON writes as JSON numbers and booleans, checked as R4 says and
//! fhirbolt does not: it reads an `integer` as 32 bits and silently wraps (`2147483648`
//! became `-2147483648`), reads an `unsignedInt` past 2³² as its remainder, takes `0` as a
//! `positiveInt`, and accepts strings (`"1"`, `"true"`) for numbers and booleans.
//!
//! R4 (datatypes.html#primitive, json.html#primitive): `integer` is -2,147,483,648 to
//! 2,147,483,647, `unsignedInt` 0 to 2,147,483,647 and `positiveInt` 1 to 2,147,483,647,
//! each a JSON number without a fraction or exponent; `decimal` is a JSON number; `boolean`
//! is JSON `true` or `false`.
//!
//! Which element has which type comes from a table generated from the R4 model
//! (`typed_elements.rs`): (owner type, JSON element, element type) for every element on a
//! path that can reach one of these. The walk follows it from the resource type down, once
//! over the resource (linear in its size).

use serde_json::{Map, Value};

use super::typed_elements::ELEMENTS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    UnsignedInt,
    PositiveInt,
    Decimal,
    Boolean,
}

impl Kind {
    fn of(type_name: &str) -> Option<Kind> {
        match type_name {
            "Integer" => Some(Kind::Integer),
            "UnsignedInt" => Some(Kind::UnsignedInt),
            "PositiveInt" => Some(Kind::PositiveInt),
            "Decimal" => Some(Kind::Decimal),
            "Boolean" => Some(Kind::Boolean),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Integer => "an integer from -2147483648 to 2147483647",
            Kind::UnsignedInt => "an unsignedInt from 0 to 2147483647",
            Kind::PositiveInt => "a positiveInt from 1 to 2147483647",
            Kind::Decimal => "a decimal (a JSON number)",
            Kind::Boolean => "a boolean (JSON true or false)",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match (self, value) {
            (Kind::Boolean, Value::Bool(_)) | (Kind::Decimal, Value::Number(_)) => true,
            (Kind::Integer | Kind::UnsignedInt | Kind::PositiveInt, Value::Number(n)) => self.admits_number(n),
            _ => false,
        }
    }

    fn admits_number(self, number: &serde_json::Number) -> bool {
        // The text as sent (arbitrary precision): digits only, no fraction or exponent.
        let text = number.to_string();
        let digits = text.strip_prefix('-').unwrap_or(&text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(n) = text.parse::<i64>() else { return false };
        let low = match self {
            Kind::Integer => i32::MIN as i64,
            Kind::UnsignedInt => 0,
            _ => 1,
        };
        (low..=i32::MAX as i64).contains(&n)
    }
}

/// The type of element `name` of an object of type `owner`, if it can hold one of these.
fn element_type(owner: &str, name: &str) -> Option<&'static str> {
    if name == "extension" || name == "modifierExtension" {
        return Some("Extension");
    }
    ELEMENTS.binary_search_by(|(o, n, _)| (*o, *n).cmp(&(owner, name))).ok().map(|i| ELEMENTS[i].2)
}

/// The first number or boolean in `resource` (an object of type `resource_type`) that is
/// not what its type says, as (FHIRPath-like path, message).
pub fn out_of_range(resource_type: &str, resource: &Map<String, Value>) -> Option<(String, String)> {
    walk(Some(resource_type), resource, resource_type)
}

/// `owner` is the object's type when the table knows it; below an element the table does not
/// name, none of these can sit until a nested resource (`contained`, `Bundle.entry.resource`,
/// `Parameters.parameter.resource`) starts a typed walk again.
fn walk(owner: Option<&str>, object: &Map<String, Value>, path: &str) -> Option<(String, String)> {
    for (name, value) in object {
        let element = owner.and_then(|o| element_type(o, name));
        let items = match value {
            Value::Array(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        for (i, item) in items.iter().enumerate() {
            let at = || if value.is_array() { format!("{path}.{name}[{i}]") } else { format!("{path}.{name}") };
            match (element.and_then(Kind::of), item) {
                (Some(kind), v) if !kind.admits(v) => {
                    return Some((at(), format!("{v} is not {}", kind.describe())));
                }
                (None, Value::Object(inner)) => {
                    let typed = match inner.get("resourceType").and_then(Value::as_str) {
                        Some(rt) if fhir_model::is_resource_type(rt) => Some(rt),
                        _ => element,
                    };
                    if let Some(found) = walk(typed, inner, &at()) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(resource: Value) -> Option<(String, String)> {
        let rt = resource["resourceType"].as_str().unwrap().to_string();
        out_of_range(&rt, resource.as_object().unwrap())
    }

    #[test]
    fn the_table_is_sorted_for_binary_search() {
        assert!(ELEMENTS.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
    }

    #[test]
    fn each_kind_has_its_range() {
        let obs = |v: Value| json!({"resourceType":"Observation","valueInteger": v});
        assert_eq!(check(obs(json!(2147483647))), None);
        assert_eq!(check(obs(json!(-2147483648))), None);
        let (path, message) = check(obs(json!(2147483648u64))).unwrap();
        assert_eq!(path, "Observation.valueInteger");
        assert!(message.contains("not an integer"), "{message}");
        assert!(check(obs(json!(-2147483649i64))).is_some());
        assert!(check(obs(serde_json::from_str("1.0").unwrap())).is_some());
        assert!(check(obs(serde_json::from_str("1e2").unwrap())).is_some());
        assert!(check(obs(json!("1"))).is_some(), "a string is not a JSON number");
        let group = |q: i64| json!({"resourceType":"Group","quantity": q});
        assert_eq!(check(group(0)), None);
        assert!(check(group(-1)).is_some());
        assert!(check(group(4294967296)).is_some());
        let rank = |r: i64| json!({"resourceType":"Encounter","diagnosis":[{"rank": 1},{"rank": r}]});
        assert_eq!(check(rank(1)), None);
        assert_eq!(check(rank(0)).unwrap().0, "Encounter.diagnosis[1].rank");
    }

    #[test]
    fn decimals_and_booleans_are_json_numbers_and_booleans() {
        let q = |v: Value| json!({"resourceType":"Observation","valueQuantity":{"value": v}});
        assert_eq!(check(q(json!(1.5))), None);
        assert_eq!(check(q(json!("1.5"))).unwrap().0, "Observation.valueQuantity.value");
        let active = |v: Value| json!({"resourceType":"Patient","active": v});
        assert_eq!(check(active(json!(true))), None);
        assert!(check(active(json!("true"))).unwrap().1.contains("boolean"));
    }

    #[test]
    fn datatypes_extensions_and_contained_resources_are_followed() {
        let timing =
            json!({"resourceType":"MedicationRequest","dosageInstruction":[{"timing":{"repeat":{"count":0}}}]});
        assert_eq!(check(timing).unwrap().0, "MedicationRequest.dosageInstruction[0].timing.repeat.count");
        let ext = json!({"resourceType":"Patient","extension":[{"url":"u","valuePositiveInt":0}]});
        assert_eq!(check(ext).unwrap().0, "Patient.extension[0].valuePositiveInt");
        let contained = json!({"resourceType":"Patient","contained":[{"resourceType":"Group","quantity":-5}]});
        assert_eq!(check(contained).unwrap().0, "Patient.contained[0].quantity");
        let bundle =
            json!({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","valueInteger":1e10}}]});
        assert_eq!(check(bundle).unwrap().0, "Bundle.entry[0].resource.valueInteger");
    }
}
