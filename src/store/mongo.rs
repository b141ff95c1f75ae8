use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::FindOptions;
use mongodb::{Collection, Database};
use serde_json::{Map, Value};

use super::version_log::{self, LogEntry};
use super::ResourceKey;
use crate::model::json_bson;

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
    pub outbox: Vec<Document>,
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
    pub(super) fn recorded(self) -> Option<Option<u64>> {
        match self {
            MemberCount::Unrecorded => None,
            MemberCount::NeverEnumerated => Some(None),
            MemberCount::Active(n) => Some(Some(n)),
        }
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
    pub outbox: Option<Document>,
    /// Stored as `versionLog` (see [`Version::version_log`]).
    pub version_log: Vec<LogEntry>,
    /// Stored as `memberCount` (see [`Version::member_count`]); `None` writes nothing.
    pub member_count: MemberCount,
    /// Mark the version as awaiting a durable hook (`eventsPending`, `eventsVersions`).
    pub events_pending: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The version guard failed: another writer got there first.
    #[error("version conflict")]
    Conflict,
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("stored document is malformed: {0}")]
    Corrupt(String),
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

#[derive(Clone)]
pub struct ResourceStore {
    db: Database,
    /// The latest version per resource whose history copy this process wrote: a writer
    /// that finds `historyPending` on it need not copy it again (the background finisher
    /// of the previous write usually has, but clears the flag only later).
    copied: Arc<Mutex<HashMap<ResourceKey, i64>>>,
    /// The latest version per resource this process committed (see [`Self::superseded`]).
    committed: Arc<Mutex<HashMap<ResourceKey, i64>>>,
    /// History copies being written now: a writer that needs the same copy waits for it
    /// instead of writing it a second time.
    copying: Arc<Mutex<HashMap<ResourceKey, InFlight>>>,
    /// The current document of resources this process wrote last (see
    /// [`Self::read_for_write`]).
    recent: Arc<Mutex<HashMap<ResourceKey, Document>>>,
    /// Per resource, the versions `first..=last` of a `versionLog` this process copied to
    /// history early (see [`Self::copy_log_early`]): a writer drops them from the log.
    log_copied: Arc<Mutex<HashMap<ResourceKey, (i64, i64)>>>,
    /// Resources whose log is being copied early right now (one copy at a time each).
    log_copying: Arc<Mutex<HashSet<ResourceKey>>>,
    /// Per Group, the highest version whose pending member batch this process's flusher
    /// pulled from `outbox` (see [`Self::batches_flushed`]).
    flushed: Arc<Mutex<HashMap<ResourceKey, i64>>>,
}

/// A history copy being written: its version, and whether it succeeded once done.
type InFlight = (i64, tokio::sync::watch::Receiver<bool>);

/// Documents kept in [`ResourceStore::recent`] before it starts over.
const RECENT_DOCS: usize = 4_096;

/// Entries kept in [`ResourceStore::copied`] before it starts over.
const COPIED_ENTRIES: usize = 65_536;

pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        ErrorKind::InsertMany(m) => m.write_errors.iter().flatten().all(|w| w.code == 11000),
        _ => false,
    }
}

pub fn current_collection(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0")
}

pub fn history_collection(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0_History")
}

impl ResourceStore {
    pub fn new(db: Database) -> Self {
        ResourceStore {
            db,
            copied: Arc::default(),
            committed: Arc::default(),
            copying: Arc::default(),
            recent: Arc::default(),
            log_copied: Arc::default(),
            log_copying: Arc::default(),
            flushed: Arc::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    fn current(&self, rt: &str) -> Collection<Document> {
        self.db.collection(&current_collection(rt))
    }

    fn history(&self, rt: &str) -> Collection<Document> {
        self.db.collection(&history_collection(rt))
    }

    /// The current version (possibly a tombstone), repairing a pending history copy first.
    pub async fn read(&self, rt: &str, id: &str) -> Result<Option<Version>, StoreError> {
        let Some(doc) = self.current(rt).find_one(doc! { "_id": id }).await? else {
            return Ok(None);
        };
        if doc.get_bool("historyPending").unwrap_or(false) {
            self.finish_history(rt, &doc).await?;
        }
        let mut version = decode(&doc, None)?;
        version.history_pending = false;
        version.version_log.clear();
        Ok(Some(version))
    }

    /// The current version, read to be replaced: a pending history copy is written (the
    /// version must reach history before it is overwritten), but its flag is left for the
    /// commit that follows to overwrite (one write fewer on the write path).
    ///
    /// [`Base::Remembered`]: the document this process committed last may stand in for the
    /// read (one MongoDB round trip fewer). It is only a guess: if another process wrote
    /// since, the version-guarded commit fails and the caller retries with
    /// [`Base::Stored`]. Returns where the version came from.
    ///
    /// [`Writes::MetaOnly`]: the write changes only `meta` (a member-only Group PATCH), so the
    /// versions not yet in history may go into its `versionLog` instead of being copied
    /// now (until the log is [`VERSION_LOG_LIMIT`] long).
    pub async fn read_for_write(
        &self,
        rt: &str,
        id: &str,
        base: Base,
        writes: Writes,
    ) -> Result<(Option<Version>, Base), StoreError> {
        let remembered = (base == Base::Remembered).then(|| self.recent_doc(rt, id)).flatten();
        let from = if remembered.is_some() { Base::Remembered } else { Base::Stored };
        let defer_history = writes == Writes::MetaOnly;
        let doc = match remembered {
            Some(doc) => doc,
            None => match self.current(rt).find_one(doc! { "_id": id }).await? {
                Some(doc) => doc,
                None => return Ok((None, Base::Stored)),
            },
        };
        let mut version = decode(&doc, None)?;
        self.drop_copied(rt, id, &mut version.version_log);
        let logged = version.version_log.len();
        if (version.history_pending || logged > 0) && !(defer_history && logged < VERSION_LOG_LIMIT) {
            if logged > 0 || !self.copied_here(rt, id, version.version).await {
                self.copy_history(rt, &doc).await?;
            }
            version.history_pending = false;
            version.version_log.clear();
        }
        Ok((Some(version), from))
    }

    fn recent_doc(&self, rt: &str, id: &str) -> Option<Document> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(&ResourceKey::new(rt, id)).cloned()
    }

    /// Remembers the document just committed (as stored, `outbox` included) for the next
    /// write of the resource by this process.
    pub fn remember_recent(&self, rt: &str, id: &str, mut doc: Document) {
        let key = ResourceKey::new(rt, id);
        self.strip_flushed(&key, &mut doc);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_DOCS {
            recent.clear();
        }
        recent.insert(key, doc);
    }

    /// The flusher pulled a Group's pending batches up to version `through` from
    /// `outbox`: every batch up to it has left MongoDB (a flusher pulls all the batches
    /// pending when it starts, and later ones have higher versions). The remembered
    /// document loses them, and so does the one the write in flight remembers next: it
    /// read its base before the pull. Without this, that write put the pulled batches
    /// back, they piled up in every guess, and every ~30th write found too many pending
    /// and finished them itself (an insert's wait: the p99 of a PATCH stream).
    pub fn batches_flushed(&self, rt: &str, id: &str, through: i64) {
        let key = ResourceKey::new(rt, id);
        remember(&self.flushed, key.clone(), through);
        if let Some(doc) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key) {
            self.strip_flushed(&key, doc);
        }
    }

    /// Drops from a remembered document's `outbox` the batches known to be flushed.
    fn strip_flushed(&self, key: &ResourceKey, doc: &mut Document) {
        let Some(through) = self.flushed.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied() else {
            return;
        };
        if let Ok(outbox) = doc.get_array_mut("outbox") {
            outbox.retain(|b| b.as_document().and_then(|b| b.get_i64("version").ok()).is_none_or(|v| v > through));
        }
    }

    /// Drops the remembered document (it may no longer be what MongoDB has).
    pub fn forget_recent(&self, rt: &str, id: &str) {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).remove(&ResourceKey::new(rt, id));
    }

    /// Copies the versions logged in a just-committed member-only document to history,
    /// once there are [`LOG_COPY_AT`] of them, off the request path; the next writer then
    /// leaves them out of the log. Why: under a stream of member-only PATCHes the log
    /// otherwise fills to [`VERSION_LOG_LIMIT`] and the writer that finds it full copies
    /// all of it before its own commit (~30 ms on SecantusDB: the p99 of such a stream).
    /// Copied a few at a time, no write waits long behind a copy. Idempotent (`_id` is
    /// the version), and a failure only leaves the entries in the log.
    pub async fn copy_log_early(&self, rt: &str, committed: &Document) -> Result<(), StoreError> {
        let mut log = version_log::decode(committed.get("versionLog")).map_err(StoreError::Corrupt)?;
        let id = committed.get_str("_id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.drop_copied(rt, id, &mut log);
        let (Some(first), Some(last)) = (log.first(), log.last()) else { return Ok(()) };
        if log.len() < LOG_COPY_AT {
            return Ok(());
        }
        let key = ResourceKey::new(rt, id);
        if !self.log_copying.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            return Ok(());
        }
        let entries: Result<Vec<Document>, StoreError> =
            log.iter().map(|e| history_entry(committed, Some(e))).collect();
        let result = match entries {
            Ok(entries) => match self.history(rt).insert_many(entries).ordered(false).await {
                Err(e) if !is_duplicate_key(&e) => Err(e.into()),
                _ => Ok(()),
            },
            Err(e) => Err(e),
        };
        if result.is_ok() {
            let mut copied = self.log_copied.lock().unwrap_or_else(|e| e.into_inner());
            if copied.len() >= COPIED_ENTRIES {
                copied.clear();
            }
            let range = match copied.get(&key) {
                // The log of one run of member-only versions is contiguous: extend.
                Some(&(lo, hi)) if first.version <= hi + 1 && last.version >= lo => {
                    (lo.min(first.version), hi.max(last.version))
                }
                _ => (first.version, last.version),
            };
            copied.insert(key.clone(), range);
        }
        self.log_copying.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        result
    }

    /// Leaves out of `log` the versions [`Self::copy_log_early`] put in history.
    fn drop_copied(&self, rt: &str, id: &str, log: &mut Vec<LogEntry>) {
        if log.is_empty() {
            return;
        }
        let copied = self.log_copied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(lo, hi)) = copied.get(&ResourceKey::new(rt, id)) {
            log.retain(|e| e.version < lo || e.version > hi);
        }
    }

    /// True when this process wrote the history copy of that version, waiting (briefly)
    /// for a copy of it that is being written right now.
    async fn copied_here(&self, rt: &str, id: &str, version: i64) -> bool {
        let key = ResourceKey::new(rt, id);
        if self.copied.lock().unwrap_or_else(|e| e.into_inner()).get(&key) == Some(&version) {
            return true;
        }
        let in_flight = self.copying.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        match in_flight {
            Some((v, mut done)) if v == version => {
                let waited = tokio::time::timeout(std::time::Duration::from_secs(2), done.wait_for(|d| *d)).await;
                matches!(waited, Ok(Ok(_)))
            }
            _ => false,
        }
    }

    /// A version from history. The current version may not be there yet (its copy can be
    /// pending): callers check [`Self::read`] first.
    pub async fn history_version(&self, rt: &str, id: &str, version: i64) -> Result<Option<Version>, StoreError> {
        let doc = self.history(rt).find_one(doc! { "_id": history_key(id, version) }).await?;
        doc.map(|d| decode(&d, Some(id))).transpose()
    }

    /// Writes a version under the version guard; `Err(Conflict)` when the guard fails.
    /// Returns the committed document, which the caller passes to [`Self::copy_history`] once
    /// any work tied to the commit is done (see the module docs).
    pub async fn commit(&self, rt: &str, c: Commit<'_>) -> Result<Document, StoreError> {
        let mut current = doc! {
            "_id": c.id,
            "versionId": c.version,
            "lastUpdated": c.last_updated,
            "deleted": c.resource.is_none(),
            "method": c.method,
            "historyPending": true,
        };
        current.insert("versionLog", version_log::encode(&c.version_log));
        if let Some(count) = c.member_count.recorded() {
            current.insert("memberCount", member_count_bson(count));
        }
        let Some(base) = c.base else {
            if let Some(resource) = &c.resource {
                current.insert("resource", resource.clone());
            }
            if let Some(batch) = &c.outbox {
                current.insert("outbox", vec![Bson::Document(batch.clone())]);
                current.insert("outboxPending", true);
            }
            if c.events_pending {
                current.insert("eventsPending", true);
                current.insert("eventsVersions", vec![c.version]);
            }
            return match self.current(rt).insert_one(&current).await {
                Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict),
                other => {
                    remember(&self.committed, ResourceKey::new(rt, c.id), c.version);
                    other.map(|_| current).map_err(Into::into)
                }
            };
        };
        // An update, not a replace: batches still pending in `outbox` stay (a flusher may
        // be pulling one right now), and a member-only PATCH writes just two meta fields.
        let mut set = current.clone();
        set.remove("_id");
        let mut unset = Document::new();
        match &c.resource {
            Some(resource) if c.meta_only => {
                let meta = resource.get_document("meta").map_err(|e| StoreError::Corrupt(e.to_string()))?;
                set.insert("resource.meta.versionId", meta.get("versionId").cloned().unwrap_or(Bson::Null));
                set.insert("resource.meta.lastUpdated", meta.get("lastUpdated").cloned().unwrap_or(Bson::Null));
            }
            Some(resource) => {
                set.insert("resource", resource.clone());
            }
            None => {
                unset.insert("resource", "");
            }
        }
        if c.member_count == MemberCount::Unrecorded {
            unset.insert("memberCount", "");
        }
        let mut update = doc! { "$set": set };
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        let mut push = Document::new();
        if let Some(batch) = &c.outbox {
            push.insert("outbox", batch.clone());
            update
                .get_document_mut("$set")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .insert("outboxPending", true);
        }
        if c.events_pending {
            push.insert("eventsVersions", c.version);
            update
                .get_document_mut("$set")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .insert("eventsPending", true);
        }
        if !push.is_empty() {
            update.insert("$push", push);
        }
        let result = self.current(rt).update_one(doc! { "_id": c.id, "versionId": base }, update).await?;
        if result.matched_count == 0 {
            return Err(StoreError::Conflict);
        }
        remember(&self.committed, ResourceKey::new(rt, c.id), c.version);
        if let Some(resource) = c.resource {
            current.insert("resource", resource);
        }
        Ok(current)
    }

    /// Resources of `rt` with versions marked for a durable hook, marked longer ago than
    /// `older_than`: (id, marked versions).
    pub async fn events_pending(
        &self,
        rt: &str,
        older_than: std::time::Duration,
    ) -> Result<Vec<(String, Vec<i64>)>, StoreError> {
        let before = DateTime::from_millis(DateTime::now().timestamp_millis() - older_than.as_millis() as i64);
        let docs: Vec<Document> = self
            .current(rt)
            .find(doc! { "eventsPending": true, "lastUpdated": { "$lt": before } })
            .projection(doc! { "eventsVersions": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                let versions = d.get_array("eventsVersions").ok()?.iter().filter_map(Bson::as_i64).collect();
                Some((d.get_str("_id").ok()?.to_string(), versions))
            })
            .collect())
    }

    /// Removes a version's durable-hook mark (the flag goes with the last one).
    pub async fn clear_events_pending(&self, rt: &str, id: &str, version: i64) -> Result<(), StoreError> {
        let unset = doc! { "$unset": { "eventsPending": "", "eventsVersions": "" } };
        // Usually the only marked version: one update.
        let only = self.current(rt).update_one(doc! { "_id": id, "eventsVersions": [version] }, unset.clone()).await?;
        if only.matched_count == 0 {
            self.current(rt).update_one(doc! { "_id": id }, doc! { "$pull": { "eventsVersions": version } }).await?;
            self.current(rt).update_one(doc! { "_id": id, "eventsVersions": { "$size": 0 } }, unset).await?;
        }
        Ok(())
    }

    /// A version, current or from history.
    pub async fn version(&self, rt: &str, id: &str, version: i64) -> Result<Option<Version>, StoreError> {
        match self.read(rt, id).await? {
            Some(current) if current.version == version => Ok(Some(current)),
            _ => self.history_version(rt, id, version).await,
        }
    }

    /// Clears the history flag of a version whose copy is written, if it is still current.
    pub async fn clear_history_flag(&self, rt: &str, id: &str, version: i64) -> Result<(), StoreError> {
        self.current(rt)
            .update_one(
                doc! { "_id": id, "versionId": version },
                doc! { "$unset": { "historyPending": "" }, "$set": { "versionLog": version_log::encode(&[]) } },
            )
            .await?;
        Ok(())
    }

    /// Writes every version the document stands for that is not in history yet: those in
    /// its `versionLog` (its content with their `meta`) and, when flagged, itself. One
    /// `insert_many`; entries already there are skipped (`_id` is the version).
    pub async fn copy_history(&self, rt: &str, current: &Document) -> Result<(), StoreError> {
        let logged = version_log::decode(current.get("versionLog")).map_err(StoreError::Corrupt)?;
        if logged.is_empty() {
            return self.copy_to_history(rt, current).await;
        }
        let mut entries = Vec::with_capacity(logged.len() + 1);
        for meta in &logged {
            entries.push(history_entry(current, Some(meta))?);
        }
        if current.get_bool("historyPending").unwrap_or(false) {
            entries.push(history_entry(current, None)?);
        }
        match self.history(rt).insert_many(entries).ordered(false).await {
            Err(e) if !is_duplicate_key(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Writes the history copy of a current document and clears its pending flag.
    async fn finish_history(&self, rt: &str, current: &Document) -> Result<(), StoreError> {
        self.copy_history(rt, current).await?;
        let id = current.get_str("_id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let version = current.get_i64("versionId").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.clear_history_flag(rt, id, version).await
    }

    /// Inserts the history copy of a committed document (idempotent).
    pub async fn copy_to_history(&self, rt: &str, current: &Document) -> Result<(), StoreError> {
        let id = current.get_str("_id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let version = current.get_i64("versionId").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let entry = history_entry(current, None)?;
        let key = ResourceKey::new(rt, id);
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.copying.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), (version, rx));
        let result = match self.history(rt).insert_one(&entry).await {
            Err(e) if !is_duplicate_key(&e) => Err(e.into()),
            _ => {
                remember(&self.copied, key.clone(), version);
                Ok(())
            }
        };
        let _ = tx.send(result.is_ok());
        let mut copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        if copying.get(&key).is_some_and(|(v, _)| *v == version) {
            copying.remove(&key);
        }
        result
    }

    /// True when this process has committed a later version of the resource.
    pub fn superseded(&self, rt: &str, id: &str, version: i64) -> bool {
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        committed.get(&ResourceKey::new(rt, id)).is_some_and(|v| *v > version)
    }

    /// Writes every pending history copy of a type (start-up sweep, type history reads).
    pub async fn repair_history(&self, rt: &str) -> Result<usize, StoreError> {
        let pending: Vec<Document> =
            self.current(rt).find(doc! { "historyPending": true }).await?.try_collect().await?;
        for doc in &pending {
            self.finish_history(rt, doc).await?;
        }
        Ok(pending.len())
    }

    /// Lists current, non-deleted resources.
    pub async fn search(
        &self,
        rt: &str,
        filter: Document,
        order: &Order,
        limit: i64,
    ) -> Result<Vec<Version>, StoreError> {
        let mut query = doc! { "deleted": false };
        query.extend(filter);
        let (sort, after) = match order {
            Order::Id { after } => (doc! { "_id": 1 }, after.as_ref().map(|a| doc! { "_id": { "$gt": a } })),
            Order::LastUpdated { descending, after } => {
                let dir = if *descending { -1 } else { 1 };
                let op = if *descending { "$lt" } else { "$gt" };
                let after = after.as_ref().map(|(t, id)| {
                    doc! { "$or": [
                        { "lastUpdated": { op: t } },
                        { "lastUpdated": t, "_id": { op: id } },
                    ] }
                });
                (doc! { "lastUpdated": dir, "_id": dir }, after)
            }
        };
        if let Some(after) = after {
            query = doc! { "$and": [query, after] };
        }
        let options = FindOptions::builder().sort(sort).limit(limit).build();
        let docs: Vec<Document> = self.current(rt).find(query).with_options(options).await?.try_collect().await?;
        docs.iter().map(|d| decode(d, None)).collect()
    }

    /// Counts current, non-deleted resources matching `filter`.
    pub async fn count(&self, rt: &str, filter: Document) -> Result<u64, StoreError> {
        let mut query = doc! { "deleted": false };
        query.extend(filter);
        Ok(self.current(rt).count_documents(query).await?)
    }

    /// History entries, newest first. `id` narrows to one resource; `since` keeps entries
    /// at or after an instant; `before` is the paging cursor (`(lastUpdated, _id)` of the
    /// last entry seen).
    pub async fn history_page(
        &self,
        rt: &str,
        id: Option<&str>,
        since: Option<DateTime>,
        before: Option<(DateTime, String)>,
        limit: i64,
    ) -> Result<(Vec<Version>, u64), StoreError> {
        match id {
            Some(id) => {
                // Reading `current` repairs a pending copy for this resource.
                self.read(rt, id).await?;
            }
            None => {
                self.repair_history(rt).await?;
            }
        }
        let mut base = Document::new();
        if let Some(id) = id {
            base.insert("id", id);
        }
        if let Some(since) = since {
            base.insert("lastUpdated", doc! { "$gte": since });
        }
        let total = self.history(rt).count_documents(base.clone()).await?;
        let query = match &before {
            Some((t, key)) => doc! { "$and": [base, { "$or": [
                { "lastUpdated": { "$lt": t } },
                { "lastUpdated": t, "_id": { "$lt": key } },
            ] }] },
            None => base,
        };
        let options = FindOptions::builder().sort(doc! { "lastUpdated": -1, "_id": -1 }).limit(limit).build();
        let docs: Vec<Document> = self.history(rt).find(query).with_options(options).await?.try_collect().await?;
        let versions = docs.iter().map(|d| decode(d, d.get_str("id").ok())).collect::<Result<_, _>>()?;
        Ok((versions, total))
    }

    /// Answers a `ping`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }
}

/// How a Group's member count is stored: `null` when members were never enumerated.
fn member_count_bson(count: Option<u64>) -> Bson {
    count.map_or(Bson::Null, |n| Bson::Int64(n as i64))
}

/// A stored `memberCount` (see [`Version::member_count`]).
pub(super) fn member_count_of(stored: Option<&Bson>) -> MemberCount {
    match stored {
        None => MemberCount::Unrecorded,
        Some(Bson::Int64(n)) => MemberCount::Active(*n as u64),
        Some(Bson::Int32(n)) => MemberCount::Active(*n as u64),
        Some(_) => MemberCount::NeverEnumerated,
    }
}

impl Version {
    /// This version's entry in a later version's `versionLog`: what differs from that
    /// version's content (the inverse of [`history_entry`]).
    pub fn log_entry(&self) -> LogEntry {
        LogEntry {
            version: self.version,
            last_updated: self.last_updated,
            method: self.method.clone(),
            member_count: self.member_count,
        }
    }
}

/// Versions a document's `versionLog` may hold before a writer copies them to history.
pub const VERSION_LOG_LIMIT: usize = 64;

/// Logged versions at which [`ResourceStore::copy_log_early`] copies them.
pub const LOG_COPY_AT: usize = 8;

/// The history entry of a current document, or of an earlier version of it that differs
/// only in `meta` and member count (`logged`).
fn history_entry(current: &Document, logged: Option<&LogEntry>) -> Result<Document, StoreError> {
    let corrupt = |e: bson::error::Error| StoreError::Corrupt(e.to_string());
    let id = current.get_str("_id").map_err(corrupt)?;
    let mut entry = current.clone();
    for internal in
        ["historyPending", "outbox", "flushLease", "outboxPending", "versionLog", "eventsPending", "eventsVersions"]
    {
        entry.remove(internal);
    }
    if let Some(meta) = logged {
        let (version, last_updated) = (meta.version, meta.last_updated);
        entry.insert("versionId", version);
        entry.insert("lastUpdated", last_updated);
        entry.insert("method", &meta.method);
        match meta.member_count.recorded() {
            Some(count) => entry.insert("memberCount", member_count_bson(count)),
            None => entry.remove("memberCount"),
        };
        if let Ok(resource) = entry.get_document_mut("resource") {
            if let Ok(m) = resource.get_document_mut("meta") {
                m.insert("versionId", version.to_string());
                m.insert("lastUpdated", crate::model::datetime::format_bson_instant(last_updated));
            }
        }
    }
    let version = entry.get_i64("versionId").map_err(corrupt)?;
    entry.insert("_id", format!("{id}/{version}"));
    entry.insert("id", id);
    Ok(entry)
}

/// Records `version` for `key` in a bounded map (it starts over when full: a forgotten
/// entry only costs a redundant write later).
fn remember(map: &Mutex<HashMap<ResourceKey, i64>>, key: ResourceKey, version: i64) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= COPIED_ENTRIES {
        map.clear();
    }
    let entry = map.entry(key).or_insert(version);
    *entry = (*entry).max(version);
}

/// The `_id` a history entry is stored under, which is also its paging key.
pub fn history_key(id: &str, version: i64) -> String {
    format!("{id}/{version}")
}

fn decode(doc: &Document, id: Option<&str>) -> Result<Version, StoreError> {
    let corrupt = |e: bson::error::Error| StoreError::Corrupt(e.to_string());
    let id = match id {
        Some(id) => id.to_string(),
        None => doc.get_str("_id").map_err(corrupt)?.to_string(),
    };
    let resource = match doc.get("resource") {
        Some(Bson::Document(d)) => Some(json_bson::to_json_object(d)),
        _ => None,
    };
    Ok(Version {
        id,
        version: doc.get_i64("versionId").map_err(corrupt)?,
        last_updated: *doc.get_datetime("lastUpdated").map_err(corrupt)?,
        deleted: doc.get_bool("deleted").map_err(corrupt)?,
        method: doc.get_str("method").unwrap_or("PUT").to_string(),
        resource,
        outbox: pending_in(doc),
        version_log: version_log::decode(doc.get("versionLog")).map_err(StoreError::Corrupt)?,
        history_pending: doc.get_bool("historyPending").unwrap_or(false),
        member_count: member_count_of(doc.get("memberCount")),
    })
}

/// The member batches pending in a stored Group document (`outbox`, oldest first; their
/// content is `group::outbox`'s business, the field is this module's).
pub fn pending_in(doc: &Document) -> Vec<Document> {
    match doc.get("outbox") {
        Some(Bson::Array(items)) => items.iter().filter_map(|b| b.as_document().cloned()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_outbox(versions: &[i64]) -> Document {
        let outbox: Vec<Bson> =
            versions.iter().map(|v| Bson::Document(doc! { "batchId": v.to_string(), "version": v })).collect();
        doc! { "_id": "g", "versionId": 9i64, "outbox": outbox }
    }

    fn outbox_versions(doc: &Document) -> Vec<i64> {
        doc.get_array("outbox").unwrap().iter().map(|b| b.as_document().unwrap().get_i64("version").unwrap()).collect()
    }

    #[tokio::test]
    async fn flushed_batches_leave_the_remembered_document_and_are_not_put_back() {
        // No server is contacted: the client connects lazily.
        let db = mongodb::Client::with_uri_str("mongodb://127.0.0.1:9/").await.unwrap().database("unused");
        let store = ResourceStore::new(db);
        store.remember_recent("Group", "g", with_outbox(&[5, 6, 7]));
        store.batches_flushed("Group", "g", 6);
        assert_eq!(outbox_versions(&store.recent_doc("Group", "g").unwrap()), [7]);
        // The write that was in flight during the flush read its base before it.
        store.remember_recent("Group", "g", with_outbox(&[5, 6, 7, 8]));
        assert_eq!(outbox_versions(&store.recent_doc("Group", "g").unwrap()), [7, 8]);
        // Other groups are untouched.
        store.remember_recent("Group", "h", with_outbox(&[5]));
        assert_eq!(outbox_versions(&store.recent_doc("Group", "h").unwrap()), [5]);
    }
}
