//! Retention per stream prefix. Events are otherwise never updated or deleted.
//!
//! A rule `{ prefix = "source:", days = 30 }` (in `[[events.retention]]`) deletes events
//! of streams starting with `source:` once they are older than 30 days. The log's last
//! event is always kept: appenders continue numbering after the last position stored, and
//! removing it would let a position be used twice.

pub use crate::config::RetentionRule as Rule;

/// Applies every rule now (a ClickHouse mutation each, waited for). Returns the events
/// deleted per rule.
pub async fn apply(ch: &clickhouse::Client, rules: &[Rule]) -> Result<Vec<(Rule, u64)>, clickhouse::error::Error> {
    const MATCH: &str = "startsWith(stream_id, {p:String}) AND timestamp < now64(3) - toIntervalDay({d:UInt32}) \
                         AND position < (SELECT max(position) FROM EventStore_Events)";
    let mut out = Vec::new();
    for rule in rules {
        let due: u64 = ch
            .query(&format!("SELECT count() FROM EventStore_Events WHERE {MATCH}"))
            .param("p", &rule.prefix)
            .param("d", rule.days)
            .fetch_one()
            .await?;
        if due > 0 {
            ch.query(&format!("ALTER TABLE EventStore_Events DELETE WHERE {MATCH}"))
                .param("p", &rule.prefix)
                .param("d", rule.days)
                .with_setting("mutations_sync", "1")
                .execute()
                .await?;
        }
        out.push((rule.clone(), due));
    }
    Ok(out)
}
