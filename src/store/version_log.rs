//! The `versionLog` of a current document: earlier versions not yet in history whose
//! content is the current one but for `meta` and the member count (member-only Group
//! PATCHes, see the module docs of `store`).
//!
//! Stored as one string, `[[versionId, lastUpdated ms, method, memberCount?], …]`, not as
//! an array of sub-documents. Every member-only PATCH rewrites the log, and a store pays
//! per element of the document it updates: on SecantusDB an update copies the whole
//! document element by element, and 40 logged sub-documents made each PATCH about 1 ms
//! slower than the same log as one string (measured, 2 cores). A string is copied whole.
//! Documents written before this format (an array of `{versionId, lastUpdated, method,
//! memberCount?}`) are still read.

use super::mongo::MemberCount;
use bson::{Bson, DateTime, Document};
use serde_json::{json, Value};

/// One logged version.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub version: i64,
    pub last_updated: DateTime,
    pub method: String,
    /// As [`super::Version::member_count`].
    pub member_count: MemberCount,
}

/// The stored form of a log.
pub fn encode(log: &[LogEntry]) -> Bson {
    let rows: Vec<Value> = log
        .iter()
        .map(|e| {
            let mut row = vec![json!(e.version), json!(e.last_updated.timestamp_millis()), json!(e.method)];
            if let Some(count) = e.member_count.recorded() {
                row.push(json!(count));
            }
            Value::Array(row)
        })
        .collect();
    Bson::String(Value::Array(rows).to_string())
}

/// The log stored in a document's `versionLog` (empty when absent).
pub fn decode(field: Option<&Bson>) -> Result<Vec<LogEntry>, String> {
    match field {
        None | Some(Bson::Null) => Ok(Vec::new()),
        Some(Bson::String(s)) => {
            let rows: Vec<Vec<Value>> = serde_json::from_str(s).map_err(|e| format!("versionLog: {e}"))?;
            rows.iter().map(|row| from_row(row).ok_or_else(|| format!("versionLog entry {row:?}"))).collect()
        }
        Some(Bson::Array(items)) => items
            .iter()
            .map(|b| b.as_document().and_then(from_document).ok_or_else(|| format!("versionLog entry {b}")))
            .collect(),
        Some(other) => Err(format!("versionLog is {other}")),
    }
}

fn from_row(row: &[Value]) -> Option<LogEntry> {
    Some(LogEntry {
        version: row.first()?.as_i64()?,
        last_updated: DateTime::from_millis(row.get(1)?.as_i64()?),
        method: row.get(2)?.as_str()?.to_string(),
        member_count: match row.get(3) {
            None => MemberCount::Unrecorded,
            Some(Value::Null) => MemberCount::NeverEnumerated,
            Some(n) => MemberCount::Active(n.as_u64()?),
        },
    })
}

/// The format before the log was a string.
fn from_document(d: &Document) -> Option<LogEntry> {
    Some(LogEntry {
        version: d.get_i64("versionId").ok()?,
        last_updated: *d.get_datetime("lastUpdated").ok()?,
        method: d.get_str("method").unwrap_or("PATCH").to_string(),
        member_count: super::mongo::member_count_of(d.get("memberCount")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn entry(version: i64, member_count: MemberCount) -> LogEntry {
        LogEntry {
            version,
            last_updated: DateTime::from_millis(1_763_821_546_190 + version),
            method: "PATCH".into(),
            member_count,
        }
    }

    #[test]
    fn round_trips_every_kind_of_count() {
        let log = vec![
            entry(3, MemberCount::Unrecorded),
            entry(4, MemberCount::NeverEnumerated),
            entry(5, MemberCount::Active(12)),
        ];
        let stored = encode(&log);
        assert!(matches!(stored, Bson::String(_)), "one element, not sub-documents");
        assert_eq!(decode(Some(&stored)).unwrap(), log);
        assert_eq!(decode(Some(&encode(&[]))).unwrap(), vec![]);
        assert_eq!(decode(None).unwrap(), vec![]);
    }

    #[test]
    fn reads_the_array_format_written_before() {
        let old = Bson::Array(vec![
            Bson::Document(doc! { "versionId": 3i64, "lastUpdated": DateTime::from_millis(1_763_821_546_193),
            "method": "PATCH" }),
            Bson::Document(doc! { "versionId": 5i64, "lastUpdated": DateTime::from_millis(1_763_821_546_195),
            "method": "PATCH", "memberCount": 12i64 }),
        ]);
        assert_eq!(
            decode(Some(&old)).unwrap(),
            vec![entry(3, MemberCount::Unrecorded), entry(5, MemberCount::Active(12))]
        );
        assert!(decode(Some(&Bson::String("[[1]]".into()))).is_err(), "a malformed entry is an error, not dropped");
    }
}
