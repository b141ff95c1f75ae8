//! FHIRPath Patch (R4, fhirpatch.html): a `Parameters` resource whose `operation`
//! parameters `add`, `insert`, `delete`, `replace` and `move` elements addressed by FHIRPath.
//!
//! Paths are the subset of FHIRPath that the specification's examples and the published
//! test cases use: element names (a choice element by its base name, `value` for
//! `valueQuantity`), indexers `[n]`, `first()`, `last()`, `ofType(T)` on a choice, and
//! `where(criteria)` whose criteria compare a relative path with a string, number or
//! boolean literal (`=`, `!=`), test `exists()`/`empty()`, and combine with `and`, `or`,
//! `not()`. Anything else is refused with the operation's index and path, never guessed.
//!
//! Semantics (per the spec): `add` adds `name` = `value` to the single element `path`
//! selects (appending when it repeats); `insert` puts `value` at `index` of the list
//! `path` names; `delete` removes the single element `path` selects (no-op when it selects
//! nothing); `replace` replaces the single selected element; `move` moves the item at
//! `source` of the list to `destination`. A path that selects more than one element is an
//! error, except that nothing is written unless every operation succeeds.
//!
//! Values come as `value[x]` or, for a complex value with no `value[x]` type (a
//! BackboneElement such as `Patient.contact`), as nested `part`s. Without a type model here
//! a new single value is written as an object; callers put repeating elements into arrays
//! afterwards (`validate::repeat_as_arrays`), which the R4 model knows.
//!
//! Cost is bounded: expressions are at most [`MAX_PATH`] bytes and nest at most
//! [`MAX_DEPTH`] deep; evaluation is linear in the document per step.

use serde_json::{Map, Value};

/// Longest accepted path expression.
pub const MAX_PATH: usize = 4096;
/// Deepest nesting of `where(...)`.
pub const MAX_DEPTH: usize = 16;

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Name(String),
    Index(usize),
    First,
    Last,
    OfType(String),
    Where(Box<Criterion>),
}

/// A `where()` criterion.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    Compare { path: Vec<Step>, equal: bool, literal: Value },
    Exists(Vec<Step>),
    Empty(Vec<Step>),
    Not(Box<Criterion>),
    And(Box<Criterion>, Box<Criterion>),
    Or(Box<Criterion>, Box<Criterion>),
}

/// The operation types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Add,
    Insert,
    Delete,
    Replace,
    Move,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Insert => "insert",
            Kind::Delete => "delete",
            Kind::Replace => "replace",
            Kind::Move => "move",
        }
    }
}

/// One parsed operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub kind: Kind,
    /// The path as sent, for messages.
    pub text: String,
    /// The path, relative to the resource (its leading type name removed).
    pub path: Vec<Step>,
    pub name: Option<String>,
    pub value: Option<Value>,
    pub index: Option<usize>,
    pub source: Option<usize>,
    pub destination: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("operation {index} ({kind} {path}): {reason}")]
pub struct PatchError {
    pub index: usize,
    pub kind: String,
    pub path: String,
    pub reason: String,
}

/// True for a `Parameters` body, which is a FHIRPath Patch.
pub fn is_fhirpath_patch(body: &Value) -> bool {
    body.get("resourceType").and_then(Value::as_str) == Some("Parameters")
}

/// Parses a `Parameters` body for a resource of type `resource_type`.
pub fn parse(body: &Value, resource_type: &str) -> Result<Vec<Operation>, PatchError> {
    let err = |index: usize, kind: &str, path: &str, reason: String| PatchError {
        index,
        kind: kind.to_string(),
        path: path.to_string(),
        reason,
    };
    let params = match body.get("parameter") {
        Some(Value::Array(p)) => p.as_slice(),
        None => &[],
        Some(_) => return Err(err(0, "", "", "Parameters.parameter must be an array".into())),
    };
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.get("name").and_then(Value::as_str) != Some("operation") {
                return Err(err(i, "", "", "every parameter of a FHIRPath Patch must be named 'operation'".into()));
            }
            let parts = p.get("part").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            let part = |name: &str| parts.iter().find(|q| q.get("name").and_then(Value::as_str) == Some(name));
            let string = |name: &str| part(name).and_then(|q| value_x(q)).and_then(|v| v.as_str().map(str::to_string));
            let kind_text = string("type").unwrap_or_default();
            let text = string("path").unwrap_or_default();
            let kind = match kind_text.as_str() {
                "add" => Kind::Add,
                "insert" => Kind::Insert,
                "delete" => Kind::Delete,
                "replace" => Kind::Replace,
                "move" => Kind::Move,
                "" => return Err(err(i, "", &text, "missing part 'type'".into())),
                other => {
                    return Err(err(
                        i,
                        other,
                        &text,
                        format!("unknown operation type '{other}' (add, insert, delete, replace, move)"),
                    ))
                }
            };
            let fail = |reason: String| err(i, kind.as_str(), &text, reason);
            if text.is_empty() {
                return Err(fail("missing part 'path'".into()));
            }
            let mut path = parse_path(&text).map_err(fail)?;
            if matches!(path.first(), Some(Step::Name(n)) if n == resource_type) {
                path.remove(0);
            }
            let integer = |name: &str| -> Result<Option<usize>, PatchError> {
                match part(name).and_then(|q| value_x(q)) {
                    None => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .map(Some)
                        .ok_or_else(|| fail(format!("'{name}' must be a non-negative integer"))),
                }
            };
            let value = part("value").map(part_value).transpose().map_err(fail)?;
            let op = Operation {
                kind,
                path,
                name: string("name"),
                value,
                index: integer("index")?,
                source: integer("source")?,
                destination: integer("destination")?,
                text: text.clone(),
            };
            let missing = match kind {
                Kind::Add if op.name.is_none() => Some("name"),
                Kind::Add | Kind::Insert | Kind::Replace if op.value.is_none() => Some("value"),
                Kind::Insert if op.index.is_none() => Some("index"),
                Kind::Move if op.source.is_none() => Some("source"),
                Kind::Move if op.destination.is_none() => Some("destination"),
                _ => None,
            };
            if let Some(m) = missing {
                return Err(fail(format!("missing part '{m}'")));
            }
            if matches!(kind, Kind::Insert | Kind::Move) && !matches!(op.path.last(), Some(Step::Name(_))) {
                return Err(fail("the path of insert and move must name a list element".into()));
            }
            Ok(op)
        })
        .collect()
}

/// The `value[x]` of a parameter part, if it has one.
fn value_x(part: &Value) -> Option<&Value> {
    part.as_object()?.iter().find(|(k, _)| k.starts_with("value") && k.len() > 5).map(|(_, v)| v)
}

/// A `value` part: its `value[x]`, or an object built from its nested `part`s.
fn part_value(part: &Value) -> Result<Value, String> {
    if let Some(v) = value_x(part) {
        return Ok(v.clone());
    }
    let Some(parts) = part.get("part").and_then(Value::as_array) else {
        return Err("part 'value' has neither a value[x] nor parts".into());
    };
    let mut object = Map::new();
    for p in parts {
        let name = p.get("name").and_then(Value::as_str).ok_or("a value's part has no name")?.to_string();
        let v = part_value(p)?;
        match object.get_mut(&name) {
            None => {
                object.insert(name, v);
            }
            Some(Value::Array(items)) => items.push(v),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, v]);
            }
        }
    }
    Ok(Value::Object(object))
}

mod eval;
mod path;
#[cfg(test)]
mod tests;

use eval::{evaluate, get_mut, key_of, Loc, Seg};
pub use path::parse_path;

/// Applies `ops` to `doc` atomically (all or nothing).
pub fn apply(doc: &mut Value, ops: &[Operation]) -> Result<(), PatchError> {
    let mut work = doc.clone();
    for (index, op) in ops.iter().enumerate() {
        apply_one(&mut work, op).map_err(|reason| PatchError {
            index,
            kind: op.kind.as_str().to_string(),
            path: op.text.clone(),
            reason,
        })?;
    }
    *doc = work;
    Ok(())
}

/// Applies one operation to `doc` (a resource, or any element the path is relative to).
pub fn apply_one(doc: &mut Value, op: &Operation) -> Result<(), String> {
    let selected = evaluate(doc, vec![Vec::new()], &op.path);
    let single = |what: &str| -> Result<Loc, String> {
        match selected.len() {
            1 => Ok(selected[0].clone()),
            0 => Err(format!("the path selects no element to {what}")),
            n => Err(format!("the path selects {n} elements; it must select one")),
        }
    };
    match op.kind {
        Kind::Add => {
            let loc = single("add to")?;
            let name = op.name.clone().unwrap_or_default();
            let value = op.value.clone().unwrap_or(Value::Null);
            let Some(Value::Object(target)) = get_mut(doc, &loc) else {
                return Err("the path selects a primitive or list, not an element that can hold children".into());
            };
            match target.get_mut(&name) {
                None => {
                    target.insert(name, value);
                }
                Some(Value::Array(items)) => items.push(value),
                Some(_) => return Err(format!("'{name}' already has a value; use replace")),
            }
            Ok(())
        }
        Kind::Replace => {
            let loc = single("replace")?;
            if loc.is_empty() {
                return Err("the whole resource cannot be replaced by a patch; use PUT".into());
            }
            let target = get_mut(doc, &loc).ok_or("the selected element vanished")?;
            *target = op.value.clone().unwrap_or(Value::Null);
            Ok(())
        }
        Kind::Delete => {
            if selected.is_empty() {
                return Ok(());
            }
            let loc = single("delete")?;
            remove_at(doc, &loc)
        }
        Kind::Insert | Kind::Move => {
            let (parent_path, name) = match op.path.split_last() {
                Some((Step::Name(n), parent)) => (parent, n.clone()),
                _ => return Err("the path must name a list element".into()),
            };
            let parents = evaluate(doc, vec![Vec::new()], parent_path);
            let parent = match parents.len() {
                1 => parents[0].clone(),
                0 => return Err("the list's parent element does not exist".into()),
                n => return Err(format!("the list's parent path selects {n} elements; it must select one")),
            };
            let Some(Value::Object(obj)) = get_mut(doc, &parent) else {
                return Err("the list's parent is not an element".into());
            };
            let key = key_of(obj, &name).unwrap_or(name);
            let list = obj.entry(key.clone()).or_insert_with(|| Value::Array(Vec::new()));
            if !list.is_array() {
                let single = list.take();
                *list = Value::Array(vec![single]);
            }
            let Value::Array(items) = list else { unreachable!("made an array above") };
            let result = if op.kind == Kind::Insert {
                let index = op.index.unwrap_or_default();
                if index > items.len() {
                    Err(format!("index {index} is past the end of the list (length {})", items.len()))
                } else {
                    items.insert(index, op.value.clone().unwrap_or(Value::Null));
                    Ok(())
                }
            } else {
                let (from, to) = (op.source.unwrap_or_default(), op.destination.unwrap_or_default());
                if from >= items.len() || to >= items.len() {
                    Err(format!("source {from} or destination {to} is outside the list (length {})", items.len()))
                } else {
                    let item = items.remove(from);
                    items.insert(to, item);
                    Ok(())
                }
            };
            if items.is_empty() {
                obj.shift_remove(&key);
            }
            result
        }
    }
}

/// Removes the element at `loc`; a list left empty goes too.
fn remove_at(doc: &mut Value, loc: &[Seg]) -> Result<(), String> {
    let Some((last, parent)) = loc.split_last() else {
        return Err("the whole resource cannot be deleted by a patch; use DELETE".into());
    };
    let container = get_mut(doc, parent).ok_or("the selected element vanished")?;
    match (container, last) {
        (Value::Object(map), Seg::Key(k)) => {
            map.shift_remove(k);
            map.shift_remove(&format!("_{k}"));
        }
        (Value::Array(items), Seg::Idx(i)) => {
            items.remove(*i);
            if items.is_empty() {
                if let Some((Seg::Key(k), grand)) = parent.split_last() {
                    if let Some(Value::Object(map)) = get_mut(doc, grand) {
                        map.shift_remove(k);
                    }
                }
            }
        }
        _ => return Err("the selected element vanished".into()),
    }
    Ok(())
}
