//! Typed index values of a resource: what each applicable search parameter's expression
//! yields, turned into the values search compares (R4 search.html, per parameter type).
//!
//! - token: system and code of codes, Codings, CodeableConcepts, Identifiers (value as the
//!   code), ContactPoints (value) and booleans; display and text for `:text`; an
//!   Identifier's type codings for `:of-type`.
//! - string: strings, and every part of a HumanName or an Address.
//! - reference: `Type/id` (this server's absolute URLs made relative), the version when one
//!   is named, other servers' URLs as written, canonical URLs (and `url|version`), the
//!   Reference's identifier for `:identifier`.
//! - date: the half-open UTC range a date, dateTime, instant, Period or Timing covers.
//! - number, quantity: the value, the range its written precision implies, the unit (a
//!   Money's currency as an ISO 4217 code), and the UCUM-canonical value where the unit
//!   converts simply (`ucum.rs`).
//! - uri: the URI as written.
//! - composite: per value of the composite's expression, its components' values.
//!
//! Nothing here fails: a value of the wrong shape (a date that does not parse, a number
//! that is not one) yields no index value, so a search simply does not find it by that
//! parameter, as for any server that indexes what it can read.

use std::sync::Arc;

use serde_json::Value;

use super::definitions::{registry, Definition, ParamType};
use super::fhirpath::{self, Item};
use super::ucum;
use crate::model::datetime::{self, parse_date_time, parse_instant};

/// One index value.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    Token {
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
    },
    /// An Identifier's type coding with its value (`:of-type` is `system|code|value`).
    IdentifierType {
        system: String,
        code: String,
        value: String,
    },
    String(String),
    Reference(Reference),
    Uri(String),
    /// Milliseconds since the epoch, `[low, high)`.
    Date {
        low: i64,
        high: i64,
    },
    Number(Number),
    Quantity {
        number: Number,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
        /// The UCUM-canonical form of another value (found by unit-qualified searches only).
        canonical: bool,
    },
    /// A composite's components, each with the values its component expression yields.
    Composite(Vec<Vec<IndexValue>>),
}

/// A decimal as written and the range its precision implies (`100` is `[99.5, 100.5)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// A reference, normalized.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reference {
    /// `Type/id` for this server's resources, the URL as written for others' and for
    /// canonicals (without `|version`).
    pub target: Option<String>,
    pub target_type: Option<String>,
    pub version: Option<String>,
    pub identifier: Option<(Option<String>, String)>,
}

/// Every parameter of the resource's type with the values it yields (parameters that yield
/// nothing are left out).
pub fn extract(resource: &Value, base: &str) -> Vec<(Arc<Definition>, Vec<IndexValue>)> {
    let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else { return Vec::new() };
    let mut out = Vec::new();
    for d in registry().of_type(rt) {
        // `_id` is the index row's own column. (`_lastUpdated`, which every stored
        // version has, is also the key that lists every resource of a type.)
        if d.code == "_id" {
            continue;
        }
        let values = values_of(d, resource, base);
        if !values.is_empty() {
            out.push((d.clone(), values));
        }
    }
    out
}

/// What one parameter yields on a resource.
pub fn values_of(d: &Definition, resource: &Value, base: &str) -> Vec<IndexValue> {
    let Some(expr) = &d.expression else { return Vec::new() };
    let items = fhirpath::evaluate_resource(expr, resource);
    let mut values = Vec::new();
    if d.kind == ParamType::Composite {
        for item in &items {
            let parts: Vec<Vec<IndexValue>> = d
                .components
                .iter()
                .map(|c| {
                    let kind = registry().by_url(&c.definition).map_or(ParamType::Token, |p| p.kind);
                    let found = fhirpath::evaluate(&c.expression, std::slice::from_ref(item), resource);
                    let mut vs = Vec::new();
                    for i in &found {
                        typed(kind, i, resource, base, &mut vs);
                    }
                    vs
                })
                .collect();
            if parts.iter().all(|p| !p.is_empty()) {
                values.push(IndexValue::Composite(parts));
            }
        }
        return values;
    }
    // A `code` element's codes have the system its required binding names (FHIR search:
    // the system is implicit), so `gender=<administrative-gender>|male` finds `male`.
    let rt = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    let implicit = (d.kind == ParamType::Token).then(|| implicit_system(rt, &d.code)).flatten();
    for item in &items {
        let start = values.len();
        typed(d.kind, item, resource, base, &mut values);
        if let (Some(implicit), Item::Node { ty: "code", .. }) = (implicit, item) {
            for v in &mut values[start..] {
                if let IndexValue::Token { system: system @ None, .. } = v {
                    *system = Some(implicit.to_string());
                }
            }
        }
    }
    values.dedup();
    values
}

/// The implicit code system of a token parameter over `code` elements of `rt` (see
/// `scripts/gen_implicit_systems.py`).
pub fn implicit_system(rt: &str, code: &str) -> Option<&'static str> {
    let table = super::implicit_systems::IMPLICIT_SYSTEMS;
    table.binary_search_by(|(t, c, _)| (*t, *c).cmp(&(rt, code))).ok().map(|i| table[i].2)
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn texts<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a str> {
    let one = v.get(key);
    let many = one.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
    one.and_then(Value::as_str).into_iter().chain(many)
}

fn coding(c: &Value) -> IndexValue {
    IndexValue::Token { system: text(c, "system"), code: text(c, "code"), text: text(c, "display") }
}

/// The index values of one item for a parameter of type `kind`.
fn typed(kind: ParamType, item: &Item, root: &Value, base: &str, out: &mut Vec<IndexValue>) {
    let (value, ty) = match item {
        Item::Node { value, ty } => (*value, *ty),
        Item::Bool(b) if kind == ParamType::Token => {
            out.push(IndexValue::Token { system: None, code: Some(b.to_string()), text: None });
            return;
        }
        _ => return,
    };
    match kind {
        ParamType::Token => token(value, ty, out),
        ParamType::String => string(value, ty, out),
        ParamType::Reference => {
            if let Some(r) = reference(value, ty, root, base) {
                out.push(IndexValue::Reference(r));
            }
        }
        ParamType::Uri => {
            if let Some(s) = value.as_str() {
                out.push(IndexValue::Uri(s.to_string()));
            }
        }
        ParamType::Date => date(value, ty, out),
        ParamType::Number => {
            if let Some(n) = number(value) {
                out.push(IndexValue::Number(n));
            }
        }
        ParamType::Quantity => quantity(value, ty, out),
        ParamType::Composite | ParamType::Special => {}
    }
}

fn token(value: &Value, ty: &str, out: &mut Vec<IndexValue>) {
    match (ty, value) {
        (_, Value::Bool(b)) => out.push(IndexValue::Token { system: None, code: Some(b.to_string()), text: None }),
        (_, Value::String(s)) => out.push(IndexValue::Token { system: None, code: Some(s.clone()), text: None }),
        ("Coding", _) => out.push(coding(value)),
        ("CodeableConcept", _) => {
            for c in value.get("coding").and_then(Value::as_array).into_iter().flatten() {
                out.push(coding(c));
            }
            if let Some(t) = text(value, "text") {
                out.push(IndexValue::Token { system: None, code: None, text: Some(t) });
            }
        }
        ("Identifier", _) => {
            let type_text = value.get("type").and_then(|t| text(t, "text"));
            out.push(IndexValue::Token { system: text(value, "system"), code: text(value, "value"), text: type_text });
            if let Some(v) = text(value, "value") {
                let codings = value.get("type").and_then(|t| t.get("coding")).and_then(Value::as_array);
                for c in codings.into_iter().flatten() {
                    if let (Some(system), Some(code)) = (text(c, "system"), text(c, "code")) {
                        out.push(IndexValue::IdentifierType { system, code, value: v.clone() });
                    }
                }
            }
        }
        ("ContactPoint", _) => {
            out.push(IndexValue::Token { system: text(value, "system"), code: text(value, "value"), text: None })
        }
        // A Quantity searched as a token (rare): its unit code.
        (t, _) if fhirpath::QUANTITY_KINDS.contains(&t) => {
            out.push(IndexValue::Token { system: text(value, "system"), code: text(value, "code"), text: None })
        }
        _ => {}
    }
}

fn string(value: &Value, ty: &str, out: &mut Vec<IndexValue>) {
    let mut push = |s: &str| {
        if !s.trim().is_empty() {
            out.push(IndexValue::String(s.to_string()));
        }
    };
    match (ty, value) {
        (_, Value::String(s)) => push(s),
        ("HumanName", _) => {
            for key in ["text", "family", "given", "prefix", "suffix"] {
                texts(value, key).for_each(&mut push);
            }
        }
        ("Address", _) => {
            for key in ["text", "line", "city", "district", "state", "postalCode", "country"] {
                texts(value, key).for_each(&mut push);
            }
        }
        _ => {}
    }
}

/// Splits a reference URL into (target, type, version); this server's absolute URLs
/// (`base`) become relative.
pub fn split_reference(url: &str, base: &str) -> (String, Option<String>, Option<String>) {
    let local = url.strip_prefix(base).and_then(|r| r.strip_prefix('/')).unwrap_or(url);
    let segments: Vec<&str> = local.split('/').collect();
    let n = segments.len();
    let is_type = |s: &str| fhir_model::is_resource_type(s);
    let (type_at, version) = match n {
        _ if n >= 4 && segments[n - 2] == "_history" => (n - 4, Some(segments[n - 1].to_string())),
        _ if n >= 2 => (n - 2, None),
        _ => return (url.to_string(), None, None),
    };
    let ty = segments[type_at];
    if !is_type(ty) {
        return (url.split('|').next().unwrap_or(url).to_string(), None, None);
    }
    let id = segments[type_at + 1];
    // Relative (`Patient/1`) or this server's: `Type/id`. Another server's: as written.
    let relative = type_at == 0;
    let target = match relative {
        true => format!("{ty}/{id}"),
        false => segments[..type_at + 2].join("/"),
    };
    (target, Some(ty.to_string()), version)
}

fn reference(value: &Value, ty: &str, root: &Value, base: &str) -> Option<Reference> {
    match (ty, value) {
        ("Reference", _) => {
            let identifier = value.get("identifier").and_then(|i| Some((text(i, "system"), text(i, "value")?)));
            let mut r = Reference { identifier, ..Reference::default() };
            if let Some(url) = value.get("reference").and_then(Value::as_str) {
                if let Some(local) = url.strip_prefix('#') {
                    // A contained resource: searchable by its type only.
                    r.target_type = fhirpath::reference_type(value, root).map(str::to_string);
                    r.target = Some(format!("#{local}"));
                } else {
                    let (target, t, version) = split_reference(url, base);
                    r.target = Some(target);
                    r.target_type = t.or_else(|| text(value, "type"));
                    r.version = version;
                }
            } else {
                r.target_type = text(value, "type");
            }
            (r.target.is_some() || r.identifier.is_some()).then_some(r)
        }
        (_, Value::String(url)) => {
            // canonical / uri: `url|version`.
            let (url, version) = match url.split_once('|') {
                Some((u, v)) => (u, Some(v.to_string())),
                None => (url.as_str(), None),
            };
            Some(Reference { target: Some(url.to_string()), version, ..Reference::default() })
        }
        // An inline resource (`Bundle.entry[0].resource`): a reference to it.
        (_, Value::Object(o)) if o.contains_key("resourceType") => {
            let t = o.get("resourceType")?.as_str()?;
            let id = o.get("id")?.as_str()?;
            Some(Reference {
                target: Some(format!("{t}/{id}")),
                target_type: Some(t.to_string()),
                ..Reference::default()
            })
        }
        _ => None,
    }
}

fn millis(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The `[low, high)` range of a date, dateTime or instant, in milliseconds.
pub fn date_range(s: &str) -> Option<(i64, i64)> {
    let parsed = parse_date_time(s).or_else(|| parse_instant(s))?;
    let (start, end) = parsed.range();
    Some((millis(start), millis(end)))
}

const MIN_MS: i64 = -62_135_596_800_000; // 0001-01-01
const MAX_MS: i64 = 253_402_300_800_000; // 10000-01-01

fn date(value: &Value, ty: &str, out: &mut Vec<IndexValue>) {
    let period = |v: &Value| -> Option<IndexValue> {
        let low = v.get("start").and_then(Value::as_str).and_then(date_range).map_or(MIN_MS, |r| r.0);
        let high = v.get("end").and_then(Value::as_str).and_then(date_range).map_or(MAX_MS, |r| r.1);
        (v.get("start").is_some() || v.get("end").is_some()).then_some(IndexValue::Date { low, high })
    };
    match (ty, value) {
        (_, Value::String(s)) => {
            if let Some((low, high)) = date_range(s) {
                out.push(IndexValue::Date { low, high });
            }
        }
        ("Period", _) => out.extend(period(value)),
        ("Timing", _) => {
            for e in texts(value, "event") {
                if let Some((low, high)) = date_range(e) {
                    out.push(IndexValue::Date { low, high });
                }
            }
            if let Some(bounds) = value.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                out.extend(period(bounds));
            }
        }
        _ => {}
    }
    let _ = datetime::MIN; // the calendar's ends are MIN_MS / MAX_MS
}

/// A JSON number (or numeric string) with the range its written precision implies.
pub fn number(value: &Value) -> Option<Number> {
    let written = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    };
    parse_number(&written)
}

/// Parses a decimal as FHIR writes it (`100`, `1.50`, `1e2`) with its precision range.
pub fn parse_number(written: &str) -> Option<Number> {
    let value: f64 = written.parse().ok().filter(|v: &f64| v.is_finite())?;
    let lower = written.to_ascii_lowercase();
    let (mantissa, exponent) = match lower.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (lower.as_str(), 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len() as i32);
    let half = 0.5 * 10f64.powi(exponent - decimals);
    Some(Number { value, low: (value - half).min(value), high: (value + half).max(value.next_up()) })
}

fn quantity(value: &Value, ty: &str, out: &mut Vec<IndexValue>) {
    let one = |q: &Value| -> Option<IndexValue> {
        let number = number(q.get("value")?)?;
        Some(IndexValue::Quantity {
            number,
            system: text(q, "system"),
            code: text(q, "code"),
            unit: text(q, "unit"),
            canonical: false,
        })
    };
    match ty {
        t if fhirpath::QUANTITY_KINDS.contains(&t) => {
            if let Some(q) = one(value) {
                if let Some(c) = ucum::canonical(&q) {
                    out.push(c);
                }
                out.push(q);
            }
        }
        "Money" => {
            if let Some(number) = value.get("value").and_then(number) {
                out.push(IndexValue::Quantity {
                    number,
                    system: Some("urn:iso:std:iso:4217".into()),
                    code: text(value, "currency"),
                    unit: None,
                    canonical: false,
                });
            }
        }
        "Range" => {
            // A range as one value spanning low to high (in low's unit).
            let (low, high) = (value.get("low"), value.get("high"));
            let unit = low.or(high);
            let l = low.and_then(|q| q.get("value")).and_then(number);
            let h = high.and_then(|q| q.get("value")).and_then(number);
            if let (Some(u), true) = (unit, l.is_some() || h.is_some()) {
                let lo = l.map_or(f64::MIN, |n| n.value);
                let hi = h.map_or(f64::MAX, |n| n.value);
                out.push(IndexValue::Quantity {
                    number: Number { value: l.or(h).map_or(0.0, |n| n.value), low: lo, high: hi },
                    system: text(u, "system"),
                    code: text(u, "code"),
                    unit: text(u, "unit"),
                    canonical: false,
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(resource: &Value, code: &str) -> Vec<IndexValue> {
        let rt = resource["resourceType"].as_str().unwrap();
        values_of(registry().get(rt, code).unwrap(), resource, "http://h/fhir")
    }

    #[test]
    fn the_implicit_systems_are_sorted_and_found() {
        let table = super::super::implicit_systems::IMPLICIT_SYSTEMS;
        assert!(table.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
        assert_eq!(implicit_system("Observation", "status"), Some("http://hl7.org/fhir/observation-status"));
        assert_eq!(implicit_system("Observation", "code"), None, "a CodeableConcept has its own");
    }

    #[test]
    fn tokens_of_each_shape() {
        let p = json!({"resourceType": "Patient", "gender": "male", "active": true,
            "identifier": [{"system": "s", "value": "v", "type": {"coding": [{"system": "t", "code": "MR"}], "text": "MRN"}}],
            "telecom": [{"system": "email", "value": "a@b.c"}]});
        let gender = Some("http://hl7.org/fhir/administrative-gender".to_string());
        assert_eq!(
            of(&p, "gender"),
            vec![IndexValue::Token { system: gender, code: Some("male".into()), text: None }],
            "a code element's system is its binding's"
        );
        assert_eq!(of(&p, "active"), vec![IndexValue::Token { system: None, code: Some("true".into()), text: None }]);
        let ids = of(&p, "identifier");
        assert_eq!(
            ids[0],
            IndexValue::Token { system: Some("s".into()), code: Some("v".into()), text: Some("MRN".into()) }
        );
        assert_eq!(ids[1], IndexValue::IdentifierType { system: "t".into(), code: "MR".into(), value: "v".into() });
        assert_eq!(of(&p, "email").len(), 1);
        assert!(of(&p, "phone").is_empty());
        let o = json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "1-8", "display": "Acyclovir"}], "text": "acy"}});
        assert_eq!(of(&o, "code").len(), 2);
    }

    #[test]
    fn strings_references_dates_numbers() {
        let p = json!({"resourceType": "Patient", "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
            "birthDate": "1974-12", "generalPractitioner": [{"reference": "http://h/fhir/Practitioner/1"}],
            "managingOrganization": {"reference": "Organization/2/_history/3"}});
        assert_eq!(of(&p, "name").len(), 3);
        assert_eq!(of(&p, "family"), vec![IndexValue::String("Chalmers".into())]);
        let IndexValue::Date { low, high } = of(&p, "birthdate")[0] else { panic!() };
        assert_eq!((low, high), (date_range("1974-12-01").unwrap().0, date_range("1975-01-01").unwrap().0));
        let IndexValue::Reference(r) = &of(&p, "general-practitioner")[0] else { panic!() };
        assert_eq!((r.target.as_deref(), r.target_type.as_deref()), (Some("Practitioner/1"), Some("Practitioner")));
        let IndexValue::Reference(r) = &of(&p, "organization")[0] else { panic!() };
        assert_eq!((r.target.as_deref(), r.version.as_deref()), (Some("Organization/2"), Some("3")));
        let n = parse_number("100").unwrap();
        assert_eq!((n.low, n.high), (99.5, 100.5));
        let n = parse_number("1.50").unwrap();
        assert!((n.low - 1.495).abs() < 1e-9 && (n.high - 1.505).abs() < 1e-9);
        assert!(parse_number("x").is_none() && parse_number("NaN").is_none());
    }

    #[test]
    fn composites_pair_their_components() {
        let o = json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]});
        let v = of(&o, "code-value-quantity");
        assert_eq!(v.len(), 1);
        let IndexValue::Composite(parts) = &v[0] else { panic!() };
        assert_eq!(parts.len(), 2);
        assert_eq!(of(&o, "component-code-value-quantity").len(), 1);
        assert_eq!(of(&o, "combo-code-value-quantity").len(), 2);
    }
}
