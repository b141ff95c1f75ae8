//! Group commit: concurrent writes of one kind to one collection go to MongoDB as one
//! command, and so do concurrent reads of current documents by id.
//!
//! Why: under concurrency the store's cost per command, not per document, bounds the write
//! path. SecantusDB runs one command at a time and spends most of a small insert reading
//! and dispatching it (measured from Python: `insert_many` of 16 documents stores ~4.7×
//! the documents per second of `insert_one`, an `update` of 16 ids by `$in` ~3.4× those
//! of 16 `update_one`s); a real mongod pays a round trip and a journal commit per command.
//! Sixteen creates at once were sixteen inserts into the resource collection, sixteen into
//! its history and sixteen flag updates; gathered, they are one or a few of each. Sixteen
//! updates also read sixteen documents first: gathered, one `find` by `_id $in`.
//!
//! How: per collection and kind of write, at most one command is in flight. A write that
//! finds none goes at once, from its caller's task (nothing waits when the server is idle);
//! writes that arrive meanwhile queue and go together as the next command, from a task of
//! their own, at most [`MAX_BATCH`] at a time.
//! So batches grow with load and no write waits longer than the command ahead of it. The
//! queues are per collection, so types never wait for each other.
//!
//! Guarantees, the same as one command per write: each write learns its own outcome (a
//! duplicate key is that document's; `ordered: false`, so one failure never stops the
//! others); a command that fails as a whole fails every write in it, each of which then
//! has an unknown outcome, as it would alone. A batch runs in its own task, so a caller that
//! goes away (a dropped request) cancels nobody else's write, and a caller is answered only
//! after its command returned. A panic in a command fails its writes
//! ([`StoreError::Abandoned`]) and the queue goes on.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bson::{doc, Document};
use futures_util::FutureExt;
use mongodb::error::ErrorKind;
use mongodb::{Collection, Database};
use tokio::sync::oneshot;

use super::StoreError;

/// Writes one command carries at most (a bound on a command's size and on the wait of the
/// last write in it).
pub(super) const MAX_BATCH: usize = 256;

/// Tokens of batched commits a document keeps (see [`guarded_updates`]): a bound on its
/// size, and more than the commits another process can make to one document between a
/// batch's reply and its read back.
pub(super) const TOKENS_KEPT: i32 = 16;

/// Bytes of writes one command carries at most, where the kind of write is weighed (a
/// command must stay under MongoDB's 16 MiB; one write alone always goes).
pub(super) const MAX_BYTES: usize = 8 << 20;

type Run<I, O> =
    Arc<dyn Fn(Collection<Document>, Vec<I>) -> Pin<Box<dyn Future<Output = Vec<O>> + Send>> + Send + Sync>;

/// Queues of writes of one kind, one per collection; `run` sends a batch as one command and
/// answers each write in order.
pub(super) struct Coalescer<I, O> {
    inner: Arc<Inner<I, O>>,
}

impl<I, O> Clone for Coalescer<I, O> {
    fn clone(&self) -> Self {
        Coalescer { inner: self.inner.clone() }
    }
}

struct Inner<I, O> {
    db: Database,
    /// A write's size toward [`MAX_BYTES`].
    weigh: fn(&I) -> usize,
    run: Run<I, O>,
    queues: Mutex<HashMap<String, Queue<I, O>>>,
}

/// The writes waiting for the command in flight. A collection has a queue exactly while
/// one of its commands is being sent (by a caller, or by [`drain`]).
struct Queue<I, O> {
    waiting: Vec<(I, oneshot::Sender<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    pub(super) fn new<F, Fut>(db: Database, weigh: fn(&I) -> usize, run: F) -> Self
    where
        F: Fn(Collection<Document>, Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let run: Run<I, O> = Arc::new(move |c, items| Box::pin(run(c, items)));
        Coalescer { inner: Arc::new(Inner { db, weigh, run, queues: Mutex::default() }) }
    }

    /// Queues one write for `collection` and waits for its outcome; `None` when its command
    /// was abandoned (it panicked).
    ///
    /// A write that finds its queue idle sends its command itself, in the caller's task: no
    /// hand-off to another task and back, which costs a sequential writer two thread
    /// wake-ups per command on a busy machine. Only its own write is at stake if the caller
    /// goes away meanwhile (as without gathering); whatever queued behind it is handed to a
    /// task of its own when it finishes or is dropped ([`Lead`]).
    pub(super) async fn submit(&self, collection: &str, item: I) -> Option<O> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get_mut(collection) {
                Some(queue) => {
                    queue.waiting.push((item, tx));
                    None
                }
                None => {
                    queues.insert(collection.to_string(), Queue { waiting: Vec::new() });
                    Some(item)
                }
            }
        };
        let Some(item) = lead else { return rx.await.ok() };
        let _lead = Lead { inner: self.inner.clone(), collection: collection.to_string() };
        let command = (self.inner.run)(self.inner.db.collection(collection), vec![item]);
        match AssertUnwindSafe(command).catch_unwind().await {
            Ok(outcomes) => outcomes.into_iter().next(),
            Err(_) => {
                tracing::error!(collection, "a MongoDB write panicked; it failed");
                None
            }
        }
    }
}

/// A caller sending its own write's command: when it is done, or dropped, the writes that
/// queued meanwhile go on in a task of their own, or the idle queue is removed.
struct Lead<I: Send + 'static, O: Send + 'static> {
    inner: Arc<Inner<I, O>>,
    collection: String,
}

impl<I: Send + 'static, O: Send + 'static> Drop for Lead<I, O> {
    fn drop(&mut self) {
        let more = {
            let mut queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(&self.collection) {
                Some(queue) if !queue.waiting.is_empty() => true,
                _ => {
                    queues.remove(&self.collection);
                    false
                }
            }
        };
        if more {
            // Drop runs where the caller ran, inside the runtime; without one (a runtime
            // shutting down) nobody is left to answer, and the waiters learn `None`.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(drain(self.inner.clone(), std::mem::take(&mut self.collection)));
                }
                Err(_) => {
                    self.inner.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.collection);
                }
            }
        }
    }
}

/// Sends the queue's waiting writes, a batch per command, until none wait.
async fn drain<I: Send + 'static, O: Send + 'static>(inner: Arc<Inner<I, O>>, collection: String) {
    loop {
        let batch: Vec<(I, oneshot::Sender<O>)> = {
            let mut queues = inner.queues.lock().unwrap_or_else(|e| e.into_inner());
            let Some(queue) = queues.get_mut(&collection) else { return };
            if queue.waiting.is_empty() {
                queues.remove(&collection);
                return;
            }
            let (mut take, mut bytes) = (0, 0);
            for (item, _) in queue.waiting.iter().take(MAX_BATCH) {
                bytes += (inner.weigh)(item);
                if take > 0 && bytes > MAX_BYTES {
                    break;
                }
                take += 1;
            }
            queue.waiting.drain(..take).collect()
        };
        let (items, answers): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
        let command = (inner.run)(inner.db.collection(&collection), items);
        match AssertUnwindSafe(command).catch_unwind().await {
            Ok(outcomes) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
            }
            Err(_) => tracing::error!(collection, "a batched MongoDB write panicked; its writes failed"),
        }
    }
}

/// What became of one document of a batched insert.
#[derive(Debug, Clone)]
pub(super) enum Inserted {
    Done,
    /// Its `_id` (or another unique key) was taken.
    Duplicate,
    Failed(StoreError),
}

/// Inserts documents, one `insert_many` (unordered) per batch. A document is shared, not
/// moved, so a caller that still needs it gets it back without a copy once its command
/// returned (the batch holds it no longer).
pub(super) fn inserts(db: Database) -> Coalescer<Arc<Document>, Inserted> {
    // `insert_many` splits a large batch into commands of allowed size itself.
    Coalescer::new(
        db,
        |_| 0,
        |collection: Collection<Document>, docs: Vec<Arc<Document>>| async move {
            let n = docs.len();
            match collection.insert_many(docs.iter().map(Arc::as_ref)).ordered(false).await {
                Ok(_) => vec![Inserted::Done; n],
                Err(e) => insert_outcomes(n, e),
            }
        },
    )
}

/// Each document's outcome of a failed unordered `insert_many`: the documents it names in
/// write errors failed (a duplicate or otherwise), the others were inserted, unless the
/// failure was the whole command's (then every outcome is unknown).
fn insert_outcomes(n: usize, e: mongodb::error::Error) -> Vec<Inserted> {
    let ErrorKind::InsertMany(m) = &*e.kind else {
        return vec![Inserted::Failed(StoreError::Mongo(e)); n];
    };
    if m.write_concern_error.is_some() {
        return vec![Inserted::Failed(StoreError::Mongo(e.clone())); n];
    }
    let mut outcomes = vec![Inserted::Done; n];
    for w in m.write_errors.iter().flatten() {
        if let Some(slot) = outcomes.get_mut(w.index) {
            *slot = match w.code {
                11000 => Inserted::Duplicate,
                _ => Inserted::Failed(StoreError::Mongo(e.clone())),
            };
        }
    }
    outcomes
}

/// Reads current documents by `_id`, one `find` by `_id $in` per batch. A read waits for
/// no command that started before it was asked for, so it sees every write acknowledged
/// before it was asked for, as one `find_one` would.
pub(super) fn reads(db: Database) -> Coalescer<String, Result<Option<Document>, StoreError>> {
    Coalescer::new(
        db,
        |_| 0,
        |collection: Collection<Document>, ids: Vec<String>| async move {
            let n = ids.len();
            let mut unique: Vec<&str> = ids.iter().map(String::as_str).collect();
            unique.sort_unstable();
            unique.dedup();
            let found = async {
                let cursor = collection.find(doc! { "_id": { "$in": unique } }).await?;
                futures_util::TryStreamExt::try_collect::<Vec<Document>>(cursor).await
            };
            match found.await {
                Ok(docs) => by_asker(&ids, docs).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(StoreError::Mongo(e)); n],
            }
        },
    )
}

/// The documents found for each asker, in order (an id asked twice gets it twice).
fn by_asker(ids: &[String], docs: Vec<Document>) -> Vec<Option<Document>> {
    let mut by_id: HashMap<String, Document> =
        docs.into_iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_string(), d))).collect();
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for id in ids {
        *wanted.entry(id).or_default() += 1;
    }
    ids.iter()
        .map(|id| match wanted.get_mut(id.as_str()) {
            // The last asker of an id takes the document, the others a copy.
            Some(left) if *left > 1 => {
                *left -= 1;
                by_id.get(id).cloned()
            }
            _ => by_id.remove(id),
        })
        .collect()
}

/// Clears a committed version's flags when it is still current: `historyPending` (and the
/// version log), and with `events` its durable-hook mark too, if that version is the only
/// one marked.
#[derive(Debug, Clone)]
pub(super) struct Clear {
    pub id: String,
    pub version: i64,
    pub events: bool,
}

/// Clears flags, one `update_many` by `_id $in` per kind of clear and version in the
/// batch (one, when a burst of creates is cleared). A write learns `true` when its update
/// surely matched (every document of its update did); `false` when it may not have.
pub(super) fn clears(db: Database) -> Coalescer<Clear, Result<bool, StoreError>> {
    Coalescer::new(
        db,
        |_| 0,
        |collection: Collection<Document>, clears: Vec<Clear>| async move {
            let mut outcomes: Vec<Option<Result<bool, StoreError>>> = vec![None; clears.len()];
            let mut groups: Vec<((bool, i64), Vec<usize>)> = Vec::new();
            for (i, c) in clears.iter().enumerate() {
                match groups.iter_mut().find(|(k, _)| *k == (c.events, c.version)) {
                    Some((_, members)) => members.push(i),
                    None => groups.push(((c.events, c.version), vec![i])),
                }
            }
            for ((events, version), members) in groups {
                let ids: Vec<&str> = members.iter().map(|&i| clears[i].id.as_str()).collect();
                let mut filter = doc! { "_id": { "$in": ids }, "versionId": version };
                // The search keys went to the index before any clear (see `store`).
                let mut unset =
                    doc! { "historyPending": "", "searchAdded": "", "searchRemoved": "", "searchChangedAt": "" };
                if events {
                    filter.insert("eventsVersions", vec![version]);
                    unset.insert("eventsPending", "");
                    unset.insert("eventsVersions", "");
                }
                let update = doc! { "$unset": unset, "$set": { "versionLog": super::version_log::encode(&[]) } };
                let outcome = match collection.update_many(filter, update).await {
                    Ok(r) => Ok(r.matched_count == members.len() as u64),
                    Err(e) => Err(StoreError::Mongo(e)),
                };
                for i in members {
                    outcomes[i] = Some(outcome.clone());
                }
            }
            outcomes.into_iter().map(|o| o.unwrap_or(Ok(false))).collect()
        },
    )
}

/// A version-guarded update of a current document: applied only while its `versionId`
/// is still `base`.
#[derive(Debug, Clone)]
pub(super) struct Guarded {
    pub id: String,
    pub base: i64,
    /// The version the update writes.
    pub version: i64,
    pub update: Document,
    /// The update's encoded size, measured by the caller: weighing a batch happens under
    /// the queue's lock, where encoding large updates would hold up every other writer.
    pub bytes: usize,
}

/// Commits version-guarded updates. One alone is an `update_one`, whose matched count is
/// its outcome. Several go as one `update` command of unordered statements; its reply
/// counts the matches of all of them, so when some did not match the documents are read
/// back to tell which did: each statement also pushes a random token of its own onto the
/// document's `commitTokens`, which keeps the last [`TOKENS_KEPT`]. A statement applied
/// exactly when its token is there, or surely did not when the array still has room (no
/// token was pushed out) or the document's version is not past the one it wrote. Only a
/// statement whose document then took [`TOKENS_KEPT`] more batched commits before the read
/// back is left unknown: [`StoreError::Ambiguous`], answered like a commit whose reply was
/// lost. A write learns `Ok(true)` applied, `Ok(false)` the guard failed (another writer
/// got there first).
pub(super) fn guarded_updates(db: Database) -> Coalescer<Guarded, Result<bool, StoreError>> {
    Coalescer::new(
        db.clone(),
        |g: &Guarded| g.bytes,
        move |collection: Collection<Document>, items: Vec<Guarded>| {
            let db = db.clone();
            async move {
                let n = items.len();
                if n == 1 {
                    let Some(one) = items.into_iter().next() else { return Vec::new() };
                    let filter = doc! { "_id": one.id, "versionId": one.base };
                    let outcome = collection.update_one(filter, one.update).await;
                    return vec![outcome.map(|r| r.matched_count == 1).map_err(StoreError::Mongo)];
                }
                match guarded_batch(&db, &collection, &items).await {
                    Ok(outcomes) => outcomes,
                    Err(e) => vec![Err(e); n],
                }
            }
        },
    )
}

async fn guarded_batch(
    db: &Database,
    collection: &Collection<Document>,
    items: &[Guarded],
) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
    let tokens: Vec<i64> = items.iter().map(|_| uuid::Uuid::new_v4().as_u64_pair().0 as i64).collect();
    let mut statements = Vec::with_capacity(items.len());
    for (g, token) in items.iter().zip(&tokens) {
        let mut update = g.update.clone();
        let token = doc! { "$each": [*token], "$slice": -TOKENS_KEPT };
        match update.get_mut("$push") {
            Some(bson::Bson::Document(push)) => {
                push.insert("commitTokens", token);
            }
            _ => {
                update.insert("$push", doc! { "commitTokens": token });
            }
        }
        statements.push(doc! { "q": { "_id": &g.id, "versionId": g.base }, "u": update });
    }
    let reply = db.run_command(doc! { "update": collection.name(), "updates": statements, "ordered": false }).await?;
    let matched = match reply.get("n") {
        Some(bson::Bson::Int32(n)) => *n as i64,
        Some(bson::Bson::Int64(n)) => *n,
        _ => -1,
    };
    let mut refused: HashMap<usize, String> = HashMap::new();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors.iter().filter_map(bson::Bson::as_document) {
            let index = e.get_i32("index").map(|i| i as usize).or_else(|_| e.get_i64("index").map(|i| i as usize));
            let message = e.get_str("errmsg").unwrap_or("write error").to_string();
            if let Ok(index) = index {
                refused.insert(index, message);
            }
        }
    }
    if refused.is_empty() && matched == items.len() as i64 {
        return Ok(vec![Ok(true); items.len()]);
    }
    let ids: Vec<&str> = items.iter().map(|g| g.id.as_str()).collect();
    let docs: Vec<Document> = futures_util::TryStreamExt::try_collect(
        collection.find(doc! { "_id": { "$in": ids } }).projection(doc! { "versionId": 1, "commitTokens": 1 }).await?,
    )
    .await?;
    let found: HashMap<&str, (Option<i64>, Vec<i64>)> = docs
        .iter()
        .filter_map(|d| {
            let tokens = d.get_array("commitTokens").map(|a| a.iter().filter_map(bson::Bson::as_i64).collect());
            Some((d.get_str("_id").ok()?, (d.get_i64("versionId").ok(), tokens.unwrap_or_default())))
        })
        .collect();
    Ok(items
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (g, token))| match refused.remove(&i) {
            Some(message) => Err(StoreError::Refused(message)),
            None => match found.get(g.id.as_str()) {
                Some((version, kept)) => applied(*token, g.version, *version, kept),
                None => Ok(false),
            },
        })
        .collect())
}

/// Whether a batched guarded commit that wrote `version` with `token` applied, from its
/// document read back: its current version and the tokens it kept.
fn applied(token: i64, version: i64, current: Option<i64>, kept: &[i64]) -> Result<bool, StoreError> {
    if kept.contains(&token) {
        Ok(true)
    } else if kept.len() < TOKENS_KEPT as usize || current.is_some_and(|v| v <= version) {
        Ok(false)
    } else {
        Err(StoreError::Ambiguous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::error::InsertManyError;

    fn insert_many_error(codes: &[(usize, i32)]) -> mongodb::error::Error {
        let errors: Vec<Document> =
            codes.iter().map(|&(index, code)| doc! { "index": index as i64, "code": code, "errmsg": "x" }).collect();
        let m: InsertManyError = bson::deserialize_from_document(doc! { "writeErrors": errors }).unwrap();
        mongodb::error::Error::from(ErrorKind::InsertMany(m))
    }

    #[test]
    fn each_document_gets_its_own_insert_outcome() {
        let outcomes = insert_outcomes(4, insert_many_error(&[(1, 11000), (3, 121)]));
        assert!(matches!(outcomes[0], Inserted::Done));
        assert!(matches!(outcomes[1], Inserted::Duplicate));
        assert!(matches!(outcomes[2], Inserted::Done));
        assert!(matches!(outcomes[3], Inserted::Failed(_)));
    }

    #[test]
    fn a_kept_token_means_applied_a_missing_one_not_unless_it_may_have_been_pushed_out() {
        let full: Vec<i64> = (100..100 + TOKENS_KEPT as i64).collect();
        // Its token is there, however far the document has moved on.
        assert!(applied(105, 3, Some(40), &full).unwrap());
        assert!(applied(7, 3, Some(3), &[1, 7]).unwrap());
        // Not there, and nothing was pushed out: another writer's commit won.
        assert!(!applied(7, 3, Some(9), &[1, 2]).unwrap());
        assert!(!applied(7, 3, Some(3), &[]).unwrap());
        // Not there and the array is full, but the document never got past this version.
        assert!(!applied(7, 3, Some(3), &full).unwrap());
        // Not there, the array full, the document newer: it may have been pushed out.
        assert!(matches!(applied(7, 3, Some(4), &full), Err(StoreError::Ambiguous)));
    }

    #[test]
    fn each_reader_gets_its_document_however_often_it_was_asked_for() {
        let ids: Vec<String> = ["a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let docs = vec![doc! { "_id": "b", "v": 2 }, doc! { "_id": "a", "v": 1 }];
        let got: Vec<Option<i32>> =
            by_asker(&ids, docs).iter().map(|d| d.as_ref().map(|d| d.get_i32("v").unwrap())).collect();
        assert_eq!(got, vec![Some(1), Some(2), Some(1), None]);
    }

    /// A coalescer whose command sleeps `pause` and answers each item with itself, noting
    /// the size of every batch it was given.
    async fn echo(pause: std::time::Duration) -> (Coalescer<u32, u32>, Arc<Mutex<Vec<usize>>>) {
        // The client connects lazily; the command below never uses it.
        let db = mongodb::Client::with_uri_str("mongodb://127.0.0.1:9").await.unwrap().database("unused");
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let c = Coalescer::new(
            db,
            |_| 0,
            move |_c: Collection<Document>, items: Vec<u32>| {
                seen.lock().unwrap().push(items.len());
                async move {
                    tokio::time::sleep(pause).await;
                    items
                }
            },
        );
        (c, batches)
    }

    /// Submits `item` from a task of its own.
    fn submitted(c: &Coalescer<u32, u32>, item: u32) -> tokio::task::JoinHandle<Option<u32>> {
        let c = c.clone();
        tokio::spawn(async move { c.submit("x", item).await })
    }

    #[tokio::test]
    async fn writes_arriving_during_a_command_go_together_as_the_next() {
        let (c, batches) = echo(std::time::Duration::from_millis(50)).await;
        let first = submitted(&c, 0);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let rest = futures_util::future::join_all((1..=5).map(|i| c.submit("x", i))).await;
        assert_eq!(first.await.unwrap(), Some(0));
        assert_eq!(rest, (1..=5).map(Some).collect::<Vec<_>>());
        assert_eq!(*batches.lock().unwrap(), vec![1, 5]);
        // Idle again: the next write goes alone, at once.
        assert_eq!(c.submit("x", 9).await, Some(9));
        assert_eq!(batches.lock().unwrap().last(), Some(&1));
        assert!(c.inner.queues.lock().unwrap().is_empty(), "an idle collection keeps no queue");
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_mid_command_leaves_the_queued_writes_going() {
        let (c, batches) = echo(std::time::Duration::from_millis(50)).await;
        let leader = submitted(&c, 0);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let queued = submitted(&c, 1);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        leader.abort();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(5), queued).await;
        assert_eq!(answered.expect("not left waiting").unwrap(), Some(1), "sent by a task of its own");
        assert_eq!(*batches.lock().unwrap(), vec![1, 1]);
        assert!(c.inner.queues.lock().unwrap().is_empty());
    }

    #[test]
    fn a_whole_command_failure_fails_every_document() {
        let e = mongodb::error::Error::custom("gone");
        let outcomes = insert_outcomes(3, e);
        assert!(outcomes.iter().all(|o| matches!(o, Inserted::Failed(_))));
    }
}
