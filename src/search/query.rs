//! A search request parsed into typed tests: each `name[:modifier]=v1,v2` becomes a
//! [`Clause`] (its values ORed; clauses ANDed), following R4 search.html per parameter type.
//!
//! Everything parsed is bounded: at most [`MAX_CLAUSES`] clauses, [`MAX_VALUES`] values per
//! clause, chains [`MAX_CHAIN`] deep, values checked by type (a date that does not parse
//! is a 400 naming the parameter, never an empty result).
//!
//! Unknown parameters are collected for the lenient warning (or refused under
//! `Prefer: handling=strict` by the caller); a known parameter with a modifier its type
//! does not take is always a 400.

use std::sync::Arc;

use super::definitions::{registry, Definition, ParamType};
use super::extract::{date_range, parse_number, split_reference, Number};
use super::keys::normalize;
use super::ucum;
use crate::error::FhirError;

pub const MAX_CLAUSES: usize = 64;
pub const MAX_VALUES: usize = 100;
pub const MAX_CHAIN: usize = 4;

/// Comparison prefixes of number, date and quantity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    /// Splits `ge2020` into (Ge, "2020"); no prefix is `eq`.
    pub fn split(value: &str) -> (Prefix, &str) {
        let table = [
            ("eq", Prefix::Eq),
            ("ne", Prefix::Ne),
            ("gt", Prefix::Gt),
            ("lt", Prefix::Lt),
            ("ge", Prefix::Ge),
            ("le", Prefix::Le),
            ("sa", Prefix::Sa),
            ("eb", Prefix::Eb),
            ("ap", Prefix::Ap),
        ];
        for (p, prefix) in table {
            if let Some(rest) = value.strip_prefix(p) {
                if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
                    return (prefix, rest);
                }
            }
        }
        (Prefix::Eq, value)
    }
}

/// What a reference value names.
#[derive(Debug, Clone, PartialEq)]
pub enum RefTarget {
    /// `Type/id` (this server's, made relative), optionally a version.
    Local { ty: String, id: String, version: Option<String> },
    /// A bare id: any allowed type.
    Id(String),
    /// Another server's URL, or a canonical (with `|version`).
    Url { url: String, version: Option<String> },
}

/// One value's test.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `system|code`, `code`, `|code`, `system|`: `system` None = any, Some(None) = none.
    Token {
        system: Option<Option<String>>,
        code: Option<String>,
    },
    /// `:text`, normalized.
    TokenText(String),
    /// `:of-type`: `system|code|value`.
    OfType {
        system: String,
        code: String,
        value: String,
    },
    StringPrefix(String),
    StringExact(String),
    StringContains(String),
    Reference(RefTarget),
    /// `:identifier`.
    RefIdentifier {
        system: Option<String>,
        value: String,
    },
    /// References to any of these `Type/id`s (a chain's result).
    RefAny(Vec<String>),
    Uri(String),
    UriBelow(String),
    UriAbove(String),
    Date {
        prefix: Prefix,
        low: i64,
        high: i64,
    },
    Number {
        prefix: Prefix,
        number: Number,
    },
    Quantity {
        prefix: Prefix,
        number: Number,
        system: Option<String>,
        code: Option<String>,
    },
    Composite(Vec<Test>),
}

/// A chain `subject:Patient.name=x`, resolved by searching the target type.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Types the reference may point to (one when a `:Type` modifier names it).
    pub types: Vec<String>,
    /// The parameter on the target type, itself possibly chained.
    pub inner: Box<Clause>,
}

/// `_has:Type:reference:param=value`: resources of this type that some `Type` refers to
/// through `reference`, where that `Type` matches `inner`.
#[derive(Debug, Clone)]
pub struct Has {
    pub source_type: String,
    pub reference: Arc<Definition>,
    pub inner: Box<Clause>,
}

/// One parameter of a search, its values ORed.
#[derive(Debug, Clone)]
pub enum Clause {
    Param {
        def: Arc<Definition>,
        not: bool,
        any: Vec<Test>,
    },
    /// `:missing=true|false`.
    Missing {
        def: Arc<Definition>,
        missing: bool,
    },
    /// `_id`.
    Ids(Vec<String>),
    /// `_lastUpdated`.
    LastUpdated(Vec<Test>),
    Chain {
        def: Arc<Definition>,
        chain: Chain,
    },
    Has(Has),
    /// Any of these (a compartment: any of its parameters refers to the patient).
    AnyOf(Vec<Clause>),
    /// Among the resources a detached reference points to (see `detached`).
    Targets(super::detached::Targets),
    /// Resources with a key in the set, decided by the keys alone (a chain whose inner
    /// search matched too many to list, as a subquery).
    Keys(super::plan::KeySet),
    /// Among the ids a subquery finds (a `_has` whose sources are too many to list).
    IdsIn(super::plan::IdQuery),
    /// `_list`: among the resources these `List`s have as entries (resolved to [`Clause::Ids`]
    /// before planning).
    List(Vec<String>),
}

/// The clause "in `Patient/{id}`'s compartment" for resources of `rt` (`None` when `rt` is
/// not in the Patient compartment). The patient itself is in it.
pub fn patient_compartment(rt: &str, id: &str) -> Option<Clause> {
    if rt == "Patient" {
        return Some(Clause::Ids(vec![id.to_string()]));
    }
    let target = format!("Patient/{id}");
    let any: Vec<Clause> = registry()
        .patient_compartment(rt)
        .iter()
        .filter_map(|code| registry().get(rt, code))
        .map(|def| Clause::Param { def: def.clone(), not: false, any: vec![Test::RefAny(vec![target.clone()])] })
        .collect();
    (!any.is_empty()).then_some(Clause::AnyOf(any))
}

fn bad(msg: String) -> FhirError {
    FhirError::bad_request(msg)
}

/// Splits on unescaped `sep` and unescapes `\,` `\|` `\$` `\\`.
pub fn split_escaped(value: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n @ (',' | '|' | '$' | '\\')) => {
                    if n == sep {
                        parts.last_mut().expect("one part").push(n);
                    } else {
                        parts.last_mut().expect("one part").push('\\');
                        parts.last_mut().expect("one part").push(n);
                    }
                }
                Some(n) => {
                    parts.last_mut().expect("one part").push('\\');
                    parts.last_mut().expect("one part").push(n);
                }
                None => parts.last_mut().expect("one part").push('\\'),
            },
            c if c == sep => parts.push(String::new()),
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    parts
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some(n @ (',' | '|' | '$' | '\\'))) => {
                out.push(n);
                chars.next();
            }
            (c, _) => out.push(c),
        }
    }
    out
}

/// The modifiers each type takes (besides `missing`).
fn modifier_allowed(kind: ParamType, modifier: &str) -> bool {
    match kind {
        ParamType::String => matches!(modifier, "exact" | "contains"),
        ParamType::Token => matches!(modifier, "not" | "text" | "of-type"),
        ParamType::Reference => modifier == "identifier" || fhir_model::is_resource_type(modifier),
        ParamType::Uri => matches!(modifier, "below" | "above"),
        _ => false,
    }
}

/// Parses one value of a parameter of `def`'s type.
pub fn parse_test(def: &Definition, modifier: Option<&str>, value: &str, base: &str) -> Result<Test, FhirError> {
    let name = &def.code;
    if value.is_empty() {
        return Err(bad(format!("{name}: an empty value")));
    }
    Ok(match (def.kind, modifier) {
        (ParamType::Token, Some("text")) => Test::TokenText(normalize(&unescape(value))),
        (ParamType::Token, Some("of-type")) => match split_escaped(value, '|').as_slice() {
            [s, c, v] if !s.is_empty() && !c.is_empty() && !v.is_empty() => {
                Test::OfType { system: s.clone(), code: c.clone(), value: v.clone() }
            }
            _ => return Err(bad(format!("{name}:of-type: '{value}' is not system|code|value"))),
        },
        (ParamType::Token, _) => token_test(value),
        (ParamType::String, Some("exact")) => Test::StringExact(unescape(value)),
        (ParamType::String, Some("contains")) => Test::StringContains(normalize(&unescape(value))),
        (ParamType::String, _) => Test::StringPrefix(normalize(&unescape(value))),
        (ParamType::Reference, Some("identifier")) => match split_escaped(value, '|').as_slice() {
            [v] => Test::RefIdentifier { system: None, value: v.clone() },
            [s, v] if !v.is_empty() => {
                Test::RefIdentifier { system: (!s.is_empty()).then(|| s.clone()), value: v.clone() }
            }
            _ => return Err(bad(format!("{name}:identifier: '{value}' is not [system|]value"))),
        },
        (ParamType::Reference, m) => Test::Reference(reference_target(def, m, &unescape(value), base)?),
        (ParamType::Uri, Some("below")) => Test::UriBelow(unescape(value)),
        (ParamType::Uri, Some("above")) => Test::UriAbove(unescape(value)),
        (ParamType::Uri, _) => Test::Uri(unescape(value)),
        (ParamType::Date, _) => date_test(name, value)?,
        (ParamType::Number, _) => {
            let (prefix, v) = Prefix::split(value);
            let number = parse_number(v).ok_or_else(|| bad(format!("{name}: '{v}' is not a number")))?;
            Test::Number { prefix, number }
        }
        (ParamType::Quantity, _) => quantity_test(name, value)?,
        (ParamType::Composite, _) => composite_test(def, value, base)?,
        (ParamType::Special, _) => return Err(bad(format!("{name}: special parameters are not supported"))),
    })
}

fn token_test(value: &str) -> Test {
    let parts = split_escaped(value, '|');
    match parts.as_slice() {
        [code] => Test::Token { system: None, code: Some(code.clone()) },
        [s, c] if s.is_empty() => Test::Token { system: Some(None), code: Some(c.clone()) },
        [s, c] if c.is_empty() => Test::Token { system: Some(Some(s.clone())), code: None },
        [s, c] => Test::Token { system: Some(Some(s.clone())), code: Some(c.clone()) },
        // More than one `|`: the system is everything before the last one.
        _ => {
            let code = parts.last().cloned().unwrap_or_default();
            let system = parts[..parts.len() - 1].join("|");
            Test::Token { system: Some(Some(system)), code: Some(code) }
        }
    }
}

fn reference_target(def: &Definition, modifier: Option<&str>, value: &str, base: &str) -> Result<RefTarget, FhirError> {
    let name = &def.code;
    if let Some(ty) = modifier {
        // `subject:Patient=123`
        if value.contains('/') {
            return Err(bad(format!("{name}:{ty}: '{value}' must be an id when the type is given")));
        }
        return Ok(RefTarget::Local { ty: ty.to_string(), id: value.to_string(), version: None });
    }
    if !value.contains('/') && !value.contains(':') {
        return Ok(RefTarget::Id(value.to_string()));
    }
    let (target, ty, version) = split_reference(value, base);
    Ok(match ty {
        Some(ty) if !target.contains(':') => {
            let id = target.rsplit('/').next().unwrap_or_default().to_string();
            RefTarget::Local { ty, id, version }
        }
        _ => match value.split_once('|') {
            Some((u, v)) => RefTarget::Url { url: u.to_string(), version: Some(v.to_string()) },
            None => RefTarget::Url { url: target, version },
        },
    })
}

fn date_test(name: &str, value: &str) -> Result<Test, FhirError> {
    let (prefix, v) = Prefix::split(value);
    let (low, high) =
        date_range(v).ok_or_else(|| bad(format!("{name}: '{v}' is not a FHIR date, dateTime or instant")))?;
    Ok(Test::Date { prefix, low, high })
}

fn quantity_test(name: &str, value: &str) -> Result<Test, FhirError> {
    let parts = split_escaped(value, '|');
    let (prefix, v) = Prefix::split(&parts[0]);
    let number = parse_number(v).ok_or_else(|| bad(format!("{name}: '{v}' is not a number")))?;
    let (system, code) = match parts.len() {
        1 => (None, None),
        3 => ((!parts[1].is_empty()).then(|| parts[1].clone()), (!parts[2].is_empty()).then(|| parts[2].clone())),
        _ => return Err(bad(format!("{name}: '{value}' is not [prefix]number[|system|code]"))),
    };
    Ok(Test::Quantity { prefix, number, system, code })
}

fn composite_test(def: &Definition, value: &str, base: &str) -> Result<Test, FhirError> {
    let parts = split_escaped(value, '$');
    if parts.len() != def.components.len() {
        return Err(bad(format!(
            "{}: '{value}' has {} parts; this composite takes {} separated by $",
            def.code,
            parts.len(),
            def.components.len()
        )));
    }
    let mut tests = Vec::new();
    for (c, part) in def.components.iter().zip(&parts) {
        let component = registry()
            .by_url(&c.definition)
            .ok_or_else(|| bad(format!("{}: component {} is not known", def.code, c.definition)))?;
        tests.push(parse_test(component, None, part, base)?);
    }
    Ok(Test::Composite(tests))
}

/// A canonical UCUM form of a quantity test, when its unit converts (searched as well).
pub fn canonical_quantity(t: &Test) -> Option<Test> {
    let Test::Quantity { prefix, number, system, code } = t else { return None };
    if system.as_deref() != Some(ucum::UCUM) {
        return None;
    }
    let (factor, unit) = ucum::convert(code.as_deref()?)?;
    if factor == 1.0 && code.as_deref() == Some(unit.as_str()) {
        return None;
    }
    let n = Number { value: number.value * factor, low: number.low * factor, high: number.high * factor };
    Some(Test::Quantity { prefix: *prefix, number: n, system: Some(ucum::UCUM.into()), code: Some(unit) })
}

/// Parses `name[:modifier][.chain…]` = `value` on `rt` into a clause; `Ok(None)` when `rt`
/// has no such parameter.
pub fn parse_clause(rt: &str, name: &str, value: &str, base: &str, depth: usize) -> Result<Option<Clause>, FhirError> {
    if depth > MAX_CHAIN {
        return Err(bad(format!("'{name}': chains and _has may nest at most {MAX_CHAIN} deep")));
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        return has_clause(rt, rest, value, base, depth).map(Some);
    }
    if name == "_list" || name.starts_with("_list:") {
        return list_clause(name, value).map(Some);
    }
    // `subject:Patient.name` / `subject.name`: the first `.` ends the parameter.
    let (head, chained) = match name.split_once('.') {
        Some((h, c)) => (h, Some(c)),
        None => (name, None),
    };
    let (code, modifier) = match head.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (head, None),
    };
    let Some(def) = registry().get(rt, code) else { return Ok(None) };
    if let Some(chained) = chained {
        if def.kind != ParamType::Reference {
            return Err(bad(format!("{code}: only reference parameters can be chained")));
        }
        let types: Vec<String> = match modifier {
            Some(t) if fhir_model::is_resource_type(t) => vec![t.to_string()],
            Some(m) => return Err(bad(format!("{code}: modifier :{m} cannot be chained"))),
            None => def.targets.clone(),
        };
        // The chained parameter must exist on at least one of the types.
        let mut inner = None;
        for t in &types {
            if let Some(c) = parse_clause(t, chained, value, base, depth + 1)? {
                inner = Some(c);
                break;
            }
        }
        let inner = inner
            .ok_or_else(|| bad(format!("{name}: '{chained}' is not a search parameter of {}", types.join(" or "))))?;
        let types: Vec<String> = types.into_iter().filter(|t| chain_applies(t, chained)).collect();
        return Ok(Some(Clause::Chain { def: def.clone(), chain: Chain { types, inner: Box::new(inner) } }));
    }
    let values = split_escaped(value, ',');
    if values.len() > MAX_VALUES {
        return Err(bad(format!("{code}: at most {MAX_VALUES} values may be ORed")));
    }
    if code == "_id" {
        if let Some(bad_id) = values.iter().find(|v| !crate::model::validate::is_valid_id(v)) {
            return Err(bad(format!("_id: '{bad_id}' is not a valid id")));
        }
        return Ok(Some(Clause::Ids(values)));
    }
    match modifier {
        Some("missing") => {
            let missing = match value {
                "true" => true,
                "false" => false,
                other => return Err(bad(format!("{code}:missing: '{other}' is not true or false"))),
            };
            return Ok(Some(Clause::Missing { def: def.clone(), missing }));
        }
        Some(m) if !modifier_allowed(def.kind, m) => {
            return Err(bad(format!("{code}: modifier :{m} is not supported on {} parameters", def.kind.as_str())))
        }
        _ => {}
    }
    if let (Some(ty), ParamType::Reference) = (modifier, def.kind) {
        if ty != "identifier" && !def.targets.is_empty() && !def.targets.iter().any(|t| t == ty) {
            return Err(bad(format!("{code}: {ty} is not a type this reference may point to")));
        }
    }
    let mut any = Vec::new();
    for v in &values {
        let test = parse_test(def, modifier.filter(|m| *m != "not"), v, base)?;
        if let Some(c) = canonical_quantity(&test) {
            any.push(c);
        }
        any.push(test);
    }
    if code == "_lastUpdated" {
        return Ok(Some(Clause::LastUpdated(any)));
    }
    Ok(Some(Clause::Param { def: def.clone(), not: modifier == Some("not"), any }))
}

/// `_list=ID[,ID…]` (FHIR search §3.1.1.5.7): the resources that are entries of these
/// Lists. Functional lists (`$current-problems`, …) name a patient's lists that this server
/// does not keep: refused by name rather than answered empty.
fn list_clause(name: &str, value: &str) -> Result<Clause, FhirError> {
    if name != "_list" {
        return Err(bad(format!("{name}: _list takes no modifier")));
    }
    let ids = split_escaped(value, ',');
    if ids.len() > MAX_VALUES {
        return Err(bad(format!("_list: at most {MAX_VALUES} values may be ORed")));
    }
    if let Some(f) = ids.iter().find(|v| v.starts_with('$')) {
        return Err(bad(format!("_list: functional lists such as '{f}' are not supported; give a List id")));
    }
    if let Some(bad_id) = ids.iter().find(|v| !crate::model::validate::is_valid_id(v)) {
        return Err(bad(format!("_list: '{bad_id}' is not a valid List id")));
    }
    Ok(Clause::List(ids))
}

fn chain_applies(ty: &str, chained: &str) -> bool {
    let code = chained.split(['.', ':']).next().unwrap_or(chained);
    code.starts_with("_has") || registry().get(ty, code).is_some()
}

/// `_has:Observation:patient:code=…` (after `_has:`).
fn has_clause(rt: &str, rest: &str, value: &str, base: &str, depth: usize) -> Result<Clause, FhirError> {
    let mut parts = rest.splitn(3, ':');
    let (Some(source), Some(reference), Some(param)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(format!("_has:{rest}: expected _has:Type:reference:parameter")));
    };
    if !fhir_model::is_resource_type(source) {
        return Err(bad(format!("_has: '{source}' is not a resource type")));
    }
    let def = registry()
        .get(source, reference)
        .filter(|d| d.kind == ParamType::Reference)
        .ok_or_else(|| bad(format!("_has: '{reference}' is not a reference parameter of {source}")))?;
    if !def.targets.is_empty() && !def.targets.iter().any(|t| t == rt) {
        return Err(bad(format!("_has: {source}.{reference} does not point to {rt}")));
    }
    let inner = parse_clause(source, param, value, base, depth + 1)?
        .ok_or_else(|| bad(format!("_has: '{param}' is not a search parameter of {source}")))?;
    Ok(Clause::Has(Has { source_type: source.to_string(), reference: def.clone(), inner: Box::new(inner) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clause(rt: &str, name: &str, value: &str) -> Clause {
        parse_clause(rt, name, value, "http://h/fhir", 0).unwrap().unwrap()
    }

    #[test]
    fn tokens_strings_and_references() {
        let Clause::Param { any, not, .. } = clause("Observation", "code", "http://loinc.org|1-8,|x,s|,y") else {
            panic!()
        };
        assert!(!not);
        assert_eq!(any[0], Test::Token { system: Some(Some("http://loinc.org".into())), code: Some("1-8".into()) });
        assert_eq!(any[1], Test::Token { system: Some(None), code: Some("x".into()) });
        assert_eq!(any[2], Test::Token { system: Some(Some("s".into())), code: None });
        assert_eq!(any[3], Test::Token { system: None, code: Some("y".into()) });
        let Clause::Param { not, .. } = clause("Observation", "status:not", "final") else { panic!() };
        assert!(not);
        let Clause::Param { any, .. } = clause("Patient", "family", "Zoë") else { panic!() };
        assert_eq!(any, vec![Test::StringPrefix("zoe".into())]);
        let Clause::Param { any, .. } = clause("Observation", "subject", "http://h/fhir/Patient/1") else { panic!() };
        assert_eq!(
            any,
            vec![Test::Reference(RefTarget::Local { ty: "Patient".into(), id: "1".into(), version: None })]
        );
        let Clause::Param { any, .. } = clause("Observation", "subject:Patient", "1") else { panic!() };
        assert_eq!(
            any,
            vec![Test::Reference(RefTarget::Local { ty: "Patient".into(), id: "1".into(), version: None })]
        );
        let Clause::Param { any, .. } = clause("Observation", "code", "a\\,b") else { panic!() };
        assert_eq!(any, vec![Test::Token { system: None, code: Some("a,b".into()) }]);
    }

    #[test]
    fn prefixes_dates_quantities_composites() {
        let Clause::Param { any, .. } = clause("Observation", "date", "ge2020-01") else { panic!() };
        assert!(matches!(any[0], Test::Date { prefix: Prefix::Ge, .. }));
        let Clause::Param { any, .. } =
            clause("Observation", "value-quantity", "lt5.4|http://unitsofmeasure.org|mg/dL")
        else {
            panic!()
        };
        assert_eq!(any.len(), 2, "the canonical form is searched too");
        let Clause::Param { any, .. } = clause("Observation", "code-value-quantity", "http://loinc.org|8480-6$gt100")
        else {
            panic!()
        };
        let Test::Composite(parts) = &any[0] else { panic!() };
        assert!(matches!(parts[1], Test::Quantity { prefix: Prefix::Gt, .. }));
    }

    #[test]
    fn chains_and_has() {
        let Clause::Chain { chain, .. } = clause("Observation", "subject:Patient.name", "peter") else { panic!() };
        assert_eq!(chain.types, vec!["Patient".to_string()]);
        let Clause::Chain { chain, .. } = clause("Observation", "encounter.subject.family", "x") else { panic!() };
        assert!(matches!(*chain.inner, Clause::Chain { .. }));
        let Clause::Has(h) = clause("Patient", "_has:Observation:patient:code", "1234-5") else { panic!() };
        assert_eq!(h.source_type, "Observation");
        assert!(parse_clause("Patient", "nope", "x", "", 0).unwrap().is_none());
    }

    #[test]
    fn bad_input_is_a_precise_400() {
        for (rt, name, value) in [
            ("Observation", "date", "yesterday"),
            ("Observation", "value-quantity", "abc"),
            ("Patient", "family:below", "x"),
            ("Observation", "code:contains", "x"),
            ("Observation", "code-value-quantity", "onlyone"),
            ("Observation", "subject:Practitioner", "1"),
            ("Patient", "_has:Observation:nope:code", "x"),
            ("Patient", "family.name", "x"),
            ("Patient", "gender:missing", "maybe"),
        ] {
            let e = parse_clause(rt, name, value, "", 0).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{name}={value}");
        }
    }
}
