//! JSON Patch (RFC 6902) over `serde_json::Value`, atomic: a patch applies whole or not
//! at all.
//!
//! Own implementation rather than the `json-patch` crate because (a) with serde_json's
//! `arbitrary_precision` (forced on by fhirbolt) `1` and `1.0` compare unequal, while RFC
//! 6902 `test` compares numbers by value; (b) errors must name the failing operation; and
//! (c) the Group member path inspects operations before applying them.

use serde_json::{Map, Value};

/// One parsed operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Add {
        path: String,
        value: Value,
    },
    /// `value` is not part of RFC 6902 (and is ignored when applying); the Group member
    /// path reads it for the remove-by-entity extension.
    Remove {
        path: String,
        value: Option<Value>,
    },
    Replace {
        path: String,
        value: Value,
    },
    Move {
        from: String,
        path: String,
    },
    Copy {
        from: String,
        path: String,
    },
    Test {
        path: String,
        value: Value,
    },
}

impl Operation {
    pub fn path(&self) -> &str {
        match self {
            Operation::Add { path, .. }
            | Operation::Remove { path, .. }
            | Operation::Replace { path, .. }
            | Operation::Move { path, .. }
            | Operation::Copy { path, .. }
            | Operation::Test { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("operation {index} ({op} {path}): {reason}")]
pub struct PatchError {
    pub index: usize,
    pub op: String,
    pub path: String,
    pub reason: String,
}

/// Parses a patch document (a JSON array of operation objects).
pub fn parse(doc: &Value) -> Result<Vec<Operation>, PatchError> {
    let err = |index: usize, op: &str, path: &str, reason: String| PatchError {
        index,
        op: op.to_string(),
        path: path.to_string(),
        reason,
    };
    let Value::Array(items) = doc else {
        return Err(err(0, "", "", "a JSON Patch document must be a JSON array of operations".into()));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(obj) = item else {
                return Err(err(i, "", "", "an operation must be a JSON object".into()));
            };
            let op = match obj.get("op") {
                Some(Value::String(op)) => op.as_str(),
                Some(_) => return Err(err(i, "", "", "'op' must be a string".into())),
                None => return Err(err(i, "", "", "missing 'op'".into())),
            };
            let string = |member: &str| -> Result<String, PatchError> {
                match obj.get(member) {
                    Some(Value::String(s)) => {
                        validate_pointer(s).map_err(|r| err(i, op, s, r))?;
                        Ok(s.clone())
                    }
                    Some(_) => Err(err(i, op, "", format!("'{member}' must be a string"))),
                    None => Err(err(i, op, "", format!("missing '{member}'"))),
                }
            };
            let path = string("path")?;
            let value = || obj.get("value").cloned().ok_or_else(|| err(i, op, &path, "missing 'value'".into()));
            Ok(match op {
                "add" => Operation::Add { value: value()?, path },
                "remove" => Operation::Remove { value: obj.get("value").cloned(), path },
                "replace" => Operation::Replace { value: value()?, path },
                "move" => Operation::Move { from: string("from")?, path },
                "copy" => Operation::Copy { from: string("from")?, path },
                "test" => Operation::Test { value: value()?, path },
                other => return Err(err(i, other, &path, format!("unknown operation '{other}'"))),
            })
        })
        .collect()
}

fn validate_pointer(p: &str) -> Result<(), String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(format!("'{p}' is not a JSON Pointer (must be empty or start with '/')"));
    }
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!("'{p}' has an invalid '~' escape"));
        }
    }
    Ok(())
}

/// Splits a pointer into unescaped reference tokens.
pub fn tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer[1..].split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect()
}

/// Applies `ops` to `doc` atomically.
pub fn apply(doc: &mut Value, ops: &[Operation]) -> Result<(), PatchError> {
    let mut work = doc.clone();
    for (index, op) in ops.iter().enumerate() {
        apply_one(&mut work, op).map_err(|reason| PatchError {
            index,
            op: op_name(op).to_string(),
            path: op.path().to_string(),
            reason,
        })?;
    }
    *doc = work;
    Ok(())
}

fn op_name(op: &Operation) -> &'static str {
    match op {
        Operation::Add { .. } => "add",
        Operation::Remove { .. } => "remove",
        Operation::Replace { .. } => "replace",
        Operation::Move { .. } => "move",
        Operation::Copy { .. } => "copy",
        Operation::Test { .. } => "test",
    }
}

fn apply_one(doc: &mut Value, op: &Operation) -> Result<(), String> {
    match op {
        Operation::Add { path, value } => add(doc, path, value.clone()),
        Operation::Remove { path, .. } => remove(doc, path).map(drop),
        Operation::Replace { path, value } => {
            let target = get_mut(doc, path)?;
            *target = value.clone();
            Ok(())
        }
        Operation::Move { from, path } => {
            if from == path {
                return get_mut(doc, from).map(drop);
            }
            if path.starts_with(&format!("{from}/")) {
                return Err(format!("cannot move '{from}' into its own child '{path}'"));
            }
            let value = remove(doc, from)?;
            add(doc, path, value)
        }
        Operation::Copy { from, path } => {
            let value = get_mut(doc, from)?.clone();
            add(doc, path, value)
        }
        Operation::Test { path, value } => {
            let actual = get_mut(doc, path)?;
            if json_equal(actual, value) {
                Ok(())
            } else {
                Err(format!("test failed: the value is {actual}, not {value}"))
            }
        }
    }
}

fn parse_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let valid =
        !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) && (token == "0" || !token.starts_with('0'));
    let index: usize = if valid {
        token.parse().map_err(|_| format!("array index '{token}' is too large"))?
    } else {
        return Err(format!("'{token}' is not an array index"));
    };
    let max = if allow_end { len } else { len.saturating_sub(1) };
    if index > max || (!allow_end && len == 0) {
        return Err(format!("array index {index} is out of bounds (length {len})"));
    }
    Ok(index)
}

fn get_mut<'a>(doc: &'a mut Value, pointer: &str) -> Result<&'a mut Value, String> {
    let mut current = doc;
    for token in tokens(pointer) {
        current = match current {
            Value::Object(map) => map.get_mut(&token).ok_or_else(|| format!("path '{pointer}' does not exist"))?,
            Value::Array(items) => {
                let i = parse_index(&token, items.len(), false)?;
                &mut items[i]
            }
            _ => return Err(format!("path '{pointer}' does not exist")),
        };
    }
    Ok(current)
}

/// The container a pointer's last token lives in, and that token.
fn parent_mut<'a>(doc: &'a mut Value, pointer: &str) -> Result<(&'a mut Value, String), String> {
    let mut toks = tokens(pointer);
    let last = toks.pop().ok_or_else(|| "the root has no parent".to_string())?;
    let parent_pointer: String = toks.iter().map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1"))).collect();
    Ok((get_mut(doc, &parent_pointer).map_err(|_| format!("the parent of '{pointer}' does not exist"))?, last))
}

fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    if pointer.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent_mut(doc, pointer)?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) => {
            let i = parse_index(&last, items.len(), true)?;
            items.insert(i, value);
            Ok(())
        }
        _ => Err(format!("the parent of '{pointer}' is not an object or array")),
    }
}

fn remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
    if pointer.is_empty() {
        return Ok(std::mem::take(doc));
    }
    let (parent, last) = parent_mut(doc, pointer)?;
    match parent {
        Value::Object(map) => map.shift_remove(&last).ok_or_else(|| format!("path '{pointer}' does not exist")),
        Value::Array(items) => {
            let i = parse_index(&last, items.len(), false)?;
            Ok(items.remove(i))
        }
        _ => Err(format!("path '{pointer}' does not exist")),
    }
}

/// JSON equality as RFC 6902 `test` defines it: numbers by value, objects regardless of
/// member order.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => decimal_key(&x.to_string()) == decimal_key(&y.to_string()),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q)),
        (Value::Object(x), Value::Object(y)) => objects_equal(x, y),
        _ => a == b,
    }
}

fn objects_equal(x: &Map<String, Value>, y: &Map<String, Value>) -> bool {
    x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
}

/// A number's value as (sign, significant digits without trailing zeros, exponent).
fn decimal_key(literal: &str) -> (bool, String, i64) {
    let (mantissa, exp) = match literal.find(['e', 'E']) {
        Some(i) => (&literal[..i], literal[i + 1..].parse::<i64>().unwrap_or(0)),
        None => (literal, 0),
    };
    let negative = mantissa.starts_with('-');
    let mantissa = mantissa.trim_start_matches(['-', '+']);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all = format!("{int}{frac}");
    let mut exp = exp - frac.len() as i64;
    let trimmed_end = all.trim_end_matches('0');
    exp += (all.len() - trimmed_end.len()) as i64;
    let digits = trimmed_end.trim_start_matches('0');
    if digits.is_empty() {
        return (false, "0".into(), 0);
    }
    (negative, digits.to_string(), exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(doc: Value, patch: Value) -> Result<Value, PatchError> {
        let ops = parse(&patch)?;
        let mut doc = doc;
        apply(&mut doc, &ops)?;
        Ok(doc)
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_equal(&json!(1), &serde_json::from_str::<Value>("1.0").unwrap()));
        assert!(json_equal(&serde_json::from_str::<Value>("1e2").unwrap(), &json!(100)));
        assert!(!json_equal(&json!(1), &json!(2)));
        assert!(json_equal(&json!(0), &serde_json::from_str::<Value>("-0.0").unwrap()));
    }

    #[test]
    fn failure_is_atomic_and_names_the_operation() {
        let doc = json!({"a": 1});
        let err = run(doc.clone(), json!([{"op":"add","path":"/b","value":2},{"op":"test","path":"/a","value":3}]))
            .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.op, "test");
        let mut d = doc.clone();
        let ops = parse(&json!([{"op":"add","path":"/b","value":2},{"op":"remove","path":"/zz"}])).unwrap();
        assert!(apply(&mut d, &ops).is_err());
        assert_eq!(d, doc, "nothing applied");
    }

    #[test]
    fn arrays() {
        assert_eq!(run(json!([1, 3]), json!([{"op":"add","path":"/1","value":2}])).unwrap(), json!([1, 2, 3]));
        assert_eq!(run(json!([1]), json!([{"op":"add","path":"/-","value":2}])).unwrap(), json!([1, 2]));
        assert!(run(json!([1]), json!([{"op":"add","path":"/01","value":2}])).is_err());
        assert!(run(json!([1]), json!([{"op":"remove","path":"/1"}])).is_err());
    }

    mod properties {
        //! No document and no patch make the engine panic; a failed patch changes nothing; a
        //! successful add or replace is seen by a `test` of the same path.
        //! `PROPTEST_CASES=1000000 cargo test --release --lib properties` (`make fuzz`).
        use super::super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                "[a-c]{0,3}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map("[a-c01~/-]{0,2}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Pointers that often name something in [`json_value`]'s documents, and often not.
        fn pointer() -> impl Strategy<Value = String> {
            let segment = prop_oneof![
                Just("a"),
                Just("b"),
                Just("c"),
                Just("0"),
                Just("1"),
                Just("-"),
                Just("~0"),
                Just("~1"),
                Just("~2"),
                Just("01"),
                Just(""),
                Just("99999999999999999999999"),
            ];
            proptest::collection::vec(segment, 0..4).prop_map(|s| s.iter().map(|p| format!("/{p}")).collect())
        }

        fn operation() -> impl Strategy<Value = Value> {
            let op = prop_oneof![
                Just("add"),
                Just("remove"),
                Just("replace"),
                Just("move"),
                Just("copy"),
                Just("test"),
                Just("nope")
            ];
            (op, pointer(), pointer(), json_value(), any::<u8>()).prop_map(|(op, path, from, value, shape)| {
                let mut o = serde_json::json!({ "op": op, "path": path, "from": from, "value": value });
                // Now and then a malformed operation: a field missing or of the wrong type.
                match shape % 8 {
                    0 => o["path"] = Value::from(1),
                    1 => {
                        o.as_object_mut().map(|m| m.remove("value"));
                    }
                    _ => {}
                }
                o
            })
        }

        proptest! {
            #[test]
            fn patches_never_panic_and_fail_atomically(
                doc in json_value(),
                ops in proptest::collection::vec(operation(), 0..6),
            ) {
                let Ok(parsed) = parse(&Value::Array(ops)) else { return Ok(()) };
                let mut patched = doc.clone();
                match apply(&mut patched, &parsed) {
                    Err(e) => {
                        prop_assert_eq!(&patched, &doc, "a failed patch changed the document");
                        prop_assert!(e.index < parsed.len());
                    }
                    Ok(()) => {
                        if let Some(Operation::Add { path, value } | Operation::Replace { path, value }) = parsed.last() {
                            if !path.ends_with("/-") {
                                let check = [Operation::Test { path: path.clone(), value: value.clone() }];
                                prop_assert!(apply(&mut patched.clone(), &check).is_ok(), "{path} does not hold {value}");
                            }
                        }
                    }
                }
            }

            #[test]
            fn arbitrary_patch_documents_never_panic(doc in json_value(), patch in json_value()) {
                if let Ok(parsed) = parse(&patch) {
                    let _ = apply(&mut doc.clone(), &parsed);
                }
            }
        }
    }
}
