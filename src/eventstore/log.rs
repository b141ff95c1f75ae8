//! The product [`EventStore`]: events in ClickHouse (`EventStore_Events`), the log lease
//! and the journal in MongoDB (`EventStore_Log`, `EventStore_Journal`).
//!
//! # Why positions never have a hole a reader could skip
//! A store that hands out positions from a sequence and lets writers commit in any order
//! has holes: position 7 is reserved, 8 commits first, a subscriber reads 8, and 7 then
//! appears behind it (Marten #4953). Here one appender at a time, across all processes,
//! holds the *log lease* (see `appender`); only it assigns positions, contiguously after
//! the last one journaled, and its flusher copies journaled cycles to ClickHouse in
//! position order, each block all or nothing (see `journal`). So the table is always a
//! gap-free prefix of the log, and `read_all(from)` can simply read it. An appender that
//! dies or stalls loses the lease when it expires; the next holder flushes the journal and
//! continues after it, and the stalled one cannot write unnoticed after its lease ends
//! (lease times come from each process's clock, assumed within a second of each other).
//!
//! The same lease is the concurrency control of streams: only its holder writes, so it
//! checks expected versions against what ClickHouse holds plus what it wrote itself.
//!
//! `group:{id}` streams are not stored here: they read the Group's member events through
//! the `EventStore_GroupEvents` view (read-only; not part of the log).
//!
//! Readers look at ClickHouse, after waiting until it holds every journaled event
//! ([`ClickHouseEventStore::await_journaled`]): an acknowledged append is visible to every read that
//! starts after it, whole, and a stream's version, its events and the log always agree.
//! Followers (`read_log`: subscriptions, projections) do not wait: they read the log as
//! ClickHouse holds it, and then what this process journaled since (`journal::Recent`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use uuid::Uuid;

use super::appender::{Appender, Faults, Request};
use super::journal::{Journal, Recent};
use super::{
    validate_append, AppendResult, EventStore, EventStoreError, ExpectedVersion, NewEvent, StoredEvent, GROUP_PREFIX,
};

pub const LOG_TABLE: &str = "EventStore_Events";
/// How often the store looks for appends made by other processes while someone waits.
const POLL: Duration = Duration::from_millis(100);
/// Longest a read waits for ClickHouse to hold the journaled events.
const JOURNALED_WAIT: Duration = Duration::from_secs(5);
/// Pages of at least this many events are read in two halves at once.
const SPLIT_READ: usize = 20_000;
/// How often a waiting read asks ClickHouse whether another process flushed.
const JOURNALED_POLL: Duration = Duration::from_millis(25);
/// How long a read waiting for journaled events waits for a flusher before asking its own appender to take
/// the lease and flush (a live holder's flusher is done well within this).
const RECOVER_AFTER: Duration = Duration::from_millis(300);

/// One event row of `EventStore_Events`.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct EventRow {
    pub position: u64,
    pub stream_id: String,
    pub stream_version: u64,
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub event_type: String,
    pub data: String,
    pub metadata: Vec<(String, String)>,
    /// Milliseconds since the epoch (`DateTime64(3)`).
    pub timestamp: i64,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        StoredEvent {
            position: r.position,
            stream_id: r.stream_id,
            stream_version: r.stream_version,
            event_id: r.event_id,
            event_type: r.event_type,
            data: r.data,
            metadata: r.metadata.into_iter().collect(),
            timestamp: r.timestamp,
        }
    }
}

const COLUMNS: &str = "position, stream_id, stream_version, event_id, event_type, data, metadata, timestamp";

/// Where `group:` streams come from: Group member events, whose latest batches may still be
/// pending in MongoDB. Implemented by the Group flusher (`group::flusher`), so this module
/// does not depend on `group`.
pub trait GroupMembers: Send + Sync {
    /// Finishes the group's pending member batches (every batch acknowledged before the
    /// call is in ClickHouse afterwards).
    fn finish_pending<'a>(&'a self, group: &'a str) -> futures_util::future::BoxFuture<'a, Result<(), String>>;
}

#[derive(Clone)]
pub struct ClickHouseEventStore {
    pub(super) ch: clickhouse::Client,
    journal: Journal,
    appends: mpsc::Sender<Request>,
    /// The last position known to be in ClickHouse: raised by this process's flusher at
    /// once, and by the poller (or a read waiting for journaled events) for appends of other processes.
    last: watch::Receiver<i64>,
    last_tx: Arc<watch::Sender<i64>>,
    /// What this process journaled lately: followers get it before ClickHouse does.
    recent: Arc<Recent>,
    /// Tells this process's flusher (when it holds the lease) that a read waits for it.
    hurry: Arc<Notify>,
    /// Tells this process's appender (when it holds no lease) to take it and flush the
    /// journal: journaled events wait and nobody may be flushing them.
    recover: Arc<Notify>,
    /// How many callers wait in [`EventStore::wait_for_more`] (the poller only asks
    /// ClickHouse while someone does).
    waiting: Arc<AtomicUsize>,
    /// Finishes a group's pending member batches before its `group:` stream is read, so
    /// an acknowledged PATCH is in it.
    groups: Option<Arc<dyn GroupMembers>>,
    /// The appender task, for [`Self::close`].
    appender: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl ClickHouseEventStore {
    /// A store over `db` and `ch`; its appender task runs until the store is dropped.
    pub fn new(db: &mongodb::Database, ch: clickhouse::Client) -> ClickHouseEventStore {
        Self::with_faults(db, ch, Faults::default())
    }

    /// As [`Self::new`], with injected delays and a lease length (fault tests).
    pub fn with_faults(db: &mongodb::Database, ch: clickhouse::Client, faults: Faults) -> ClickHouseEventStore {
        let (tx, rx) = mpsc::channel(4096);
        let last_tx = Arc::new(watch::channel(-1).0);
        let last = last_tx.subscribe();
        let journal = Journal::new(db, ch.clone());
        let recent = Arc::new(Recent::default());
        let hurry = Arc::new(Notify::new());
        let recover = Arc::new(Notify::new());
        let appender =
            Appender::new(db, ch.clone(), last_tx.clone(), recent.clone(), hurry.clone(), recover.clone(), faults);
        let task = tokio::spawn(appender.run(rx));
        let appender = Arc::new(std::sync::Mutex::new(Some(task)));
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(poll_for_others(journal.clone(), last_tx.clone(), Arc::downgrade(&waiting)));
        ClickHouseEventStore {
            ch,
            journal,
            appends: tx,
            last,
            last_tx,
            recent,
            hurry,
            recover,
            waiting,
            groups: None,
            appender,
        }
    }

    /// Stops the appender once queued appends are done and releases the log lease (a
    /// short-lived process such as the CLI calls this, or the next appender anywhere would
    /// wait for the lease to expire). Waits at most 5 s; other clones must be dropped.
    pub async fn close(self) {
        let task = self.appender.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self);
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// At start-up: if the journal holds events ClickHouse may lack (a holder that died, this
    /// machine's previous run perhaps), takes the log lease and flushes them, without
    /// waiting for an append or a reader to ask.
    pub fn recover_journal(&self) {
        let (journal, recover) = (self.journal.clone(), self.recover.clone());
        tokio::spawn(async move {
            match (journal.pending_end().await, journal.last_stored().await) {
                (Ok(Some(end)), Ok(stored)) if end > stored => {
                    tracing::info!(stored, journaled = end, "flushing journaled events left by an earlier holder");
                    recover.notify_one();
                }
                (Err(e), _) => tracing::warn!(error = %e, "could not look at the event journal at start-up"),
                (_, Err(e)) => tracing::warn!(error = %e, "could not look at the event log at start-up"),
                _ => {}
            }
        });
    }

    /// `group:` streams first finish the group's pending member batches with `members`.
    pub fn with_group_members(mut self, members: Arc<dyn GroupMembers>) -> ClickHouseEventStore {
        self.groups = Some(members);
        self
    }

    /// Finishes the pending member batches of a group, so that reads of its member events
    /// see every acknowledged write.
    pub async fn finish_group_batches(&self, group: &str) -> Result<(), EventStoreError> {
        match &self.groups {
            Some(f) => {
                f.finish_pending(group).await.map_err(|e| EventStoreError::Unavailable(format!("member events: {e}")))
            }
            None => Ok(()),
        }
    }

    /// Waits until ClickHouse holds every event journaled so far, by any process, so that a
    /// read starting now sees every append acknowledged before it. Costs one MongoDB read
    /// when nothing is pending.
    pub async fn await_journaled(&self) -> Result<(), EventStoreError> {
        let Some(end) = self.journal.pending_end().await? else { return Ok(()) };
        let started = tokio::time::Instant::now();
        let (give_up, recover_at) = (started + JOURNALED_WAIT, started + RECOVER_AFTER);
        let mut last = self.last.clone();
        if *last.borrow_and_update() >= end {
            return Ok(());
        }
        self.hurry.notify_one();
        let mut recovering = false;
        loop {
            // Another process's flusher raises nothing here: ask ClickHouse.
            raise(&self.last_tx, self.journal.last_stored().await?);
            if *last.borrow_and_update() >= end {
                return Ok(());
            }
            if tokio::time::Instant::now() > give_up {
                return Err(EventStoreError::Unavailable(format!(
                    "events up to position {end} are stored but ClickHouse does not hold them yet; retry"
                )));
            }
            // Nothing moved for a while: maybe no process is flushing (the holder died, or
            // released the lease without draining). This process's appender takes the lease
            // when it can, and flushes the journal first.
            if !recovering && tokio::time::Instant::now() > recover_at {
                recovering = true;
                self.recover.notify_one();
            }
            // This process's flusher wakes the watch at once; another's is looked for again
            // after a while (each look is a ClickHouse query, and reads may be many).
            let _ = tokio::time::timeout(JOURNALED_POLL, last.changed()).await;
            if *last.borrow_and_update() >= end {
                return Ok(());
            }
        }
    }

    /// Up to `max` events from position `from`, as ClickHouse holds them.
    ///
    /// A large page is read as two halves at once (two queries, decoded on two threads):
    /// on a small machine one query leaves a core idle while the other decodes. The second
    /// half starts where the first would end if no position were missing. It is kept only
    /// if the first half holds exactly the positions before it: retention may have left
    /// holes, and a flush may land between the two reads (the page must stay a prefix).
    async fn read_stored(&self, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        if max < SPLIT_READ {
            return read_from(self.ch.clone(), from, max).await;
        }
        let half = max / 2;
        let second = tokio::spawn(read_from(self.ch.clone(), from + half as u64, max - half));
        let mut events = read_from(self.ch.clone(), from, half).await?;
        let rest = second.await.map_err(|e| EventStoreError::Unavailable(format!("reading the log: {e}")))??;
        if events.len() == half && events.last().is_some_and(|e| e.position == from + half as u64 - 1) {
            events.extend(rest);
        }
        Ok(events)
    }
}

impl EventStore for ClickHouseEventStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult, EventStoreError> {
        let client_ids = events.iter().all(|e| e.event_id.is_some());
        validate_append(stream, &mut events)?;
        let (reply, answer) = oneshot::channel();
        let request = Request { stream: stream.to_string(), expected, events, client_ids, reply };
        self.appends
            .send(request)
            .await
            .map_err(|_| EventStoreError::Unavailable("the appender has stopped".into()))?;
        answer.await.map_err(|_| EventStoreError::Unavailable("the appender stopped during the append".into()))?
    }

    async fn read_stream(&self, stream: &str, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        if let Some(group) = stream.strip_prefix(GROUP_PREFIX) {
            self.finish_group_batches(group).await?;
            return fetch(
                self.ch
                    .query(&format!(
                        "SELECT {COLUMNS} FROM EventStore_GroupEvents(group = {{g:String}}) \
                         WHERE stream_version >= {{v:UInt64}} ORDER BY stream_version LIMIT {{m:UInt64}}"
                    ))
                    .param("g", group)
                    .param("v", from)
                    .param("m", max as u64),
            )
            .await;
        }
        self.await_journaled().await?;
        fetch(
            self.ch
                .query(&format!(
                    "SELECT {COLUMNS} FROM EventStore_Events WHERE stream_id = {{s:String}} AND stream_version >= {{v:UInt64}} \
                     ORDER BY stream_version LIMIT {{m:UInt64}}"
                ))
                .param("s", stream)
                .param("v", from)
                .param("m", max as u64),
        )
        .await
    }

    async fn read_all(&self, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        // What ClickHouse holds is a gap-free prefix of the log. When journaled events stay
        // unflushed (a stalled holder, until its lease expires), a full page of that prefix
        // is still exact; a short one would end before acknowledged events: 503 instead.
        let journaled = self.await_journaled().await;
        let events = self.read_stored(from, max).await?;
        match journaled {
            Err(e) if events.len() < max => Err(e),
            _ => Ok(events),
        }
    }

    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        // Journaled events are final: from memory when this process has them, flushed or
        // not (the page may then be short; a follower asks again). Just past them,
        // ClickHouse is asked only when it is known to hold more (another process's
        // appends, seen by the poll): a caught-up follower is woken by every cycle, and
        // asking each time would cost ClickHouse a query per cycle per follower.
        match self.recent.read(from, max) {
            Some(events) if !events.is_empty() || *self.last.borrow() < from as i64 => Ok(events),
            _ => self.read_stored(from, max).await,
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<i64, EventStoreError> {
        if let Some(group) = stream.strip_prefix(GROUP_PREFIX) {
            self.finish_group_batches(group).await?;
            let events: u64 = self
                .ch
                .query(
                    "SELECT count() FROM (SELECT 1 FROM Group_4_0_0_MemberEvents WHERE group_id = {g:String} \
                     LIMIT 1 BY group_version, seq)",
                )
                .param("g", group)
                .fetch_one()
                .await?;
            return Ok(events as i64 - 1);
        }
        self.await_journaled().await?;
        Ok(self
            .ch
            .query(
                "SELECT if(count() = 0, -1, toInt64(max(stream_version))) FROM EventStore_Events WHERE stream_id = {s:String}",
            )
            .param("s", stream)
            .fetch_one()
            .await?)
    }

    async fn last_position(&self) -> Result<i64, EventStoreError> {
        self.await_journaled().await?;
        self.journal.last_stored().await
    }

    async fn wait_for_more(&self, position: i64) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        let (mut last, mut journaled) = (self.last.clone(), self.recent.journaled.subscribe());
        let more = async {
            tokio::select! {
                _ = last.wait_for(|&p| p > position) => {}
                _ = journaled.wait_for(|&p| p > position) => {}
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), more).await;
    }
}

/// The first `max` events ClickHouse holds from position `from` on. Not a position range:
/// retention may have deleted some positions.
///
/// Read as plain `RowBinary`, without the client checking every value against the column
/// types (`RowBinaryWithNamesAndTypes`): pages of the whole log are where that check costs
/// most. The row type is the one the flusher inserts with validation on, so a mismatch
/// would show on the first insert, and every read test decodes through here.
async fn read_from(ch: clickhouse::Client, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
    fetch(
        ch.with_validation(false).query(&format!(
            "SELECT {COLUMNS} FROM EventStore_Events WHERE position >= {{f:UInt64}} ORDER BY position LIMIT {{m:UInt64}}"
        ))
        .param("f", from)
        .param("m", max as u64),
    )
    .await
}

async fn fetch(query: clickhouse::query::Query) -> Result<Vec<StoredEvent>, EventStoreError> {
    let rows: Vec<EventRow> = query.fetch_all().await?;
    Ok(rows.into_iter().map(StoredEvent::from).collect())
}

/// Raises the last known position (never lowers it).
pub fn raise(last: &watch::Sender<i64>, position: i64) {
    last.send_if_modified(|p| match position > *p {
        true => {
            *p = position;
            true
        }
        false => false,
    });
}

/// While anyone waits for events, asks ClickHouse for the last position every [`POLL`]:
/// one query per process however many subscribers and projections wait (appends of this
/// process wake them at once without it). Ends with the store.
async fn poll_for_others(journal: Journal, last: Arc<watch::Sender<i64>>, waiting: std::sync::Weak<AtomicUsize>) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(waiting) = waiting.upgrade() else { return };
        if waiting.load(Ordering::SeqCst) == 0 {
            continue;
        }
        if let Ok(p) = journal.last_stored().await {
            raise(&last, p);
        }
    }
}

/// The store as handlers hold it.
pub type SharedEventStore = Arc<ClickHouseEventStore>;
