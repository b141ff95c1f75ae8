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
    /// Its search index keys, and what ClickHouse may still lack of them.
    pub search: SearchKeys,
}

/// A version's search index keys (`_s`; see `search::keys`), and the change ClickHouse's
/// index may not have yet: keys to add (`searchAdded`) and keys to drop (`searchRemoved`),
/// accumulated over every version since the last flush. Both are empty once a flush
/// cleared them, which happens only together with `historyPending` (see `store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchKeys {
    pub keys: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl SearchKeys {
    /// The state after a write whose keys are `new` (sorted, distinct) over `base`: every
    /// new key ClickHouse may lack is added (all of them when the base has no keys: it was
    /// never indexed), every base key or pending removal not in `new` is dropped.
    pub fn next(base: Option<&SearchKeys>, new: Vec<String>) -> SearchKeys {
        use std::collections::BTreeSet;
        let Some(base) = base else {
            return SearchKeys { added: new.clone(), keys: new, removed: Vec::new() };
        };
        let new_set: BTreeSet<&String> = new.iter().collect();
        let old: BTreeSet<&String> = base.keys.iter().collect();
        let mut added: BTreeSet<&String> = base.added.iter().filter(|k| new_set.contains(k)).collect();
        added.extend(new.iter().filter(|k| !old.contains(k)));
        let mut removed: BTreeSet<&String> = base.removed.iter().filter(|k| !new_set.contains(k)).collect();
        removed.extend(base.keys.iter().filter(|k| !new_set.contains(k)));
        let added = added.into_iter().cloned().collect();
        let removed = removed.into_iter().cloned().collect();
        SearchKeys { keys: new, added, removed }
    }

    /// Nothing for ClickHouse to do.
    pub fn settled(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What the search index must receive for one version (see [`SearchSink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKeys {
    pub id: String,
    pub version: i64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Where pending search keys go (ClickHouse's `SearchIndex`, via `search::flusher`). The
/// store asks it before it clears `historyPending`: a document without the flag has its
/// keys in the index.
pub trait SearchSink: Send + Sync + 'static {
    fn index<'a>(
        &'a self,
        rt: &'a str,
        pending: Vec<PendingKeys>,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>>;
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
    /// Its search keys (`_s`, `searchAdded`, `searchRemoved`); `None` writes none.
    pub search: Option<SearchKeys>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The version guard failed: another writer got there first.
    #[error("version conflict")]
    Conflict,
    /// The search index did not take a version's keys (they stay pending in MongoDB).
    #[error("search index: {0}")]
    SearchIndex(String),
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

#[cfg(test)]
mod search_keys_tests {
    use super::SearchKeys;

    fn v(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn a_first_version_adds_every_key() {
        let s = SearchKeys::next(None, v(&["a", "b"]));
        assert_eq!((s.added, s.removed), (v(&["a", "b"]), v(&[])));
    }

    #[test]
    fn a_flushed_base_gives_the_difference() {
        let base = SearchKeys { keys: v(&["a", "b"]), added: v(&[]), removed: v(&[]) };
        let s = SearchKeys::next(Some(&base), v(&["b", "c"]));
        assert_eq!((s.added, s.removed), (v(&["c"]), v(&["a"])));
    }

    #[test]
    fn pending_changes_accumulate_until_a_flush() {
        // Given a version that added `c` and removed `a`, not yet flushed,
        let base = SearchKeys { keys: v(&["b", "c"]), added: v(&["c"]), removed: v(&["a"]) };
        // when the next version drops `c` and brings `a` back,
        let s = SearchKeys::next(Some(&base), v(&["a", "b"]));
        // then `a` is added again and `c` removed: whatever the index took of the first.
        assert_eq!((s.added, s.removed), (v(&["a"]), v(&["c"])));
    }

    #[test]
    fn a_delete_removes_every_key() {
        let base = SearchKeys { keys: v(&["a", "b"]), added: v(&["b"]), removed: v(&["z"]) };
        let s = SearchKeys::next(Some(&base), v(&[]));
        assert!(!s.settled());
        assert_eq!((s.added, s.removed), (v(&[]), v(&["a", "b", "z"])));
    }
}
