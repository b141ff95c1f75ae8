//! Member events travel from a committed Group version to ClickHouse through an outbox.
//!
//! MongoDB and ClickHouse share no transaction, so:
//! 1. the events of a write are staged as the `outbox` field of the Group's current
//!    document, written by the same version-guarded replace that bumps `meta.versionId`:
//!    the version and its events commit together or not at all (a batch over 4 MiB goes to
//!    `Group_4_0_0_MemberOutbox` chunks first, and the commit records their batch id;
//!    chunks of a commit that lost its version race are never referenced and are deleted);
//! 2. after the commit the writer inserts them into ClickHouse with a deduplication token;
//! 3. then clears the `outbox` field (guarded by the batch id) and deletes the chunks.
//!
//! If anything fails after 1, the batch stays in MongoDB. Every read of the group, every
//! later write of it, the sweep at start-up and a background task finish it ([`flush`] in
//! recovery mode inserts only the rows ClickHouse does not have). Events therefore reach
//! ClickHouse only for committed versions (no phantom) and always do (no loss), and a
//! reader that finds a pending batch finishes it before answering, or answers 503.

use bson::{doc, Document};
use futures_util::TryStreamExt;
use mongodb::Database;

use super::events::{self, MemberEvent};
use super::plan::Planned;
use crate::store::mongo::current_collection;

/// Largest batch kept inline in the Group document, and largest outbox chunk (MongoDB
/// documents stop at 16 MiB).
pub const INLINE_LIMIT: usize = 4 * 1024 * 1024;
/// Most rows per ClickHouse insert and per events chunk built in memory.
pub const CHUNK_ROWS: usize = 10_000;

pub const OUTBOX_COLLECTION: &str = "Group_4_0_0_MemberOutbox";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("outbox batch is malformed: {0}")]
    Corrupt(String),
    /// A chunk vanished while being read: another flusher finished the batch.
    #[error("outbox batch {0} was finished by another flusher")]
    Finished(String),
}

/// Batches up to this many events are kept inline in the Group document when they fit
/// in [`INLINE_LIMIT`] (one chunk: built in memory at once).
const INLINE_ROWS: usize = CHUNK_ROWS;

/// Prepares a planned batch for the commit; returns the `outbox` field to store with it.
pub async fn stage(db: &Database, planned: &Planned<'_>) -> Result<Document, OutboxError> {
    let batch_id = uuid::Uuid::new_v4().to_string();
    let count = planned.len() as i64;
    if planned.len() <= INLINE_ROWS {
        let events: Vec<MemberEvent> = planned.chunks(INLINE_ROWS).flatten().collect();
        let json = serde_json::to_string(&events).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
        if json.len() <= INLINE_LIMIT {
            let version = events.first().map_or(0, |e| e.group_version) as i64;
            return Ok(doc! { "batchId": batch_id, "version": version, "count": count, "events": json });
        }
    }
    // Built, serialized and written one chunk at a time.
    let chunks = db.collection::<Document>(OUTBOX_COLLECTION);
    let mut n = 0i32;
    let mut version = 0i64;
    for events in planned.chunks(CHUNK_ROWS) {
        version = events.first().map_or(version, |e| e.group_version as i64);
        let mut rest = &events[..];
        while !rest.is_empty() {
            let (chunk, taken) = next_chunk(rest)?;
            rest = &rest[taken..];
            chunks
                .insert_one(
                    doc! { "_id": format!("{batch_id}/{n}"), "batchId": &batch_id, "chunk": n, "events": chunk },
                )
                .await?;
            n += 1;
        }
    }
    Ok(doc! { "batchId": batch_id, "version": version, "count": count, "chunks": n })
}

/// The JSON array of the first events that fit in [`INLINE_LIMIT`] bytes and
/// [`CHUNK_ROWS`] rows, and how many it holds.
fn next_chunk(events: &[MemberEvent]) -> Result<(String, usize), OutboxError> {
    let mut out = String::from("[");
    let mut rows = 0;
    for event in events {
        let json = serde_json::to_string(event).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
        if rows > 0 && (out.len() + json.len() + 2 > INLINE_LIMIT || rows == CHUNK_ROWS) {
            break;
        }
        if rows > 0 {
            out.push(',');
        }
        out.push_str(&json);
        rows += 1;
    }
    out.push(']');
    Ok((out, rows))
}

/// Deletes the chunks of a staged batch whose commit failed.
pub async fn discard(db: &Database, outbox: &Document) {
    if let Ok(id) = outbox.get_str("batchId") {
        let _ = db.collection::<Document>(OUTBOX_COLLECTION).delete_many(doc! { "batchId": id }).await;
    }
}

fn parse_events(s: &str) -> Result<Vec<MemberEvent>, OutboxError> {
    serde_json::from_str::<Vec<MemberEvent>>(s).map_err(|e| OutboxError::Corrupt(e.to_string()))
}

/// Calls `each` with the batch's events, one chunk at a time (never all in memory).
async fn for_each_chunk<F, Fut>(db: &Database, outbox: &Document, mut each: F) -> Result<(), OutboxError>
where
    F: FnMut(Vec<MemberEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<(), OutboxError>>,
{
    if let Ok(inline) = outbox.get_str("events") {
        let events = parse_events(inline)?;
        for chunk in events.chunks(CHUNK_ROWS) {
            each(chunk.to_vec()).await?;
        }
        return Ok(());
    }
    let id = outbox.get_str("batchId").map_err(|e| OutboxError::Corrupt(e.to_string()))?;
    let expected = outbox.get_i32("chunks").map_err(|e| OutboxError::Corrupt(e.to_string()))?;
    let collection = db.collection::<Document>(OUTBOX_COLLECTION);
    for n in 0..expected {
        let chunk = collection
            .find_one(doc! { "_id": format!("{id}/{n}") })
            .await?
            .ok_or_else(|| OutboxError::Finished(id.to_string()))?;
        each(parse_events(chunk.get_str("events").unwrap_or("[]"))?).await?;
    }
    Ok(())
}

/// Inserts a committed batch into ClickHouse and clears it from the Group document.
///
/// `recovering` = the batch may be partly inserted already (a crash, a concurrent
/// flusher): only missing rows are inserted. The writer's own first flush skips that check.
pub async fn flush(
    db: &Database,
    ch: &clickhouse::Client,
    group_id: &str,
    outbox: &Document,
    recovering: bool,
) -> Result<(), OutboxError> {
    let batch_id = outbox.get_str("batchId").unwrap_or_default();
    match insert(db, ch, group_id, outbox, recovering).await {
        Err(OutboxError::Finished(_)) => {
            // Its chunks are deleted only after its marker is cleared: if the marker is
            // gone too, the batch is done; otherwise it really is damaged.
            let marked = db
                .collection::<Document>(&current_collection("Group"))
                .find_one(doc! { "_id": group_id, "outbox.batchId": batch_id })
                .await?;
            return match marked {
                None => Ok(()),
                Some(_) => Err(OutboxError::Corrupt(format!("batch {batch_id} lacks chunks"))),
            };
        }
        other => other?,
    }
    db.collection::<Document>(&current_collection("Group"))
        .update_one(doc! { "_id": group_id, "outbox.batchId": batch_id }, doc! { "$unset": { "outbox": "" } })
        .await?;
    forget_chunks(db, outbox).await
}

/// Inserts a committed batch's events into ClickHouse (without clearing the marker).
///
/// Every flusher (the writer, a reader, the sweep) inserts the same blocks, the batch's
/// stored chunks, each with the same deduplication token, so flushers racing on one batch
/// cannot insert a row twice: ClickHouse drops the repeated block.
pub async fn insert(
    db: &Database,
    ch: &clickhouse::Client,
    group_id: &str,
    outbox: &Document,
    recovering: bool,
) -> Result<(), OutboxError> {
    for_each_chunk(db, outbox, |chunk| async move {
        if recovering {
            let Some(first) = chunk.first() else { return Ok(()) };
            let have = events::stored_seqs(ch, group_id, first.group_version).await?;
            let missing: Vec<MemberEvent> = chunk.into_iter().filter(|e| !have.contains(&e.seq)).collect();
            events::insert(ch, &missing).await?;
        } else {
            events::insert(ch, &chunk).await?;
        }
        Ok(())
    })
    .await
}

/// Deletes the chunk documents of a batch whose marker is cleared.
pub async fn forget_chunks(db: &Database, outbox: &Document) -> Result<(), OutboxError> {
    if outbox.contains_key("chunks") {
        let batch_id = outbox.get_str("batchId").unwrap_or_default();
        db.collection::<Document>(OUTBOX_COLLECTION).delete_many(doc! { "batchId": batch_id }).await?;
    }
    Ok(())
}

/// Finishes every pending batch (start-up and the background sweep). Returns how many.
pub async fn recover_all(db: &Database, ch: &clickhouse::Client) -> Result<usize, OutboxError> {
    let pending: Vec<Document> = db
        .collection::<Document>(&current_collection("Group"))
        .find(doc! { "outbox": { "$exists": true } })
        .projection(doc! { "outbox": 1 })
        .await?
        .try_collect()
        .await?;
    for d in &pending {
        let id = d.get_str("_id").map_err(|e| OutboxError::Corrupt(e.to_string()))?;
        let outbox = d.get_document("outbox").map_err(|e| OutboxError::Corrupt(e.to_string()))?;
        flush(db, ch, id, outbox, true).await?;
    }
    Ok(pending.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::events::EventType;

    fn event(seq: u32, json_len: usize) -> MemberEvent {
        MemberEvent {
            group_id: "g".into(),
            group_version: 1,
            seq,
            ver: seq as u64,
            event_id: format!("g/1/{seq}"),
            event_type: EventType::Added,
            member_reference: format!("Patient/{seq}"),
            member_type: "Patient".into(),
            position: seq as u64,
            period_start: String::new(),
            period_end: String::new(),
            inactive: false,
            member_json: "x".repeat(json_len),
            active_count: seq as u64,
            actor: String::new(),
            request_id: String::new(),
            source: "patch".into(),
            event_time: 0,
        }
    }

    #[test]
    fn chunks_stay_under_the_document_limit_and_keep_every_event_in_order() {
        let events: Vec<MemberEvent> = (0..3000).map(|i| event(i, 4000)).collect();
        let mut chunks = Vec::new();
        let mut rest = &events[..];
        while !rest.is_empty() {
            let (chunk, taken) = next_chunk(rest).unwrap();
            chunks.push(chunk);
            rest = &rest[taken..];
        }
        assert!(chunks.len() > 1);
        assert!(chunks.iter().all(|c| c.len() <= INLINE_LIMIT));
        let back: Vec<MemberEvent> =
            chunks.iter().flat_map(|c| serde_json::from_str::<Vec<MemberEvent>>(c).unwrap()).collect();
        assert_eq!(back, events);
    }
}
