//! Index keys: each typed index value written as strings whose equality and byte order are
//! what search needs, so one single-field index answers every parameter of a type with an
//! equality, an `$in`, or a range (a prefix is a range).
//!
//! A key is `code US tag payload` (US = U+001F, which FHIR strings cannot usefully hold):
//!
//! | tag | from | payload | answers |
//! |---|---|---|---|
//! | `t` | token with a system | `system US code` | `system\|code` |
//! | `c` | token | `code` | `code` |
//! | `n` | token without a system | `code` | `\|code` |
//! | `s` | token with a system | `system` | `system\|` |
//! | `x` | token display/text, identifier type text | normalized text, and each word | `:text` (prefix) |
//! | `o` | identifier type | `system US code US value` | `:of-type` |
//! | `p` | string | normalized (lowercase, accents removed) | default prefix search |
//! | `e` | string | as written | `:exact` |
//! | `r` | reference | `Type/id`, `Type/id/_history/v`, a URL, `url\|version` | equality |
//! | `i` | reference | `id` (`Type/id` without the type) | `subject=123` |
//! | `y` | reference | target type | `:Type` and chains |
//! | `d` | reference identifier | `system US value`, and `US value` | `:identifier` |
//! | `u` | uri | as written | equality, `:below`/`:above` (ranges and prefixes) |
//! | `L`/`H` | date | low / high end of the range, sortable | prefixes as ranges |
//! | `v` | number, quantity | value, sortable | prefixes as ranges |
//! | `q` | quantity with a system | `system US code US value` | `value\|system\|code` |
//! | `Q` | quantity with a code | `code US value` | `value\|\|code` |
//! | `k` | composite | components' keys joined by `$` | composites |
//! | `*` | any value | empty | `:missing=false` |
//!
//! Keys find candidates; every candidate is then checked against the full semantics
//! (`matcher.rs`), so a key may over-approximate (a date's low and high ends taken from
//! different values, a long string cut at [`MAX_KEY`]) but must never miss a match.

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use super::extract::{IndexValue, Number, Reference};

/// The separator between a key's parts.
pub const US: char = '\u{1f}';
/// Longest payload kept in a key, in bytes; longer strings are cut (at a character
/// boundary) and matched exactly by the matcher.
pub const MAX_KEY: usize = 200;

/// Lowercase, accents removed, whitespace collapsed: what string search compares.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.nfd().filter(|c| !is_combining_mark(*c)) {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_KEY {
        return s;
    }
    let mut end = MAX_KEY;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A key for parameter `code`, tag and payload.
pub fn key(code: &str, tag: char, payload: &str) -> String {
    let payload = cut(payload);
    let mut k = String::with_capacity(code.len() + payload.len() + 2);
    k.push_str(code);
    k.push(US);
    k.push(tag);
    k.push_str(payload);
    k
}

/// The first key after every key that starts with `prefix` (the end of a prefix range).
pub fn after_prefix(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

/// An f64 as 16 hex digits whose byte order is the numbers' order.
pub fn sortable_f64(v: f64) -> String {
    let bits = v.to_bits();
    let ordered = if v.is_sign_negative() { !bits } else { bits | 0x8000_0000_0000_0000 };
    format!("{ordered:016x}")
}

/// An i64 (milliseconds) as 16 hex digits whose byte order is the numbers' order.
pub fn sortable_i64(v: i64) -> String {
    format!("{:016x}", (v as u64) ^ 0x8000_0000_0000_0000)
}

fn join(parts: &[&str]) -> String {
    parts.join(&US.to_string())
}

/// Keys of one value of a token parameter (also used for composite components).
fn token_keys(code: &str, v: &IndexValue, out: &mut Vec<String>) {
    match v {
        IndexValue::Token { system, code: c, text } => {
            if let Some(c) = c {
                out.push(key(code, 'c', c));
                match system {
                    Some(s) => out.push(key(code, 't', &join(&[s, c]))),
                    None => out.push(key(code, 'n', c)),
                }
            }
            if let Some(s) = system {
                out.push(key(code, 's', s));
            }
            if let Some(t) = text {
                text_keys(code, t, out);
            }
        }
        IndexValue::IdentifierType { system, code: c, value } => out.push(key(code, 'o', &join(&[system, c, value]))),
        _ => {}
    }
}

fn text_keys(code: &str, t: &str, out: &mut Vec<String>) {
    let n = normalize(t);
    for word in n.split(' ').skip(1) {
        out.push(key(code, 'x', word));
    }
    out.push(key(code, 'x', &n));
}

fn reference_keys(code: &str, r: &Reference, out: &mut Vec<String>) {
    if let Some(t) = &r.target {
        out.push(key(code, 'r', t));
        if let Some(v) = &r.version {
            let versioned = match &r.target_type {
                Some(_) => format!("{t}/_history/{v}"),
                None => format!("{t}|{v}"),
            };
            out.push(key(code, 'r', &versioned));
        }
        if let (Some(ty), Some(id)) = (&r.target_type, t.rsplit('/').next()) {
            if t.starts_with(&format!("{ty}/")) {
                out.push(key(code, 'i', id));
            }
        }
    }
    if let Some(ty) = &r.target_type {
        out.push(key(code, 'y', ty));
    }
    if let Some((system, value)) = &r.identifier {
        if let Some(s) = system {
            out.push(key(code, 'd', &join(&[s, value])));
        }
        out.push(key(code, 'd', &join(&["", value])));
    }
}

fn number_key(n: &Number) -> String {
    sortable_f64(n.value)
}

/// Every key of one parameter's values.
pub fn keys(code: &str, values: &[IndexValue], out: &mut Vec<String>) {
    if values.is_empty() {
        return;
    }
    out.push(key(code, '*', ""));
    for v in values {
        match v {
            IndexValue::Token { .. } | IndexValue::IdentifierType { .. } => token_keys(code, v, out),
            IndexValue::String(s) => {
                out.push(key(code, 'p', &normalize(s)));
                out.push(key(code, 'e', s));
            }
            IndexValue::Reference(r) => reference_keys(code, r, out),
            IndexValue::Uri(u) => out.push(key(code, 'u', u)),
            IndexValue::Date { low, high } => {
                out.push(key(code, 'L', &sortable_i64(*low)));
                out.push(key(code, 'H', &sortable_i64(*high)));
            }
            IndexValue::Number(n) => out.push(key(code, 'v', &number_key(n))),
            IndexValue::Quantity { number, system, code: unit, canonical, .. } => {
                let n = number_key(number);
                // A canonical form is found by unit only: a bare number means the value as written.
                if !canonical {
                    out.push(key(code, 'v', &n));
                }
                if let Some(u) = unit {
                    out.push(key(code, 'Q', &join(&[u, &n])));
                    if let Some(s) = system {
                        out.push(key(code, 'q', &join(&[s, u, &n])));
                    }
                }
            }
            IndexValue::Composite(parts) => composite_keys(code, parts, out),
        }
    }
}

/// The composite payloads: the first component's token keys (`t` and `c` forms) joined with
/// each later component's value keys, in order, as `first$second`.
fn composite_keys(code: &str, parts: &[Vec<IndexValue>], out: &mut Vec<String>) {
    let mut combos: Vec<String> = vec![String::new()];
    for (i, part) in parts.iter().enumerate() {
        let mut forms = Vec::new();
        for v in part {
            forms.extend(component_forms(v));
        }
        forms.sort();
        forms.dedup();
        let mut next = Vec::with_capacity(combos.len() * forms.len());
        for c in &combos {
            for f in &forms {
                next.push(match i {
                    0 => f.clone(),
                    _ => format!("{c}${f}"),
                });
            }
        }
        // Bounded: a composite of many codings and values yields at most 64 keys.
        next.truncate(64);
        combos = next;
    }
    for c in combos {
        out.push(key(code, 'k', &c));
    }
}

/// How one component value is written inside a composite key.
pub fn component_forms(v: &IndexValue) -> Vec<String> {
    match v {
        IndexValue::Token { system, code: Some(c), .. } => {
            let mut f = vec![format!("c{c}")];
            if let Some(s) = system {
                f.push(format!("t{s}{US}{c}"));
            }
            f
        }
        IndexValue::Quantity { number, .. } | IndexValue::Number(number) => vec![format!("v{}", number_key(number))],
        IndexValue::Date { low, .. } => vec![format!("L{}", sortable_i64(*low))],
        IndexValue::String(s) => vec![format!("p{}", normalize(s))],
        IndexValue::Reference(Reference { target: Some(t), .. }) => vec![format!("r{t}")],
        IndexValue::Uri(u) => vec![format!("u{u}")],
        _ => vec![],
    }
}

/// How a component test's value is written inside a composite key, when it is one exact
/// form (as [`component_forms`] writes values); `None` for ranges and prefixes.
pub fn component_forms_of_test(t: &super::query::Test) -> Option<String> {
    use super::query::{RefTarget, Test};
    match t {
        Test::Token { system: Some(Some(s)), code: Some(c) } => Some(format!("t{s}{US}{c}")),
        Test::Token { system: _, code: Some(c) } => Some(format!("c{c}")),
        Test::Reference(RefTarget::Local { ty, id, version: None }) => Some(format!("r{ty}/{id}")),
        Test::Uri(u) => Some(format!("u{u}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_folds_case_accents_and_space() {
        assert_eq!(normalize("  Zoë  VAN\tder Berg "), "zoe van der berg");
        assert_eq!(normalize("Ångström"), "angstrom");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn sortable_encodings_keep_order() {
        let nums = [-1e300, -5.5, -0.0, 0.0, 1e-9, 1.0, 99.5, 100.0, 1e300];
        let enc: Vec<String> = nums.iter().map(|n| sortable_f64(*n)).collect();
        assert!(enc.windows(2).all(|w| w[0] <= w[1]), "{enc:?}");
        let ms = [i64::MIN, -62_135_596_800_000, -1, 0, 1, 253_402_300_800_000];
        let enc: Vec<String> = ms.iter().map(|n| sortable_i64(*n)).collect();
        assert!(enc.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let long = "é".repeat(150);
        let k = key("name", 'e', &long);
        assert!(k.len() <= "name".len() + 2 + MAX_KEY);
        assert!(k.ends_with('é'));
    }

    #[test]
    fn token_and_reference_keys() {
        let mut out = Vec::new();
        let v = IndexValue::Token {
            system: Some("http://loinc.org".into()),
            code: Some("1-8".into()),
            text: Some("Blood Pressure".into()),
        };
        keys("code", &[v], &mut out);
        for expected in [
            "code\u{1f}*",
            "code\u{1f}c1-8",
            "code\u{1f}thttp://loinc.org\u{1f}1-8",
            "code\u{1f}shttp://loinc.org",
            "code\u{1f}xblood pressure",
            "code\u{1f}xpressure",
        ] {
            assert!(out.contains(&expected.to_string()), "{expected:?} not in {out:?}");
        }
        let mut out = Vec::new();
        let r = Reference {
            target: Some("Patient/1".into()),
            target_type: Some("Patient".into()),
            version: Some("2".into()),
            identifier: None,
        };
        keys("subject", &[IndexValue::Reference(r)], &mut out);
        for expected in [
            "subject\u{1f}rPatient/1",
            "subject\u{1f}rPatient/1/_history/2",
            "subject\u{1f}i1",
            "subject\u{1f}yPatient",
        ] {
            assert!(out.contains(&expected.to_string()), "{expected:?} not in {out:?}");
        }
    }
}
