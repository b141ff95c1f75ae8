//! A parsed search as conditions on index keys: what finds the candidates, in ClickHouse
//! (as SQL with bound parameters) and on a pending document's own keys (the same
//! conditions evaluated in Rust), so both paths agree by construction.
//!
//! Keys only find candidates. Where a key over-approximates a test (a date's `eq` needs
//! its low and high ends from the same value; a string cut at `MAX_KEY`; `:contains`;
//! `ap`), the matcher decides on the document. A negation (`:not`, `:missing=true`) is
//! planned as "no key in the set" only where the keys are exact, else left to the matcher.

use std::collections::HashSet;
use std::sync::Arc;

use super::definitions::{registry, Definition, ParamType};
use super::keys::{after_prefix, component_forms_of_test, key, sortable_f64, sortable_i64, US};
use super::query::{Clause, Prefix, RefTarget, Test};
use super::sql::Sql;

/// One condition on a key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyCond {
    Eq(String),
    /// `[from, to)`.
    Range(String, String),
    /// In `[from, to)`, with `needle` somewhere after the first `skip` bytes.
    Contains {
        from: String,
        to: String,
        needle: String,
        skip: usize,
    },
    /// `prefix` followed by an id that `inner` (a `SELECT id …` subquery) finds: a chain
    /// whose inner search matches more resources than a list of keys should hold.
    Refers {
        prefix: String,
        inner: Arc<Sql>,
        /// Of the ids after `prefix` in the keys of the documents a search evaluates
        /// itself (pending ones), those `inner` finds (filled by the engine first).
        found: Arc<HashSet<String>>,
    },
}

impl KeyCond {
    fn prefix(p: String) -> KeyCond {
        let to = after_prefix(&p);
        KeyCond::Range(p, to)
    }

    pub fn matches(&self, k: &str) -> bool {
        match self {
            KeyCond::Eq(e) => k == e,
            KeyCond::Range(from, to) => k >= from.as_str() && k < to.as_str(),
            KeyCond::Contains { from, to, needle, skip } => {
                k >= from.as_str()
                    && k < to.as_str()
                    && k.get(*skip..).is_some_and(|rest| rest.contains(needle.as_str()))
            }
            KeyCond::Refers { prefix, found, .. } => {
                k.strip_prefix(prefix.as_str()).is_some_and(|id| found.contains(id))
            }
        }
    }
}

/// Any of these conditions (a clause's values, ORed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeySet(pub Vec<KeyCond>);

impl KeySet {
    /// How many resources a set of this shape usually finds, as a rank (lower = fewer),
    /// for choosing which step drives a search when there are no statistics: a
    /// reference or an identifier names a few resources; an exact string, a string
    /// prefix a few more; a code or a status many; a range of dates or numbers, or
    /// "has a value", most. A set is as wide as its widest condition.
    pub fn breadth(&self) -> u8 {
        self.0
            .iter()
            .map(|c| {
                let k = match c {
                    KeyCond::Eq(k) => k,
                    KeyCond::Range(from, _) | KeyCond::Contains { from, .. } => from,
                    // As many as the inner search finds: too many to list.
                    KeyCond::Refers { .. } => return 3,
                };
                let (code, rest) = k.split_once(US).unwrap_or((k, ""));
                match (c, rest.chars().next()) {
                    (_, Some('*')) => 4,
                    (KeyCond::Eq(_), Some('r' | 'i')) => 0,
                    (KeyCond::Eq(_), _) if code == "identifier" || code == "_id" => 0,
                    (KeyCond::Eq(_), Some('e')) => 1,
                    (KeyCond::Range(..), Some('p')) => 1,
                    (KeyCond::Eq(_), _) => 2,
                    _ => 3,
                }
            })
            .max()
            .unwrap_or(4)
    }

    /// Whether any key (sorted) satisfies a condition.
    pub fn any(&self, keys: &[String]) -> bool {
        self.0.iter().any(|c| match c {
            KeyCond::Eq(e) => keys.binary_search(e).is_ok(),
            _ => keys.iter().any(|k| c.matches(k)),
        })
    }
}

/// One step of the candidate search; steps are ANDed.
#[derive(Debug, Clone)]
pub enum Step {
    /// Resources with a key in the set.
    With(KeySet),
    /// Resources without any key in the set.
    Without(KeySet),
    /// Resources with these ids.
    Ids(Vec<String>),
    /// Resources a detached reference points to.
    Targets(super::detached::Targets),
    /// Resources a subquery finds.
    IdsIn(IdQuery),
}

/// The ids of the searched type a subquery finds (a `_has` whose sources are too many to
/// list), and those known from documents evaluated in Rust.
#[derive(Debug, Clone, PartialEq)]
pub struct IdQuery {
    /// `SELECT id …` over what ClickHouse holds.
    pub sql: Arc<Sql>,
    /// Ids found by pending documents (the subquery leaves those out).
    pub known: Arc<HashSet<String>>,
    /// Of the documents a search evaluates itself, those the subquery finds (filled by
    /// the engine first).
    pub among: Arc<HashSet<String>>,
}

impl Step {
    /// On a resource's sorted keys.
    pub fn holds(&self, id: &str, keys: &[String]) -> bool {
        match self {
            Step::With(s) => s.any(keys),
            Step::Without(s) => !s.any(keys),
            Step::Ids(ids) => ids.iter().any(|i| i == id),
            Step::Targets(t) => t.among.contains(id),
            Step::IdsIn(q) => q.known.contains(id) || q.among.contains(id),
        }
    }
}

/// The key every stored version of every type has (`meta.lastUpdated` present): "all".
pub fn every_resource() -> String {
    key("_lastUpdated", '*', "")
}

/// The steps of one clause (chains and `_has` resolved into ids or references first).
pub fn steps(rt: &str, clause: &Clause) -> Vec<Step> {
    match clause {
        Clause::Param { def, not: false, any } => vec![Step::With(key_set(def, any))],
        Clause::Param { def, not: true, any } => match any.iter().all(|t| matches!(t, Test::Token { .. })) {
            true => vec![Step::Without(key_set(def, any))],
            false => Vec::new(),
        },
        Clause::Missing { def, missing } => {
            let present = KeySet(vec![KeyCond::Eq(key(&def.code, '*', ""))]);
            vec![if *missing { Step::Without(present) } else { Step::With(present) }]
        }
        Clause::Ids(ids) => vec![Step::Ids(ids.clone())],
        Clause::Targets(t) => vec![Step::Targets(t.clone())],
        Clause::Keys(set) => vec![Step::With(set.clone())],
        Clause::IdsIn(q) => vec![Step::IdsIn(q.clone())],
        Clause::LastUpdated(any) => match registry().get(rt, "_lastUpdated") {
            Some(def) => vec![Step::With(key_set(def, any))],
            None => Vec::new(),
        },
        // Resolved by the executor before planning.
        Clause::Chain { .. } | Clause::Has(_) | Clause::List(_) => Vec::new(),
        // One "with" step for the union, when each part is one; else the matcher decides.
        Clause::AnyOf(parts) => {
            let mut union = Vec::new();
            for part in parts {
                match steps(rt, part).as_slice() {
                    [Step::With(set)] => union.extend(set.0.iter().cloned()),
                    _ => return Vec::new(),
                }
            }
            vec![Step::With(KeySet(union))]
        }
    }
}

/// The keys that find any of a parameter's tests.
pub fn key_set(def: &Definition, any: &[Test]) -> KeySet {
    let mut out = Vec::new();
    for t in any {
        test_conds(def, t, &mut out);
    }
    KeySet(out)
}

/// Every key of the parameter with tag `tag`.
fn all_of(code: &str, tag: char) -> KeyCond {
    KeyCond::prefix(key(code, tag, ""))
}

fn test_conds(def: &Definition, t: &Test, out: &mut Vec<KeyCond>) {
    let c = def.code.as_str();
    let join = |parts: &[&str]| parts.join(&US.to_string());
    match t {
        Test::Token { system: None, code: Some(x) } => out.push(KeyCond::Eq(key(c, 'c', x))),
        Test::Token { system: Some(None), code: Some(x) } => out.push(KeyCond::Eq(key(c, 'n', x))),
        Test::Token { system: Some(Some(s)), code: Some(x) } => out.push(KeyCond::Eq(key(c, 't', &join(&[s, x])))),
        Test::Token { system: Some(Some(s)), code: None } => out.push(KeyCond::Eq(key(c, 's', s))),
        Test::Token { .. } => out.push(KeyCond::Eq(key(c, '*', ""))),
        Test::TokenText(text) => out.push(KeyCond::prefix(key(c, 'x', text))),
        Test::OfType { system, code, value } => out.push(KeyCond::Eq(key(c, 'o', &join(&[system, code, value])))),
        Test::StringPrefix(p) => out.push(KeyCond::prefix(key(c, 'p', p))),
        // A long value's key is cut: its start finds it.
        Test::StringExact(e) => out.push(KeyCond::prefix(key(c, 'e', e))),
        Test::StringContains(n) => {
            let from = key(c, 'p', "");
            let skip = from.len();
            let to = after_prefix(&from);
            out.push(KeyCond::Contains { from, to, needle: n.clone(), skip });
        }
        Test::Reference(RefTarget::Local { ty, id, version }) => {
            let target = format!("{ty}/{id}");
            out.push(KeyCond::Eq(key(
                c,
                'r',
                &match version {
                    Some(v) => format!("{target}/_history/{v}"),
                    None => target,
                },
            )));
        }
        Test::Reference(RefTarget::Id(id)) => out.push(KeyCond::Eq(key(c, 'i', id))),
        Test::Reference(RefTarget::Url { url, version }) => out.push(KeyCond::Eq(key(
            c,
            'r',
            &match version {
                Some(v) => format!("{url}|{v}"),
                None => url.clone(),
            },
        ))),
        Test::RefIdentifier { system, value } => {
            out.push(KeyCond::Eq(key(c, 'd', &join(&[system.as_deref().unwrap_or(""), value]))))
        }
        Test::RefAny(targets) => out.extend(targets.iter().map(|t| KeyCond::Eq(key(c, 'r', t)))),
        Test::Uri(u) => {
            out.push(KeyCond::Eq(key(c, 'u', u)));
            // Canonical-typed parameters are references in the index.
            if def.kind == ParamType::Reference {
                out.push(KeyCond::Eq(key(c, 'r', u)));
            }
        }
        Test::UriBelow(u) => out.push(KeyCond::prefix(key(c, 'u', u))),
        Test::UriAbove(u) => {
            // Every prefix of the search URI (at most `MAX_KEY` of them) is a candidate.
            let mut ends: Vec<usize> = u.char_indices().map(|(i, _)| i).skip(1).collect();
            ends.push(u.len());
            for end in ends.into_iter().take(super::keys::MAX_KEY) {
                out.push(KeyCond::Eq(key(c, 'u', &u[..end])));
            }
        }
        Test::Date { prefix, low, high } => out.push(date_cond(c, *prefix, *low, *high)),
        Test::Number { prefix, number } => out.push(number_cond(key(c, 'v', ""), *prefix, number)),
        Test::Quantity { prefix, number, system, code } => {
            let at = match (system, code) {
                (Some(s), Some(u)) => key(c, 'q', &format!("{}{US}", join(&[s, u]))),
                (None, Some(u)) => key(c, 'Q', &format!("{u}{US}")),
                _ => key(c, 'v', ""),
            };
            out.push(number_cond(at, *prefix, number));
        }
        Test::Composite(tests) => out.push(composite_cond(c, tests)),
    }
}

/// A date test as a range of the low (`L`) or high (`H`) keys; `ne` and `ap` take every
/// value (the matcher decides).
fn date_cond(c: &str, prefix: Prefix, sl: i64, sh: i64) -> KeyCond {
    let at = |tag: char, ms: i64| key(c, tag, &sortable_i64(ms));
    match prefix {
        Prefix::Eq => KeyCond::Range(at('L', sl), at('L', sh)),
        Prefix::Lt => KeyCond::Range(key(c, 'L', ""), at('L', sl)),
        Prefix::Le => KeyCond::Range(key(c, 'L', ""), at('L', sh)),
        Prefix::Sa => KeyCond::Range(at('L', sh), after_prefix(&key(c, 'L', ""))),
        Prefix::Gt => KeyCond::Range(at('H', sh.saturating_add(1)), after_prefix(&key(c, 'H', ""))),
        Prefix::Ge => KeyCond::Range(at('H', sl.saturating_add(1)), after_prefix(&key(c, 'H', ""))),
        Prefix::Eb => KeyCond::Range(key(c, 'H', ""), at('H', sl.saturating_add(1))),
        Prefix::Ne | Prefix::Ap => all_of(c, 'L'),
    }
}

/// A number test as a range of sortable values after `at` (a key prefix).
fn number_cond(at: String, prefix: Prefix, n: &super::extract::Number) -> KeyCond {
    let v = |x: f64| format!("{at}{}", sortable_f64(x));
    let end = after_prefix(&at);
    // Just above a value, for strict comparisons and inclusive ends.
    let next = |x: f64| format!("{}\u{0}", v(x));
    match prefix {
        Prefix::Eq => KeyCond::Range(v(n.low), v(n.high)),
        Prefix::Gt | Prefix::Sa => KeyCond::Range(next(n.value), end),
        Prefix::Ge => KeyCond::Range(v(n.value), end),
        Prefix::Lt | Prefix::Eb => KeyCond::Range(at.clone(), v(n.value)),
        Prefix::Le => KeyCond::Range(at.clone(), next(n.value)),
        Prefix::Ap => {
            let gap = (n.value * 0.1).abs().max(n.high - n.low);
            KeyCond::Range(v(n.value - gap), next(n.value + gap))
        }
        Prefix::Ne => KeyCond::Range(at.clone(), end),
    }
}

/// A composite: the first component's form exactly, the rest by prefix of their forms
/// (ranges on a later component are left to the matcher).
fn composite_cond(c: &str, tests: &[Test]) -> KeyCond {
    let Some(first) = tests.first().and_then(component_forms_of_test) else {
        return all_of(c, 'k');
    };
    let mut payload = first;
    if let Some(second) = tests.get(1) {
        match (component_forms_of_test(second), second) {
            (Some(form), _) if tests.len() == 2 => return KeyCond::Eq(key(c, 'k', &format!("{payload}${form}"))),
            _ => payload.push('$'),
        }
    }
    KeyCond::prefix(key(c, 'k', &payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::query::parse_clause;

    fn holds(rt: &str, name: &str, value: &str, resource: serde_json::Value) -> bool {
        let clause = parse_clause(rt, name, value, "http://h/fhir", 0).unwrap().unwrap();
        let keys = crate::search::index_keys(&resource, "http://h/fhir");
        steps(rt, &clause).iter().all(|s| s.holds("x", &keys))
    }

    fn breadth(rt: &str, name: &str, value: &str) -> u8 {
        let clause = parse_clause(rt, name, value, "http://h/fhir", 0).unwrap().unwrap();
        match steps(rt, &clause).as_slice() {
            [Step::With(set)] => set.breadth(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn references_and_identifiers_drive_before_codes_and_ranges() {
        let subject = breadth("Observation", "subject", "Patient/1");
        let identifier = breadth("Observation", "identifier", "http://x|1");
        let family = breadth("Patient", "family", "smi");
        let code = breadth("Observation", "code", "http://loinc.org|1-1");
        let date = breadth("Observation", "date", "ge2024-01-01");
        let present = breadth("Observation", "code:missing", "false");
        assert!(subject == identifier && identifier < family && family < code, "{subject} {family} {code}");
        assert!(code < date && date < present, "{code} {date} {present}");
        // A set is as wide as its widest value.
        assert_eq!(breadth("Observation", "subject", "Patient/1,Patient/2"), subject);
    }

    #[test]
    fn strings_tokens_references_dates_numbers() {
        let p = serde_json::json!({"resourceType": "Patient", "name": [{"family": "Zoë Smith"}],
            "gender": "female", "birthDate": "1974-12-25", "generalPractitioner": [{"reference": "Practitioner/9"}],
            "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}});
        assert!(holds("Patient", "family", "zoe", p.clone()));
        assert!(!holds("Patient", "family", "smith", p.clone()));
        assert!(holds("Patient", "family:exact", "Zoë Smith", p.clone()));
        assert!(!holds("Patient", "family:exact", "zoë smith", p.clone()));
        assert!(holds("Patient", "family:contains", "smi", p.clone()));
        assert!(holds("Patient", "gender", "female", p.clone()));
        // A code element's system is its binding's (implicit): `|female` wants none.
        assert!(!holds("Patient", "gender", "|female", p.clone()));
        assert!(holds("Patient", "gender", "http://hl7.org/fhir/administrative-gender|female", p.clone()));
        assert!(!holds("Patient", "gender", "male", p.clone()));
        assert!(holds("Patient", "gender:not", "male", p.clone()));
        assert!(!holds("Patient", "gender:not", "female", p.clone()));
        assert!(holds("Patient", "general-practitioner", "Practitioner/9", p.clone()));
        assert!(holds("Patient", "general-practitioner", "9", p.clone()));
        assert!(holds("Patient", "general-practitioner", "http://h/fhir/Practitioner/9", p.clone()));
        assert!(!holds("Patient", "general-practitioner", "Practitioner/99", p.clone()));
        for (q, expected) in [
            ("1974", true),
            ("1974-12-25", true),
            ("1975", false),
            ("ge1974-12-25", true),
            ("gt1974-12-25", false),
            ("lt1974-12-26", true),
            ("lt1974-12-25", false),
            ("le1974-12-25", true),
            ("sa1974-12-24", true),
            ("eb1974-12-26", true),
            ("eb1974-12-25", false),
        ] {
            assert_eq!(holds("Patient", "birthdate", q, p.clone()), expected, "birthdate={q}");
        }
        assert!(holds("Patient", "birthdate:missing", "false", p.clone()));
        assert!(holds("Patient", "death-date:missing", "true", p.clone()));
        assert!(holds("Patient", "_lastUpdated", "ge2024-01-01", p.clone()));
        assert!(!holds("Patient", "_lastUpdated", "gt2024-01-01", p));
    }

    #[test]
    fn quantities_and_composites() {
        let o = serde_json::json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "valueQuantity": {"value": 185, "unit": "lbs", "system": "http://unitsofmeasure.org", "code": "[lb_av]"}});
        assert!(holds("Observation", "value-quantity", "185", o.clone()));
        assert!(holds("Observation", "value-quantity", "gt180", o.clone()));
        assert!(!holds("Observation", "value-quantity", "lt180", o.clone()));
        assert!(holds("Observation", "value-quantity", "185|http://unitsofmeasure.org|[lb_av]", o.clone()));
        assert!(holds("Observation", "value-quantity", "ge185||[lb_av]", o.clone()));
        assert!(!holds("Observation", "value-quantity", "185||kg", o.clone()));
        assert!(holds("Observation", "code-value-quantity", "http://loinc.org|29463-7$185", o.clone()));
        assert!(holds("Observation", "code-value-quantity", "29463-7$gt100", o.clone()));
        assert!(!holds("Observation", "code-value-quantity", "1-8$185", o));
    }
}
