//! The exact semantics of each test on a resource's index values (R4 search.html). The
//! index keys only find candidates; this decides, for every candidate, so that what a
//! search returns never depends on how a key over-approximates.
//!
//! Ranges: a date value covers `[low, high)`, a search date too; a number or quantity is
//! compared by its value, the search value's precision giving its `eq` range
//! (`100` matches `[99.5, 100.5)`). `ap` is within 10 % of the search value (of the gap to
//! now, for dates).

use super::extract::{IndexValue, Number, Reference};
use super::keys::normalize;
use super::query::{Prefix, RefTarget, Test};

/// Whether any value matches the test.
pub fn any_matches(values: &[IndexValue], test: &Test, allowed_types: &[String]) -> bool {
    values.iter().any(|v| matches(v, test, allowed_types))
}

fn matches(v: &IndexValue, test: &Test, allowed: &[String]) -> bool {
    match (test, v) {
        (Test::Token { system, code }, IndexValue::Token { system: vs, code: vc, .. }) => {
            let system_ok = match system {
                None => true,
                Some(None) => vs.is_none(),
                Some(Some(s)) => vs.as_deref() == Some(s.as_str()),
            };
            let code_ok = match code {
                None => true,
                Some(c) => vc.as_deref() == Some(c.as_str()),
            };
            system_ok && code_ok && (code.is_some() || vs.is_some())
        }
        (Test::TokenText(t), IndexValue::Token { text: Some(text), .. }) => {
            let n = normalize(text);
            n.starts_with(t.as_str()) || n.split(' ').any(|w| w.starts_with(t.as_str()))
        }
        (Test::OfType { system, code, value }, IndexValue::IdentifierType { system: s, code: c, value: v }) => {
            system == s && code == c && value == v
        }
        (Test::StringPrefix(p), IndexValue::String(s)) => normalize(s).starts_with(p.as_str()),
        (Test::StringExact(e), IndexValue::String(s)) => s == e,
        (Test::StringContains(c), IndexValue::String(s)) => normalize(s).contains(c.as_str()),
        (Test::Reference(target), IndexValue::Reference(r)) => reference_matches(target, r, allowed),
        (Test::RefIdentifier { system, value }, IndexValue::Reference(Reference { identifier: Some((s, v)), .. })) => {
            v == value && (system.is_none() || system == s)
        }
        (Test::RefAny(targets), IndexValue::Reference(Reference { target: Some(t), .. })) => {
            targets.iter().any(|x| x == t)
        }
        (Test::Uri(u), IndexValue::Uri(v)) => u == v,
        (Test::Uri(u), IndexValue::Reference(Reference { target: Some(t), .. })) => u == t,
        (Test::UriBelow(u), IndexValue::Uri(v)) => v.starts_with(u.as_str()),
        (Test::UriAbove(u), IndexValue::Uri(v)) => u.starts_with(v.as_str()),
        (Test::Date { prefix, low, high }, IndexValue::Date { low: tl, high: th }) => {
            date_matches(*prefix, (*low, *high), (*tl, *th))
        }
        (Test::Number { prefix, number }, IndexValue::Number(n)) => number_matches(*prefix, number, n),
        (Test::Number { prefix, number }, IndexValue::Quantity { number: n, canonical: false, .. }) => {
            number_matches(*prefix, number, n)
        }
        (
            Test::Quantity { prefix, number, system, code },
            IndexValue::Quantity { number: n, system: s, code: c, unit, canonical },
        ) => {
            let unit_ok = match (system, code) {
                (_, None) => !canonical,
                (None, Some(code)) => c.as_deref() == Some(code) || unit.as_deref() == Some(code),
                (Some(sys), Some(code)) => s.as_deref() == Some(sys) && c.as_deref() == Some(code),
            };
            unit_ok && number_matches(*prefix, number, n)
        }
        (Test::Quantity { prefix, number, system: None, code: None }, IndexValue::Number(n)) => {
            number_matches(*prefix, number, n)
        }
        (Test::Composite(tests), IndexValue::Composite(parts)) => {
            tests.len() == parts.len() && tests.iter().zip(parts).all(|(t, values)| any_matches(values, t, &[]))
        }
        _ => false,
    }
}

fn reference_matches(target: &RefTarget, r: &Reference, allowed: &[String]) -> bool {
    let Some(t) = &r.target else { return false };
    match target {
        RefTarget::Local { ty, id, version } => {
            let same = t.len() == ty.len() + 1 + id.len()
                && t.starts_with(ty.as_str())
                && t.ends_with(id.as_str())
                && t.as_bytes()[ty.len()] == b'/';
            same && (version.is_none() || version == &r.version)
        }
        RefTarget::Id(id) => {
            let Some(ty) = &r.target_type else { return false };
            t == &format!("{ty}/{id}") && (allowed.is_empty() || allowed.iter().any(|a| a == ty))
        }
        RefTarget::Url { url, version } => t == url && (version.is_none() || version == &r.version),
    }
}

/// Milliseconds `now`, for `ap` on dates.
fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// R4 date prefixes on ranges: `search` = [sl, sh), `target` = [tl, th).
pub fn date_matches(prefix: Prefix, (sl, sh): (i64, i64), (tl, th): (i64, i64)) -> bool {
    match prefix {
        Prefix::Eq => tl >= sl && th <= sh,
        Prefix::Ne => !(tl >= sl && th <= sh),
        Prefix::Gt => th > sh,
        Prefix::Lt => tl < sl,
        Prefix::Ge => th > sl,
        Prefix::Le => tl < sh,
        Prefix::Sa => tl >= sh,
        Prefix::Eb => th <= sl,
        Prefix::Ap => {
            let gap = ((now_ms() - sl).abs() / 10).max(sh - sl);
            tl < sh + gap && th > sl - gap
        }
    }
}

/// R4 number prefixes: the target's value against the search value (its precision range
/// for `eq`/`ne`).
pub fn number_matches(prefix: Prefix, search: &Number, target: &Number) -> bool {
    let v = target.value;
    match prefix {
        Prefix::Eq => v >= search.low && v < search.high,
        Prefix::Ne => !(v >= search.low && v < search.high),
        Prefix::Gt | Prefix::Sa => v > search.value,
        Prefix::Lt | Prefix::Eb => v < search.value,
        Prefix::Ge => v >= search.value,
        Prefix::Le => v <= search.value,
        Prefix::Ap => {
            let gap = (search.value * 0.1).abs().max(search.high - search.low);
            (v - search.value).abs() <= gap
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::extract::{date_range, parse_number};

    fn d(s: &str) -> (i64, i64) {
        date_range(s).unwrap()
    }

    #[test]
    fn date_prefixes_on_ranges() {
        // A birthDate of 1974-12 against searches of each prefix.
        let t = d("1974-12");
        assert!(date_matches(Prefix::Eq, d("1974"), t));
        assert!(!date_matches(Prefix::Eq, d("1974-12-25"), t), "a day does not contain a month");
        assert!(date_matches(Prefix::Ge, d("1974-12-25"), t), "overlaps");
        assert!(date_matches(Prefix::Le, d("1974-12-01"), t));
        assert!(!date_matches(Prefix::Gt, d("1974"), t));
        assert!(date_matches(Prefix::Gt, d("1974-11"), t));
        assert!(date_matches(Prefix::Lt, d("1975"), t));
        assert!(date_matches(Prefix::Sa, d("1974-11"), t) && !date_matches(Prefix::Sa, d("1974-12-02"), t));
        assert!(date_matches(Prefix::Eb, d("1975"), t) && !date_matches(Prefix::Eb, d("1974-12-31"), t));
        assert!(date_matches(Prefix::Ne, d("1975"), t));
    }

    #[test]
    fn number_prefixes_use_the_search_precision() {
        let n = |s: &str| parse_number(s).unwrap();
        assert!(number_matches(Prefix::Eq, &n("100"), &n("100.4")));
        assert!(!number_matches(Prefix::Eq, &n("100.0"), &n("100.4")));
        assert!(number_matches(Prefix::Gt, &n("100"), &n("100.4")));
        assert!(number_matches(Prefix::Ap, &n("100"), &n("109")));
        assert!(!number_matches(Prefix::Ap, &n("100"), &n("111")));
        assert!(number_matches(Prefix::Ne, &n("100"), &n("101")));
    }

    #[test]
    fn tokens_and_references() {
        let v =
            IndexValue::Token { system: Some("s".into()), code: Some("c".into()), text: Some("Blood pressure".into()) };
        assert!(any_matches(std::slice::from_ref(&v), &Test::Token { system: None, code: Some("c".into()) }, &[]));
        assert!(!any_matches(
            std::slice::from_ref(&v),
            &Test::Token { system: Some(None), code: Some("c".into()) },
            &[]
        ));
        assert!(any_matches(
            std::slice::from_ref(&v),
            &Test::Token { system: Some(Some("s".into())), code: None },
            &[]
        ));
        assert!(any_matches(std::slice::from_ref(&v), &Test::TokenText("press".into()), &[]));
        let r = IndexValue::Reference(Reference {
            target: Some("Patient/1".into()),
            target_type: Some("Patient".into()),
            version: None,
            identifier: None,
        });
        let local =
            |ty: &str, id: &str| Test::Reference(RefTarget::Local { ty: ty.into(), id: id.into(), version: None });
        assert!(any_matches(std::slice::from_ref(&r), &local("Patient", "1"), &[]));
        assert!(!any_matches(std::slice::from_ref(&r), &local("Patient", "11"), &[]));
        assert!(!any_matches(std::slice::from_ref(&r), &local("Group", "1"), &[]));
        assert!(any_matches(std::slice::from_ref(&r), &Test::Reference(RefTarget::Id("1".into())), &[]));
        assert!(!any_matches(std::slice::from_ref(&r), &Test::Reference(RefTarget::Id("1".into())), &["Group".into()]));
    }
}
