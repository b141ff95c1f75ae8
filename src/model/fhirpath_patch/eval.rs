//! Evaluating parsed paths over a JSON document: locations as keys and indexes.

use super::*;

/// Where an element is: keys and array indexes from the root.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Seg {
    Key(String),
    Idx(usize),
}

pub(super) type Loc = Vec<Seg>;

pub(super) fn get<'a>(root: &'a Value, loc: &[Seg]) -> Option<&'a Value> {
    loc.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Idx(i) => v.get(i),
    })
}

pub(super) fn get_mut<'a>(root: &'a mut Value, loc: &[Seg]) -> Option<&'a mut Value> {
    loc.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get_mut(k),
        Seg::Idx(i) => v.get_mut(i),
    })
}

/// The key under which `name` lives in `object`: itself, or a choice element `name[Type]`.
pub(super) fn key_of(object: &Map<String, Value>, name: &str) -> Option<String> {
    if object.contains_key(name) {
        return Some(name.to_string());
    }
    object
        .keys()
        .find(|k| k.len() > name.len() && k.starts_with(name) && k.as_bytes()[name.len()].is_ascii_uppercase())
        .cloned()
}

pub(super) fn evaluate(root: &Value, start: Vec<Loc>, steps: &[Step]) -> Vec<Loc> {
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

pub(super) fn holds(root: &Value, loc: &Loc, criterion: &Criterion) -> bool {
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
