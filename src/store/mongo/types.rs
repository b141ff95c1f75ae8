//! What the store reads and writes: versions, member counts, outbox batches, commits,
//! errors, orders.

use serde::{Deserialize, Serialize};

use super::*;

/// A stored version of a resource (current or from history).
#[derive(Debug, Clone)]
pub struct Version {
    pub id: String,
    pub version: i64,
    pub last_updated: DateTime,
    pub deleted: bool,
    /// The interaction that wrote this version (`POST`, `PUT`, `PATCH`, `DELETE`).
    pub method: String,
    pub resource: Option<Map<String, Value>>,
    /// Group member event batches committed but not yet in ClickHouse, oldest first
    /// (see `group::outbox`).
    pub outbox: Vec<OutboxBatch>,
    /// A Group's active member count at this version: `None` unknown (not recorded),
    /// `Some(None)` members never enumerated, `Some(Some(n))` n members.
    pub member_count: MemberCount,
    /// Earlier versions not yet in history whose content is this version's but for
    /// `meta` and member count (member-only Group PATCHes), as `{versionId, lastUpdated,
    /// method, memberCount?}`.
    pub version_log: Vec<LogEntry>,
    /// This version is not in history yet.
    pub history_pending: bool,
}

/// A Group's active member count, as a version records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemberCount {
    /// Not recorded: not a Group whose members are events, or written before counts were.
    #[default]
    Unrecorded,
    /// The group never had a member event.
    NeverEnumerated,
    /// This many active members.
    Active(u64),
}

impl MemberCount {
    /// From a count that is known: `None` when the members were never enumerated.
    pub fn known(count: Option<u64>) -> MemberCount {
        count.map_or(MemberCount::NeverEnumerated, MemberCount::Active)
    }

    /// The active members, when counted.
    pub fn active(self) -> Option<u64> {
        match self {
            MemberCount::Active(n) => Some(n),
            _ => None,
        }
    }

    /// `None` unrecorded, `Some(None)` never enumerated, `Some(Some(n))` (the stored forms).
    pub fn recorded(self) -> Option<Option<u64>> {
        match self {
            MemberCount::Unrecorded => None,
            MemberCount::NeverEnumerated => Some(None),
            MemberCount::Active(n) => Some(Some(n)),
        }
    }
}

/// One batch of member events in a Group document's `outbox`: committed with its version,
/// not yet in ClickHouse. This module owns the field and the batch's envelope; the rows
/// and what they mean are `group::outbox`'s business.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxBatch {
    /// Unique per batch: the flusher pulls batches by it, chunks are filed under it.
    pub batch_id: String,
    /// The Group version the events belong to.
    pub version: i64,
    /// Active members before the batch.
    pub base_count: i64,
    /// Events in the batch.
    #[serde(default)]
    pub count: i64,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub request_id: String,
    /// The interaction that made the events (`create`, `update`, `patch`).
    #[serde(default = "patch_source")]
    pub source: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub event_time: i64,
    #[serde(flatten)]
    pub rows: BatchRows,
}

fn patch_source() -> String {
    "patch".into()
}

/// Where a batch's rows are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchRows {
    /// In the batch, as JSON text (`events`).
    Inline { events: String },
    /// In this many chunk documents beside the Group (`chunks`; see `group::outbox`).
    Chunked { chunks: i32 },
}

impl OutboxBatch {
    /// The rows' JSON text when they are in the batch.
    pub fn inline(&self) -> Option<&str> {
        match &self.rows {
            BatchRows::Inline { events } => Some(events),
            BatchRows::Chunked { .. } => None,
        }
    }

    pub(super) fn to_bson(&self) -> Result<Bson, StoreError> {
        bson::serialize_to_bson(self).map_err(|e| StoreError::Corrupt(format!("outbox batch: {e}")))
    }
}

/// Where the base version of a write is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// MongoDB.
    Stored,
    /// The document this process committed last, if it remembers one (else MongoDB).
    Remembered,
}

/// What a write is going to change, which decides what must reach history first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// The resource's content.
    Content,
    /// Only `meta.versionId` and `meta.lastUpdated` (a member-only Group PATCH).
    MetaOnly,
}

/// What a write stores; see the module docs for the protocol.
pub struct Commit<'a> {
    pub id: &'a str,
    /// The version this write replaces; `None` creates the resource.
    pub base: Option<i64>,
    pub version: i64,
    pub last_updated: DateTime,
    pub method: &'a str,
    /// The new content; `None` is a delete tombstone.
    pub resource: Option<Document>,
    /// Only `meta.versionId` and `meta.lastUpdated` of the content changed (a member-only
    /// Group PATCH): only those are written.
    pub meta_only: bool,
    /// A batch pushed onto `outbox` atomically with the version (see `group::outbox`).
    pub outbox: Option<OutboxBatch>,
    /// Stored as `versionLog` (see [`Version::version_log`]).
    pub version_log: Vec<LogEntry>,
    /// Stored as `memberCount` (see [`Version::member_count`]); `None` writes nothing.
    pub member_count: MemberCount,
    /// Mark the version as awaiting a durable hook (`eventsPending`, `eventsVersions`).
    pub events_pending: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The version guard failed: another writer got there first.
    #[error("version conflict")]
    Conflict,
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("stored document is malformed: {0}")]
    Corrupt(String),
    /// The batched command that carried the write failed in this process (a bug: it is
    /// logged); whether the write reached MongoDB is unknown.
    #[error("the batched command carrying the write was abandoned")]
    Abandoned,
    /// MongoDB refused one write of a batched command (its message).
    #[error("MongoDB refused the write: {0}")]
    Refused(String),
    /// A batched guarded update's outcome could not be read back: another writer
    /// overwrote the document first. Whether it applied is unknown.
    #[error("the outcome of the commit is unknown: the document changed again before it was read back")]
    Ambiguous,
}

impl StoreError {
    /// True when MongoDB could not be reached (as opposed to a rejected command).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Mongo(e) => matches!(
                *e.kind,
                ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
            ),
            _ => false,
        }
    }
}

/// Sort orders and paging positions for listing current resources.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// By id ascending; the cursor is the last id seen.
    Id { after: Option<String> },
    /// By (lastUpdated, id), ascending or descending; the cursor is the last pair seen.
    LastUpdated { descending: bool, after: Option<(DateTime, String)> },
}
