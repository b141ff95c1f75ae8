//! The appender: group commit under the log lease.
//!
//! Each process runs one appender task; every append of that process queues on it. The
//! task takes the *log lease* (`EventStore_Log`, one document, a conditional update), then
//! commits whatever is queued as one *cycle*:
//! 1. check each append against its stream head (expected version, retry of the last
//!    append) and give the accepted ones positions, contiguously;
//! 2. write the new heads (`EventStore_Streams`, version-guarded), each with a `pending`
//!    note of what it was before and which positions the cycle covers;
//! 3. insert the cycle's events into ClickHouse as one block (one part: all or nothing),
//!    with the cycle id as deduplication token;
//! 4. answer the appends.
//!
//! While appends keep coming the lease is kept (its heads are then known without a read);
//! after [`LINGER`] without one it is released, with the next position written down.
//!
//! # Failures
//! - MongoDB fails in step 2, or ClickHouse refuses the block outright: the heads written
//!   so far are put back, the appends get 503, the positions are reused.
//! - ClickHouse fails without a clear answer (cut connection, timeout): the block may
//!   still land. The appends get 503 ("retry with the same event ids") and the lease is
//!   *kept until it expires*; whoever takes it next settles the cycle (below).
//! - The process dies or stalls: the lease expires. The next holder reads the last
//!   position in ClickHouse, then visits every head with a `pending` note: a cycle whose
//!   positions are in ClickHouse stands; one whose are not is rolled back. A client that
//!   retries with the same event ids then gets the original result or a fresh append.
//!
//! A holder starts no write it could not finish before its lease ends ([`Faults::lease`]
//! minus [`MARGIN`]), so after expiry nothing of the old holder can land.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::log::{EventRow, EVENTS_TABLE};
use super::{AppendResult, EventStoreError, ExpectedVersion, NewEvent};
use crate::store::mongo::is_duplicate_key;

pub const STREAMS: &str = "EventStore_Streams";
pub const LOG: &str = "EventStore_Log";
/// How long an idle holder keeps the lease, hoping for another append.
const LINGER: Duration = Duration::from_millis(20);
/// A holder starts no write later than this before its lease ends.
const MARGIN: Duration = Duration::from_secs(2);
/// Longest a ClickHouse insert may take; shorter than the lease minus the margin.
const INSERT_TIMEOUT: Duration = Duration::from_secs(3);
/// One cycle takes at most about this many events (one more append may exceed it).
const CYCLE_EVENTS: usize = 10_000;
/// How often an appender waiting for the lease tries again.
const LEASE_POLL: Duration = Duration::from_millis(5);

/// Lease length and injected stalls (each happens once, in the first cycle that reaches
/// it), for fault tests. The defaults are the product's.
#[derive(Clone, Debug)]
pub struct Faults {
    pub lease: Duration,
    /// Stall after the heads are written, before the insert.
    pub after_heads: Duration,
    /// Stall after the insert, before the appends are answered.
    pub after_insert: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { lease: Duration::from_secs(10), after_heads: Duration::ZERO, after_insert: Duration::ZERO }
    }
}

pub struct Request {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
}

/// A stream head as MongoDB holds it.
#[derive(Clone, Debug)]
struct Head {
    /// Last version, -1 when the stream has no event.
    version: i64,
    /// The head document exists.
    stored: bool,
    /// The stream's last append: its event ids, first version and first position.
    last: Option<(Vec<Uuid>, i64, i64)>,
}

impl Default for Head {
    /// A stream without events or head document.
    fn default() -> Self {
        Head { version: -1, stored: false, last: None }
    }
}

impl Head {
    fn from_doc(d: &Document) -> Head {
        let last = d.get_document("last").ok().map(|l| {
            let ids = l
                .get_array("ids")
                .map(|a| a.iter().filter_map(|b| b.as_str().and_then(|s| s.parse().ok())).collect())
                .unwrap_or_default();
            (ids, l.get_i64("version").unwrap_or(0), l.get_i64("position").unwrap_or(0))
        });
        Head { version: d.get_i64("version").unwrap_or(-1), stored: true, last }
    }

    fn last_bson(&self) -> Bson {
        match &self.last {
            Some((ids, version, position)) => Bson::Document(doc! {
                "ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "version": version,
                "position": position,
            }),
            None => Bson::Null,
        }
    }

    /// The result of the stream's last append when `events` repeat it.
    fn retry_of(&self, events: &[NewEvent]) -> Option<AppendResult> {
        let (ids, version, position) = self.last.as_ref()?;
        let same = ids.len() == events.len() && ids.iter().zip(events).all(|(id, e)| Some(*id) == e.event_id);
        same.then(|| AppendResult {
            next_expected_version: (*version + ids.len() as i64 - 1) as u64,
            first_position: *position as u64,
            position: (*position + ids.len() as i64 - 1) as u64,
        })
    }
}

/// The lease this appender holds.
struct Tenure {
    id: String,
    /// No write starts after this.
    deadline: Instant,
    /// Next position to assign.
    next: u64,
    /// Heads as they are now: exact, since nobody else writes while the lease is held.
    heads: HashMap<String, Head>,
    /// Cycles committed under this lease (their `pending` notes are cleared on release).
    cycles: Vec<String>,
}

impl Tenure {
    fn check(&self, budget: Duration) -> Result<(), EventStoreError> {
        match Instant::now() + budget < self.deadline {
            true => Ok(()),
            false => Err(EventStoreError::Unavailable("the log lease ran out during the append; retry".into())),
        }
    }
}

/// How a cycle ended, for the lease.
enum Outcome {
    /// Keep the lease.
    Keep,
    /// The lease must not be used again; let it expire (an insert may still land).
    Abandon,
}

pub struct Appender {
    streams: Collection<Document>,
    log: Collection<Document>,
    ch: clickhouse::Client,
    last: watch::Sender<i64>,
    faults: Faults,
    /// The injected stalls still to happen: after the heads, after the insert.
    stalls: [bool; 2],
}

impl Appender {
    pub fn new(db: &Database, ch: clickhouse::Client, last: watch::Sender<i64>, faults: Faults) -> Appender {
        let stalls = [!faults.after_heads.is_zero(), !faults.after_insert.is_zero()];
        Appender { streams: db.collection(STREAMS), log: db.collection(LOG), ch, last, faults, stalls }
    }

    /// Serves appends until every sender is gone, then releases the lease.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut tenure: Option<Tenure> = None;
        loop {
            let first = match &tenure {
                Some(_) => match tokio::time::timeout(LINGER, rx.recv()).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.release(tenure.take()).await;
                        rx.recv().await
                    }
                },
                None => rx.recv().await,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            let mut events = batch[0].events.len();
            while events < CYCLE_EVENTS {
                match rx.try_recv() {
                    Ok(r) => {
                        events += r.events.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.hold(&mut tenure).await {
                for r in batch {
                    let _ = r.reply.send(Err(EventStoreError::Unavailable(e.to_string())));
                }
                continue;
            }
            let t = tenure.as_mut().expect("held");
            if let Outcome::Abandon = self.cycle(t, batch).await {
                tenure = None;
            }
        }
        self.release(tenure.take()).await;
    }

    /// Makes sure the lease is held with time to spare: renews it, or takes it (waiting for
    /// another holder to release it or to let it expire).
    async fn hold(&self, tenure: &mut Option<Tenure>) -> Result<(), EventStoreError> {
        if let Some(t) = tenure {
            if t.check(self.faults.lease / 2).is_ok() {
                return Ok(());
            }
            let now = Instant::now();
            let until =
                DateTime::from_millis(DateTime::now().timestamp_millis() + self.faults.lease.as_millis() as i64);
            let renewed = match t.check(MARGIN / 2) {
                Ok(()) => self
                    .log
                    .update_one(doc! { "_id": "log", "lease.by": &t.id }, doc! { "$set": { "lease.until": until } })
                    .await
                    .map(|r| r.matched_count == 1)
                    .unwrap_or(false),
                Err(_) => false,
            };
            match renewed {
                true => t.deadline = now + self.faults.lease - MARGIN,
                false => *tenure = None,
            }
            if tenure.is_some() {
                return Ok(());
            }
        }
        let give_up = Instant::now() + self.faults.lease + Duration::from_secs(5);
        loop {
            if let Some(t) = self.acquire().await? {
                *tenure = Some(t);
                return Ok(());
            }
            if Instant::now() > give_up {
                return Err(EventStoreError::Unavailable("another process has held the log lease too long".into()));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Takes the lease if it is free or expired; settles a dead holder's last cycle.
    async fn acquire(&self) -> Result<Option<Tenure>, EventStoreError> {
        let id = Uuid::new_v4().to_string();
        let started = Instant::now();
        let now = DateTime::now();
        let until = DateTime::from_millis(now.timestamp_millis() + self.faults.lease.as_millis() as i64);
        let before = self
            .log
            .find_one_and_update(
                doc! { "_id": "log", "$or": [ { "lease": { "$exists": false } }, { "lease.until": { "$lt": now } } ] },
                doc! { "$set": { "lease": { "by": &id, "until": until } } },
            )
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await;
        let before = match before {
            Ok(b) => b,
            // The upsert collided with the existing, held document.
            Err(e) if is_duplicate_key(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let deadline = started + self.faults.lease - MARGIN;
        let next = match before {
            Some(d) if !d.contains_key("lease") => d.get_i64("next").unwrap_or(0) as u64,
            // First use, or the last holder let the lease expire.
            _ => self.settle().await?,
        };
        Ok(Some(Tenure { id, deadline, next, heads: HashMap::new(), cycles: Vec::new() }))
    }

    /// After an expired lease: the cycles ClickHouse has stand, the others are rolled back.
    /// Returns the next position.
    async fn settle(&self) -> Result<u64, EventStoreError> {
        let (count, max): (u64, u64) =
            self.ch.query("SELECT count(), max(position) FROM EventStore_Events").fetch_one().await?;
        let next = if count == 0 { 0 } else { max + 1 };
        let pending: Vec<Document> =
            self.streams.find(doc! { "pending.cycle": { "$exists": true } }).await?.try_collect().await?;
        let mut rolled_back = 0;
        for head in pending {
            let (Ok(id), Ok(p)) = (head.get_str("_id"), head.get_document("pending")) else { continue };
            let cycle = p.get_str("cycle").unwrap_or_default();
            let filter = doc! { "_id": id, "pending.cycle": cycle };
            if p.get_i64("to").unwrap_or(0) as u64 <= next {
                self.streams.update_one(filter, doc! { "$unset": { "pending": "" } }).await?;
            } else {
                rolled_back += 1;
                self.roll_back(filter, p).await?;
            }
        }
        if rolled_back > 0 {
            tracing::warn!(streams = rolled_back, next, "rolled back appends of an appender whose lease expired");
        }
        Ok(next)
    }

    /// Puts a head back as its `pending` note says it was.
    async fn roll_back(&self, filter: Document, pending: &Document) -> Result<(), mongodb::error::Error> {
        match pending.get_i64("version").unwrap_or(-1) {
            v if v < 0 && !pending.get_bool("stored").unwrap_or(false) => {
                self.streams.delete_one(filter).await?;
            }
            v => {
                let last = pending.get("last").cloned().unwrap_or(Bson::Null);
                self.streams
                    .update_one(filter, doc! { "$set": { "version": v, "last": last }, "$unset": { "pending": "" } })
                    .await?;
            }
        }
        Ok(())
    }

    async fn release(&self, tenure: Option<Tenure>) {
        let Some(t) = tenure else { return };
        if t.check(Duration::ZERO).is_err() {
            return; // let it expire: the next holder settles
        }
        let released = self
            .log
            .update_one(
                doc! { "_id": "log", "lease.by": &t.id },
                doc! { "$set": { "next": t.next as i64 }, "$unset": { "lease": "" } },
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the log lease; it expires on its own");
            return;
        }
        // Housekeeping only: a settle would clear these notes too.
        if !t.cycles.is_empty() {
            let _ = self
                .streams
                .update_many(doc! { "pending.cycle": { "$in": &t.cycles } }, doc! { "$unset": { "pending": "" } })
                .await;
        }
    }

    /// Commits one batch of appends under the lease.
    async fn cycle(&mut self, t: &mut Tenure, batch: Vec<Request>) -> Outcome {
        if let Err(e) = self.load_heads(t, &batch).await {
            answer_all(batch, &e);
            return Outcome::Keep;
        }
        let cycle = Uuid::new_v4().to_string();
        let start = t.next;
        let now = DateTime::now().timestamp_millis();
        let mut next = start;
        let mut heads: HashMap<String, Head> = HashMap::new();
        let mut before: HashMap<String, Head> = HashMap::new();
        let mut rows = Vec::new();
        let mut answers = Vec::new();
        for r in batch {
            let head = heads.get(&r.stream).or_else(|| t.heads.get(&r.stream)).cloned().unwrap_or_default();
            if let Some(done) = head.retry_of(&r.events) {
                answers.push(Answer { reply: r.reply, result: Ok(done), accepted: false });
                continue;
            }
            if !r.expected.admits(head.version) {
                let e = EventStoreError::WrongExpectedVersion {
                    stream: r.stream.clone(),
                    expected: r.expected,
                    actual: head.version,
                };
                answers.push(Answer { reply: r.reply, result: Err(e), accepted: false });
                continue;
            }
            before.entry(r.stream.clone()).or_insert_with(|| head.clone());
            let k = r.events.len() as i64;
            let ids = r.events.iter().map(|e| e.event_id.expect("validated")).collect();
            for (i, e) in r.events.into_iter().enumerate() {
                rows.push(EventRow {
                    position: next + i as u64,
                    stream_id: r.stream.clone(),
                    stream_version: (head.version + 1 + i as i64) as u64,
                    event_id: e.event_id.expect("validated"),
                    event_type: e.event_type,
                    data: e.data,
                    metadata: e.metadata.into_iter().collect(),
                    timestamp: now,
                });
            }
            let result = AppendResult {
                next_expected_version: (head.version + k) as u64,
                first_position: next,
                position: next + k as u64 - 1,
            };
            heads.insert(
                r.stream.clone(),
                Head { version: head.version + k, stored: true, last: Some((ids, head.version + 1, next as i64)) },
            );
            answers.push(Answer { reply: r.reply, result: Ok(result), accepted: true });
            next += k as u64;
        }
        if rows.is_empty() {
            answer(answers);
            return Outcome::Keep;
        }
        // Step 2: the heads.
        let mut written: Vec<&String> = Vec::new();
        for (stream, old) in &before {
            let new = &heads[stream];
            let pending = doc! {
                "cycle": &cycle, "version": old.version, "stored": old.stored, "last": old.last_bson(),
                "from": start as i64, "to": next as i64,
            };
            let wrote = match t.check(Duration::from_secs(1)) {
                Err(e) => Err(e),
                Ok(()) => self.write_head(stream, old, new, pending).await,
            };
            if let Err(e) = wrote {
                self.undo(&cycle, &written, &before).await;
                fail(answers, &e);
                // A head that did not match means someone else wrote it: this process
                // no longer holds the lease it thinks it holds.
                t.heads.clear();
                return Outcome::Keep;
            }
            written.push(stream);
        }
        if std::mem::take(&mut self.stalls[0]) {
            tokio::time::sleep(self.faults.after_heads).await;
        }
        // Step 3: the events, one block.
        let inserted = match t.check(INSERT_TIMEOUT) {
            Err(e) => Err(Some(e)),
            Ok(()) => match tokio::time::timeout(INSERT_TIMEOUT, insert(&self.ch, &cycle, &rows)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(clickhouse::error::Error::BadResponse(m))) => Err(Some(EventStoreError::Unavailable(m))),
                Ok(Err(e)) => Err(None).inspect(|_: &()| tracing::warn!(error = %e, "event insert outcome unknown")),
                Err(_) => Err(None),
            },
        };
        match inserted {
            Ok(()) => {}
            Err(Some(refused)) => {
                self.undo(&cycle, &written, &before).await;
                fail(answers, &refused);
                return Outcome::Keep;
            }
            Err(None) => {
                let e = EventStoreError::Unavailable(
                    "the events may or may not have been stored; retry with the same event ids".into(),
                );
                fail(answers, &e);
                return Outcome::Abandon;
            }
        }
        if std::mem::take(&mut self.stalls[1]) {
            tokio::time::sleep(self.faults.after_insert).await;
        }
        t.next = next;
        t.heads.extend(heads);
        t.cycles.push(cycle);
        self.last.send_replace(next as i64 - 1);
        answer(answers);
        Outcome::Keep
    }

    /// Reads the heads of the batch's streams this lease has not seen yet.
    async fn load_heads(&self, t: &mut Tenure, batch: &[Request]) -> Result<(), EventStoreError> {
        let missing: HashSet<&str> =
            batch.iter().map(|r| r.stream.as_str()).filter(|s| !t.heads.contains_key(*s)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        t.check(Duration::from_secs(1))?;
        let ids: Vec<&str> = missing.iter().copied().collect();
        let found: Vec<Document> = self.streams.find(doc! { "_id": { "$in": ids } }).await?.try_collect().await?;
        for d in &found {
            if let Ok(id) = d.get_str("_id") {
                t.heads.insert(id.to_string(), Head::from_doc(d));
            }
        }
        for s in missing {
            t.heads.entry(s.to_string()).or_default();
        }
        Ok(())
    }

    async fn write_head(&self, stream: &str, old: &Head, new: &Head, pending: Document) -> Result<(), EventStoreError> {
        let lost = || EventStoreError::Unavailable(format!("stream '{stream}' changed under the log lease; retry"));
        if old.stored {
            let r = self
                .streams
                .update_one(
                    doc! { "_id": stream, "version": old.version },
                    doc! { "$set": { "version": new.version, "last": new.last_bson(), "pending": pending } },
                )
                .await?;
            if r.matched_count != 1 {
                return Err(lost());
            }
        } else {
            let d = doc! { "_id": stream, "version": new.version, "last": new.last_bson(), "pending": pending };
            match self.streams.insert_one(d).await {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => return Err(lost()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Puts back the heads a failed cycle wrote (best effort: a settle does it otherwise).
    async fn undo(&self, cycle: &str, written: &[&String], before: &HashMap<String, Head>) {
        for stream in written {
            let old = &before[*stream];
            let pending = doc! { "version": old.version, "stored": old.stored, "last": old.last_bson() };
            if let Err(e) = self.roll_back(doc! { "_id": *stream, "pending.cycle": cycle }, &pending).await {
                tracing::warn!(error = %e, stream = %stream, "could not roll back a stream head; the next settle will");
            }
        }
    }
}

/// Inserts one cycle's rows as one block; a retry of the same cycle is deduplicated.
async fn insert(ch: &clickhouse::Client, cycle: &str, rows: &[EventRow]) -> Result<(), clickhouse::error::Error> {
    let mut insert = ch
        .insert::<EventRow>(EVENTS_TABLE)
        .await?
        .with_setting("insert_deduplication_token", cycle)
        .with_setting("async_insert", "0")
        .with_setting("max_insert_block_size", "1048576");
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// An append's answer once the cycle ends; `accepted` when it depends on the cycle's
/// writes (conflicts and retries of an earlier append do not).
struct Answer {
    reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
    result: Result<AppendResult, EventStoreError>,
    accepted: bool,
}

fn answer(answers: Vec<Answer>) {
    for a in answers {
        let _ = a.reply.send(a.result);
    }
}

/// Answers every accepted append with `e`; the others keep their own answer.
fn fail(answers: Vec<Answer>, e: &EventStoreError) {
    for a in answers {
        let _ = a.reply.send(match a.accepted {
            true => Err(EventStoreError::Unavailable(e.to_string())),
            false => a.result,
        });
    }
}

fn answer_all(batch: Vec<Request>, e: &EventStoreError) {
    for r in batch {
        let _ = r.reply.send(Err(EventStoreError::Unavailable(e.to_string())));
    }
}
