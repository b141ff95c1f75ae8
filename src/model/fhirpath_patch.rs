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

// ---------------------------------------------------------------------------------------
// Path parsing

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

/// Parses a path expression.
pub fn parse_path(text: &str) -> Result<Vec<Step>, String> {
    if text.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    let mut p = Parser { s: text.as_bytes(), pos: 0, depth: 0 };
    let steps = p.path(false)?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(format!("unexpected '{}' at offset {} of the path", &text[p.pos..], p.pos));
    }
    Ok(steps)
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.ws();
        if self.s[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self) -> Option<String> {
        self.ws();
        if self.s.get(self.pos) == Some(&b'`') {
            let end = self.s[self.pos + 1..].iter().position(|b| *b == b'`')?;
            let id = String::from_utf8_lossy(&self.s[self.pos + 1..self.pos + 1 + end]).into_owned();
            self.pos += end + 2;
            return Some(id);
        }
        let start = self.pos;
        while self.s.get(self.pos).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
            self.pos += 1;
        }
        let id = &self.s[start..self.pos];
        (!id.is_empty() && !id[0].is_ascii_digit()).then(|| String::from_utf8_lossy(id).into_owned())
    }

    /// A path; inside `where()` (`criterion`), `exists()`, `empty()` and `not()` come
    /// back as pseudo-names ending in `()`.
    fn path(&mut self, criterion: bool) -> Result<Vec<Step>, String> {
        let mut steps = Vec::new();
        loop {
            let at = self.pos;
            let name = self.identifier().ok_or_else(|| format!("expected an element name at offset {at}"))?;
            if self.eat("(") {
                match name.as_str() {
                    "exists" | "empty" | "not" if criterion => {
                        if !self.eat(")") {
                            return Err(format!("{name}() takes no arguments here"));
                        }
                        steps.push(Step::Name(format!("{name}()")));
                    }
                    _ => steps.push(self.function(&name)?),
                }
            } else {
                steps.push(Step::Name(name));
            }
            while self.eat("[") {
                self.ws();
                let start = self.pos;
                while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                    self.pos += 1;
                }
                let n = std::str::from_utf8(&self.s[start..self.pos])
                    .ok()
                    .and_then(|d| d.parse::<usize>().ok())
                    .ok_or_else(|| format!("expected an index at offset {start}"))?;
                if !self.eat("]") {
                    return Err(format!("expected ']' at offset {}", self.pos));
                }
                steps.push(Step::Index(n));
            }
            if !self.eat(".") {
                return Ok(steps);
            }
        }
    }

    fn function(&mut self, name: &str) -> Result<Step, String> {
        let step = match name {
            "first" => Step::First,
            "last" => Step::Last,
            "ofType" => Step::OfType(self.identifier().ok_or("ofType() needs a type name")?),
            "where" => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("where() nests deeper than {MAX_DEPTH}"));
                }
                let c = self.or()?;
                self.depth -= 1;
                Step::Where(Box::new(c))
            }
            other => {
                return Err(format!(
                    "the function {other}() is not supported in a patch path (first, last, ofType, where)"
                ))
            }
        };
        if !self.eat(")") {
            return Err(format!("expected ')' at offset {}", self.pos));
        }
        Ok(step)
    }

    fn or(&mut self) -> Result<Criterion, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Criterion::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Criterion, String> {
        let mut left = self.term()?;
        while self.keyword("and") {
            left = Criterion::And(Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn keyword(&mut self, word: &str) -> bool {
        let save = self.pos;
        self.ws();
        if self.s[self.pos..].starts_with(word.as_bytes())
            && !self.s.get(self.pos + word.len()).is_some_and(|b| b.is_ascii_alphanumeric())
        {
            self.pos += word.len();
            true
        } else {
            self.pos = save;
            false
        }
    }

    fn term(&mut self) -> Result<Criterion, String> {
        if self.eat("(") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("criteria nest deeper than {MAX_DEPTH}"));
            }
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(format!("expected ')' at offset {}", self.pos));
            }
            return Ok(inner);
        }
        let mut path = self.path(true)?;
        let mut criterion = match path.last() {
            Some(Step::Name(n)) if n == "exists" || n == "empty" || n == "not" => {
                return Err(format!("{n} must be called: {n}()"));
            }
            _ => None,
        };
        // `exists()`, `empty()` and `not()` were parsed as names followed by `()`.
        while let Some(Step::Name(n)) = path.last().cloned() {
            let function = match n.as_str() {
                "exists()" | "empty()" | "not()" => n,
                _ => break,
            };
            path.pop();
            criterion = Some(match (function.as_str(), criterion.take()) {
                ("exists()", None) => Criterion::Exists(std::mem::take(&mut path)),
                ("empty()", None) => Criterion::Empty(std::mem::take(&mut path)),
                ("not()", Some(c)) if path.is_empty() => Criterion::Not(Box::new(c)),
                _ => return Err("not() must follow a criterion, as in exists().not()".into()),
            });
        }
        if let Some(c) = criterion {
            return Ok(c);
        }
        let equal = if self.eat("!=") {
            false
        } else if self.eat("=") {
            true
        } else {
            return Err(format!("expected '=', '!=' or exists() at offset {}", self.pos));
        };
        let literal = self.literal()?;
        Ok(Criterion::Compare { path, equal, literal })
    }

    fn literal(&mut self) -> Result<Value, String> {
        self.ws();
        match self.s.get(self.pos) {
            Some(b'\'') => {
                let mut out = Vec::new();
                let mut i = self.pos + 1;
                loop {
                    match self.s.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some(b'\\') => {
                            let escaped = *self.s.get(i + 1).ok_or("unterminated string literal")?;
                            out.push(match escaped {
                                b'n' => b'\n',
                                b't' => b'\t',
                                b'r' => b'\r',
                                other => other,
                            });
                            i += 2;
                        }
                        Some(b'\'') => break,
                        Some(b) => {
                            out.push(*b);
                            i += 1;
                        }
                    }
                }
                self.pos = i + 1;
                Ok(Value::String(String::from_utf8_lossy(&out).into_owned()))
            }
            _ if self.keyword("true") => Ok(Value::Bool(true)),
            _ if self.keyword("false") => Ok(Value::Bool(false)),
            _ => {
                let start = self.pos;
                while self.s.get(self.pos).is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.')) {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(Value::is_number)
                    .ok_or_else(|| format!("expected a literal at offset {start}"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// Where an element is: keys and array indexes from the root.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Idx(usize),
}

type Loc = Vec<Seg>;

fn get<'a>(root: &'a Value, loc: &[Seg]) -> Option<&'a Value> {
    loc.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Idx(i) => v.get(i),
    })
}

fn get_mut<'a>(root: &'a mut Value, loc: &[Seg]) -> Option<&'a mut Value> {
    loc.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get_mut(k),
        Seg::Idx(i) => v.get_mut(i),
    })
}

/// The key under which `name` lives in `object`: itself, or a choice element `name[Type]`.
fn key_of(object: &Map<String, Value>, name: &str) -> Option<String> {
    if object.contains_key(name) {
        return Some(name.to_string());
    }
    object
        .keys()
        .find(|k| k.len() > name.len() && k.starts_with(name) && k.as_bytes()[name.len()].is_ascii_uppercase())
        .cloned()
}

fn evaluate(root: &Value, start: Vec<Loc>, steps: &[Step]) -> Vec<Loc> {
    let mut current = start;
    for step in steps {
        current = match step {
            Step::Name(name) => {
                let mut next = Vec::new();
                for loc in current {
                    let Some(Value::Object(obj)) = get(root, &loc) else { continue };
                    let Some(key) = key_of(obj, name) else { continue };
                    let mut child = loc.clone();
                    child.push(Seg::Key(key.clone()));
                    match &obj[&key] {
                        Value::Array(items) => {
                            for i in 0..items.len() {
                                let mut item = child.clone();
                                item.push(Seg::Idx(i));
                                next.push(item);
                            }
                        }
                        _ => next.push(child),
                    }
                }
                next
            }
            Step::Index(i) => current.into_iter().nth(*i).into_iter().collect(),
            Step::First => current.into_iter().take(1).collect(),
            Step::Last => current.into_iter().last().into_iter().collect(),
            Step::OfType(t) => current
                .into_iter()
                .filter(|loc| match loc.iter().rev().find_map(|s| if let Seg::Key(k) = s { Some(k) } else { None }) {
                    Some(k) => k.ends_with(t.as_str()),
                    None => false,
                })
                .collect(),
            Step::Where(c) => current.into_iter().filter(|loc| holds(root, loc, c)).collect(),
        };
    }
    current
}

fn holds(root: &Value, loc: &Loc, criterion: &Criterion) -> bool {
    let values = |path: &[Step]| -> Vec<&Value> {
        evaluate(root, vec![loc.clone()], path).iter().filter_map(|l| get(root, l)).collect()
    };
    match criterion {
        Criterion::Compare { path, equal, literal } => {
            let found = values(path);
            let matches = found.iter().any(|v| crate::model::patch::json_equal(v, literal));
            if *equal {
                matches
            } else {
                !found.is_empty() && !matches
            }
        }
        Criterion::Exists(path) => !values(path).is_empty(),
        Criterion::Empty(path) => values(path).is_empty(),
        Criterion::Not(c) => !holds(root, loc, c),
        Criterion::And(a, b) => holds(root, loc, a) && holds(root, loc, b),
        Criterion::Or(a, b) => holds(root, loc, a) || holds(root, loc, b),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(kind: &str, path: &str, extra: Value) -> Value {
        let mut parts = vec![json!({"name":"type","valueCode":kind}), json!({"name":"path","valueString":path})];
        if let Value::Array(more) = extra {
            parts.extend(more);
        }
        json!({"name":"operation","part":parts})
    }

    fn run(doc: Value, ops: Vec<Value>) -> Result<Value, PatchError> {
        let parsed = parse(&json!({"resourceType":"Parameters","parameter":ops}), "Patient")?;
        let mut doc = doc;
        apply(&mut doc, &parsed)?;
        Ok(doc)
    }

    #[test]
    fn paths_parse() {
        assert_eq!(
            parse_path("Patient.identifier.where(system='http://x' and value.exists()).value").unwrap().len(),
            4
        );
        assert_eq!(parse_path("Patient.name[0].given.last()").unwrap()[2], Step::Index(0));
        assert!(parse_path("Patient.name.select(given)").unwrap_err().contains("select"));
        assert!(parse_path("Patient.name.where(").is_err());
        assert!(parse_path(&format!("Patient{}", ".where(a=1)".repeat(2))).is_ok());
        let deep = format!("Patient.a.where({}b=1{})", "(".repeat(40), ")".repeat(40));
        assert!(parse_path(&deep).unwrap_err().contains("deeper"));
    }

    #[test]
    fn every_operation_type() {
        let p = json!({"resourceType":"Patient","id":"1","identifier":[{"system":"a","value":"1"},{"system":"b","value":"2"}]});
        let exists = run(
            p.clone(),
            vec![op("add", "Patient", json!([{"name":"name","valueString":"id"}, {"name":"value","valueString":"2"}]))],
        );
        assert!(exists.unwrap_err().reason.contains("already has a value"));
        let out = run(
            p.clone(),
            vec![
                op(
                    "add",
                    "Patient",
                    json!([{"name":"name","valueString":"birthDate"},{"name":"value","valueDate":"2000-01-01"}]),
                ),
                op("replace", "Patient.birthDate", json!([{"name":"value","valueDate":"2001-01-01"}])),
                op(
                    "insert",
                    "Patient.identifier",
                    json!([{"name":"index","valueInteger":0},{"name":"value","valueIdentifier":{"value":"0"}}]),
                ),
                op(
                    "move",
                    "Patient.identifier",
                    json!([{"name":"source","valueInteger":2},{"name":"destination","valueInteger":0}]),
                ),
                op("delete", "Patient.identifier.where(system='a')", json!([])),
                op("delete", "Patient.telecom", json!([])),
            ],
        )
        .unwrap();
        assert_eq!(out["birthDate"], "2001-01-01");
        assert_eq!(out["identifier"], json!([{"system":"b","value":"2"},{"value":"0"}]));
        let err = run(p, vec![op("delete", "Patient.identifier", json!([]))]).unwrap_err();
        assert_eq!((err.index, err.kind.as_str()), (0, "delete"));
        assert!(err.reason.contains("selects 2"), "{err}");
    }

    #[test]
    fn values_from_parts_and_choice_names() {
        let p = json!({"resourceType":"Observation","valueQuantity":{"value":1}});
        let parsed = parse(
            &json!({"resourceType":"Parameters","parameter":[
                op("replace", "Observation.value.value", json!([{"name":"value","valueDecimal":2}])),
                op("add", "Observation", json!([{"name":"name","valueString":"code"},{"name":"value","part":[
                    {"name":"text","valueString":"t"},{"name":"coding","valueCoding":{"code":"a"}},{"name":"coding","valueCoding":{"code":"b"}}]}]))
            ]}),
            "Observation",
        )
        .unwrap();
        let mut doc = p;
        apply(&mut doc, &parsed).unwrap();
        assert_eq!(doc["valueQuantity"]["value"], 2);
        assert_eq!(doc["code"], json!({"text":"t","coding":[{"code":"a"},{"code":"b"}]}));
    }

    #[test]
    fn errors_name_the_operation_and_leave_the_document() {
        let parsed =
            parse(&json!({"resourceType":"Parameters","parameter":[op("explode", "Patient", json!([]))]}), "Patient");
        assert!(parsed.unwrap_err().reason.contains("unknown operation type"));
        let parsed = parse(
            &json!({"resourceType":"Parameters","parameter":[op("insert", "Patient.name", json!([]))]}),
            "Patient",
        );
        assert!(parsed.unwrap_err().reason.contains("'value'"));
    }
}
