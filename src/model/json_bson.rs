//! The one mapping between FHIR JSON and BSON.
//!
//! fhirbolt turns on serde_json's `arbitrary_precision`, so a JSON number is kept as the text
//! the client sent. Neither `bson::to_document` (writes a private marker map) nor
//! `Bson::try_from` (goes through `f64`) keeps that text, and FHIR requires decimals to keep
//! their precision (`70.50` is not `70.5`). So numbers map explicitly:
//!
//! * an integer literal that fits `i32`/`i64` → `Int32`/`Int64`;
//! * every other number → `Decimal128` parsed from the literal, which keeps digits *and*
//!   exponent (trailing zeros survive), up to 34 significant digits;
//! * more digits than that is refused (FHIR asks servers for at least 18).
//!
//! Reading back, `Decimal128` prints IEEE 754's canonical form: the same digits and exponent,
//! in plain notation unless the number is below 1E-6 or has a positive exponent.

use bson::{Bson, Decimal128, Document};
use serde_json::{Map, Number, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("number {literal} at {path} cannot be stored exactly: {reason}")]
pub struct NumberError {
    pub path: String,
    pub literal: String,
    pub reason: &'static str,
}

/// Converts a JSON object to a BSON document.
pub fn to_document(value: &Map<String, Value>) -> Result<Document, NumberError> {
    let mut path = String::new();
    object_to_document(value, &mut path)
}

fn object_to_document(map: &Map<String, Value>, path: &mut String) -> Result<Document, NumberError> {
    let mut doc = Document::new();
    for (key, value) in map {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        doc.insert(key.clone(), to_bson(value, path)?);
        path.truncate(len);
    }
    Ok(doc)
}

fn to_bson(value: &Value, path: &mut String) -> Result<Bson, NumberError> {
    Ok(match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::String(s) => Bson::String(s.clone()),
        Value::Number(n) => number_to_bson(n, path)?,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_bson(item, path)?);
                path.truncate(len);
            }
            Bson::Array(out)
        }
        Value::Object(map) => Bson::Document(object_to_document(map, path)?),
    })
}

fn number_to_bson(n: &Number, path: &str) -> Result<Bson, NumberError> {
    let literal = n.to_string();
    let is_integer_literal = !literal.contains(['.', 'e', 'E']) && literal != "-0";
    if is_integer_literal {
        if let Ok(i) = literal.parse::<i32>() {
            return Ok(Bson::Int32(i));
        }
        if let Ok(i) = literal.parse::<i64>() {
            return Ok(Bson::Int64(i));
        }
    }
    let digits =
        literal.split(['e', 'E']).next().unwrap_or("").chars().filter(char::is_ascii_digit).collect::<String>();
    let significant = digits.trim_start_matches('0').len();
    let err = |reason| NumberError { path: path.to_string(), literal: literal.clone(), reason };
    if significant > 34 {
        return Err(err("more than 34 significant digits"));
    }
    let dec: Decimal128 = literal.parse().map_err(|_| err("not a decimal128 value"))?;
    // Refuse anything Decimal128 would round or clamp (extreme exponents): the read back must
    // give the same number.
    if !same_number(&dec.to_string(), &literal) {
        return Err(err("exponent out of decimal128 range"));
    }
    Ok(Bson::Decimal128(dec))
}

/// Converts a stored BSON document back to JSON.
pub fn to_json_object(doc: &Document) -> Map<String, Value> {
    doc.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()
}

pub fn to_json(value: &Bson) -> Value {
    match value {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Int32(i) => Value::Number((*i).into()),
        Bson::Int64(i) => Value::Number((*i).into()),
        Bson::Decimal128(d) => decimal_to_json(&d.to_string()),
        // Not written by this server, but readable if an operator stored one by hand.
        Bson::Double(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
        Bson::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Bson::Document(doc) => Value::Object(to_json_object(doc)),
        Bson::DateTime(dt) => Value::String(dt.try_to_rfc3339_string().unwrap_or_default()),
        Bson::ObjectId(oid) => Value::String(oid.to_hex()),
        other => Value::String(other.to_string()),
    }
}

fn decimal_to_json(text: &str) -> Value {
    // Decimal128 prints IEEE 754's canonical form (`1.000E-245`, `70.50`): same digits and
    // exponent as stored, in scientific notation only below 1E-6 or for a positive exponent.
    match text.parse::<Number>() {
        Ok(n) => Value::Number(n),
        Err(_) => Value::String(text.to_string()), // NaN/Infinity: never written by us
    }
}

/// True when two decimal literals denote the same number with the same precision: equal
/// after normalising exponent case, a `+` sign, and leading zeros of the exponent.
fn same_number(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> (String, i64) {
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i64>().unwrap_or(i64::MIN)),
            None => (s, 0),
        };
        // Move the decimal point into the exponent: "70.50" → ("7050", -2).
        let negative = mantissa.starts_with('-');
        let mantissa = mantissa.trim_start_matches(['-', '+']);
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        let digits = if digits.is_empty() { "0" } else { digits };
        let sign = if negative { "-" } else { "" };
        (format!("{sign}{digits}"), exp - frac.len() as i64)
    }
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> String {
        let value: Value = serde_json::from_str(text).unwrap();
        let doc = to_document(value.as_object().unwrap()).unwrap();
        Value::Object(to_json_object(&doc)).to_string()
    }

    #[test]
    fn decimals_keep_their_precision() {
        for text in [
            r#"{"v":70.50}"#,
            r#"{"v":0.000001}"#,
            r#"{"v":1e-22}"#,
            r#"{"v":1.000000000000000000e-245}"#,
            r#"{"v":-1.000000000000000000e+245}"#,
            r#"{"v":-12.300}"#,
            r#"{"v":100}"#,
            r#"{"v":2147483648}"#,
            r#"{"v":123456789012345678901234}"#,
            r#"{"v":1.000000000000000000000000000000001}"#,
            r#"{"a":[1,2.50,{"b":3.14159265358979323846264338327950}]}"#,
        ] {
            assert_eq!(round_trip(text), text);
        }
    }

    #[test]
    fn other_notations_come_back_canonical_with_the_same_digits() {
        for (sent, back) in [
            (r#"{"v":1.5e3}"#, r#"{"v":1.5e+3}"#),
            (r#"{"v":0.0000001}"#, r#"{"v":1e-7}"#),
            (r#"{"v":12.5e-1}"#, r#"{"v":1.25}"#),
        ] {
            assert_eq!(round_trip(sent), back);
        }
    }

    #[test]
    fn negative_zero_is_kept() {
        assert_eq!(round_trip(r#"{"v":-0}"#), r#"{"v":-0}"#);
    }

    #[test]
    fn too_many_digits_is_an_error_naming_the_path() {
        let value: Value = serde_json::from_str(r#"{"x":{"y":[1, 0.12345678901234567890123456789012345]}}"#).unwrap();
        let err = to_document(value.as_object().unwrap()).unwrap_err();
        assert_eq!(err.path, "x.y[1]");
    }

    #[test]
    fn key_order_is_preserved() {
        assert_eq!(round_trip(r#"{"z":1,"a":2,"m":{"q":1,"b":2}}"#), r#"{"z":1,"a":2,"m":{"q":1,"b":2}}"#);
    }
}
