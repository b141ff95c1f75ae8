//! The appender: group commit under the log lease.
//!
//! Each process runs one appender task; every append of that process queues on it. The
//! task takes the *log lease* (`EventStore_Log`, one MongoDB document, a conditional
//! update), then commits whatever is queued as one *cycle*:
//! 1. check each append against its stream's head (expected version; a retry of the
//!    stream's last append gets that append's result) and give the accepted ones
//!    positions, contiguously from the last position stored;
//! 2. insert the cycle's events into ClickHouse as one block (one part: all or nothing);
//! 3. answer the appends.
//!
//! ClickHouse is the only record of streams: a stream's version is its last event's. The
//! lease makes this appender the only writer of the whole log while it holds it, so what
//! it read or wrote itself during the lease stays exact; it keeps those heads in memory
//! and needs no other store round trip per cycle. While appends keep coming the lease is
//! kept; after [`LINGER`] without one it is released, with the next position noted.
//!
//! # Failures
//! - ClickHouse refuses the block: nothing was stored; the appends get 503 and the
//!   positions are reused.
//! - ClickHouse fails without a clear answer (cut connection, timeout): the block may
//!   still land. The appends get 503 ("retry with the same event ids") and the lease is
//!   *kept until it expires*; whoever takes it next starts from the last position stored.
//! - The process dies or stalls: the lease expires; the next holder reads the last
//!   position from ClickHouse. A client that retries with the same event ids gets the
//!   original result if the block landed, a fresh append if not.
//!
//! A holder starts no insert it could not finish before its lease ends ([`Faults::lease`]
//! minus [`MARGIN`]), so after expiry nothing of the old holder can land.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::log::{EventRow, EVENTS_TABLE};
use super::{AppendResult, EventStoreError, ExpectedVersion, NewEvent};
use crate::store::mongo::is_duplicate_key;

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
    /// Stall after the cycle is planned, before the insert.
    pub before_insert: Duration,
    /// Stall after the insert, before the appends are answered.
    pub after_insert: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { lease: Duration::from_secs(10), before_insert: Duration::ZERO, after_insert: Duration::ZERO }
    }
}

pub struct Request {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// The client chose the event ids (only then can the append be a retry).
    pub client_ids: bool,
    pub reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
}

/// What the holder knows of a stream.
#[derive(Clone, Debug)]
struct Head {
    /// Last version, -1 when the stream has no event.
    version: i64,
    /// The stream's last events, newest last: (id, version, position). At least as many
    /// as the longest retry checked against it; `None` when not read.
    tail: Option<Vec<(Uuid, i64, i64)>>,
}

impl Head {
    /// The result of an earlier append whose events `events` repeat: the stream's last
    /// `events.len()` events carry exactly these ids.
    fn retry_of(&self, events: &[NewEvent]) -> Option<AppendResult> {
        let tail = self.tail.as_ref()?;
        let last = tail.get(tail.len().checked_sub(events.len())?..)?;
        let same = last.iter().zip(events).all(|((id, _, _), e)| Some(*id) == e.event_id);
        let (first, end) = (last.first()?, last.last()?);
        same.then_some(AppendResult {
            next_expected_version: end.1 as u64,
            first_position: first.2 as u64,
            position: end.2 as u64,
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
    log: Collection<Document>,
    ch: clickhouse::Client,
    last: std::sync::Arc<watch::Sender<i64>>,
    faults: Faults,
    /// The injected stalls still to happen: before the insert, after it.
    stalls: [bool; 2],
}

impl Appender {
    pub fn new(
        db: &Database,
        ch: clickhouse::Client,
        last: std::sync::Arc<watch::Sender<i64>>,
        faults: Faults,
    ) -> Appender {
        let stalls = [!faults.before_insert.is_zero(), !faults.after_insert.is_zero()];
        Appender { log: db.collection(LOG), ch, last, faults, stalls }
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
                answer_all(batch, &e);
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

    /// Takes the lease if it is free or expired.
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
            // First use, or the last holder let the lease expire: ClickHouse says.
            _ => (self.last_stored().await? + 1) as u64,
        };
        Ok(Some(Tenure { id, deadline, next, heads: HashMap::new() }))
    }

    /// The last position ClickHouse holds (-1: none).
    async fn last_stored(&self) -> Result<i64, EventStoreError> {
        let (count, max): (u64, u64) =
            self.ch.query("SELECT count(), max(position) FROM EventStore_Events").fetch_one().await?;
        Ok(if count == 0 { -1 } else { max as i64 })
    }

    async fn release(&self, tenure: Option<Tenure>) {
        let Some(t) = tenure else { return };
        if t.check(Duration::ZERO).is_err() {
            return; // let it expire
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
        }
    }

    /// Commits one batch of appends under the lease.
    async fn cycle(&mut self, t: &mut Tenure, batch: Vec<Request>) -> Outcome {
        if let Err(e) = self.load_heads(t, &batch).await {
            answer_all(batch, &e);
            return Outcome::Keep;
        }
        let cycle = Uuid::new_v4().to_string();
        let now = DateTime::now().timestamp_millis();
        let mut next = t.next;
        let mut heads: HashMap<String, Head> = HashMap::new();
        let mut rows = Vec::new();
        let mut answers = Vec::new();
        for r in batch {
            let head = heads.get(&r.stream).or_else(|| t.heads.get(&r.stream)).cloned().expect("loaded");
            if let Some(done) = r.client_ids.then(|| head.retry_of(&r.events)).flatten() {
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
            let k = r.events.len() as i64;
            let mut tail = Vec::with_capacity(r.events.len());
            for (i, e) in r.events.into_iter().enumerate() {
                let (version, position) = (head.version + 1 + i as i64, next + i as u64);
                let id = e.event_id.expect("validated");
                tail.push((id, version, position as i64));
                rows.push(EventRow {
                    position,
                    stream_id: r.stream.clone(),
                    stream_version: version as u64,
                    event_id: id,
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
            heads.insert(r.stream.clone(), Head { version: head.version + k, tail: Some(tail) });
            answers.push(Answer { reply: r.reply, result: Ok(result), accepted: true });
            next += k as u64;
        }
        if rows.is_empty() {
            answer(answers);
            return Outcome::Keep;
        }
        if std::mem::take(&mut self.stalls[0]) {
            tokio::time::sleep(self.faults.before_insert).await;
        }
        let inserted = match t.check(INSERT_TIMEOUT) {
            Err(e) => Err(Some(e)),
            Ok(()) => match tokio::time::timeout(INSERT_TIMEOUT, insert(&self.ch, &cycle, &rows)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(clickhouse::error::Error::BadResponse(m))) => Err(Some(EventStoreError::Unavailable(m))),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "event insert outcome unknown");
                    Err(None)
                }
                Err(_) => Err(None),
            },
        };
        match inserted {
            Ok(()) => {}
            Err(Some(refused)) => {
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
        super::log::raise(&self.last, next as i64 - 1);
        answer(answers);
        Outcome::Keep
    }

    /// Reads from ClickHouse the heads of the batch's streams this lease does not know
    /// yet, with as many last events as the longest possible retry needs.
    async fn load_heads(&self, t: &mut Tenure, batch: &[Request]) -> Result<(), EventStoreError> {
        let mut need_tail: HashMap<&str, usize> = HashMap::new();
        let mut missing: HashSet<&str> = HashSet::new();
        for r in batch {
            match t.heads.get(&r.stream) {
                None => {
                    missing.insert(&r.stream);
                }
                Some(h) if r.client_ids && h.tail.as_ref().is_none_or(|tail| tail.len() < r.events.len()) => {
                    missing.insert(&r.stream);
                }
                Some(_) => {}
            }
            if r.client_ids {
                let n = need_tail.entry(&r.stream).or_default();
                *n = (*n).max(r.events.len());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        t.check(Duration::from_secs(1))?;
        let ids: Vec<&str> = missing.iter().copied().collect();
        let versions: Vec<(String, u64)> = self
            .ch
            .query(
                "SELECT stream_id, max(stream_version) FROM EventStore_Events \
                 WHERE stream_id IN {s:Array(String)} GROUP BY stream_id",
            )
            .param("s", &ids)
            .fetch_all()
            .await?;
        let versions: HashMap<String, i64> = versions.into_iter().map(|(s, v)| (s, v as i64)).collect();
        for s in missing {
            let version = versions.get(s).copied().unwrap_or(-1);
            let tail = match need_tail.get(s) {
                Some(&n) if version >= 0 => Some(self.tail(s, n).await?),
                Some(_) => Some(Vec::new()),
                None => None,
            };
            t.heads.insert(s.to_string(), Head { version, tail });
        }
        Ok(())
    }

    /// A stream's last `n` events (id, version, position), oldest first.
    async fn tail(&self, stream: &str, n: usize) -> Result<Vec<(Uuid, i64, i64)>, EventStoreError> {
        let rows: Vec<(String, u64, u64)> = self
            .ch
            .query(
                "SELECT toString(event_id), stream_version, position FROM EventStore_Events \
                 WHERE stream_id = {s:String} ORDER BY stream_version DESC LIMIT 1 BY stream_version LIMIT {n:UInt64}",
            )
            .param("s", stream)
            .param("n", n as u64)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().rev().filter_map(|(id, v, p)| Some((id.parse().ok()?, v as i64, p as i64))).collect())
    }
}

/// Inserts one cycle's rows as one block (tagged with the cycle id in the query log).
async fn insert(ch: &clickhouse::Client, cycle: &str, rows: &[EventRow]) -> Result<(), clickhouse::error::Error> {
    let mut insert = ch
        .insert::<EventRow>(EVENTS_TABLE)
        .await?
        .with_setting("log_comment", cycle)
        .with_setting("async_insert", "0")
        .with_setting("max_insert_block_size", "1048576");
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// An append's answer once the cycle ends; `accepted` when it depends on the cycle's
/// insert (conflicts and retries of an earlier append do not).
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
            true => Err(again(e)),
            false => a.result,
        });
    }
}

fn answer_all(batch: Vec<Request>, e: &EventStoreError) {
    for r in batch {
        let _ = r.reply.send(Err(again(e)));
    }
}

/// The same failure for another waiting append (errors are not `Clone`).
fn again(e: &EventStoreError) -> EventStoreError {
    match e {
        EventStoreError::Unavailable(m) => EventStoreError::Unavailable(m.clone()),
        other => EventStoreError::Unavailable(other.to_string()),
    }
}
