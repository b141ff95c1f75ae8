//! Validation of an incoming resource, in two layers:
//!
//! 1. structure, via the `fhir-model` facade (fhirbolt, strict R4: unknown elements, wrong
//!    JSON types, missing required elements);
//! 2. what fhirbolt does not check: R4 primitive formats, JSON numbers and booleans and the
//!    ranges of the integer types (`json_primitives`), and the required code bindings of
//!    elements this server interprets.
//!
//! Layer 2 works on JSON by element name, which FHIR's JSON rules make reliable for choice
//! types (`effectiveDateTime` *is* a dateTime) and for the fixed names checked below.

use serde_json::{Map, Value};

use super::datetime::{parse_date_time, parse_instant, parse_time};

/// Why a resource is not valid R4, and where: what the HTTP edge turns into an
/// OperationOutcome (this module knows no HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub problem: Problem,
    pub diagnostics: String,
    /// The element, as a FHIRPath-like path (`Patient.name[0].given`).
    pub expression: Option<String>,
}

/// The kind of a validation finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Not a resource of the expected type at all (no object, another `resourceType`).
    NotAResource,
    /// Unknown, missing or misshapen elements.
    Structure,
    /// A primitive value that breaks its type's rules.
    Value,
    /// An element repeated past any sensible bound.
    TooLong,
}

impl Invalid {
    pub fn new(problem: Problem, diagnostics: impl Into<String>) -> Invalid {
        Invalid { problem, diagnostics: diagnostics.into(), expression: None }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Invalid {
        self.expression = Some(expression.into());
        self
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.expression {
            Some(at) => write!(f, "{at}: {}", self.diagnostics),
            None => f.write_str(&self.diagnostics),
        }
    }
}

impl std::error::Error for Invalid {}

/// `Resource.id` / `id` datatype: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Validates `resource` as an R4 resource of type `resource_type`.
pub fn validate_resource(resource_type: &str, resource: &Value) -> Result<(), Invalid> {
    let Some(object) = resource.as_object() else {
        return Err(Invalid::new(Problem::NotAResource, "the body must be a JSON object (a FHIR resource)"));
    };
    match object.get("resourceType") {
        Some(Value::String(t)) if t == resource_type => {}
        Some(Value::String(t)) => {
            return Err(Invalid::new(
                Problem::NotAResource,
                format!("resourceType '{t}' does not match the type '{resource_type}' in the URL"),
            )
            .at(format!("{resource_type}.resourceType")))
        }
        _ => {
            return Err(Invalid::new(Problem::NotAResource, "the body has no resourceType")
                .at(format!("{resource_type}.resourceType")))
        }
    }
    // Cheap, linear checks first, each stopping at its first finding, so a huge invalid body
    // is refused before fhirbolt reads all of it (seconds for a million elements).
    if let Some(path) = oversized_array(resource, resource_type) {
        return Err(Invalid::new(
            Problem::TooLong,
            format!("this element repeats more than {MAX_REPEATS} times; no R4 resource needs that many"),
        )
        .at(path));
    }
    let mut checker = Checker { error: None };
    checker.resource(resource_type, object, resource_type);
    if let Some((path, msg)) = checker.error {
        return Err(Invalid::new(Problem::Value, msg).at(path));
    }
    // Before fhirbolt, which would wrap an out-of-range integer, take a string for a number,
    // or refuse without naming the element.
    if let Some((path, msg)) = super::json_primitives::out_of_range(resource_type, object) {
        return Err(Invalid::new(Problem::Value, msg).at(path));
    }
    let typed = fhir_model::parse(resource).map_err(|message| structural_error(resource_type, resource, &message))?;
    if let Some(path) = object_where_array_expected(resource, &typed, resource_type) {
        return Err(Invalid::new(Problem::Structure, "this element repeats in R4 and must be a JSON array").at(path));
    }
    Ok(())
}

/// Puts a single value where R4 has a repeating element into an array, as the R4 model
/// says (FHIRPath Patch values carry no cardinality). Leaves an invalid resource as it is:
/// validation words its errors.
pub fn repeat_as_arrays(resource: &mut Value) {
    if let Ok(typed) = fhir_model::parse(resource) {
        wrap_singletons(resource, &typed);
    }
}

fn wrap_singletons(input: &mut Value, typed: &Value) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i.iter_mut() {
                if let Some(tv) = t.get(k) {
                    wrap_singletons(v, tv);
                }
            }
        }
        (Value::Array(i), Value::Array(t)) => i.iter_mut().zip(t).for_each(|(iv, tv)| wrap_singletons(iv, tv)),
        (other, Value::Array(t)) => {
            let mut single = other.take();
            if let Some(tv) = t.first() {
                wrap_singletons(&mut single, tv);
            }
            *other = Value::Array(vec![single]);
        }
        _ => {}
    }
}

/// fhirbolt accepts a single object where R4 has a repeating element; its own output then
/// has an array there. Returns the path of the first such element.
fn object_where_array_expected(input: &Value, typed: &Value, path: &str) -> Option<String> {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => i
            .iter()
            .find_map(|(k, v)| t.get(k).and_then(|tv| object_where_array_expected(v, tv, &format!("{path}.{k}")))),
        (Value::Array(i), Value::Array(t)) => i
            .iter()
            .zip(t)
            .enumerate()
            .find_map(|(n, (iv, tv))| object_where_array_expected(iv, tv, &format!("{path}[{n}]"))),
        (other, Value::Array(_)) if !other.is_array() => Some(path.to_string()),
        _ => None,
    }
}

/// Turns a fhirbolt message (which has no location) into an error naming the element.
fn structural_error(resource_type: &str, resource: &Value, message: &str) -> Invalid {
    let unknown = between(message, "unknown field `", "`");
    let sent = unknown.and_then(|field| find_key(resource, field, resource_type));
    let (diagnostics, path) = if let (Some(field), Some(path)) = (unknown, &sent) {
        (format!("unknown element '{field}'"), Some(path.clone()))
    } else if let Some(field) = unknown {
        // fhirbolt reads a primitive where R4 has an element with children as `{value: …}`
        // and then finds no element `value`: the client sent no such key, so say what it did.
        let steps = locate_by_pruning(resource, message);
        let found = steps.as_ref().and_then(|s| get(resource, s)).filter(|v| !v.is_object() && !v.is_array());
        match (found, steps) {
            (Some(v), Some(steps)) => (
                format!("{v} is a primitive where R4 has an element with children (a JSON object)"),
                Some(render_path(resource_type, &steps)),
            ),
            _ => (format!("unknown element '{field}'"), None),
        }
    } else {
        let path = locate_by_pruning(resource, message).map(|p| render_path(resource_type, &p));
        let diagnostics = match between(message, "missing field `", "`") {
            Some(field) => format!("missing required element '{field}'"),
            None => message.to_string(),
        };
        (diagnostics, path)
    };
    let err = Invalid::new(Problem::Structure, diagnostics);
    err.at(path.unwrap_or_else(|| resource_type.to_string()))
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// Path of the first (depth-first) occurrence of key `key`.
fn find_key(v: &Value, key: &str, path: &str) -> Option<String> {
    match v {
        Value::Object(map) => map.iter().find_map(|(k, child)| {
            let here = format!("{path}.{k}");
            if k == key {
                Some(here)
            } else {
                find_key(child, key, &here)
            }
        }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, c)| find_key(c, key, &format!("{path}[{i}]"))),
        _ => None,
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn render_path(resource_type: &str, steps: &[Step]) -> String {
    let mut out = resource_type.to_string();
    for s in steps {
        match s {
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Locates the element a parse error is about by removing subtrees: the child whose
/// removal changes the error contains the problem. Bounded (small documents, few parses)
/// because this only runs on invalid input.
fn locate_by_pruning(resource: &Value, message: &str) -> Option<Vec<Step>> {
    const MAX_PARSES: usize = 200;
    if resource.to_string().len() > 256 * 1024 {
        return None;
    }
    let mut budget = MAX_PARSES;
    let mut steps: Vec<Step> = Vec::new();
    'descend: loop {
        let node = get(resource, &steps)?;
        let children: Vec<Step> = match node {
            Value::Object(map) => map.keys().filter(|k| *k != "resourceType").map(|k| Step::Key(k.clone())).collect(),
            Value::Array(items) => (0..items.len()).map(Step::Index).collect(),
            _ => return Some(steps),
        };
        for child in children {
            if budget == 0 {
                return Some(steps);
            }
            budget -= 1;
            let mut pruned = resource.clone();
            remove(&mut pruned, &steps, &child);
            if fhir_model::parse(&pruned).err().as_deref() != Some(message) {
                steps.push(child);
                continue 'descend;
            }
        }
        return Some(steps);
    }
}

fn get<'a>(v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(i),
    })
}

fn remove(root: &mut Value, parent: &[Step], child: &Step) {
    let mut v = root;
    for s in parent {
        v = match s {
            Step::Key(k) => &mut v[k.as_str()],
            Step::Index(i) => &mut v[*i],
        };
    }
    match (v, child) {
        (Value::Object(map), Step::Key(k)) => {
            map.shift_remove(k);
        }
        (Value::Array(items), Step::Index(i)) => {
            items.remove(*i);
        }
        _ => {}
    }
}

/// Most items one array of a resource may hold. `Group.member` (streamed into member events,
/// bounded by the body limit) and `Bundle.entry` (bounded by the body limit) are exempt.
pub const MAX_REPEATS: usize = 20_000;

/// The path of the first array longer than [`MAX_REPEATS`], outside the exempt elements.
fn oversized_array(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let exempt = matches!((path, k.as_str()), ("Group", "member") | ("Bundle", "entry"));
            match v {
                Value::Array(items) if items.len() > MAX_REPEATS && !exempt => Some(format!("{path}.{k}")),
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .filter(|(_, item)| item.is_object())
                    .find_map(|(i, item)| oversized_array(item, &format!("{path}.{k}[{i}]"))),
                Value::Object(_) => oversized_array(v, &format!("{path}.{k}")),
                _ => None,
            }
        }),
        _ => None,
    }
}

/// Layer 2; stops at the first finding.
struct Checker {
    error: Option<(String, String)>,
}

/// Required bindings of coded elements this server reads (resource type, element, codes).
const REQUIRED_CODES: &[(&str, &str, &[&str])] = &[
    ("Group", "type", &["person", "animal", "practitioner", "device", "medication", "substance"]),
    ("Patient", "gender", &["male", "female", "other", "unknown"]),
];

impl Checker {
    fn fail(&mut self, path: &str, msg: String) {
        self.error.get_or_insert_with(|| (path.to_string(), msg));
    }

    fn resource(&mut self, resource_type: &str, obj: &Map<String, Value>, path: &str) {
        if let Some(id) = obj.get("id") {
            match id.as_str() {
                Some(s) if is_valid_id(s) => {}
                _ => self.fail(&format!("{path}.id"), format!("{id} is not a valid id ([A-Za-z0-9-.]{{1,64}})")),
            }
        }
        if let Some(Value::Object(meta)) = obj.get("meta") {
            let mpath = format!("{path}.meta");
            if let Some(v) = meta.get("versionId") {
                if !v.as_str().is_some_and(is_valid_id) {
                    self.fail(&format!("{mpath}.versionId"), format!("{v} is not a valid id"));
                }
            }
            if let Some(v) = meta.get("lastUpdated") {
                if v.as_str().is_none_or(|s| parse_instant(s).is_none()) {
                    self.fail(&format!("{mpath}.lastUpdated"), format!("{v} is not a valid instant"));
                }
            }
        }
        for (rt, element, codes) in REQUIRED_CODES {
            if *rt == resource_type {
                if let Some(v) = obj.get(*element) {
                    if !v.as_str().is_some_and(|s| codes.contains(&s)) {
                        self.fail(
                            &format!("{path}.{element}"),
                            format!("{v} is not one of the required codes {}", codes.join(", ")),
                        );
                    }
                }
            }
        }
        self.walk_object(obj, path, true);
    }

    fn walk_object(&mut self, obj: &Map<String, Value>, path: &str, resource_level: bool) {
        for (key, value) in obj {
            if self.error.is_some() {
                return;
            }
            if resource_level && (key == "resourceType" || key == "id") {
                continue;
            }
            let child = format!("{path}.{key}");
            // Contained and nested resources (Bundle.entry.resource, Parameters...).
            if let Value::Object(inner) = value {
                if let Some(Value::String(rt)) = inner.get("resourceType") {
                    if fhir_model::is_resource_type(rt) {
                        self.resource(rt, inner, &child);
                        continue;
                    }
                }
            }
            self.primitive(key, value, &child);
            match value {
                Value::Object(inner) => self.walk_object(inner, &child, false),
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if self.error.is_some() {
                            return;
                        }
                        let ipath = format!("{child}[{i}]");
                        match item {
                            Value::Object(inner) => match inner.get("resourceType").and_then(Value::as_str) {
                                Some(rt) if fhir_model::is_resource_type(rt) => self.resource(rt, inner, &ipath),
                                _ => self.walk_object(inner, &ipath, false),
                            },
                            other => self.primitive(key, other, &ipath),
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Checks a primitive by what its element name says its type is.
    fn primitive(&mut self, key: &str, value: &Value, path: &str) {
        let Value::String(s) = value else {
            if let Value::Object(period) = value {
                if key == "period" || key.ends_with("Period") {
                    for bound in ["start", "end"] {
                        if let Some(Value::String(b)) = period.get(bound) {
                            if parse_date_time(b).is_none() {
                                self.fail(&format!("{path}.{bound}"), format!("'{b}' is not a valid dateTime"));
                            }
                        }
                    }
                }
            }
            return;
        };
        let kind = if key.ends_with("DateTime") || key == "lastUpdated" {
            Some(("dateTime", parse_date_time(s).is_some()))
        } else if key.ends_with("Instant") {
            Some(("instant", parse_instant(s).is_some()))
        } else if key.ends_with("Date") {
            // Some `*Date` elements are dateTime (Medication.batch.expirationDate), and every
            // date is a valid dateTime, so accept either.
            Some(("date or dateTime", parse_date_time(s).is_some()))
        } else if key.ends_with("Time")
            && key.len() > 4
            && key.as_bytes()[key.len() - 5].is_ascii_lowercase()
            && key.starts_with("value")
        {
            Some(("time", parse_time(s).is_some()))
        } else if key == "url"
            || key == "system"
            || key.ends_with("Uri")
            || key.ends_with("Url")
            || key.ends_with("Canonical")
        {
            Some(("uri", !s.is_empty() && !s.chars().any(char::is_whitespace)))
        } else if key.ends_with("Code") && key.starts_with("value") {
            Some(("code", is_code(s)))
        } else {
            None
        };
        if let Some((type_name, false)) = kind {
            self.fail(path, format!("'{s}' is not a valid {type_name}"));
        }
    }
}

/// FHIR `code`: `[^\s]+(\s[^\s]+)*`.
fn is_code(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(char::is_whitespace)
        && !s.ends_with(char::is_whitespace)
        && !s.contains("  ")
        && !s.chars().any(|c| c.is_whitespace() && c != ' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(rt: &str, v: Value) -> Result<(), (String, String)> {
        let mut c = Checker { error: None };
        c.resource(rt, v.as_object().unwrap(), rt);
        c.error.map_or(Ok(()), Err)
    }

    #[test]
    fn a_primitive_where_an_element_with_children_belongs_is_named() {
        for (body, path) in [
            (json!({"resourceType":"Patient","name":"x"}), "Patient.name"),
            (json!({"resourceType":"Patient","name":[{"family":"f"}, 7]}), "Patient.name[1]"),
        ] {
            let e = validate_resource("Patient", &body).unwrap_err();
            assert_eq!(e.expression.as_deref(), Some(path), "{body}");
            assert!(
                e.diagnostics.contains("is a primitive where R4 has an element with children"),
                "{}",
                e.diagnostics
            );
        }
    }

    #[test]
    fn arrays_past_the_cap_are_refused_before_anything_else() {
        let many: Vec<Value> = (0..=MAX_REPEATS).map(|i| json!(i)).collect();
        let patient = json!({"resourceType":"Patient","name":[{"given": many.clone()}]});
        let e = validate_resource("Patient", &patient).unwrap_err();
        assert_eq!(e.problem, Problem::TooLong);
        assert_eq!(e.expression.as_deref(), Some("Patient.name[0].given"));
        let members: Vec<Value> = many.iter().map(|_| json!({"entity":{"reference":"Patient/1"}})).collect();
        let group = json!({"resourceType":"Group","type":"person","actual":true,"member": members});
        assert!(oversized_array(&group, "Group").is_none(), "Group.member is bounded elsewhere");
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-1.2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn group_type_must_be_a_known_code() {
        let err = check("Group", json!({"resourceType":"Group","type":"banana","actual":true})).unwrap_err();
        assert_eq!(err.0, "Group.type");
        assert!(check("Group", json!({"resourceType":"Group","type":"person","actual":true})).is_ok());
    }

    #[test]
    fn primitive_formats_are_checked_with_paths() {
        let err = check("Patient", json!({"resourceType":"Patient","meta":{"lastUpdated":"yesterday"}})).unwrap_err();
        assert_eq!(err.0, "Patient.meta.lastUpdated");
        let err =
            check("Observation", json!({"resourceType":"Observation","effectiveDateTime":"2023-02-30"})).unwrap_err();
        assert_eq!(err.0, "Observation.effectiveDateTime");
        let err = check("Patient", json!({"resourceType":"Patient","birthDate":"1990-1-1"})).unwrap_err();
        assert_eq!(err.0, "Patient.birthDate");
        let err = check("Group", json!({"resourceType":"Group","member":[{"period":{"start":"soon"}}]})).unwrap_err();
        assert_eq!(err.0, "Group.member[0].period.start");
        let err = check(
            "Bundle",
            json!({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","gender":"x"}}]}),
        )
        .unwrap_err();
        assert_eq!(err.0, "Bundle.entry[0].resource.gender");
    }

    #[test]
    fn singletons_become_arrays_where_r4_repeats() {
        let mut v = json!({"resourceType":"Patient","name":{"given":"A","family":"B"},"gender":"male"});
        repeat_as_arrays(&mut v);
        assert_eq!(v, json!({"resourceType":"Patient","name":[{"given":["A"],"family":"B"}],"gender":"male"}));
    }

    #[test]
    fn codes() {
        assert!(is_code("a b"));
        assert!(!is_code(" a"));
        assert!(!is_code("a  b"));
        assert!(!is_code(""));
    }

    mod properties {
        //! Whatever a client sends, reading and validating it never panics: arbitrary bytes
        //! as JSON, XML and a Group body, and JSON objects built from real R4 element names
        //! with values of any type (what reaches fhirbolt and the checks around it).
        //! `PROPTEST_CASES=1000000 cargo test --release --lib properties` (`make fuzz`).
        use super::super::*;
        use crate::fhir::format::{decode, Format};
        use proptest::prelude::*;

        const NAMES: &[&str] = &[
            "resourceType",
            "id",
            "meta",
            "versionId",
            "lastUpdated",
            "name",
            "family",
            "given",
            "gender",
            "birthDate",
            "deceasedDateTime",
            "active",
            "valueInteger",
            "valueQuantity",
            "value",
            "code",
            "coding",
            "system",
            "status",
            "member",
            "entity",
            "reference",
            "period",
            "start",
            "end",
            "inactive",
            "quantity",
            "contained",
            "extension",
            "url",
            "valueBoolean",
            "valuePositiveInt",
            "diagnosis",
            "rank",
            "text",
            "div",
            "_family",
            "type",
            "actual",
            "characteristic",
            "exclude",
            "multipleBirthInteger",
        ];
        const TYPES: &[&str] = &["Patient", "Group", "Observation", "Encounter", "Bundle", "Nope"];
        const XML: &[&str] = &[
            "<Patient xmlns=\"http://hl7.org/fhir\">",
            "</Patient>",
            "<Group xmlns=\"http://hl7.org/fhir\">",
            "</Group>",
            "<name>",
            "</name>",
            "<family value=\"a\"/>",
            "<given value=\"\"/>",
            "<valueInteger value=\"2147483648\"/>",
            "<active value=\"yes\"/>",
            "<text>",
            "</text>",
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">",
            "</div>",
            "<member>",
            "</member>",
            "<entity>",
            "</entity>",
            "<reference value=\"Patient/1\"/>",
            "<contained>",
            "</contained>",
            "&amp;",
            "&bogus;",
            "<![CDATA[x]]>",
            "<!-- c -->",
            "<?xml version=\"1.0\"?>",
            "<extension url=\"u\">",
            "</extension>",
            "<period><start value=\"9999-12-31T23:59:59-01:00\"/></period>",
            "x",
            " ",
            ">",
            "<",
            "\"",
        ];

        fn element() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
                prop_oneof![
                    Just("2024-01-01".to_string()),
                    Just("9999-12-31T23:59:59-01:00".to_string()),
                    Just("Patient/1".to_string()),
                    "\\PC{0,8}"
                ]
                .prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 5, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::vec((proptest::sample::select(NAMES), inner), 0..5)
                        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
                ]
            })
        }

        fn resource() -> impl Strategy<Value = (String, Value)> {
            (
                proptest::sample::select(TYPES),
                proptest::collection::vec((proptest::sample::select(NAMES), element()), 0..6),
            )
                .prop_map(|(rt, kv)| {
                    let mut map: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    map.insert("resourceType".into(), Value::from(rt));
                    (rt.to_string(), Value::Object(map))
                })
        }

        proptest! {
            #[test]
            fn resources_of_real_element_names_never_panic((rt, body) in resource()) {
                let _ = validate_resource(&rt, &body);
                let mut dropped = body.clone();
                crate::model::lenient::drop_empty(&mut dropped, &rt);
                let _ = validate_resource(&rt, &dropped);
                if rt == "Group" {
                    let _ = crate::group::body::parse(body.to_string().as_bytes(), false);
                    let _ = crate::group::body::parse(body.to_string().as_bytes(), true);
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = decode(Format::Json, &bytes);
                let _ = decode(Format::Xml, &bytes);
                let _ = crate::group::body::parse(&bytes, true);
            }

            #[test]
            fn xml_shaped_text_never_panics(tokens in proptest::collection::vec(proptest::sample::select(XML), 0..24)) {
                let text = tokens.concat();
                if let Ok(value) = decode(Format::Xml, text.as_bytes()) {
                    if let Some(rt) = value.get("resourceType").and_then(Value::as_str) {
                        let _ = validate_resource(rt, &value);
                    }
                }
            }

            #[test]
            fn json_shaped_text_never_panics(text in "[\\[\\]{}:,\"a-z0-9 .eE+-]{0,80}") {
                let _ = decode(Format::Json, text.as_bytes());
                let _ = crate::group::body::parse(text.as_bytes(), false);
            }
        }
    }
}
