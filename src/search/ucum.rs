//! UCUM units made canonical where the conversion is a plain factor: a metric prefix on a
//! base unit (`mg` → `g` × 10⁻³), the time units (`min`, `h`, `d`, `wk` → `s`), and one
//! quotient of those (`mg/dL` → `g/L` × 10⁻²). A quantity stored as `5.4 mg/dL` is then also
//! found by `value-quantity=54|http://unitsofmeasure.org|mg/L`, as R4 search asks where a
//! server can convert ("SHOULD … in the canonical form").
//!
//! What does not convert simply (`mm[Hg]`, `%`, arbitrary units, `Cel`, products, powers)
//! is left as written: the quantity is then found by its own unit only.

use super::extract::{IndexValue, Number};

pub const UCUM: &str = "http://unitsofmeasure.org";

/// Units that are their own canonical base.
const BASES: &[&str] = &["g", "m", "L", "l", "mol", "s", "eq", "Pa", "J", "W", "Hz", "K", "A", "V"];
/// Time units in seconds.
const TIMES: &[(&str, f64)] = &[("s", 1.0), ("min", 60.0), ("h", 3600.0), ("d", 86_400.0), ("wk", 604_800.0)];
const PREFIXES: &[(&str, f64)] = &[
    ("k", 1e3),
    ("h", 1e2),
    ("da", 1e1),
    ("d", 1e-1),
    ("c", 1e-2),
    ("m", 1e-3),
    ("u", 1e-6),
    ("n", 1e-9),
    ("p", 1e-12),
    ("f", 1e-15),
];

/// Customary units that are exact multiples of a base.
const CUSTOMARY: &[(&str, f64, &str)] =
    &[("[lb_av]", 453.592_37, "g"), ("[oz_av]", 28.349_523_125, "g"), ("[in_i]", 0.0254, "m"), ("[ft_i]", 0.3048, "m")];

/// One unit atom as (factor, canonical atom).
fn atom(unit: &str) -> Option<(f64, &'static str)> {
    if let Some((_, f, b)) = CUSTOMARY.iter().find(|(u, _, _)| *u == unit) {
        return Some((*f, b));
    }
    if let Some((_, f)) = TIMES.iter().find(|(u, _)| *u == unit) {
        return Some((*f, "s"));
    }
    if let Some(b) = BASES.iter().find(|b| **b == unit) {
        return Some((1.0, if *b == "l" { "L" } else { b }));
    }
    for (p, f) in PREFIXES {
        if let Some(rest) = unit.strip_prefix(p) {
            if let Some(b) = BASES.iter().find(|b| **b == rest) {
                return Some((*f, if *b == "l" { "L" } else { b }));
            }
        }
    }
    None
}

/// `code` as (factor, canonical code), when it converts simply.
pub fn convert(code: &str) -> Option<(f64, String)> {
    match code.split_once('/') {
        None => atom(code).map(|(f, a)| (f, a.to_string())),
        Some((n, d)) if !d.contains('/') => {
            let (fd, ad) = atom(d)?;
            let (fn_, an) = match n {
                "1" => (1.0, "1"),
                _ => atom(n)?,
            };
            Some((fn_ / fd, format!("{an}/{ad}")))
        }
        _ => None,
    }
}

/// The canonical form of a UCUM quantity, when it differs from the quantity as written.
pub fn canonical(q: &IndexValue) -> Option<IndexValue> {
    let IndexValue::Quantity { number, system, code, .. } = q else { return None };
    if system.as_deref() != Some(UCUM) {
        return None;
    }
    let (factor, unit) = convert(code.as_deref()?)?;
    if factor == 1.0 && code.as_deref() == Some(unit.as_str()) {
        return None;
    }
    let n = Number { value: number.value * factor, low: number.low * factor, high: number.high * factor };
    Some(IndexValue::Quantity { number: n, system: Some(UCUM.into()), code: Some(unit), unit: None, canonical: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_units_convert_and_others_do_not() {
        assert_eq!(convert("mg"), Some((1e-3, "g".into())));
        let (f, u) = convert("mg/dL").unwrap();
        assert!((f - 0.01).abs() < 1e-15 && u == "g/L");
        assert_eq!(convert("h"), Some((3600.0, "s".into())));
        assert_eq!(convert("mm[Hg]"), None);
        assert_eq!(convert("%"), None);
        assert_eq!(convert("kg/m2"), None);
    }
}
