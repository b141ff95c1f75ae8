use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::FindOptions;
use mongodb::{Collection, Database};
use serde_json::{Map, Value};

use self::coalesce::{Clear, Coalescer, Guarded, Inserted};
use super::version_log::{self, LogEntry};
use super::ResourceKey;
use crate::model::json_bson;

pub use types::*;

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
    recent: Arc<Mutex<HashMap<ResourceKey, Recent>>>,
    /// Per resource, the versions `first..=last` of a `versionLog` this process copied to
    /// history early (see [`Self::copy_log_early`]): a writer drops them from the log.
    log_copied: Arc<Mutex<HashMap<ResourceKey, (i64, i64)>>>,
    /// Resources whose log is being copied early right now (one copy at a time each).
    log_copying: Arc<Mutex<HashSet<ResourceKey>>>,
    /// Per resource, the highest version whose search keys this process's flush put in the
    /// index (see `SearchKeys::next`).
    indexed: Arc<Mutex<HashMap<ResourceKey, i64>>>,
    /// Per resource, when a superseded version's keys last went to the index (see
    /// [`Self::claim_search_flush`]).
    search_claims: Arc<Mutex<HashMap<ResourceKey, std::time::Instant>>>,
    /// Per Group, the highest version whose pending member batch this process's flusher
    /// pulled from `outbox` (see [`Self::batches_flushed`]).
    flushed: Arc<Mutex<HashMap<ResourceKey, i64>>>,
    /// Concurrent inserts into one collection, one command at a time (see `coalesce`).
    inserts: Coalescer<Arc<Document>, Inserted>,
    /// Concurrent flag clears in one collection, likewise.
    clears: Coalescer<Clear, Result<bool, StoreError>>,
    /// Concurrent version-guarded commits in one collection, likewise.
    commits: Coalescer<Guarded, Result<bool, StoreError>>,
    /// Concurrent reads of current documents by id in one collection, likewise.
    reads: Coalescer<String, Result<Option<Document>, StoreError>>,
    /// Where pending search keys go before `historyPending` is cleared (see `store`).
    search: Arc<std::sync::OnceLock<Arc<dyn SearchSink>>>,
}

/// A document this process committed last, and the member batches pending in it as far
/// as this process knows (the commit's own, and those it found pending before).
#[derive(Clone)]
struct Recent {
    doc: Document,
    outbox: Vec<OutboxBatch>,
}

/// A history copy being written: its version, and whether it succeeded once done.
type InFlight = (i64, tokio::sync::watch::Receiver<bool>);

/// MongoDB's largest document.
const MAX_DOCUMENT: usize = 16 << 20;

/// How often a resource written in a stream has its keys flushed although superseded (see
/// [`ResourceStore::claim_search_flush`]).
const SEARCH_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

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
            inserts: coalesce::inserts(db.clone()),
            clears: coalesce::clears(db.clone()),
            commits: coalesce::guarded_updates(db.clone()),
            reads: coalesce::reads(db.clone()),
            db,
            copied: Arc::default(),
            committed: Arc::default(),
            copying: Arc::default(),
            recent: Arc::default(),
            log_copied: Arc::default(),
            log_copying: Arc::default(),
            flushed: Arc::default(),
            indexed: Arc::default(),
            search_claims: Arc::default(),
            search: Arc::default(),
        }
    }

    /// Sets where pending search keys go (once per store; later calls change nothing).
    pub fn set_search_sink(&self, sink: Arc<dyn SearchSink>) {
        let _ = self.search.set(sink);
    }

    /// Sends a committed document's pending search keys to the index; `Ok(false)` when there
    /// is no sink (this process does not index): then `historyPending` must stay.
    pub async fn flush_search(&self, rt: &str, committed: &Document) -> Result<bool, StoreError> {
        let keys = search_keys_of(committed);
        if keys.settled() {
            return Ok(true);
        }
        let Some(sink) = self.search.get() else { return Ok(false) };
        let corrupt = |e: bson::error::Error| StoreError::Corrupt(e.to_string());
        let pending = PendingKeys {
            id: committed.get_str("_id").map_err(corrupt)?.to_string(),
            version: committed.get_i64("versionId").map_err(corrupt)?,
            added: keys.added,
            removed: keys.removed,
        };
        let (id, version) = (pending.id.clone(), pending.version);
        sink.index(rt, vec![pending]).await.map_err(StoreError::SearchIndex)?;
        remember(&self.indexed, ResourceKey::new(rt, &id), version);
        Ok(true)
    }

    /// The highest version of a resource whose search keys this process put in the index
    /// (see `SearchKeys::next`).
    pub fn search_indexed(&self, rt: &str, id: &str) -> Option<i64> {
        self.indexed.lock().unwrap_or_else(|e| e.into_inner()).get(&ResourceKey::new(rt, id)).copied()
    }

    /// Whether a superseded version's keys should go to the index anyway, claimed for the
    /// caller: none of the resource's went for [`SEARCH_FLUSH_EVERY`]. Under a stream of
    /// member-only PATCHes every version is superseded before its turn; this bounds what
    /// each commit carries as pending keys to the changes of about that interval.
    pub fn claim_search_flush(&self, rt: &str, id: &str) -> bool {
        let mut claims = self.search_claims.lock().unwrap_or_else(|e| e.into_inner());
        if claims.len() >= RECENT_DOCS {
            claims.retain(|_, at| at.elapsed() < SEARCH_FLUSH_EVERY);
        }
        let now = std::time::Instant::now();
        match claims.entry(ResourceKey::new(rt, id)) {
            std::collections::hash_map::Entry::Occupied(e) if e.get().elapsed() < SEARCH_FLUSH_EVERY => false,
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(now);
                true
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(now);
                true
            }
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
        let Some(doc) = self.current_doc(rt, id).await? else {
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
        let remembered = (base == Base::Remembered).then(|| self.recent(rt, id)).flatten();
        let from = if remembered.is_some() { Base::Remembered } else { Base::Stored };
        let defer_history = writes == Writes::MetaOnly;
        let (doc, outbox) = match remembered {
            Some(Recent { doc, outbox }) => (doc, Some(outbox)),
            None => match self.current_doc(rt, id).await? {
                Some(doc) => (doc, None),
                None => return Ok((None, Base::Stored)),
            },
        };
        let mut version = decode(&doc, None)?;
        if let Some(outbox) = outbox {
            version.outbox = outbox;
        }
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

    fn recent(&self, rt: &str, id: &str) -> Option<Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(&ResourceKey::new(rt, id)).cloned()
    }

    /// Remembers the document just committed, and the member batches pending in it, for
    /// the next write of the resource by this process.
    pub fn remember_recent(&self, rt: &str, id: &str, committed: &Document, mut outbox: Vec<OutboxBatch>) {
        let key = ResourceKey::new(rt, id);
        self.strip_flushed(&key, &mut outbox);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_DOCS {
            recent.clear();
        }
        recent.insert(key, Recent { doc: committed.clone(), outbox });
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
        if let Some(recent) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key) {
            self.strip_flushed(&key, &mut recent.outbox);
        }
    }

    /// Drops from a remembered outbox the batches known to be flushed.
    fn strip_flushed(&self, key: &ResourceKey, outbox: &mut Vec<OutboxBatch>) {
        let Some(through) = self.flushed.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied() else {
            return;
        };
        outbox.retain(|b| b.version > through);
    }

    /// Drops the remembered document (it may no longer be what MongoDB has).
    pub fn forget_recent(&self, rt: &str, id: &str) {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).remove(&ResourceKey::new(rt, id));
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
        if let Some(search) = &c.search {
            current.insert("_s", &search.keys);
            current.insert("searchAdded", &search.added);
            current.insert("searchRemoved", &search.removed);
            // Always written: a stale array left by an earlier version could align with
            // other keys.
            current.insert("searchChangedAt", search.changed_at().unwrap_or_default());
        }
        if let Some(count) = c.member_count.recorded() {
            current.insert("memberCount", member_count_bson(count));
        }
        let Some(base) = c.base else {
            if let Some(resource) = &c.resource {
                current.insert("resource", resource.clone());
            }
            if let Some(batch) = &c.outbox {
                current.insert("outbox", vec![batch.to_bson()?]);
                current.insert("outboxPending", true);
            }
            if c.events_pending {
                current.insert("eventsPending", true);
                current.insert("eventsVersions", vec![c.version]);
            }
            let current = Arc::new(current);
            return match self.insert(&current_collection(rt), current.clone()).await {
                Inserted::Duplicate => Err(StoreError::Conflict),
                Inserted::Failed(e) => Err(e),
                Inserted::Done => {
                    remember(&self.committed, ResourceKey::new(rt, c.id), c.version);
                    Ok(Arc::unwrap_or_clone(current))
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
            push.insert("outbox", batch.to_bson()?);
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
        let bytes = update.to_vec().map_or(MAX_DOCUMENT, |b| b.len());
        let guarded = Guarded { id: c.id.to_string(), base, version: c.version, update, bytes };
        let applied =
            self.commits.submit(&current_collection(rt), guarded).await.unwrap_or(Err(StoreError::Abandoned))?;
        if !applied {
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

    /// The current document of a resource, read in one command with the reads of the same
    /// collection that wait meanwhile (see `coalesce`).
    async fn current_doc(&self, rt: &str, id: &str) -> Result<Option<Document>, StoreError> {
        self.reads.submit(&current_collection(rt), id.to_string()).await.unwrap_or(Err(StoreError::Abandoned))
    }

    /// Inserts one document, in one command with the inserts into the same collection
    /// that wait meanwhile (see `coalesce`).
    async fn insert(&self, collection: &str, doc: Arc<Document>) -> Inserted {
        self.inserts.submit(collection, doc).await.unwrap_or(Inserted::Failed(StoreError::Abandoned))
    }

    /// Clears a version's flags (see [`Clear`]), in one command with the clears of the same
    /// collection that wait meanwhile; `true` when it surely matched.
    async fn clear(&self, rt: &str, clear: Clear) -> Result<bool, StoreError> {
        self.clears.submit(&current_collection(rt), clear).await.unwrap_or(Err(StoreError::Abandoned))
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
    for internal in [
        "historyPending",
        "outbox",
        "flushLease",
        "outboxPending",
        "versionLog",
        "eventsPending",
        "eventsVersions",
        "commitTokens",
        "_s",
        "searchAdded",
        "searchRemoved",
        "searchChangedAt",
    ] {
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
        outbox: pending_in(doc)?,
        version_log: version_log::decode(doc.get("versionLog")).map_err(StoreError::Corrupt)?,
        history_pending: doc.get_bool("historyPending").unwrap_or(false),
        member_count: member_count_of(doc.get("memberCount")),
        search: search_keys_of(doc),
    })
}

/// A stored document's search keys (`_s`, `searchAdded`, `searchRemoved`; empty when absent).
pub(super) fn search_keys_of(doc: &Document) -> SearchKeys {
    let strings = |field: &str| -> Vec<String> {
        doc.get_array(field)
            .map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let changed_at: Vec<i64> =
        doc.get_array("searchChangedAt").map(|a| a.iter().filter_map(bson::Bson::as_i64).collect()).unwrap_or_default();
    SearchKeys {
        keys: strings("_s"),
        added: strings("searchAdded"),
        removed: strings("searchRemoved"),
        changed: Default::default(),
    }
    .with_changed_at(&changed_at)
}

/// The member batches pending in a stored Group document (`outbox`, oldest first; their
/// rows are `group::outbox`'s business, the field is this module's). A batch that does not
/// parse is an error, never skipped: skipping would lose its events.
pub fn pending_in(doc: &Document) -> Result<Vec<OutboxBatch>, StoreError> {
    match doc.get("outbox") {
        None => Ok(Vec::new()),
        Some(Bson::Array(items)) => items
            .iter()
            .map(|b| {
                bson::deserialize_from_bson(b.clone())
                    .map_err(|e| StoreError::Corrupt(format!("an outbox batch is malformed: {e}")))
            })
            .collect(),
        Some(other) => Err(StoreError::Corrupt(format!("outbox is not an array: {other}"))),
    }
}

mod coalesce;
mod history;
mod query;
mod types;

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(versions: &[i64]) -> Vec<OutboxBatch> {
        versions
            .iter()
            .map(|v| OutboxBatch {
                batch_id: v.to_string(),
                version: *v,
                base_count: 0,
                count: 1,
                actor: String::new(),
                request_id: String::new(),
                source: "patch".into(),
                event_time: 0,
                rows: BatchRows::Inline { events: "[]".into() },
            })
            .collect()
    }

    fn outbox_versions(store: &ResourceStore, id: &str) -> Vec<i64> {
        store.recent("Group", id).unwrap().outbox.iter().map(|b| b.version).collect()
    }

    #[tokio::test]
    async fn flushed_batches_leave_the_remembered_document_and_are_not_put_back() {
        // No server is contacted: the client connects lazily.
        let db = mongodb::Client::with_uri_str("mongodb://127.0.0.1:9/").await.unwrap().database("unused");
        let store = ResourceStore::new(db);
        let doc = doc! { "_id": "g", "versionId": 9i64 };
        store.remember_recent("Group", "g", &doc, batches(&[5, 6, 7]));
        store.batches_flushed("Group", "g", 6);
        assert_eq!(outbox_versions(&store, "g"), [7]);
        // The write that was in flight during the flush read its base before it.
        store.remember_recent("Group", "g", &doc, batches(&[5, 6, 7, 8]));
        assert_eq!(outbox_versions(&store, "g"), [7, 8]);
        // Other groups are untouched.
        store.remember_recent("Group", "h", &doc, batches(&[5]));
        assert_eq!(outbox_versions(&store, "h"), [5]);
    }

    #[test]
    fn batches_keep_their_stored_form() {
        // The stored form, as earlier releases wrote it: inline and chunked.
        let inline = doc! {
            "batchId": "b1", "version": 7i64, "baseCount": 10i64, "count": 2i64, "actor": "a",
            "requestId": "r", "source": "update", "eventTime": 5i64, "events": "[[1,1,\"x\"]]",
        };
        let chunked = doc! { "batchId": "b2", "version": 8i64, "baseCount": 12i64, "count": 30000i64, "chunks": 3 };
        let stored = doc! { "outbox": [inline.clone(), chunked.clone()] };
        let parsed = pending_in(&stored).unwrap();
        assert_eq!(parsed[0].inline(), Some("[[1,1,\"x\"]]"));
        assert_eq!((parsed[0].version, parsed[0].base_count, parsed[0].source.as_str()), (7, 10, "update"));
        assert_eq!(parsed[1].rows, BatchRows::Chunked { chunks: 3 });
        assert_eq!(parsed[1].source, "patch", "older batches without a source were PATCHes");
        assert_eq!(parsed[0].to_bson().unwrap(), Bson::Document(inline), "written back exactly as read");
        // A batch that does not parse is an error, never skipped (its events would be lost).
        assert!(pending_in(&doc! { "outbox": [{ "batchId": "b3" }] }).is_err());
        assert!(pending_in(&doc! { "outbox": { "batchId": "b", "events": "[]" } }).is_err());
    }
}
