//! The `Group_4_0_0_MemberEvents` row and its ClickHouse I/O.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use serde_repr::{Deserialize_repr, Serialize_repr};

pub const MEMBER_EVENTS_TABLE: &str = "Group_4_0_0_MemberEvents";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize_repr, Deserialize_repr)]
#[repr(i8)]
pub enum EventType {
    Added = 1,
    Removed = 2,
    Updated = 3,
}

/// One member event, as stored. `ver` = `group_version * 2^32 + seq`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct MemberEvent {
    pub group_id: String,
    pub group_version: u32,
    pub seq: u32,
    pub ver: u64,
    pub event_id: String,
    pub event_type: EventType,
    pub member_reference: String,
    pub member_type: String,
    pub position: u64,
    pub period_start: String,
    pub period_end: String,
    pub inactive: bool,
    pub member_json: String,
    pub active_count: u64,
    pub actor: String,
    pub request_id: String,
    pub source: String,
    /// Milliseconds since the epoch (`DateTime64(3)`).
    pub event_time: i64,
}

pub fn ver(group_version: u32, seq: u32) -> u64 {
    ((group_version as u64) << 32) | seq as u64
}

/// Inserts `events` (a group's rows, in order, possibly of several versions) as one block
/// with a deduplication token naming exactly those rows, so a retry of the same insert is
/// dropped by ClickHouse. Synchronous (`async_insert=0`, whatever the server's default):
/// the caller batches rows itself and must know they are stored when this returns.
pub async fn insert(client: &clickhouse::Client, events: &[MemberEvent]) -> Result<(), clickhouse::error::Error> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(());
    };
    let token = format!("{}/{}.{}-{}.{}", first.group_id, first.group_version, first.seq, last.group_version, last.seq);
    let mut insert = client
        .insert::<MemberEvent>(MEMBER_EVENTS_TABLE)
        .await?
        .with_setting("insert_deduplication_token", token)
        .with_setting("async_insert", "0");
    for event in events {
        insert.write(event).await?;
    }
    insert.end().await
}

/// The `seq`s of a group version already stored (recovery uses it to insert only what is
/// missing, even outside the deduplication window).
pub async fn stored_seqs(
    client: &clickhouse::Client,
    group_id: &str,
    group_version: u32,
) -> Result<std::collections::HashSet<u32>, clickhouse::error::Error> {
    let seqs: Vec<u32> = client
        .query("SELECT seq FROM Group_4_0_0_MemberEvents WHERE group_id = {g:String} AND group_version = {v:UInt32}")
        .param("g", group_id)
        .param("v", group_version)
        .fetch_all()
        .await?;
    Ok(seqs.into_iter().collect())
}
