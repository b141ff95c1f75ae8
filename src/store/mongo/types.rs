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
/// every key whose presence changed since the last version known to be in the index.
/// Both are empty once a flush cleared them, which happens only together with
/// `historyPending` (see `store`).
///
/// Why `changed`: a stream of member-only Group PATCHes changes `_lastUpdated` on every
/// version and flushes none of them (each is superseded before its turn), so without it the
/// lists grew by two keys per write (hundreds of keys rewritten in every commit). With the
/// version of each key's last change, a write whose process has put a version `F` of the
/// resource in the index keeps only the keys changed after `F` (see [`Self::next`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchKeys {
    pub keys: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The version at which each key of `added`/`removed` last changed (`searchChangedAt`,
    /// aligned with `added` then `removed`). A key missing here (documents written before
    /// it was recorded) stays until a flush clears the lists.
    pub changed: std::collections::BTreeMap<String, i64>,
}

impl SearchKeys {
    /// The state after version `version`, whose keys are `new` (sorted, distinct), over
    /// `base`: every key whose presence changed since the last indexed version is added
    /// (when in `new`) or removed (when not); all of them when the base has no keys (it was
    /// never indexed).
    ///
    /// `indexed`: a version of the resource whose keys this process put in the index
    /// (its flush answered). Every row a version writes agrees with that version's keys, and
    /// a row of a newer version wins over an older one in `ReplacingMergeTree(version)`; so
    /// once version `F` is in, a key that did not change after `F` has in the index the
    /// presence it has now, whatever older or in-between rows arrive later, and only keys
    /// changed after `F` need rows. Keys without a known change version are kept.
    pub fn next(base: Option<&SearchKeys>, new: Vec<String>, version: i64, indexed: Option<i64>) -> SearchKeys {
        use std::collections::BTreeSet;
        let Some(base) = base else {
            let changed = new.iter().map(|k| (k.clone(), version)).collect();
            return SearchKeys { added: new.clone(), keys: new, removed: Vec::new(), changed };
        };
        let new_set: BTreeSet<&String> = new.iter().collect();
        let old: BTreeSet<&String> = base.keys.iter().collect();
        let pending = |k: &&String| match (indexed, base.changed.get(*k)) {
            (Some(f), Some(at)) => *at > f,
            _ => true,
        };
        let mut changed = std::collections::BTreeMap::new();
        let mut added: BTreeSet<&String> = base.added.iter().filter(pending).filter(|k| new_set.contains(k)).collect();
        let mut removed: BTreeSet<&String> =
            base.removed.iter().filter(pending).filter(|k| !new_set.contains(k)).collect();
        for k in added.iter().chain(&removed) {
            if let Some(at) = base.changed.get(*k) {
                changed.insert((*k).clone(), *at);
            }
        }
        for k in new.iter().filter(|k| !old.contains(k)) {
            added.insert(k);
            changed.insert(k.clone(), version);
        }
        for k in base.keys.iter().filter(|k| !new_set.contains(k)) {
            removed.insert(k);
            changed.insert(k.clone(), version);
        }
        let added = added.into_iter().cloned().collect();
        let removed = removed.into_iter().cloned().collect();
        SearchKeys { keys: new, added, removed, changed }
    }

    /// The change versions aligned with `added` then `removed`, as stored
    /// (`searchChangedAt`); `None` when one is unknown (then none is stored).
    pub fn changed_at(&self) -> Option<Vec<i64>> {
        self.added.iter().chain(&self.removed).map(|k| self.changed.get(k).copied()).collect()
    }

    /// The lists with their stored change versions (see [`Self::changed_at`]); versions
    /// that do not align are ignored (every key then stays until a flush clears them).
    pub fn with_changed_at(mut self, at: &[i64]) -> SearchKeys {
        if at.len() == self.added.len() + self.removed.len() {
            self.changed = self.added.iter().chain(&self.removed).cloned().zip(at.iter().copied()).collect();
        }
        self
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
        let s = SearchKeys::next(None, v(&["a", "b"]), 1, None);
        assert_eq!((s.added, s.removed), (v(&["a", "b"]), v(&[])));
    }

    #[test]
    fn a_flushed_base_gives_the_difference() {
        let base = SearchKeys { keys: v(&["a", "b"]), ..Default::default() };
        let s = SearchKeys::next(Some(&base), v(&["b", "c"]), 2, None);
        assert_eq!((s.added, s.removed), (v(&["c"]), v(&["a"])));
    }

    #[test]
    fn pending_changes_accumulate_until_a_flush() {
        // Given a version that added `c` and removed `a`, not yet flushed,
        let base = SearchKeys { keys: v(&["b", "c"]), added: v(&["c"]), removed: v(&["a"]), ..Default::default() };
        // when the next version drops `c` and brings `a` back,
        let s = SearchKeys::next(Some(&base), v(&["a", "b"]), 3, None);
        // then `a` is added again and `c` removed: whatever the index took of the first.
        assert_eq!((s.added, s.removed), (v(&["a"]), v(&["c"])));
    }

    #[test]
    fn a_delete_removes_every_key() {
        let base = SearchKeys { keys: v(&["a", "b"]), added: v(&["b"]), removed: v(&["z"]), ..Default::default() };
        let s = SearchKeys::next(Some(&base), v(&[]), 4, Some(3));
        assert!(!s.settled());
        assert_eq!((s.added, s.removed), (v(&[]), v(&["a", "b", "z"])));
    }

    /// The keys of a version after `n` writes that each change only `_lastUpdated`
    /// (`l1`, `l2`, …) over the constant key `g`, with a flush of version `indexed_at`
    /// answered before the write after it.
    fn stream(n: i64, indexed_at: Option<i64>) -> SearchKeys {
        let mut s = SearchKeys::next(None, v(&["g", "l1"]), 1, None);
        for version in 2..=n {
            let indexed = indexed_at.filter(|f| *f < version);
            s = SearchKeys::next(Some(&s), v(&["g", &format!("l{version}")]), version, indexed);
        }
        s
    }

    #[test]
    fn without_a_flush_a_stream_keeps_every_change() {
        let s = stream(50, None);
        assert_eq!(s.added, v(&["g", "l50"]));
        assert_eq!(s.removed.len(), 49, "every earlier lastUpdated key: the index may hold any of them");
    }

    #[test]
    fn keys_that_did_not_change_after_an_indexed_version_are_dropped() {
        // Given a stream in which version 40 reached the index,
        let s = stream(50, Some(40));
        // then only what changed after it is pending: version 40's key and later ones.
        assert_eq!(s.added, v(&["l50"]));
        let expected: Vec<String> = (40..50).map(|i| format!("l{i}")).collect();
        let mut removed = s.removed.clone();
        removed.sort();
        let mut expected_sorted = expected;
        expected_sorted.sort();
        assert_eq!(removed, expected_sorted);
        assert_eq!(s.changed["l40"], 41, "l40 left the keys with version 41");
    }

    #[test]
    fn change_versions_round_trip_aligned_and_unknown_ones_are_kept() {
        let s = stream(5, None);
        let at = s.changed_at().expect("every key has its version");
        let stored = SearchKeys { changed: Default::default(), ..s.clone() }.with_changed_at(&at);
        assert_eq!(stored, s);
        // A document without versions (written before they were recorded) keeps its lists.
        let old = SearchKeys { changed: Default::default(), ..s.clone() };
        let next = SearchKeys::next(Some(&old), v(&["g", "l6"]), 6, Some(5));
        assert!(next.removed.contains(&"l1".to_string()) && next.added.contains(&"g".to_string()));
        // Misaligned versions are ignored.
        assert!(SearchKeys { changed: Default::default(), ..s }.with_changed_at(&[1]).changed.is_empty());
    }
}
