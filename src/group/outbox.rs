//! Member events travel from a committed Group version to ClickHouse through an outbox.
//!
//! MongoDB and ClickHouse share no transaction, so:
//! 1. the events of a write are staged as one *batch* pushed onto the `outbox` array of the
//!    Group's current document, by the same version-guarded update that bumps
//!    `meta.versionId`: the version and its events commit together or not at all (a batch
//!    over 4 MiB goes to `Group_4_0_0_MemberOutbox` chunks first, and the commit records
//!    their batch id; chunks of a commit that lost its version race are deleted);
//! 2. after the commit the batch is inserted into ClickHouse, off the request path (the
//!    client's answer does not wait for it), by the group's one flusher (`flusher`);
//! 3. then the batch is pulled from the `outbox` array (by its id) and its chunks deleted.
//!
//! Until 3, the batch is *pending*. Every reader of the group's members finishes the
//! pending batches first (or answers 503), and so does `Group?member=`, so no reader sees
//! a version whose events are missing. A later writer need not wait: it lays the pending
//! events over what ClickHouse has (see `plan`). The sweep at start-up and every few
//! seconds finishes batches whose writer died. Events therefore reach ClickHouse only for
//! committed versions (no phantom) and always do (no loss); flushers of a group take turns
//! under a lease and insert only the rows ClickHouse lacks (no duplicate).
//!
//! A batch is compact: its origin once, then per event only `[type, position, text]`
//! (text = the member's JSON, or a removed member's reference); the columns are derived
//! when the rows are built for ClickHouse.

use bson::{doc, Document};
use mongodb::Database;

pub use crate::store::mongo::pending_in;
use crate::store::{BatchRows, OutboxBatch};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::body::MemberFields;
use super::events::{ver, EventType, MemberEvent};
use super::plan::{member_reference, Planned};

/// Largest batch kept inline in the Group document, and largest outbox chunk (MongoDB
/// documents stop at 16 MiB).
pub const INLINE_LIMIT: usize = 4 * 1024 * 1024;
/// Most rows per ClickHouse insert (one block) and per outbox chunk.
pub const CHUNK_ROWS: usize = 10_000;
/// Pending inline bytes beyond which a writer finishes the pending batches itself before
/// adding one (back-pressure, and the Group document stays far below 16 MiB).
pub const PENDING_LIMIT: usize = 6 * 1024 * 1024;
/// Pending batches beyond which a writer finishes them itself. The background flusher
/// takes a group's batches every ~100 ms (gathering) plus its insert time (tens of ms,
/// more under load), so single-member PATCHes every few ms leave 20–40 pending: the
/// limit sits above that, or a writer every ~30 would wait for an insert. Each pending
/// batch costs every commit a little (~0.01 ms on SecantusDB), so it is not unbounded.
pub const PENDING_BATCHES: usize = 64;

pub const OUTBOX_COLLECTION: &str = "Group_4_0_0_MemberOutbox";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("outbox batch is malformed: {0}")]
    Corrupt(String),
    /// A chunk vanished while being read: the batch was finished meanwhile.
    #[error("outbox batch {0} was finished by another flusher")]
    Finished(String),
    /// Another flusher holds the group, or an insert took too long.
    #[error("{0}")]
    Busy(String),
}

fn corrupt(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Corrupt(e.to_string())
}

/// One event as the outbox keeps it: type, position, and the member's JSON (for a
/// removed member, its reference).
#[derive(Serialize)]
struct RowRef<'a>(EventType, u64, &'a str);

#[derive(Deserialize)]
struct Row(EventType, u64, String);

/// A chunk document of a big batch (`{_id: "batch/n", batchId, chunk, events}`).
#[derive(Deserialize)]
struct Chunk {
    events: String,
}

/// Serializes the batch's rows into JSON arrays of at most [`INLINE_LIMIT`] bytes and
/// [`CHUNK_ROWS`] rows.
fn pieces<'p>(planned: &'p Planned<'_>) -> impl Iterator<Item = Result<(String, usize), OutboxError>> + 'p {
    let mut rows = planned.rows().peekable();
    std::iter::from_fn(move || {
        rows.peek()?;
        let mut out = String::from("[");
        let mut n = 0;
        while let Some((t, position, text)) = rows.peek() {
            let json = match serde_json::to_string(&RowRef(*t, *position, text)) {
                Ok(j) => j,
                Err(e) => return Some(Err(corrupt(e))),
            };
            if n > 0 && (out.len() + json.len() + 2 > INLINE_LIMIT || n == CHUNK_ROWS) {
                break;
            }
            if n > 0 {
                out.push(',');
            }
            out.push_str(&json);
            n += 1;
            rows.next();
        }
        out.push(']');
        Some(Ok((out, n)))
    })
}

/// Prepares a planned batch for the commit: inline when it fits one piece, else its
/// chunks are written to [`OUTBOX_COLLECTION`] first.
pub async fn stage(db: &Database, planned: &Planned<'_>) -> Result<OutboxBatch, OutboxError> {
    let o = planned.origin();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let mut pieces = pieces(planned);
    let first = pieces.next().transpose()?.unwrap_or_else(|| ("[]".into(), 0));
    let rows = if first.1 == planned.len() {
        BatchRows::Inline { events: first.0 }
    } else {
        let chunks = db.collection::<Document>(OUTBOX_COLLECTION);
        let mut n = 0i32;
        for piece in std::iter::once(Ok(first)).chain(pieces) {
            let (events, _) = piece?;
            chunks
                .insert_one(
                    doc! { "_id": format!("{batch_id}/{n}"), "batchId": &batch_id, "chunk": n, "events": events },
                )
                .await?;
            n += 1;
        }
        BatchRows::Chunked { chunks: n }
    };
    Ok(OutboxBatch {
        batch_id,
        version: o.version as i64,
        base_count: planned.base_count() as i64,
        count: planned.len() as i64,
        actor: o.actor.clone(),
        request_id: o.request_id.clone(),
        source: o.source.to_string(),
        event_time: o.event_time,
        rows,
    })
}

/// Deletes the chunks of a staged batch whose commit failed.
pub async fn discard(db: &Database, staged: &OutboxBatch) {
    if let BatchRows::Chunked { .. } = staged.rows {
        let _ = db.collection::<Document>(OUTBOX_COLLECTION).delete_many(doc! { "batchId": &staged.batch_id }).await;
    }
}

/// The origin of a stored batch, needed to build its ClickHouse rows.
struct Header<'d> {
    group_id: &'d str,
    batch_id: &'d str,
    version: u32,
    base_count: u64,
    actor: &'d str,
    request_id: &'d str,
    source: &'d str,
    event_time: i64,
}

impl<'d> Header<'d> {
    fn of(group_id: &'d str, batch: &'d OutboxBatch) -> Header<'d> {
        Header {
            group_id,
            batch_id: &batch.batch_id,
            version: batch.version as u32,
            base_count: batch.base_count as u64,
            actor: &batch.actor,
            request_id: &batch.request_id,
            source: &batch.source,
            event_time: batch.event_time,
        }
    }

    /// Builds the ClickHouse rows of stored rows starting at `seq`; `count` is the active
    /// count before them and is carried forward.
    fn events(&self, rows: Vec<Row>, seq: u32, count: &mut u64) -> Result<Vec<MemberEvent>, OutboxError> {
        rows.into_iter()
            .enumerate()
            .map(|(i, Row(event_type, position, text))| {
                let seq = seq + i as u32;
                let (reference, value, member_json) = match event_type {
                    EventType::Removed => (text, Value::Null, String::new()),
                    _ => {
                        let value: Value = serde_json::from_str(&text).map_err(corrupt)?;
                        let reference = member_reference(&value)
                            .ok_or_else(|| corrupt("a member without entity.reference"))?
                            .to_string();
                        (reference, value, text)
                    }
                };
                match event_type {
                    EventType::Added => *count += 1,
                    EventType::Removed => *count = count.saturating_sub(1),
                    EventType::Updated => {}
                }
                let f = MemberFields::of(&reference, &value);
                Ok(MemberEvent {
                    group_id: self.group_id.to_string(),
                    group_version: self.version,
                    seq,
                    ver: ver(self.version, seq),
                    event_id: format!("{}/{}/{seq}", self.group_id, self.version),
                    event_type,
                    member_reference: reference,
                    member_type: f.member_type,
                    position,
                    period_start: f.period_start,
                    period_end: f.period_end,
                    inactive: f.inactive,
                    member_json,
                    active_count: *count,
                    actor: self.actor.to_string(),
                    request_id: self.request_id.to_string(),
                    source: self.source.to_string(),
                    event_time: self.event_time,
                })
            })
            .collect()
    }
}

fn parse_rows(s: &str) -> Result<Vec<Row>, OutboxError> {
    serde_json::from_str(s).map_err(corrupt)
}

/// Calls `each` with the batch's ClickHouse rows, one block at a time (never all in
/// memory). Blocks are the same for every flusher, so their tokens are too.
pub(crate) async fn for_each_block<F, Fut>(
    db: &Database,
    group_id: &str,
    batch: &OutboxBatch,
    mut each: F,
) -> Result<(), OutboxError>
where
    F: FnMut(Vec<MemberEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<(), OutboxError>>,
{
    let header = Header::of(group_id, batch);
    let mut count = header.base_count;
    let mut seq = 0u32;
    let expected = match &batch.rows {
        BatchRows::Chunked { chunks } => *chunks,
        BatchRows::Inline { events } => {
            let mut rows = parse_rows(events)?;
            while !rows.is_empty() {
                let rest = rows.split_off(rows.len().min(CHUNK_ROWS));
                let n = rows.len() as u32;
                each(header.events(rows, seq, &mut count)?).await?;
                seq += n;
                rows = rest;
            }
            return Ok(());
        }
    };
    let collection = db.collection::<Chunk>(OUTBOX_COLLECTION);
    for n in 0..expected {
        let chunk = collection
            .find_one(doc! { "_id": format!("{}/{n}", header.batch_id) })
            .projection(doc! { "events": 1 })
            .await?
            .ok_or_else(|| OutboxError::Finished(header.batch_id.to_string()))?;
        let rows = parse_rows(&chunk.events)?;
        let len = rows.len() as u32;
        each(header.events(rows, seq, &mut count)?).await?;
        seq += len;
    }
    Ok(())
}

/// The ClickHouse rows of an inline batch, all at once (tools and tests; flushers go a
/// block at a time).
pub fn inline_events(group_id: &str, batch: &OutboxBatch) -> Result<Vec<MemberEvent>, OutboxError> {
    let header = Header::of(group_id, batch);
    let mut count = header.base_count;
    header.events(parse_rows(inline(batch)?)?, 0, &mut count)
}

/// The rows of a batch that must be inline.
fn inline(batch: &OutboxBatch) -> Result<&str, OutboxError> {
    batch.inline().ok_or_else(|| corrupt(format!("batch {} is chunked, not inline", batch.batch_id)))
}

/// Deletes the chunk documents of batches that are no longer referenced.
pub async fn forget_chunks(db: &Database, batches: &[OutboxBatch]) -> Result<(), OutboxError> {
    let chunked: Vec<&str> = batches.iter().filter(|b| b.inline().is_none()).map(|b| b.batch_id.as_str()).collect();
    if !chunked.is_empty() {
        db.collection::<Document>(OUTBOX_COLLECTION).delete_many(doc! { "batchId": { "$in": chunked } }).await?;
    }
    Ok(())
}

/// True when a writer may lay these pending batches over ClickHouse's state instead of
/// finishing them first: all inline, and few and small enough.
pub fn can_overlay(batches: &[OutboxBatch]) -> bool {
    let bytes: usize = batches.iter().map(|b| b.inline().map_or(usize::MAX / 2, str::len)).sum();
    batches.len() <= PENDING_BATCHES && bytes <= PENDING_LIMIT
}

/// The latest pending state of each member the batches touch: reference → `Some((member
/// JSON, position))` when active, `None` when removed. Later batches win.
pub fn overlay(
    batches: &[OutboxBatch],
) -> Result<std::collections::HashMap<String, Option<(String, u64)>>, OutboxError> {
    let mut out = std::collections::HashMap::new();
    for batch in batches {
        let rows = parse_rows(inline(batch)?)?;
        for Row(event_type, position, text) in rows {
            match event_type {
                EventType::Removed => {
                    out.insert(text, None);
                }
                _ => {
                    let value: Value = serde_json::from_str(&text).map_err(corrupt)?;
                    let reference = member_reference(&value).ok_or_else(|| corrupt("member without reference"))?;
                    out.insert(reference.to_string(), Some((text, position)));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A batch of version 7 with these inline rows (tests).
    pub(crate) fn batch(events: &str) -> OutboxBatch {
        OutboxBatch {
            batch_id: "b".into(),
            version: 7,
            base_count: 0,
            count: 3,
            actor: "a".into(),
            request_id: "r".into(),
            source: "patch".into(),
            event_time: 5,
            rows: BatchRows::Inline { events: events.into() },
        }
    }

    #[test]
    fn rows_round_trip_into_clickhouse_rows_with_counts_and_fields() {
        let batch = OutboxBatch { base_count: 10, ..batch("[]") };
        let header = Header::of("g", &batch);
        let rows = parse_rows(
            r#"[[1,30064771072,"{\"entity\":{\"reference\":\"Patient/1\"},\"period\":{\"start\":\"2024\"}}"],
                [2,4,"Patient/2"],[3,9,"{\"entity\":{\"reference\":\"Patient/3\"},\"inactive\":true}"]]"#,
        )
        .unwrap();
        let mut count = header.base_count;
        let events = header.events(rows, 4, &mut count).unwrap();
        assert_eq!(count, 10);
        assert_eq!(events.iter().map(|e| e.active_count).collect::<Vec<_>>(), [11, 10, 10]);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6]);
        assert_eq!(events[0].ver, ver(7, 4));
        assert_eq!(events[0].event_id, "g/7/4");
        assert_eq!(events[0].member_type, "Patient");
        assert_eq!(events[0].period_start, "2024");
        assert_eq!(events[1].member_reference, "Patient/2");
        assert_eq!(events[1].member_json, "");
        assert!(events[2].inactive);
        assert_eq!(events[2].position, 9);
    }

    #[test]
    fn overlay_keeps_the_latest_state_per_member() {
        let b1 = batch(
            r#"[[1,1,"{\"entity\":{\"reference\":\"Patient/1\"}}"],[1,2,"{\"entity\":{\"reference\":\"Patient/2\"}}"]]"#,
        );
        let b2 = batch(r#"[[2,1,"Patient/1"]]"#);
        let o = overlay(&[b1, b2]).unwrap();
        assert_eq!(o["Patient/1"], None);
        assert_eq!(o["Patient/2"].as_ref().map(|(_, p)| *p), Some(2));
        assert!(can_overlay(&[batch("[]")]));
        let chunked = OutboxBatch { rows: BatchRows::Chunked { chunks: 2 }, ..batch("[]") };
        assert!(!can_overlay(&[chunked]), "chunked batches are finished, not overlaid");
    }
}
