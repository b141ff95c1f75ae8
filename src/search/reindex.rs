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
//! Resumable: after each batch, `_search_reindex` records the last id done per type (and
//! the key format, [`KEYS_VERSION`]); a run starts after it. A type is done when a run
//! reaches its end. Several processes may run it at once: the work is idempotent.

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

/// Documents per batch.
const BATCH: i64 = 2_000;

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

/// Indexes the documents of `rt` that lack keys, from its checkpoint on (`restart`: from
/// the start). `progress` is told the documents scanned after each batch.
pub async fn reindex_type(
    db: &mongodb::Database,
    ch: &clickhouse::Client,
    base: &str,
    rt: &str,
    restart: bool,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Done, String> {
    let checkpoints = db.collection::<Document>(COLLECTION);
    let key = format!("type:{rt}");
    let mut after: Option<String> = None;
    if !restart {
        let saved =
            checkpoints.find_one(doc! { "_id": &key, "version": KEYS_VERSION }).await.map_err(|e| e.to_string())?;
        if let Some(saved) = saved {
            if saved.get_bool("done").unwrap_or(false) {
                return Ok(Done::default());
            }
            after = saved.get_str("after").ok().map(str::to_string);
        }
    }
    let coll = db.collection::<Document>(&current_collection(rt));
    let mut done = Done::default();
    loop {
        let filter = match &after {
            Some(a) => doc! { "_id": { "$gt": a } },
            None => doc! {},
        };
        let options = FindOptions::builder()
            .sort(doc! { "_id": 1 })
            .limit(BATCH)
            .projection(doc! { "resource": 1, "versionId": 1, "deleted": 1, "_s": 1 })
            .build();
        let docs: Vec<Document> = coll
            .find(filter)
            .with_options(options)
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = docs.last().and_then(|d| d.get_str("_id").ok()).map(str::to_string) else { break };
        let mut rows = Vec::new();
        for d in &docs {
            done.scanned += 1;
            if d.contains_key("_s") || d.get_bool("deleted").unwrap_or(false) {
                continue;
            }
            let (Ok(id), Ok(version), Ok(resource)) =
                (d.get_str("_id"), d.get_i64("versionId"), d.get_document("resource"))
            else {
                continue;
            };
            let resource = Value::Object(json_bson::to_json_object(resource));
            for k in super::index_keys(&resource, base) {
                rows.push(IndexRow { rt: rt.to_string(), key: k, id: id.to_string(), version, deleted: 0 });
            }
            done.indexed += 1;
        }
        insert(ch, &rows).await.map_err(|e| e.to_string())?;
        checkpoints
            .update_one(
                doc! { "_id": &key },
                doc! { "$set": { "after": &last, "version": KEYS_VERSION, "done": false } },
            )
            .upsert(true)
            .await
            .map_err(|e| e.to_string())?;
        progress(done.scanned);
        if (docs.len() as i64) < BATCH {
            break;
        }
        after = Some(last);
    }
    checkpoints
        .update_one(doc! { "_id": &key }, doc! { "$set": { "version": KEYS_VERSION, "done": true } })
        .upsert(true)
        .await
        .map_err(|e| e.to_string())?;
    Ok(done)
}

/// The start-up migration step: indexes every type not done yet, then records that all
/// are. Runs in the background while the server serves.
pub async fn migrate(db: &mongodb::Database, ch: &clickhouse::Client, base: &str) -> Result<Done, String> {
    if all_done(db).await.map_err(|e| e.to_string())? {
        return Ok(Done::default());
    }
    let mut total = Done::default();
    for rt in fhir_model::RESOURCE_TYPES {
        let d = reindex_type(db, ch, base, rt, false, &|_| {}).await?;
        total.scanned += d.scanned;
        total.indexed += d.indexed;
    }
    mark_all_done(db).await.map_err(|e| e.to_string())?;
    Ok(total)
}
