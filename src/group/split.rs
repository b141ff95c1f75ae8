//! Splitting a Group PATCH: operations on `/member…` become member events; the rest apply
//! to the MongoDB document as for any resource.

use crate::model::patch::{tokens, Operation};

/// True when an operation reads or writes `Group.member`.
pub fn is_member_op(op: &Operation) -> bool {
    let touches = |path: &str| tokens(path).first().is_some_and(|t| t == "member");
    match op {
        Operation::Move { from, path } | Operation::Copy { from, path } => touches(from) || touches(path),
        other => touches(other.path()),
    }
}

/// True when a member operation names its member by reference, not by position: `add
/// /member/-` (or `/member/N`: members are appended) and `remove /member` with a value.
/// Those can be planned over pending events; positional ones need the views complete.
pub fn is_keyed(op: &Operation) -> bool {
    let t = tokens(op.path());
    match op {
        Operation::Add { value, .. } => t.len() == 2 && value.is_object(),
        Operation::Remove { value: Some(_), .. } => t.len() == 1,
        _ => false,
    }
}

/// (member operations with their index in the patch, the other operations).
pub fn split(ops: Vec<Operation>) -> (Vec<(usize, Operation)>, Vec<Operation>) {
    let mut member = Vec::new();
    let mut other = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        if is_member_op(&op) {
            member.push((i, op));
        } else {
            other.push(op);
        }
    }
    (member, other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::patch::parse;
    use serde_json::json;

    #[test]
    fn splits_by_path() {
        let ops = parse(&json!([
            {"op":"add","path":"/member/-","value":{}},
            {"op":"replace","path":"/name","value":"x"},
            {"op":"remove","path":"/member/3/period"},
            {"op":"copy","from":"/member/0","path":"/extension/0"},
            {"op":"add","path":"/memberX","value":1}
        ]))
        .unwrap();
        let (member, other) = split(ops);
        assert_eq!(member.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(other.len(), 2);
        let keyed: Vec<bool> = member.iter().map(|(_, op)| is_keyed(op)).collect();
        assert_eq!(keyed, [true, false, false]);
        let by_value = parse(&json!([{"op":"remove","path":"/member","value":{"entity":{"reference":"Patient/1"}}}]));
        assert!(is_keyed(&by_value.unwrap()[0]));
    }
}
