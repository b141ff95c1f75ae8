//! Splitting a Group PATCH, in any of the three formats: changes to `Group.member` become
//! member events; the rest apply to the MongoDB document as for any resource.
//!
//! * JSON Patch: operations whose path (or `from`) starts with `/member`.
//! * Merge patch: a `member` key. An array replaces the membership (RFC 7386 replaces
//!   arrays whole), `null` or `[]` removes every member.
//! * FHIRPath Patch: operations on `Group.member`. A member is selected by `[n]`,
//!   `first()`, `last()` or `where(entity.reference = '…')`; `add` of `member` to `Group`
//!   and `insert` into `Group.member` add one (appended: the order of addition is the
//!   stable order, as for JSON Patch). Any other selection of members (a criterion on
//!   other elements, several members at once) is refused rather than evaluated over a
//!   membership that may have millions of entries.

use serde_json::Value;

use crate::model::fhirpath_patch::{self as fp, Criterion, Kind, Step};
use crate::model::patch::{tokens, Operation};
use crate::model::patching::Patch;

/// How a FHIRPath Patch names one member.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// The n-th member of the current list.
    At(u64),
    /// The last member.
    Last,
    /// The member whose `entity.reference` this is.
    Reference(String),
}

/// One change to `Group.member`.
#[derive(Debug, Clone)]
pub enum MemberOp {
    /// A JSON Patch operation on `/member…` (merge patches become these too).
    Json(Operation),
    /// FHIRPath `add`/`insert` of a member.
    Add(Value),
    /// FHIRPath `delete` of a member (no-op when none is selected).
    Remove(Selector),
    /// FHIRPath `replace` of a whole member.
    Replace(Selector, Value),
    /// A FHIRPath operation inside one member; its path is relative to the member.
    Edit(Selector, fp::Operation),
}

/// A member operation could not be mapped (422).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("operation {index} ({kind} {path}): {reason}")]
pub struct SplitError {
    pub index: usize,
    pub kind: String,
    pub path: String,
    pub reason: String,
}

/// True when a JSON Patch operation reads or writes `Group.member`.
pub fn is_member_op(op: &Operation) -> bool {
    let touches = |path: &str| tokens(path).first().is_some_and(|t| t == "member");
    match op {
        Operation::Move { from, path } | Operation::Copy { from, path } => touches(from) || touches(path),
        other => touches(other.path()),
    }
}

/// True when a member operation names its member by reference, not by position: `add
/// /member/-` (or `/member/N`: members are appended), `remove /member` with a value, and
/// FHIRPath adds and `where(entity.reference=…)` selections. Those can be planned over
/// pending events; positional ones need the views complete.
pub fn is_keyed(op: &MemberOp) -> bool {
    match op {
        MemberOp::Json(op) => {
            let t = tokens(op.path());
            match op {
                Operation::Add { value, .. } => t.len() == 2 && value.is_object(),
                Operation::Remove { value: Some(_), .. } => t.len() == 1,
                _ => false,
            }
        }
        MemberOp::Add(_) => true,
        MemberOp::Remove(s) | MemberOp::Replace(s, _) | MemberOp::Edit(s, _) => matches!(s, Selector::Reference(_)),
    }
}

/// A patch split in two: the member operations and the rest, each with the index its
/// operations had in the patch the client sent (errors name those).
pub struct Split {
    pub member: Vec<(usize, MemberOp)>,
    pub other: Patch,
    /// `other_numbers[i]`: the index of `other`'s operation `i` in the whole patch.
    pub other_numbers: Vec<usize>,
}

/// Splits a Group patch into member operations and the others.
pub fn split(patch: Patch) -> Result<Split, SplitError> {
    let mut other_numbers = Vec::new();
    let (member, other) = match patch {
        Patch::Json(ops) => {
            let mut member = Vec::new();
            let mut other = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                if is_member_op(&op) {
                    member.push((i, MemberOp::Json(op)));
                } else {
                    other.push(op);
                    other_numbers.push(i);
                }
            }
            (member, Patch::Json(other))
        }
        Patch::Merge(mut doc) => {
            let member = match doc.shift_remove("member") {
                None => Vec::new(),
                Some(Value::Array(items)) if !items.is_empty() => {
                    vec![(0, MemberOp::Json(Operation::Replace { path: "/member".into(), value: Value::Array(items) }))]
                }
                Some(Value::Null | Value::Array(_)) => {
                    vec![(0, MemberOp::Json(Operation::Remove { path: "/member".into(), value: None }))]
                }
                Some(other) => {
                    return Err(SplitError {
                        index: 0,
                        kind: "merge".into(),
                        path: "member".into(),
                        reason: format!("Group.member must be an array or null, not {other}"),
                    })
                }
            };
            (member, Patch::Merge(doc))
        }
        Patch::FhirPath(ops) => {
            let mut member = Vec::new();
            let mut other = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match member_op(&op).map_err(|reason| SplitError {
                    index: i,
                    kind: op.kind.as_str().into(),
                    path: op.text.clone(),
                    reason,
                })? {
                    Some(m) => member.push((i, m)),
                    None => {
                        other.push(op);
                        other_numbers.push(i);
                    }
                }
            }
            (member, Patch::FhirPath(other))
        }
    };
    Ok(Split { member, other, other_numbers })
}

const SELECTORS: &str = "on Group.member, a FHIRPath Patch selects one member by [n], first(), last() or \
                         where(entity.reference = '…')";

/// The member operation a FHIRPath operation is, or `None` when it does not touch members.
fn member_op(op: &fp::Operation) -> Result<Option<MemberOp>, String> {
    let value = || op.value.clone().unwrap_or(Value::Null);
    let (first, rest) = match op.path.split_first() {
        None if op.kind == Kind::Add && op.name.as_deref() == Some("member") => {
            return Ok(Some(MemberOp::Add(value())))
        }
        None => return Ok(None),
        Some(split) => split,
    };
    if *first != Step::Name("member".into()) {
        return Ok(None);
    }
    if rest.is_empty() {
        return match op.kind {
            Kind::Insert => Ok(Some(MemberOp::Add(value()))),
            Kind::Move => Err("members cannot be moved: their order is the order of addition".into()),
            _ => Err(format!("the path selects every member; {SELECTORS}")),
        };
    }
    let selector = match &rest[0] {
        Step::Index(n) => Selector::At(*n as u64),
        Step::First => Selector::At(0),
        Step::Last => Selector::Last,
        Step::Where(c) => match c.as_ref() {
            Criterion::Compare { path, equal: true, literal: Value::String(r) }
                if *path == [Step::Name("entity".into()), Step::Name("reference".into())] =>
            {
                Selector::Reference(r.clone())
            }
            _ => return Err(SELECTORS.into()),
        },
        _ => return Err(SELECTORS.into()),
    };
    let inner = &rest[1..];
    if inner.is_empty() {
        return match op.kind {
            Kind::Delete => Ok(Some(MemberOp::Remove(selector))),
            Kind::Replace => Ok(Some(MemberOp::Replace(selector, value()))),
            Kind::Add | Kind::Insert | Kind::Move => {
                Ok(Some(MemberOp::Edit(selector, fp::Operation { path: Vec::new(), ..op.clone() })))
            }
        };
    }
    if matches!(inner.first(), Some(Step::Index(_) | Step::First | Step::Last | Step::Where(_))) {
        return Err(format!("the path selects several members; {SELECTORS}"));
    }
    if matches!(inner.first(), Some(Step::Name(n)) if n == "entity") && op.kind != Kind::Add {
        return Err("a member's entity cannot change; delete the member and add the new one".into());
    }
    Ok(Some(MemberOp::Edit(selector, fp::Operation { path: inner.to_vec(), ..op.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::patch::parse;
    use serde_json::json;

    #[test]
    fn splits_json_patch_by_path() {
        let ops = parse(&json!([
            {"op":"add","path":"/member/-","value":{}},
            {"op":"replace","path":"/name","value":"x"},
            {"op":"remove","path":"/member/3/period"},
            {"op":"copy","from":"/member/0","path":"/extension/0"},
            {"op":"add","path":"/memberX","value":1}
        ]))
        .unwrap();
        let Split { member, other, other_numbers } = split(Patch::Json(ops)).unwrap();
        assert_eq!(member.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(other.len(), 2);
        assert_eq!(other_numbers, [1, 4], "the others keep their place in the client's patch");
        let keyed: Vec<bool> = member.iter().map(|(_, op)| is_keyed(op)).collect();
        assert_eq!(keyed, [true, false, false]);
        let by_value = parse(&json!([{"op":"remove","path":"/member","value":{"entity":{"reference":"Patient/1"}}}]));
        assert!(is_keyed(&MemberOp::Json(by_value.unwrap().remove(0))));
    }

    #[test]
    fn merge_patch_member_replaces_or_clears() {
        let doc = json!({"name":"n","member":[{"entity":{"reference":"Patient/1"}}]});
        let Split { member, other, .. } = split(Patch::Merge(doc.as_object().unwrap().clone())).unwrap();
        assert!(matches!(&member[0].1, MemberOp::Json(Operation::Replace { path, .. }) if path == "/member"));
        assert_eq!(other.len(), 1);
        let Split { member, .. } = split(Patch::Merge(json!({"member":null}).as_object().unwrap().clone())).unwrap();
        assert!(matches!(&member[0].1, MemberOp::Json(Operation::Remove { value: None, .. })));
        assert!(split(Patch::Merge(json!({"member":3}).as_object().unwrap().clone())).is_err());
    }

    fn fhirpath(kind: &str, path: &str, extra: Vec<Value>) -> Patch {
        let mut parts = vec![json!({"name":"type","valueCode":kind}), json!({"name":"path","valueString":path})];
        parts.extend(extra);
        let body = json!({"resourceType":"Parameters","parameter":[{"name":"operation","part":parts}]});
        Patch::FhirPath(fp::parse(&body, "Group").unwrap())
    }

    #[test]
    fn fhirpath_member_operations_map_to_selectors() {
        let value = json!({"name":"value","part":[{"name":"entity","valueReference":{"reference":"Patient/9"}}]});
        let name = json!({"name":"name","valueString":"member"});
        let Split { member: m, other: rest, .. } = split(fhirpath("add", "Group", vec![name, value.clone()])).unwrap();
        assert!(matches!(&m[0].1, MemberOp::Add(v) if v["entity"]["reference"] == "Patient/9") && rest.is_empty());
        let m = split(fhirpath("delete", "Group.member.where(entity.reference='Patient/9')", vec![])).unwrap().member;
        assert!(matches!(&m[0].1, MemberOp::Remove(Selector::Reference(r)) if r == "Patient/9"));
        assert!(is_keyed(&m[0].1));
        let m = split(fhirpath("delete", "Group.member.last()", vec![])).unwrap().member;
        assert!(matches!(&m[0].1, MemberOp::Remove(Selector::Last)));
        let period = json!({"name":"value","valueDateTime":"2024-01-01"});
        let m = split(fhirpath("replace", "Group.member[2].period.start", vec![period])).unwrap().member;
        assert!(matches!(&m[0].1, MemberOp::Edit(Selector::At(2), op) if op.path.len() == 2));
        let Split { member: m, other: rest, .. } =
            split(fhirpath("replace", "Group.name", vec![json!({"name":"value","valueString":"x"})])).unwrap();
        assert!(m.is_empty() && rest.len() == 1);
        for refused in ["Group.member", "Group.member.where(inactive=true)", "Group.member[0].entity.reference"] {
            assert!(split(fhirpath("delete", refused, vec![])).is_err(), "{refused}");
        }
    }
}
