//! The journal: where an append becomes durable, in MongoDB, before ClickHouse has it.
//!
//! Why: a ClickHouse insert costs 7–20 ms here however small it is (a new part on disk,
//! plus the `by_stream` projection), and a cycle that waits for one makes every append wait
//! one to two of them. A MongoDB insert of one document costs about 1 ms. So the appender
//! writes each cycle as one journal document and answers; a *flusher* then copies
//! journaled cycles into `EventStore_Events`, many per ClickHouse block, in position order.
//!
//! # Invariants
//! - A journal document is keyed by its first position (`_id`). Positions are handed out
//!   contiguously by the log lease's holder, so a stale holder whose write lands late
//!   collides with its successor's document instead of overlapping it.
//! - The flusher inserts blocks in position order, one after the other, so
//!   `EventStore_Events` stays a gap-free prefix of the log; readers never see a hole.
//! - Before each block the flusher records it in the log document (`flushing: {from, to}`),
//!   only while it still holds the lease. The block goes in with the deduplication token
//!   `es-{from}-{to}`. A new holder first re-inserts that exact block with that token:
//!   if the old holder's insert landed, or lands later, ClickHouse keeps one copy.
//! - A journal document is deleted only once its events are in ClickHouse.
//! - Readers wait until ClickHouse holds every journaled position they could be asked
//!   about ([`Journal::pending_end`]): a read after an acknowledged append sees it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, spec::BinarySubtype, Binary, Document};
use mongodb::options::FindOptions;
use mongodb::{Collection, Database};
use tokio::sync::{mpsc, watch, Notify};
use uuid::Uuid;

use super::log::{EventRow, LOG_TABLE};
use super::EventStoreError;

pub const JOURNAL: &str = "EventStore_Journal";
/// Most events one flusher block carries.
const BLOCK_EVENTS: usize = 100_000;
/// Under load, at most one flusher block starts per this interval, unless a reader of
/// this process waits for the journaled events (see [`JournalFlusher::hurry`]).
///
/// Each ClickHouse insert costs about 15–25 ms of server CPU whatever its size, plus
/// merging the part it makes: at 40,000 events/s, 2,000-event blocks every 50 ms kept
/// chdb at 45–85% of a core, 8,000-event blocks every 200 ms at 35–40% (measured with
/// inserts alone on this 2-core machine). That CPU is taken from the appends.
const GATHER: Duration = Duration::from_millis(200);

/// Most journal entries one delete removes, and the pause between two deletes while
/// more wait. A MongoDB that runs one operation at a time (SecantusDB here: ~0.3 ms per
/// deleted document) holds the appender's journal writes up behind a delete. Deleting a
/// flush's worth of entries at once (~60-120 under single-event load) held every append
/// of that moment 40-70 ms, every 400 ms; small deletes spaced out hold one write at most
/// a few ms.
const FORGET_CHUNK: usize = 8;
const FORGET_PAUSE: Duration = Duration::from_millis(10);
/// Longest a ClickHouse insert of the flusher may take before it is tried again.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// One cycle's events, as journaled (positions `first ..= first + rows.len() - 1`).
#[derive(Clone)]
pub struct Entry {
    pub first: u64,
    pub rows: Arc<Vec<EventRow>>,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.first + self.rows.len() as u64 - 1
    }
}

/// Why a journal write failed.
pub enum WriteError {
    /// Another holder journaled these positions: this holder's view is stale.
    Taken,
    /// The write may or may not have landed.
    Unknown(mongodb::error::Error),
}

/// The journal collection and the log document it answers to.
#[derive(Clone)]
pub struct Journal {
    col: Collection<Document>,
    log: Collection<Document>,
    ch: clickhouse::Client,
}

impl Journal {
    pub fn new(db: &Database, ch: clickhouse::Client) -> Journal {
        Journal { col: db.collection(JOURNAL), log: db.collection(super::appender::LOG), ch }
    }

    /// Journals a cycle (one document, all or nothing).
    pub async fn write(&self, entry: &Entry, tenure: &str) -> Result<(), WriteError> {
        let bytes = encode(&entry.rows);
        let d = doc! {
            "_id": entry.first as i64,
            "end": entry.end() as i64,
            "by": tenure,
            "rows": Binary { subtype: BinarySubtype::Generic, bytes },
        };
        match self.col.insert_one(d).await {
            Ok(_) => Ok(()),
            Err(e) if crate::store::mongo::is_duplicate_key(&e) => Err(WriteError::Taken),
            Err(e) => Err(WriteError::Unknown(e)),
        }
    }

    /// The last journaled position not yet known to be in ClickHouse, if any.
    pub async fn pending_end(&self) -> Result<Option<i64>, mongodb::error::Error> {
        let last = self.col.find_one(doc! {}).sort(doc! { "_id": -1 }).projection(doc! { "end": 1 }).await?;
        Ok(last.and_then(|d| d.get_i64("end").ok()))
    }

    /// Every journaled entry, in position order.
    async fn entries(&self) -> Result<Vec<Entry>, EventStoreError> {
        use futures_util::TryStreamExt;
        let docs: Vec<Document> = self
            .col
            .find(doc! {})
            .with_options(FindOptions::builder().sort(doc! { "_id": 1 }).build())
            .await?
            .try_collect()
            .await?;
        docs.iter()
            .map(|d| {
                let first = d.get_i64("_id").map_err(|_| corrupt("an entry without a first position"))? as u64;
                let bytes = d.get_binary_generic("rows").map_err(|_| corrupt("an entry without rows"))?;
                let rows = decode(bytes).ok_or_else(|| corrupt(&format!("entry {first} cannot be read")))?;
                match rows.first().map(|r| r.position) {
                    Some(p) if p == first => Ok(Entry { first, rows: Arc::new(rows) }),
                    _ => Err(corrupt(&format!("entry {first} does not start at its position"))),
                }
            })
            .collect()
    }

    /// Forgets every entry that starts at or before `last`: ClickHouse holds them all.
    /// Entries are keyed by their first position, so that is an `_id` range.
    async fn forget_through(&self, last: u64) -> Result<(), mongodb::error::Error> {
        self.col.delete_many(doc! { "_id": { "$lte": last as i64 } }).await.map(|_| ())
    }

    /// Forgets the entries with these first positions, whose events ClickHouse holds. By
    /// `_id`, not as a range: a range costs SecantusDB a scan of the whole collection.
    async fn forget(&self, firsts: &[u64]) -> Result<(), mongodb::error::Error> {
        let ids: Vec<i64> = firsts.iter().map(|&f| f as i64).collect();
        self.col.delete_many(doc! { "_id": { "$in": ids } }).await.map(|_| ())
    }

    /// Flushes `block` (consecutive entries) while `tenure` holds the lease: records it in
    /// the log document, then inserts it. `Ok(false)`: the lease is someone else's now, so
    /// this holder must stop flushing (the new holder takes over from the journal).
    async fn flush(&self, tenure: &str, block: &[Entry]) -> Result<bool, EventStoreError> {
        let (from, to) = (block[0].first, block[block.len() - 1].end());
        let marked = self
            .log
            .update_one(
                doc! { "_id": "log", "lease.by": tenure },
                doc! { "$set": { "flushing": { "from": from as i64, "to": to as i64 } } },
            )
            .await?;
        if marked.matched_count == 0 {
            return Ok(false);
        }
        self.insert(from, to, block).await?;
        Ok(true)
    }

    /// Inserts positions `from ..= to` of `entries` as one block with the block's
    /// deduplication token (public so tests can replay a late insert).
    pub async fn insert(&self, from: u64, to: u64, entries: &[Entry]) -> Result<(), EventStoreError> {
        let token = format!("es-{from}-{to}");
        let insert = async {
            let mut insert = self
                .ch
                .insert::<EventRow>(LOG_TABLE)
                .await?
                .with_setting("insert_deduplication_token", &token)
                .with_setting("async_insert", "0")
                .with_setting("max_insert_block_size", "1048576");
            for row in entries.iter().flat_map(|e| e.rows.iter()).filter(|r| (from..=to).contains(&r.position)) {
                insert.write(row).await?;
            }
            insert.end().await
        };
        match tokio::time::timeout(FLUSH_TIMEOUT, insert).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(EventStoreError::Unavailable(format!("ClickHouse did not answer the insert of {token}"))),
        }
    }

    /// The last position ClickHouse holds (-1: none).
    pub async fn last_stored(&self) -> Result<i64, EventStoreError> {
        let (count, max): (u64, u64) =
            self.ch.query("SELECT count(), max(position) FROM EventStore_Events").fetch_one().await?;
        Ok(if count == 0 { -1 } else { max as i64 })
    }

    /// A new holder's first duty: brings ClickHouse level with the journal and returns the
    /// last position stored. `flushing` is the block the last holder recorded as in flight.
    pub async fn recover(&self, tenure: &str, flushing: Option<(u64, u64)>) -> Result<i64, EventStoreError> {
        // The journal is read before ClickHouse: an entry gone from the journal is in
        // ClickHouse by then, so the two reads can only disagree towards "already stored".
        let entries = self.entries().await?;
        let mut stored = self.last_stored().await?;
        if let Some((from, to)) = flushing.filter(|&(_, to)| to as i64 > stored) {
            let block: Vec<Entry> = entries.iter().filter(|e| e.first >= from && e.end() <= to).cloned().collect();
            let covered: u64 = block.iter().map(|e| e.rows.len() as u64).sum();
            if from as i64 != stored + 1 || covered != to - from + 1 {
                return Err(corrupt(&format!("block {from}-{to} was in flight but its entries are not all journaled")));
            }
            self.insert(from, to, &block).await?;
            stored = to as i64;
        }
        let rest: Vec<Entry> = entries.into_iter().filter(|e| e.end() as i64 > stored).collect();
        for block in blocks(&rest) {
            if block[0].first as i64 != stored + 1 {
                return Err(corrupt(&format!("the journal skips from {stored} to {}", block[0].first)));
            }
            if !self.flush(tenure, block).await? {
                return Err(EventStoreError::Unavailable("the log lease was taken during recovery".into()));
            }
            stored = block[block.len() - 1].end() as i64;
        }
        if stored >= 0 {
            self.forget_through(stored as u64).await?;
        }
        Ok(stored)
    }
}

/// Splits consecutive entries into flusher blocks of about [`BLOCK_EVENTS`].
fn blocks(entries: &[Entry]) -> Vec<&[Entry]> {
    let mut out = Vec::new();
    let (mut start, mut n) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        if n > 0 && n + e.rows.len() > BLOCK_EVENTS {
            out.push(&entries[start..i]);
            (start, n) = (i, 0);
        }
        n += e.rows.len();
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

fn corrupt(what: &str) -> EventStoreError {
    EventStoreError::Unavailable(format!("the event journal is inconsistent: {what}"))
}

/// The cycles this process journaled lately, for followers in this process
/// (subscriptions, projections): journaled events are durable and final (the flusher
/// inserts exactly these rows at these positions), so a follower can have them without
/// waiting for ClickHouse. Only a contiguous run is kept, and only what it holds is
/// served, from the exact position asked: a follower still never skips a position.
pub struct Recent {
    entries: std::sync::Mutex<std::collections::VecDeque<Entry>>,
    /// The last position this process journaled (wakes followers).
    pub journaled: watch::Sender<i64>,
}

/// Most events [`Recent`] keeps.
const RECENT_EVENTS: usize = 50_000;

impl Default for Recent {
    fn default() -> Self {
        Recent { entries: Default::default(), journaled: watch::channel(-1).0 }
    }
}

impl Recent {
    pub fn push(&self, entry: Entry) {
        let end = entry.end() as i64;
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            // Another process wrote in between: what is kept is no longer a run.
            if entries.back().is_some_and(|b| b.end() + 1 != entry.first) {
                entries.clear();
            }
            entries.push_back(entry);
            let mut held: usize = entries.iter().map(|e| e.rows.len()).sum();
            while held > RECENT_EVENTS && entries.len() > 1 {
                held -= entries.pop_front().map_or(0, |e| e.rows.len());
            }
        }
        super::log::raise(&self.journaled, end);
    }

    /// Up to `max` events from position `from`, if this process journaled `from` lately.
    /// Just past the last position it journaled, the page is empty: the caller decides
    /// whether another process may have written beyond.
    pub fn read(&self, from: u64, max: usize) -> Option<Vec<super::StoredEvent>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.front()?.first > from || entries.back()?.end() + 1 < from {
            return None;
        }
        // Entries are one contiguous run: skip whole entries, then index into the first.
        let mut held = entries.iter().skip_while(|e| e.end() < from);
        let Some(first) = held.next() else { return Some(Vec::new()) };
        let rows = first.rows[(from - first.first) as usize..].iter().chain(held.flat_map(|e| e.rows.iter()));
        Some(rows.take(max).map(|r| super::StoredEvent::from(r.clone())).collect())
    }
}

/// Copies one tenure's journaled entries to ClickHouse, in order, until the tenure's
/// sender is dropped (then it finishes what is queued) or the lease is lost.
pub struct JournalFlusher {
    pub journal: Journal,
    pub tenure: String,
    /// Raised to the last position stored after each block.
    pub stored: Arc<watch::Sender<i64>>,
    /// Notified by whoever waits for ClickHouse to hold journaled events (a read waiting for them,
    /// a releasing holder): the block being gathered is flushed at once.
    pub hurry: Arc<Notify>,
    /// Injected stall before the first block (fault tests).
    pub stall: Duration,
}

impl JournalFlusher {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Entry>) {
        let mut stall = self.stall;
        let mut flushed_at = Instant::now() - GATHER;
        // Deleting flushed entries is bookkeeping, done beside the flushes, at its own pace.
        let (forget, flushed) = mpsc::unbounded_channel();
        tokio::spawn(forget_paced(self.journal.clone(), flushed));
        while let Some(first) = rx.recv().await {
            if !stall.is_zero() {
                tokio::time::sleep(std::mem::take(&mut stall)).await;
            }
            // Under load, cycles are gathered into fewer, larger blocks: each insert makes a
            // part (and a projection part) that ClickHouse must later merge, so the part
            // count, not the event count, is what costs. An idle log flushes at once, and so
            // does a busy one when a reader waits.
            let gather_until = flushed_at + GATHER;
            let mut block = vec![first];
            let mut n = block[0].rows.len();
            while n < BLOCK_EVENTS {
                let next = match rx.try_recv() {
                    Ok(e) => Some(e),
                    Err(_) => tokio::select! {
                        e = rx.recv() => e,
                        _ = tokio::time::sleep_until(gather_until.into()) => None,
                        _ = self.hurry.notified() => None,
                    },
                };
                let Some(e) = next else { break };
                n += e.rows.len();
                block.push(e);
            }
            flushed_at = Instant::now();
            let mut pause = Duration::from_millis(10);
            loop {
                match self.journal.flush(&self.tenure, &block).await {
                    Ok(true) => break,
                    // The next holder re-inserts from the journal.
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "flushing journaled events to ClickHouse failed; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
            let end = block[block.len() - 1].end();
            super::log::raise(&self.stored, end as i64);
            let _ = forget.send(block.iter().map(|e| e.first).collect());
        }
    }
}

/// Deletes flushed journal entries (by their first positions), [`FORGET_CHUNK`] per
/// delete, [`FORGET_PAUSE`] apart while more wait, until the flusher is gone and nothing
/// waits. A failed delete is tried again a second later, or, once the flusher is gone, left:
/// left-over entries are harmless (readers only look at the last entry, and a holder
/// taking over after a crash forgets what it finds flushed).
async fn forget_paced(journal: Journal, mut flushed: mpsc::UnboundedReceiver<Vec<u64>>) {
    let mut waiting = std::collections::VecDeque::new();
    loop {
        if waiting.is_empty() {
            match flushed.recv().await {
                Some(firsts) => waiting.extend(firsts),
                None => return,
            }
        }
        while let Ok(firsts) = flushed.try_recv() {
            waiting.extend(firsts);
        }
        let chunk: Vec<u64> = waiting.iter().take(FORGET_CHUNK).copied().collect();
        match journal.forget(&chunk).await {
            Ok(()) => drop(waiting.drain(..chunk.len())),
            Err(err) if flushed.is_closed() => {
                tracing::warn!(error = %err, "could not delete flushed journal entries; leaving them");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not delete flushed journal entries; trying again later");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if !waiting.is_empty() {
            tokio::time::sleep(FORGET_PAUSE).await;
        }
    }
}

/// The journal's row encoding: length-prefixed fields, so event data (JSON text) is
/// stored as it is, without a second layer of escaping.
fn encode(rows: &[EventRow]) -> Vec<u8> {
    let size: usize = rows.iter().map(|r| 64 + r.stream_id.len() + r.event_type.len() + r.data.len()).sum();
    let mut out = Vec::with_capacity(size);
    let text = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    for r in rows {
        out.extend_from_slice(&r.position.to_le_bytes());
        out.extend_from_slice(&r.stream_version.to_le_bytes());
        out.extend_from_slice(r.event_id.as_bytes());
        out.extend_from_slice(&r.timestamp.to_le_bytes());
        text(&mut out, &r.stream_id);
        text(&mut out, &r.event_type);
        text(&mut out, &r.data);
        out.extend_from_slice(&(r.metadata.len() as u32).to_le_bytes());
        for (k, v) in &r.metadata {
            text(&mut out, k);
            text(&mut out, v);
        }
    }
    out
}

fn decode(mut bytes: &[u8]) -> Option<Vec<EventRow>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (b.get(..n)?, b.get(n..)?);
        *b = tail;
        Some(head)
    }
    fn u64_(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    fn u32_(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    fn text(b: &mut &[u8]) -> Option<String> {
        let n = u32_(b)?;
        String::from_utf8(take(b, n)?.to_vec()).ok()
    }
    let mut rows = Vec::new();
    while !bytes.is_empty() {
        let b = &mut bytes;
        let position = u64_(b)?;
        let stream_version = u64_(b)?;
        let event_id = Uuid::from_slice(take(b, 16)?).ok()?;
        let timestamp = u64_(b)? as i64;
        let (stream_id, event_type, data) = (text(b)?, text(b)?, text(b)?);
        let pairs = u32_(b)?;
        let metadata = (0..pairs).map(|_| Some((text(b)?, text(b)?))).collect::<Option<Vec<_>>>()?;
        rows.push(EventRow { position, stream_version, event_id, timestamp, stream_id, event_type, data, metadata });
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(position: u64, data: &str) -> EventRow {
        EventRow {
            position,
            stream_id: "patient:ü-1".into(),
            stream_version: position * 2,
            event_id: Uuid::from_u128(position as u128 + 7),
            event_type: "admit".into(),
            data: data.into(),
            metadata: vec![("actor".into(), "ann \"the\" nurse".into()), (String::new(), String::new())],
            timestamp: 1_700_000_000_123,
        }
    }

    #[test]
    fn rows_survive_the_journal_encoding() {
        let rows = vec![row(4, r#"{"a":"\"quoted\""}"#), row(5, "[]"), row(6, "")];
        let back = decode(&encode(&rows)).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{rows:?}"));
        let bytes = encode(&rows);
        assert!(decode(&bytes[..bytes.len() - 1]).is_none(), "a truncated entry is refused, not misread");
    }

    #[test]
    fn recent_cycles_are_served_only_as_a_run_from_the_position_asked() {
        let entry =
            |first: u64, n: u64| Entry { first, rows: Arc::new((first..first + n).map(|p| row(p, "1")).collect()) };
        let recent = Recent::default();
        recent.push(entry(10, 3));
        recent.push(entry(13, 2));
        let positions = |v: Option<Vec<crate::eventstore::StoredEvent>>| {
            v.map(|v| v.iter().map(|e| e.position).collect::<Vec<_>>())
        };
        assert_eq!(positions(recent.read(11, 3)), Some(vec![11, 12, 13]));
        assert_eq!(positions(recent.read(9, 10)), None, "9 was not journaled here: ClickHouse answers");
        assert_eq!(positions(recent.read(14, 10)), Some(vec![14]), "from inside the last entry");
        assert_eq!(positions(recent.read(10, 100)), Some(vec![10, 11, 12, 13, 14]));
        assert_eq!(positions(recent.read(15, 10)), Some(vec![]), "just past the run: nothing more here");
        assert_eq!(positions(recent.read(16, 10)), None);
        assert_eq!(*recent.journaled.borrow(), 14);
        // Another process wrote 15-19: the run starts again at 20.
        recent.push(entry(20, 1));
        assert_eq!(positions(recent.read(14, 10)), None);
        assert_eq!(positions(recent.read(20, 10)), Some(vec![20]));
    }

    #[test]
    fn blocks_split_consecutive_entries_near_the_block_size() {
        let entry = |first: u64, n: usize| Entry {
            first,
            rows: Arc::new((0..n as u64).map(|i| row(first + i, "1")).collect()),
        };
        let entries = vec![entry(0, 60_000), entry(60_000, 30_000), entry(90_000, 20_000), entry(110_000, 5)];
        let sizes: Vec<usize> = blocks(&entries).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 2]);
        assert!(blocks(&[]).is_empty());
    }
}
