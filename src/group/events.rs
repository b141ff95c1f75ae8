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

/// Inserts `events` (rows of one or several groups, each group's in order, possibly of
/// several versions) as one block with a deduplication token naming exactly those rows, so
/// a retry of the same insert is dropped by ClickHouse. Synchronous (`async_insert=0`,
/// whatever the server's default): the caller batches rows itself and must know they are
/// stored when this returns.
pub async fn insert(client: &clickhouse::Client, events: &[MemberEvent]) -> Result<(), clickhouse::error::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let token = token(events);
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

/// The deduplication token of a block: each run of one group's rows as
/// `group/version.seq-version.seq` (a group's rows within a run are consecutive, so its
/// first and last row name it), runs joined by `;`. A token over [`TOKEN_MAX`] bytes (a
/// gathering of many groups) keeps its first run and adds the number of runs and a 128-bit
/// FNV-1a digest of the whole: still the same for the same rows, and distinct otherwise.
fn token(events: &[MemberEvent]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut start = 0;
    for i in 1..=events.len() {
        if i == events.len() || events[i].group_id != events[start].group_id {
            let (a, b) = (&events[start], &events[i - 1]);
            runs.push(format!("{}/{}.{}-{}.{}", a.group_id, a.group_version, a.seq, b.group_version, b.seq));
            start = i;
        }
    }
    let all = runs.join(";");
    if all.len() <= TOKEN_MAX {
        return all;
    }
    format!("{};+{}:{:032x}", runs[0], runs.len(), crate::model::digest128(&all))
}

/// Longest deduplication token spelled out in full.
const TOKEN_MAX: usize = 512;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &str, version: u32, seq: u32) -> MemberEvent {
        MemberEvent {
            group_id: group.into(),
            group_version: version,
            seq,
            ver: ver(version, seq),
            event_id: String::new(),
            event_type: EventType::Added,
            member_reference: String::new(),
            member_type: String::new(),
            position: 0,
            period_start: String::new(),
            period_end: String::new(),
            inactive: false,
            member_json: String::new(),
            active_count: 0,
            actor: String::new(),
            request_id: String::new(),
            source: String::new(),
            event_time: 0,
        }
    }

    #[test]
    fn a_token_names_each_groups_rows() {
        let one = [row("g", 3, 0), row("g", 3, 1), row("g", 4, 0)];
        assert_eq!(token(&one), "g/3.0-4.0", "one group: as before the gathering of groups");
        let two = [row("g", 3, 0), row("h", 1, 0), row("h", 2, 5)];
        assert_eq!(token(&two), "g/3.0-3.0;h/1.0-2.5");
        let other = [row("g", 3, 0), row("k", 1, 0), row("h", 2, 5)];
        assert_ne!(token(&two), token(&other), "first and last row alike, another group between");
    }

    #[test]
    fn a_long_token_is_digested_and_still_distinct() {
        let many: Vec<MemberEvent> = (0..100).map(|i| row(&format!("group-{i}"), 1, 0)).collect();
        let t = token(&many);
        assert!(t.len() < 100 && t.starts_with("group-0/1.0-1.0;+100:"), "{t}");
        let mut changed = many.clone();
        changed[50].group_version = 2;
        changed[50].ver = ver(2, 0);
        assert_ne!(token(&changed), t);
        assert_eq!(token(&many.clone()), t, "the same rows, the same token");
    }
}
