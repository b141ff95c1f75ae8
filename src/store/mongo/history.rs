//! History: copying versions into the history collection (one by one, from the version
//! log, and by the repair sweep), and reading it back.

use super::*;

impl ResourceStore {
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
    pub(super) fn drop_copied(&self, rt: &str, id: &str, log: &mut Vec<LogEntry>) {
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
    pub(super) async fn copied_here(&self, rt: &str, id: &str, version: i64) -> bool {
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

    /// A version, current or from history.
    pub async fn version(&self, rt: &str, id: &str, version: i64) -> Result<Option<Version>, StoreError> {
        match self.read(rt, id).await? {
            Some(current) if current.version == version => Ok(Some(current)),
            _ => self.history_version(rt, id, version).await,
        }
    }

    /// Clears the history flag of a version whose copy is written, if it is still current.
    pub async fn clear_history_flag(&self, rt: &str, id: &str, version: i64) -> Result<(), StoreError> {
        self.clear(rt, Clear { id: id.to_string(), version, events: false }).await.map(|_| ())
    }

    /// Clears the history flag and the durable-hook mark of a version in one update, when
    /// it is still current and the only marked version. False when it may not have matched
    /// (a newer version followed, or other versions are marked): the caller clears each
    /// separately (both clears are idempotent).
    pub async fn clear_history_and_events_flags(&self, rt: &str, id: &str, version: i64) -> Result<bool, StoreError> {
        self.clear(rt, Clear { id: id.to_string(), version, events: true }).await
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
    /// The flag stays when the version's search keys cannot reach the index now: searches
    /// read such a document from MongoDB until a later flush.
    pub(super) async fn finish_history(&self, rt: &str, current: &Document) -> Result<(), StoreError> {
        self.copy_history(rt, current).await?;
        match self.flush_search(rt, current).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                tracing::warn!(resource_type = rt, error = %e, "search keys stay pending in MongoDB");
                return Ok(());
            }
        }
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
        let result = match self.insert(&history_collection(rt), Arc::new(entry)).await {
            Inserted::Failed(e) => Err(e),
            Inserted::Done | Inserted::Duplicate => {
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
        self.finish_pending(rt, doc! { "historyPending": true }).await
    }

    /// Finishes the pending versions of a type written longer than `age` ago (the sweep).
    pub async fn repair_history_older(&self, rt: &str, age: std::time::Duration) -> Result<usize, StoreError> {
        let before = DateTime::from_millis(DateTime::now().timestamp_millis() - age.as_millis() as i64);
        self.finish_pending(rt, doc! { "historyPending": true, "lastUpdated": { "$lt": before } }).await
    }

    /// Finishes every pending version matching `filter`; how many there were.
    async fn finish_pending(&self, rt: &str, filter: Document) -> Result<usize, StoreError> {
        let pending: Vec<Document> = self.current(rt).find(filter).await?.try_collect().await?;
        for doc in &pending {
            self.finish_history(rt, doc).await?;
        }
        Ok(pending.len())
    }

    /// The types that have a history collection, sorted.
    pub async fn history_types(&self) -> Result<Vec<String>, StoreError> {
        let names = self.database().list_collection_names().await?;
        let mut types: Vec<String> = names
            .iter()
            .filter_map(|n| n.strip_suffix(&history_collection("")))
            .filter(|rt| fhir_model::is_resource_type(rt))
            .map(str::to_string)
            .collect();
        types.sort_unstable();
        Ok(types)
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
}
