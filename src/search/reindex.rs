//! Indexes resources stored before their keys were (`roster reindex`, and the start-up
//! migration step): every current document without keys (`_s`) gets its keys inserted
//! into `SearchIndex`, type by type in `_id` order, in batches.
//!
//! Why only ClickHouse is written: a MongoDB update per document would cap the rate at the
//! store's update rate (about 1,500/s here). Without `_s` in MongoDB, the next write of
//! such a resource takes its base keys from the stored content instead (see
//! `pipeline::commit`), so the keys it drops are still removed from the index, and a
//! search reads such a document's keys from its content while it is pending. A write that
//! races with the reindex of its resource wins by version (`ReplacingMergeTree`).
//!
//! Resumable: a run skips the documents the index already has at their version, so a run
//! after an interruption only scans what was done. `_search_reindex` records the types a
//! run finished at the current key format ([`KEYS_VERSION`]): the start-up step skips them;
//! `roster reindex` scans them again (an older server may have stored documents without
//! keys since). Several processes may run it at once: the work is idempotent.

use bson::{doc, Document};
use futures_util::TryStreamExt;
use mongodb::options::FindOptions;

use serde_json::Value;

use super::flusher::{insert, IndexRow};
use crate::model::json_bson;
use crate::store::mongo::current_collection;

/// The format of the keys (`search::keys`): a change bumps it, and the start-up step
/// indexes every type again.
pub const KEYS_VERSION: i64 = 1;

/// The checkpoints.
pub const COLLECTION: &str = "_search_reindex";

/// What one type's run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub scanned: u64,
    pub indexed: u64,
}

/// Whether every type is indexed at [`KEYS_VERSION`].
pub async fn all_done(db: &mongodb::Database) -> Result<bool, mongodb::error::Error> {
    let c = db.collection::<Document>(COLLECTION);
    Ok(c.find_one(doc! { "_id": "*", "version": KEYS_VERSION }).await?.is_some())
}

/// Records that every type is indexed.
pub async fn mark_all_done(db: &mongodb::Database) -> Result<(), mongodb::error::Error> {
    let c = db.collection::<Document>(COLLECTION);
    c.update_one(doc! { "_id": "*" }, doc! { "$set": { "version": KEYS_VERSION } }).upsert(true).await?;
    Ok(())
}

/// Current documents of `rt` (for a progress bar's length).
pub async fn count(db: &mongodb::Database, rt: &str) -> Result<u64, mongodb::error::Error> {
    db.collection::<Document>(&current_collection(rt)).estimated_document_count().await
}

/// Documents sent from the reader to the indexer at a time.
const SEND: usize = 2_000;

/// A document to index: id, version, content.
type Stored = (String, i64, Document);

/// Indexes the documents of `rt` that lack keys and are not in the index at their version.
/// `progress` is told the documents scanned so far.
///
/// One pass in the collection's natural order (on SecantusDB a range or sorted read of
/// `_id` scans the collection each time, so paging by id would be quadratic): a reader
/// task streams the documents, an indexer task asks ClickHouse which it already has (a
/// rerun after an interruption skips them), computes the keys of the others and inserts
/// them — the two run on the two cores at once.
pub async fn reindex_type(
    db: &mongodb::Database,
    ch: &clickhouse::Client,
    base: &str,
    rt: &str,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Done, String> {
    let coll = db.collection::<Document>(&current_collection(rt));
    let options = FindOptions::builder()
        .projection(doc! { "resource": 1, "versionId": 1, "deleted": 1, "_s": 1 })
        .batch_size(SEND as u32)
        .build();
    let mut cursor = coll.find(doc! {}).with_options(options).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Stored>>(2);
    let indexer = {
        let (ch, base, rt) = (ch.clone(), base.to_string(), rt.to_string());
        tokio::spawn(async move {
            let mut indexed = 0u64;
            while let Some(batch) = rx.recv().await {
                indexed += index_batch(&ch, &base, &rt, batch).await?;
            }
            Ok::<u64, String>(indexed)
        })
    };
    let mut done = Done::default();
    let mut batch = Vec::with_capacity(SEND);
    let mut failed = None;
    loop {
        let next = match cursor.try_next().await {
            Ok(next) => next,
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        };
        let Some(mut d) = next else { break };
        done.scanned += 1;
        if !d.contains_key("_s") && !d.get_bool("deleted").unwrap_or(false) {
            if let (Ok(id), Ok(version), Some(bson::Bson::Document(resource))) =
                (d.get_str("_id").map(str::to_string), d.get_i64("versionId"), d.remove("resource"))
            {
                batch.push((id, version, resource));
            }
        }
        if batch.len() >= SEND && tx.send(std::mem::take(&mut batch)).await.is_err() {
            break; // the indexer failed: its error is below
        }
        if done.scanned % SEND as u64 == 0 {
            progress(done.scanned);
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
    drop(tx);
    progress(done.scanned);
    done.indexed = indexer.await.map_err(|e| e.to_string())??;
    match failed {
        Some(e) => Err(e),
        None => {
            let checkpoints = db.collection::<Document>(COLLECTION);
            checkpoints
                .update_one(
                    doc! { "_id": format!("type:{rt}") },
                    doc! { "$set": { "version": KEYS_VERSION, "done": true } },
                )
                .upsert(true)
                .await
                .map_err(|e| e.to_string())?;
            Ok(done)
        }
    }
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Indexed {
    id: String,
    version: i64,
}

/// Indexes the documents of a batch the index lacks at their version; returns how many.
async fn index_batch(ch: &clickhouse::Client, base: &str, rt: &str, batch: Vec<Stored>) -> Result<u64, String> {
    let ids: Vec<String> = batch.iter().map(|(id, _, _)| id.clone()).collect();
    let mut sql = super::sql::Sql::default();
    sql.push(&format!("SELECT id, max(version) AS version FROM {} WHERE rt = ", super::flusher::TABLE)).str(rt);
    sql.push(" AND key = ").str(&super::plan::every_resource()).push(" AND ").in_list("id", &ids, false);
    sql.push(" GROUP BY id");
    let have: Vec<Indexed> = sql.query(ch).fetch_all().await.map_err(|e| e.to_string())?;
    let have: std::collections::HashMap<String, i64> = have.into_iter().map(|r| (r.id, r.version)).collect();
    let mut rows = Vec::new();
    let mut indexed = 0;
    for (id, version, resource) in batch {
        if have.get(&id).is_some_and(|v| *v >= version) {
            continue;
        }
        let resource = Value::Object(json_bson::to_json_object(&resource));
        for k in super::index_keys(&resource, base) {
            rows.push(IndexRow { rt: rt.to_string(), key: k, id: id.clone(), version, deleted: 0 });
        }
        indexed += 1;
    }
    insert(ch, &rows).await.map_err(|e| e.to_string())?;
    Ok(indexed)
}

/// Whether the start-up step finished `rt` at the current key format.
async fn type_done(db: &mongodb::Database, rt: &str) -> Result<bool, String> {
    let c = db.collection::<Document>(COLLECTION);
    let found = c.find_one(doc! { "_id": format!("type:{rt}"), "version": KEYS_VERSION, "done": true }).await;
    Ok(found.map_err(|e| e.to_string())?.is_some())
}

/// The start-up migration step: indexes every type not done yet, then records that all
/// are. Runs in the background while the server serves.
pub async fn migrate(db: &mongodb::Database, ch: &clickhouse::Client, base: &str) -> Result<Done, String> {
    if all_done(db).await.map_err(|e| e.to_string())? {
        return Ok(Done::default());
    }
    let mut total = Done::default();
    for rt in fhir_model::RESOURCE_TYPES {
        if type_done(db, rt).await? {
            continue;
        }
        let d = reindex_type(db, ch, base, rt, &|_| {}).await?;
        total.scanned += d.scanned;
        total.indexed += d.indexed;
    }
    mark_all_done(db).await.map_err(|e| e.to_string())?;
    Ok(total)
}
