//! Reading a POST/PUT Group body without building its member array in memory.
//!
//! A million-member body parsed into `serde_json::Value` takes about 100× its size (and
//! validation would copy it several times more). Here the body is parsed once, by a
//! visitor: the Group's other elements become a small `Value`; each member is parsed
//! alone, checked (identity, duplicates, R4 structure in batches), and kept only as its
//! compact JSON text with the few fields the events need.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

use axum::http::StatusCode;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

use crate::error::{FhirError, IssueCode};
use crate::model::lenient;
use crate::model::validate::validate_resource;

/// Members validated per fhirbolt parse.
const VALIDATE_BATCH: usize = 1000;

/// True for a member made only of the common elements, each well-formed:
/// `entity` {`reference`, `type` (a resource type), `display`}, `period` {`start`, `end`
/// as dateTimes}, `inactive` (boolean). Such a member is valid R4 without asking
/// fhirbolt, which costs far more than the rest of a big PATCH; anything else (extensions,
/// identifiers, a malformed value) goes to the full validator, which also words the error.
pub fn is_plain_member(member: &Value) -> bool {
    let text = |v: &Value| v.as_str().is_some_and(|s| !s.trim().is_empty());
    let Some(m) = member.as_object() else { return false };
    let entity_ok = m.get("entity").and_then(Value::as_object).is_some_and(|e| {
        e.contains_key("reference")
            && e.iter().all(|(k, v)| match k.as_str() {
                "reference" | "display" => text(v),
                "type" => v.as_str().is_some_and(fhir_model::is_resource_type),
                _ => false,
            })
    });
    entity_ok
        && m.iter().all(|(k, v)| match k.as_str() {
            "entity" => true,
            "inactive" => v.is_boolean(),
            "period" => v.as_object().is_some_and(|p| {
                p.iter().all(|(k, v)| {
                    matches!(k.as_str(), "start" | "end")
                        && v.as_str().and_then(crate::model::datetime::parse_date_time).is_some()
                })
            }),
            _ => false,
        })
}

/// One `Group.member` element, compact: its identity and its JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactMember {
    pub reference: String,
    /// The element's JSON text (empty for a removed member).
    pub json: String,
}

/// The fields of a member that events carry in columns of their own.
pub struct MemberFields {
    pub member_type: String,
    pub period_start: String,
    pub period_end: String,
    pub inactive: bool,
}

impl MemberFields {
    /// The column fields of a member element (`Value::Null` for a removed member).
    pub fn of(reference: &str, value: &Value) -> MemberFields {
        let text = |p: &str| value.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        let member_type = match value.pointer("/entity/type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => {
                let parts: Vec<&str> = reference.rsplitn(3, '/').collect();
                match parts.as_slice() {
                    [_, t, ..] if fhir_model::is_resource_type(t) => t.to_string(),
                    _ => String::new(),
                }
            }
        };
        MemberFields {
            member_type,
            period_start: text("/period/start"),
            period_end: text("/period/end"),
            inactive: value.pointer("/inactive").and_then(Value::as_bool).unwrap_or(false),
        }
    }
}

impl CompactMember {
    /// `None` when the member has no `entity.reference` (its identity here).
    pub fn from_value(member: &Value) -> Option<CompactMember> {
        let reference = super::plan::member_reference(member)?.to_string();
        Some(CompactMember { reference, json: member.to_string() })
    }

    /// A removed member: the reference alone.
    pub fn gone(reference: &str) -> CompactMember {
        CompactMember { reference: reference.to_string(), json: String::new() }
    }

    /// Reads the column fields back from the JSON (done chunk by chunk, when events are
    /// built, so they are not held for every member of a big body).
    pub fn fields(&self) -> MemberFields {
        let value = if self.json.is_empty() { Value::Null } else { self.value() };
        MemberFields::of(&self.reference, &value)
    }

    pub fn value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }
}

/// A Group body split into its other elements and its members (`None`: no `member`).
pub struct GroupBody {
    pub rest: Value,
    pub members: Option<Vec<CompactMember>>,
}

/// Parses and checks a Group body. Errors are 400s naming the element.
///
/// `null`, empty arrays and empty objects are dropped (a `member` that is `null` or `[]`
/// is no member at all), unless `strict` (`Prefer: handling=strict`) refuses them: see
/// `model::lenient`.
pub fn parse(bytes: &[u8], strict: bool) -> Result<GroupBody, FhirError> {
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result = BodySeed { failure: &failure, strict }.deserialize(&mut de).and_then(|body| de.end().map(|_| body));
    match (result, failure.into_inner()) {
        (_, Some(e)) => Err(e),
        (Ok(body), None) => Ok(body),
        (Err(e), None) if e.is_data() => {
            Err(FhirError::new(StatusCode::BAD_REQUEST, IssueCode::Structure, format!("the body is not a Group: {e}")))
        }
        (Err(e), None) => Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            IssueCode::Structure,
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

struct BodySeed<'a> {
    failure: &'a RefCell<Option<FhirError>>,
    strict: bool,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = GroupBody;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<GroupBody, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = GroupBody;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Group resource (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GroupBody, A::Error> {
        let mut rest = Map::new();
        let mut members = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "member" {
                let seed = MembersSeed { failure: self.failure, strict: self.strict };
                members = map.next_value_seed(OptionalMembers(seed))?.filter(|m: &Vec<_>| !m.is_empty());
                if members.is_none() && self.strict {
                    *self.failure.borrow_mut() = Some(lenient::refusal("Group.member".into()).into());
                    return Err(serde::de::Error::custom("invalid member"));
                }
            } else {
                let value: Value = map.next_value()?;
                rest.insert(key, value);
            }
        }
        let mut rest = Value::Object(rest);
        if let Some(path) = lenient::drop_empty(&mut rest, "Group") {
            if self.strict {
                *self.failure.borrow_mut() = Some(lenient::refusal(path).into());
                return Err(serde::de::Error::custom("empty element"));
            }
        }
        Ok(GroupBody { rest, members })
    }
}

struct MembersSeed<'a> {
    failure: &'a RefCell<Option<FhirError>>,
    strict: bool,
}

/// `member` may be `null` (no members).
struct OptionalMembers<'a>(MembersSeed<'a>);

impl<'de> DeserializeSeed<'de> for OptionalMembers<'_> {
    type Value = Option<Vec<CompactMember>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalMembers<'_> {
    type Value = Option<Vec<CompactMember>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Group.member as a JSON array")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

impl<'de> DeserializeSeed<'de> for MembersSeed<'_> {
    type Value = Vec<CompactMember>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<CompactMember>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MembersSeed<'_> {
    type Value = Vec<CompactMember>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Group.member as a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<CompactMember>, A::Error> {
        let fail = |e: FhirError| {
            *self.failure.borrow_mut() = Some(e);
            serde::de::Error::custom("invalid member")
        };
        let mut out: Vec<CompactMember> = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        // Duplicate check by 64-bit hash (16 bytes a member, not a copy of every
        // reference); a hash hit is confirmed against the stored reference.
        let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut batch: Vec<(usize, Value)> = Vec::with_capacity(VALIDATE_BATCH);
        let mut index = 0usize;
        while let Some(mut member) = seq.next_element::<Value>()? {
            if let Some(path) = lenient::drop_empty(&mut member, format_args!("Group.member[{index}]")) {
                if self.strict {
                    return Err(fail(lenient::refusal(path).into()));
                }
            }
            let compact = CompactMember::from_value(&member).ok_or_else(|| {
                fail(
                    FhirError::new(
                        StatusCode::BAD_REQUEST,
                        IssueCode::Required,
                        "a member needs entity.reference (this server identifies members by reference)",
                    )
                    .at(format!("Group.member[{index}].entity.reference")),
                )
            })?;
            let slot = seen.entry(hash(&compact.reference)).or_default();
            if slot.iter().any(|&i| out[i].reference == compact.reference) {
                return Err(fail(
                    FhirError::bad_request(format!(
                        "{} is listed twice; this server keeps one member entry per entity",
                        compact.reference
                    ))
                    .at(format!("Group.member[{index}]")),
                ));
            }
            slot.push(out.len());
            out.push(compact);
            if !is_plain_member(&member) {
                batch.push((index, member));
            }
            index += 1;
            if batch.len() == VALIDATE_BATCH {
                validate_batch(&mut batch).map_err(fail)?;
            }
        }
        validate_batch(&mut batch).map_err(fail)?;
        Ok(out)
    }
}

fn hash(s: &str) -> u64 {
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(s)
}

/// The smallest valid Group holding `members`: how a member (which is not a resource) is
/// validated, shaped by the R4 model or written as XML.
pub fn group_of(members: Vec<Value>) -> Value {
    json!({ "resourceType": "Group", "type": "person", "actual": true, "member": members })
}

/// Validates members with one fhirbolt parse; errors name the member's index in the body.
fn validate_batch(batch: &mut Vec<(usize, Value)>) -> Result<(), FhirError> {
    if batch.is_empty() {
        return Ok(());
    }
    let (indexes, members): (Vec<usize>, Vec<Value>) = std::mem::take(batch).into_iter().unzip();
    let group = group_of(members);
    validate_resource("Group", &group).map_err(|mut e| {
        if let Some(expr) = e.expression.as_deref() {
            if let Some(rest) = expr.strip_prefix("Group.member[") {
                if let Some((k, tail)) = rest.split_once(']') {
                    if let Some(i) = k.parse::<usize>().ok().and_then(|k| indexes.get(k)) {
                        e.expression = Some(format!("Group.member[{i}]{tail}"));
                    }
                }
            }
        }
        e.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_members_from_the_rest() {
        let body = br#"{"resourceType":"Group","type":"person","actual":true,"member":[
            {"entity":{"reference":"Patient/1"},"period":{"start":"2024-01-01"},"inactive":true},
            {"entity":{"reference":"Patient/2"}}],"name":"x"}"#;
        let parsed = parse(body, false).unwrap();
        assert!(parsed.rest.get("member").is_none());
        assert_eq!(parsed.rest["name"], "x");
        let members = parsed.members.unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].reference, "Patient/1");
        let fields = members[0].fields();
        assert_eq!(fields.period_start, "2024-01-01");
        assert!(fields.inactive);
        assert_eq!(fields.member_type, "Patient");
        assert_eq!(members[1].value(), json!({"entity":{"reference":"Patient/2"}}));
    }

    #[test]
    fn plain_members_are_exactly_those_the_full_validator_accepts_without_help() {
        let plain = [
            json!({"entity":{"reference":"Patient/1"}}),
            json!({"entity":{"reference":"Patient/1","type":"Patient","display":"Ann"},"inactive":true}),
            json!({"entity":{"reference":"urn:uuid:1"},"period":{"start":"2024","end":"2024-05-06T07:08:09+02:00"}}),
            json!({"period":{"start":"2024-01-01"},"entity":{"reference":"Group/x"},"inactive":false}),
        ];
        let not_plain = [
            json!({"entity":{"reference":"Patient/1"},"extension":[{"url":"http://x","valueString":"y"}]}),
            json!({"entity":{"reference":"Patient/1","identifier":{"value":"1"}}}),
            json!({"entity":{"reference":"Patient/1","type":"Nonsense"}}),
            json!({"entity":{"reference":"Patient/1"},"period":{"start":"2024-13-01"}}),
            json!({"entity":{"reference":"Patient/1"},"period":{"start":"2024-01-01","foo":"x"}}),
            json!({"entity":{"reference":"Patient/1"},"inactive":"yes"}),
            json!({"entity":{"reference":"Patient/1","display":""}}),
            json!({"entity":{"reference":"Patient/1"},"colour":"red"}),
            json!({"period":{"start":"2024"}}),
            json!("Patient/1"),
        ];
        let full = |m: &Value| {
            validate_resource("Group", &json!({"resourceType":"Group","type":"person","actual":true,"member":[m]}))
        };
        for m in &plain {
            assert!(is_plain_member(m), "{m}");
            assert!(full(m).is_ok(), "a plain member must be valid: {m}");
        }
        for m in &not_plain {
            assert!(!is_plain_member(m), "{m}");
        }
        // Invalid ones among them are refused by the full validator, which they go to.
        assert!(full(&not_plain[3]).is_err() && full(&not_plain[7]).is_err() && full(&not_plain[5]).is_err());
    }

    #[test]
    fn errors_name_the_member() {
        let many: Vec<String> = (0..1500).map(|i| format!(r#"{{"entity":{{"reference":"Patient/{i}"}}}}"#)).collect();
        let mut bad = many.clone();
        bad[1203] = r#"{"entity":{"reference":"Patient/x"},"colour":"red"}"#.into();
        let body = format!(r#"{{"resourceType":"Group","type":"person","actual":true,"member":[{}]}}"#, bad.join(","));
        let e = parse(body.as_bytes(), false).err().unwrap();
        assert_eq!(e.expression.as_deref(), Some("Group.member[1203].colour"));

        let body = r#"{"resourceType":"Group","member":[{"entity":{"reference":"Patient/1"}},{"entity":{"reference":"Patient/1"}}]}"#;
        assert_eq!(parse(body.as_bytes(), false).err().unwrap().expression.as_deref(), Some("Group.member[1]"));
        let body = r#"{"resourceType":"Group","member":[{"entity":{"display":"x"}}]}"#;
        assert_eq!(
            parse(body.as_bytes(), false).err().unwrap().expression.as_deref(),
            Some("Group.member[0].entity.reference")
        );
        assert_eq!(parse(b"{\"member\": 3}", false).err().unwrap().status, StatusCode::BAD_REQUEST);
        assert_eq!(parse(b"{\"a\":1} x", false).err().unwrap().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn empty_members_and_elements_are_dropped_unless_strict() {
        for body in
            [&br#"{"resourceType":"Group","member":[],"name":null}"#[..], br#"{"member":null,"resourceType":"Group"}"#]
        {
            let parsed = parse(body, false).unwrap();
            assert!(parsed.members.is_none());
            assert!(parsed.rest.get("name").is_none());
            assert_eq!(parse(body, true).err().unwrap().expression.as_deref(), Some("Group.member"));
        }
        let body = br#"{"resourceType":"Group","member":[{"entity":{"reference":"Patient/1"},"period":{}}],"code":{}}"#;
        let parsed = parse(body, false).unwrap();
        assert_eq!(parsed.members.unwrap()[0].value(), json!({"entity":{"reference":"Patient/1"}}));
        assert!(parsed.rest.get("code").is_none());
        assert_eq!(parse(body, true).err().unwrap().expression.as_deref(), Some("Group.member[0].period"));
    }
}
