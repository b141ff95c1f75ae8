//! The appender: group commit under the log lease.
//!
//! Each process runs one appender task; every append of that process queues on it. The
//! task takes the *log lease* (`EventStore_Log`, one MongoDB document, a conditional
//! update), then commits whatever is queued as one *cycle*:
//! 1. check each append against its stream's head (expected version; a retry of the
//!    stream's last append gets that append's result) and give the accepted ones
//!    positions, contiguously after the last position journaled;
//! 2. write the cycle's events to the journal as one MongoDB document (all or nothing;
//!    see `journal`): from then on they are durable;
//! 3. answer the appends, and hand the cycle to the tenure's flusher, which copies it
//!    into ClickHouse (readers wait for that; see `log`).
//!
//! A stream's version is its last event's: ClickHouse holds every stream as it was when
//! the lease was taken (a new holder first flushes the journal), and the lease makes this
//! appender the only writer of the whole log while it holds it, so what it wrote itself
//! during the lease stays exact; it keeps those heads in memory and needs no other store
//! round trip per cycle. While appends keep coming the lease is kept; after [`LINGER`]
//! without one the flusher is drained and the lease released, with the next position noted.
//!
//! # Failures
//! - MongoDB fails without a clear answer (cut connection, timeout): the cycle may still be
//!   journaled. The appends get 503 ("retry with the same event ids") and the lease is
//!   *kept until it expires*; whoever takes it next starts from the journal.
//! - Another holder journaled these positions (a duplicate `_id`): this holder's view is
//!   stale; the appends get 503 and the lease is let go at once, to be taken afresh.
//! - ClickHouse fails: the flusher retries, in order, with the same deduplication token;
//!   appends go on until [`MAX_UNFLUSHED`] events wait, then get 503.
//! - The process dies or stalls: the lease expires; the next holder flushes the journal
//!   and continues after it. A client that retries with the same event ids gets the
//!   original result if the cycle was journaled, a fresh append if not.
//!
//! A holder starts no write it could not finish before its lease ends ([`Faults::lease`]
//! minus [`MARGIN`]), so after expiry nothing of the old holder can land unnoticed: a late
//! journal write collides with the successor's, a late flush is deduplicated.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use futures_util::FutureExt;
use mongodb::{Collection, Database};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use uuid::Uuid;

use super::journal::{Entry, Journal, JournalFlusher, Recent, WriteError};
use super::log::EventRow;
use super::{AppendResult, EventStoreError, ExpectedVersion, NewEvent};
use crate::store::lease::{Lease, Taken};

pub const LOG: &str = "EventStore_Log";
/// How long an idle holder keeps the lease, hoping for another append.
const LINGER: Duration = Duration::from_millis(20);
/// A holder starts no write later than this before its lease ends.
const MARGIN: Duration = Duration::from_secs(2);
/// Longest a journal write may take; shorter than the lease minus the margin.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// One cycle takes at most about this many events, and this many bytes of event data
/// (one more append, of at most `MAX_APPEND_BYTES`, may exceed either; a journal document
/// must stay under 16 MiB).
const CYCLE_EVENTS: usize = 10_000;
const CYCLE_BYTES: usize = super::MAX_APPEND_BYTES;
/// Longest a cycle waits for appends it expects (see `gather`).
const COHORT_WAIT: Duration = Duration::from_millis(1);
/// How often an appender waiting for the lease tries again.
const LEASE_POLL: Duration = Duration::from_millis(5);
/// How often such an appender also asks whether the holder is dead (a read of its own).
const HOLDER_CHECK: Duration = Duration::from_millis(250);
/// Most journaled events waiting for ClickHouse before appends are refused (503).
const MAX_UNFLUSHED: u64 = 200_000;
/// Most stream heads a holder keeps in memory; beyond, it forgets them once flushed.
const HEADS_KEPT: usize = 100_000;
/// Last events of a stream its head keeps, for checking retries without reading ClickHouse.
const TAIL_KEPT: usize = 4;
/// Longest a releasing holder waits for its flusher.
const DRAIN: Duration = Duration::from_secs(3);

/// Lease length and injected stalls (each happens once, in the first cycle that reaches
/// it), for fault tests. The defaults are the product's.
#[derive(Clone, Debug)]
pub struct Faults {
    pub lease: Duration,
    /// Stall after the cycle is planned, before its journal write.
    pub before_write: Duration,
    /// Stall after the journal write, before the appends are answered and the cycle is
    /// handed to the flusher.
    pub after_write: Duration,
    /// Stall of the flusher before its first block.
    pub before_flush: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            lease: Duration::from_secs(10),
            before_write: Duration::ZERO,
            after_write: Duration::ZERO,
            before_flush: Duration::ZERO,
        }
    }
}

/// Which of the injected stalls of [`Faults`] are still to happen (each happens once).
#[derive(Debug, Default)]
struct Stalls {
    before_write: bool,
    after_write: bool,
    before_flush: bool,
}

pub struct Request {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// The client chose the event ids (only then can the append be a retry).
    pub client_ids: bool,
    pub reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
}

impl Request {
    fn bytes(&self) -> usize {
        self.events.iter().map(NewEvent::size).sum()
    }
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
    /// Whether the tail tells if an append of `n` events repeats the stream's last ones: it
    /// holds that many, or the whole stream.
    fn can_check(&self, n: usize) -> bool {
        self.tail.as_ref().is_some_and(|tail| tail.len() >= n || tail.len() as i64 == self.version + 1)
    }

    /// The head after `appended` (newest last) went onto the stream: the tail grows by them,
    /// keeping the last [`TAIL_KEPT`] (or all of them, when more), so a stream's next
    /// append needs no read of ClickHouse to be checked.
    fn after(&self, appended: Vec<(Uuid, i64, i64)>) -> Head {
        let n = appended.len();
        let version = self.version + n as i64;
        let mut tail = self.tail.clone().unwrap_or_default();
        tail.extend(appended);
        tail.drain(..tail.len().saturating_sub(TAIL_KEPT.max(n)));
        Head { version, tail: Some(tail) }
    }

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
    /// Heads of the streams read or written during the lease: exact, since nobody else
    /// writes while it is held. A stream written during the lease is always here (its
    /// events may not be in ClickHouse yet), so a head missing here may be read there.
    heads: HashMap<String, Head>,
    /// The tenure's flusher: journaled cycles go to it, in order.
    flusher: mpsc::UnboundedSender<Entry>,
    flushing: tokio::task::JoinHandle<()>,
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
    /// The lease must not be used again; let it expire (a journal write may still land).
    Abandon,
    /// This holder's view of the log is stale: give the lease up now, to be taken afresh.
    Release,
}

pub struct Appender {
    log: Collection<Document>,
    /// The log document's `lease`.
    lease: Lease,
    ch: clickhouse::Client,
    journal: Journal,
    /// The last position ClickHouse holds, as far as this process knows.
    last: Arc<watch::Sender<i64>>,
    /// Journaled cycles, for this process's followers.
    recent: Arc<Recent>,
    /// Makes the tenure's flusher flush what it is gathering now (see [`JournalFlusher::hurry`]).
    hurry: Arc<Notify>,
    faults: Faults,
    /// The injected stalls still to happen.
    stalls: Stalls,
    /// A reader found journaled events nobody flushes: take the lease to flush them.
    recover: Arc<Notify>,
    /// The stream heads of this process's last tenure and the position it would have given
    /// next. Positions are gap-free and only a lease holder gives them, so when the next
    /// tenure starts at that same position nobody appended in between and the heads are
    /// still exact: a process that takes the lease again after an idle moment (it lets it
    /// go after [`LINGER`]) need not read every stream's head from ClickHouse again.
    kept: Option<(u64, HashMap<String, Head>)>,
}

impl Appender {
    pub fn new(
        db: &Database,
        ch: clickhouse::Client,
        last: Arc<watch::Sender<i64>>,
        recent: Arc<Recent>,
        hurry: Arc<Notify>,
        recover: Arc<Notify>,
        faults: Faults,
    ) -> Appender {
        let stalls = Stalls {
            before_write: !faults.before_write.is_zero(),
            after_write: !faults.after_write.is_zero(),
            before_flush: !faults.before_flush.is_zero(),
        };
        Appender {
            log: db.collection(LOG),
            lease: Lease::new(db.collection(LOG), "lease", faults.lease).creating().checking_holder_every(HOLDER_CHECK),
            journal: Journal::new(db, ch.clone()),
            ch,
            last,
            recent,
            hurry,
            faults,
            stalls,
            recover,
            kept: None,
        }
    }

    /// Serves appends until every sender is gone, then drains the flusher and releases
    /// the lease.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut tenure: Option<Tenure> = None;
        // Appends the last cycle answered plus those that queued behind it: about how many
        // clients are appending one after the other (see `gather`).
        let mut expect = 0;
        loop {
            let first = match &tenure {
                Some(t) => match tokio::time::timeout(LINGER, rx.recv()).await {
                    Ok(r) => r,
                    // Idle: release once the flusher is done, unless an append comes first
                    // (then the lease is kept and the append does not wait for the flush).
                    Err(_) => {
                        let idle = tokio::select! {
                            r = rx.recv() => Err(r),
                            _ = self.drain(t, DRAIN) => Ok(()),
                        };
                        match idle {
                            Err(r) => r,
                            Ok(()) => {
                                self.release(tenure.take(), true).await;
                                rx.recv().await
                            }
                        }
                    }
                },
                // No lease: wait for an append, or for a reader that found journaled events
                // nobody is flushing (a holder that died): then take the lease, which
                // flushes the journal first, and let it go once idle.
                None => tokio::select! {
                    r = rx.recv() => r,
                    () = self.recover.notified() => {
                        if let Err(e) = self.hold(&mut tenure).await {
                            tracing::warn!(error = %e, "could not take the log lease to flush the journal");
                        }
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            let batch = gather(first, &mut rx, expect).await;
            let taken = batch.len();
            if let Err(e) = self.hold(&mut tenure).await {
                answer_all(batch, &e);
                continue;
            }
            let Some(t) = tenure.as_mut() else {
                answer_all(batch, &EventStoreError::Unavailable("the log lease was not held; retry".into()));
                continue;
            };
            // A panic inside a cycle (a bug) must not end the appender: every later append
            // would fail until a restart. Its appends are answered 503 (their reply channels
            // drop), and the tenure is abandoned: whether its journal write landed is unknown,
            // so the next holder starts from the journal, as after a crash.
            let outcome = match AssertUnwindSafe(self.cycle(t, batch)).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(panic) => {
                    tracing::error!(
                        panic = crate::rejection::panic_message(&*panic),
                        "an append cycle panicked; its appends get 503, the lease is abandoned"
                    );
                    Outcome::Abandon
                }
            };
            expect = taken + rx.len();
            match outcome {
                Outcome::Keep => {}
                Outcome::Abandon => tenure = None,
                Outcome::Release => self.release(tenure.take(), false).await,
            }
        }
        self.release(tenure.take(), true).await;
    }

    /// Makes sure the lease is held with time to spare: renews it, or takes it (waiting for
    /// another holder to release it or to let it expire).
    async fn hold(&mut self, tenure: &mut Option<Tenure>) -> Result<(), EventStoreError> {
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

    /// Takes the lease if it is free or expired. After a holder that did not release it
    /// cleanly, the journal is flushed first, so ClickHouse holds every stream whole.
    async fn acquire(&mut self) -> Result<Option<Tenure>, EventStoreError> {
        let id = Uuid::new_v4().to_string();
        let started = Instant::now();
        // Free, expired, or held by a process that is gone (see `store::lease`).
        let log = doc! { "_id": "log" };
        let before = match self.lease.take(&log, &id, Document::new()).await {
            Ok(Taken::Granted(before)) => before,
            Ok(Taken::Held | Taken::Absent) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let deadline = started + self.faults.lease - MARGIN;
        let clean = before.as_ref().filter(|d| !d.contains_key("lease")).and_then(|d| d.get_i64("next").ok());
        let stored = match clean {
            // The last holder drained its flusher and released the lease.
            Some(next) => next - 1,
            None => {
                let flushing = before
                    .as_ref()
                    .and_then(|d| d.get_document("flushing").ok())
                    .and_then(|f| Some((f.get_i64("from").ok()? as u64, f.get_i64("to").ok()? as u64)));
                match self.journal.recover(&id, flushing).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        // Let others try at once rather than after the lease.
                        let _ = self
                            .log
                            .update_one(doc! { "_id": "log", "lease.by": &id }, doc! { "$unset": { "lease": "" } })
                            .await;
                        return Err(e);
                    }
                }
            }
        };
        super::log::raise(&self.last, stored);
        let (flusher, rx) = mpsc::unbounded_channel();
        let stall = match std::mem::take(&mut self.stalls.before_flush) {
            true => self.faults.before_flush,
            false => Duration::ZERO,
        };
        let task = JournalFlusher {
            journal: self.journal.clone(),
            tenure: id.clone(),
            stored: self.last.clone(),
            hurry: self.hurry.clone(),
            stall,
        };
        let flushing = tokio::spawn(task.run(rx));
        let next = (stored + 1) as u64;
        let heads = match self.kept.take() {
            Some((at, heads)) if at == next => heads,
            _ => HashMap::new(),
        };
        Ok(Some(Tenure { id, deadline, next, heads, flusher, flushing }))
    }

    /// Waits (at most `within`) until ClickHouse holds everything this tenure journaled.
    /// False if it does not, or the flusher stopped (the lease was lost).
    async fn drain(&self, t: &Tenure, within: Duration) -> bool {
        let target = t.next as i64 - 1;
        let mut last = self.last.subscribe();
        let give_up = Instant::now() + within;
        self.hurry.notify_one();
        loop {
            if *last.borrow_and_update() >= target {
                return true;
            }
            if t.flushing.is_finished() || Instant::now() > give_up {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), last.changed()).await;
        }
    }

    /// Gives the lease up. `drained`: wait for the flusher first, so the next holder can
    /// start from the noted position without reading the journal.
    async fn release(&mut self, tenure: Option<Tenure>, drain: bool) {
        let Some(mut t) = tenure else { return };
        self.kept = Some((t.next, std::mem::take(&mut t.heads)));
        let drained = drain && self.drain(&t, DRAIN).await;
        if t.check(Duration::ZERO).is_err() {
            return; // let it expire
        }
        let update = match drained {
            true => doc! { "$set": { "next": t.next as i64 }, "$unset": { "lease": "" } },
            false => doc! { "$unset": { "lease": "", "next": "" } },
        };
        if let Err(e) = self.log.update_one(doc! { "_id": "log", "lease.by": &t.id }, update).await {
            tracing::warn!(error = %e, "could not release the log lease; it expires on its own");
        }
    }
}

/// Takes the appends of one cycle: `first`, whatever is queued, and, while fewer than
/// `expect` are in hand, whatever arrives within [`COHORT_WAIT`].
///
/// Why wait: clients that append one after the other split into two cohorts when cycles
/// start as soon as one ends. The cohort a cycle answers comes back while the next cycle
/// runs, which took only the other cohort, so every cycle is half as large as it could be
/// and costs one journal write all the same. Waiting for the answered cohort to come back
/// (a client's round trip, well under a millisecond) merges them again: half the journal
/// writes for the same appends. A client that stopped costs one wait, after which
/// `expect` no longer counts it; a lone client never waits.
async fn gather(first: Request, rx: &mut mpsc::Receiver<Request>, expect: usize) -> Vec<Request> {
    let (mut events, mut bytes) = (first.events.len(), first.bytes());
    let mut batch = vec![first];
    let wait_until = tokio::time::Instant::now() + COHORT_WAIT;
    while events < CYCLE_EVENTS && bytes < CYCLE_BYTES {
        let next = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(_) if batch.len() >= expect => None,
            Err(_) => tokio::time::timeout_at(wait_until, rx.recv()).await.ok().flatten(),
        };
        let Some(r) = next else { break };
        events += r.events.len();
        bytes += r.bytes();
        batch.push(r);
    }
    batch
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
        EventStoreError::Store { store, cause } => EventStoreError::Store { store, cause: cause.clone() },
        other => EventStoreError::Unavailable(other.to_string()),
    }
}

mod cycle;

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        let events = vec![NewEvent::new("t", &serde_json::json!(1))];
        let (reply, _) = oneshot::channel();
        Request { stream: "s".into(), expected: ExpectedVersion::Any, events, client_ids: false, reply }
    }

    fn with_id(id: Uuid) -> NewEvent {
        NewEvent { event_id: Some(id), ..NewEvent::new("t", &serde_json::json!(1)) }
    }

    #[test]
    fn a_head_keeps_its_last_events_and_knows_a_whole_stream() {
        let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
        // A new stream (no event) takes one append: its tail is the whole stream.
        let new = Head { version: -1, tail: None };
        let one = new.after(vec![(ids[0], 0, 10)]);
        assert_eq!(one.version, 0);
        assert!(one.can_check(1) && one.can_check(3), "the whole stream: a longer retry cannot be one");
        assert!(one.retry_of(&[with_id(ids[0])]).is_some());
        assert!(one.retry_of(&[with_id(ids[1])]).is_none());
        // Appends grow the tail up to TAIL_KEPT, newest last.
        let mut head = one;
        for (i, id) in ids.iter().enumerate().skip(1) {
            head = head.after(vec![(*id, i as i64, 10 + i as i64)]);
        }
        assert_eq!(head.version, 7);
        let tail = head.tail.as_ref().unwrap();
        assert_eq!(tail.len(), TAIL_KEPT);
        assert_eq!(tail.last().unwrap().0, ids[7]);
        assert!(head.can_check(TAIL_KEPT) && !head.can_check(TAIL_KEPT + 1));
        let last_two: Vec<NewEvent> = ids[6..].iter().copied().map(with_id).collect();
        let retry = head.retry_of(&last_two).unwrap();
        assert_eq!((retry.first_position, retry.position, retry.next_expected_version), (16, 17, 7));
        // A head read without its tail, then appended to, is not the whole stream.
        let read = Head { version: 5, tail: None }.after(vec![(ids[0], 6, 30)]);
        assert!(read.can_check(1) && !read.can_check(2));
        // One append longer than TAIL_KEPT is kept whole.
        let long: Vec<(Uuid, i64, i64)> = (0..6).map(|i| (Uuid::new_v4(), i, i)).collect();
        assert_eq!(Head { version: -1, tail: Some(Vec::new()) }.after(long).tail.unwrap().len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cycle_waits_briefly_for_the_cohort_it_expects() {
        let (tx, mut rx) = mpsc::channel(16);
        // Expecting 3: the one queued is taken, then the cycle waits for the third.
        tx.send(request()).await.unwrap();
        let late = tx.clone();
        // (On this one-thread runtime the sender runs only once `gather` waits.)
        tokio::spawn(async move { late.send(request()).await.unwrap() });
        let started = tokio::time::Instant::now();
        assert_eq!(gather(request(), &mut rx, 3).await.len(), 3);
        assert_eq!(started.elapsed(), Duration::ZERO, "it went as soon as the third came");
        // A client that stopped: the cycle goes after the wait with what it has.
        let started = tokio::time::Instant::now();
        assert_eq!(gather(request(), &mut rx, 2).await.len(), 1);
        assert_eq!(started.elapsed(), COHORT_WAIT);
        // As many as expected, or a lone client: no wait at all.
        tx.send(request()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(gather(request(), &mut rx, 1).await.len(), 2, "what is queued is always taken");
        assert_eq!(gather(request(), &mut rx, 0).await.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
