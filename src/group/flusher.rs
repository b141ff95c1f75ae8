//! Moves pending member batches into ClickHouse: one flusher at a time per group, across
//! all server processes, and in each process one ClickHouse insert per gathering for all
//! the groups written meanwhile.
//!
//! Why one at a time: two flushers racing on the same batch (the writer's background task
//! and a reader that needs the members now, perhaps in another process) would each see
//! the rows missing and each insert them. Deduplication tokens only help when both insert
//! the very same block, and coalescing batches (needed: ClickHouse creates a part per
//! insert, and a part per single-member PATCH cannot keep up with the writes) makes blocks
//! differ. So a flusher first takes the group's *flush lease* — a `flushLease` field on the
//! Group document, set by a conditional update — then inserts only the rows ClickHouse
//! lacks (counted per version), then pulls the batches and drops the lease in one update.
//!
//! Why one insert for all groups: a small ClickHouse insert costs 15–25 ms of its CPU
//! whatever its size, so a flusher per group, each inserting every [`GATHER`], made 16
//! busy groups cost 16 inserts per interval and ClickHouse the bottleneck of concurrent
//! PATCHes. Commits therefore *kick* one gatherer per process (`gather`): it waits
//! [`GATHER`] from the oldest waiting commit, takes the free leases of every group
//! committed to meanwhile in one conditional `updateMany` (the same rule as a lone
//! flusher's, per document: absent or expired), reads their batches back, inserts all their
//! rows as one block (groups one after the other, each group's versions in order; the
//! token names every group's rows), then pulls every group's batches and drops the leases
//! in one more `updateMany`. A group whose lease another flusher holds waits for the next
//! gathering. A group that needs counting (an earlier flusher left its lease) or has a
//! chunked batch is inserted on its own, as before. If the block fails, every group in it
//! keeps its lease as after any failed insert (below), so the next flusher counts.
//!
//! Several server processes: each has its own gatherer for the groups it wrote; a group
//! written through two processes is flushed by whichever takes its lease first, and the
//! other finds it held (and tries again at its next gathering) or finds nothing pending.
//! ClickHouse then sees one insert per process per interval.
//!
//! A lease lasts [`LEASE`]; inserts are abandoned [`INSERT_TIMEOUT`] after the first lease
//! of a gathering was taken, shorter, so a flusher that stalls or dies cannot still be
//! inserting when another takes over and counts what is there; after an insert that
//! failed without a clear answer the leases stay [`AMBIGUOUS_GRACE`] more. Lease times
//! come from each process's clock: processes are assumed to keep their clocks within a few
//! seconds of each other (NTP). In this process, flushes of a group queue on a mutex.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::options::Hint;
use mongodb::{Collection, Database};
use tokio::sync::Notify;

use super::events::{self, MemberEvent};
use super::outbox::{self, OutboxError, CHUNK_ROWS};
use crate::store::lease::{Lease, Taken};
use crate::store::mongo::current_collection;
use crate::store::{OutboxBatch, ResourceStore};

/// How long a flush lease holds before another flusher may take it over.
pub const LEASE: Duration = Duration::from_secs(30);
/// Longest a flusher spends inserting under one lease.
pub const INSERT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a reader waits for another flusher of the group before answering 503.
const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
/// How long the lease outlives an insert that failed without a clear answer (a cut
/// connection): an insert whose data reached ClickHouse lands within it.
const AMBIGUOUS_GRACE: Duration = Duration::from_secs(2);
/// Batches of at least this many events are flushed without gathering.
const URGENT_ROWS: usize = 1_000;
/// How long the gatherer waits for more commits before it starts.
const GATHER: Duration = Duration::from_millis(100);
/// Most groups of one gathering whose leases are taken (and batches pulled) at once: the
/// MongoDB connection pool is shared with the requests.
const PARALLEL: usize = 16;
/// The sparse index of documents with unfinished work (`mongo/005_pending_work_index.json`).
const PENDING_INDEX: &str = "pending_work";

#[derive(Default)]
struct GroupState {
    /// One flush of the group at a time in this process.
    cycle: Arc<tokio::sync::Mutex<()>>,
    /// Batches were committed since the gatherer last took the group.
    dirty: AtomicBool,
}

/// The groups committed to since the gatherer last looked.
#[derive(Default)]
struct Waiting {
    /// A set: a group written many times in one gathering is listed once, at no cost that
    /// grows with the number of groups waiting.
    groups: HashSet<String>,
    /// When the oldest of those commits was made: the gatherer waits [`GATHER`] from then.
    since: Option<Instant>,
    /// One of them is big: no point gathering more before inserting.
    urgent: bool,
    /// The gatherer task runs.
    running: bool,
}

pub struct Flusher {
    db: Database,
    store: ResourceStore,
    ch: clickhouse::Client,
    groups: Mutex<HashMap<String, Arc<GroupState>>>,
    /// Each Group document's `flushLease`.
    lease: Lease,
    waiting: Mutex<Waiting>,
    /// Wakes a gatherer that is waiting for more commits (an urgent batch came).
    wake: Notify,
}

enum Cycle {
    /// Nothing was pending, or this flusher finished what was.
    Done,
    /// Another flusher holds the lease.
    Held,
}

/// A group whose lease this flusher took, with the batches it found pending.
struct Leased {
    group: String,
    lease_id: String,
    batches: Vec<OutboxBatch>,
    /// No earlier flusher left its lease: ClickHouse has no row of these batches.
    clean: bool,
    taken_at: Instant,
}

enum Took {
    Leased(Leased),
    Cycle(Cycle),
}

/// False only when the batch certainly has no event of `member`: its rows are JSON text in
/// which the reference appears verbatim (a chunked batch, or a reference JSON would
/// escape, counts as "maybe").
fn may_name(batch: &OutboxBatch, member: &str) -> bool {
    match batch.inline() {
        Some(events) if !member.contains(['"', '\\']) && member.is_ascii() => events.contains(member),
        _ => true,
    }
}

impl Flusher {
    pub fn new(store: ResourceStore, ch: clickhouse::Client) -> Arc<Flusher> {
        let db = store.database().clone();
        let lease = Lease::new(db.collection(&current_collection("Group")), "flushLease", LEASE);
        Arc::new(Flusher {
            db,
            store,
            ch,
            groups: Mutex::new(HashMap::new()),
            lease,
            waiting: Mutex::default(),
            wake: Notify::new(),
        })
    }

    fn groups(&self) -> Collection<Document> {
        self.db.collection(&current_collection("Group"))
    }

    fn state(&self, group: &str) -> Arc<GroupState> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.len() > 10_000 {
            groups.retain(|_, s| Arc::strong_count(s) > 1);
        }
        groups.entry(group.to_string()).or_default().clone()
    }

    /// Makes sure every batch pending for the group when called is in ClickHouse; waits
    /// for another flusher of the group rather than racing it.
    pub async fn flush(&self, group: &str) -> Result<(), OutboxError> {
        let _cycle = self.state(group).cycle.clone().lock_owned().await;
        let deadline = Instant::now() + WAIT;
        loop {
            match self.cycle(group).await? {
                Cycle::Done => return Ok(()),
                Cycle::Held if Instant::now() > deadline => {
                    return Err(OutboxError::Busy(format!("group {group} is being flushed by another process")))
                }
                Cycle::Held => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// After a commit: the group's batches go to ClickHouse with the next gathering, off
    /// the request path. A failure leaves them pending for readers and the sweep.
    pub fn kick(self: &Arc<Self>, group: &str, rows: usize) {
        self.state(group).dirty.store(true, Ordering::SeqCst);
        let urgent = rows >= URGENT_ROWS;
        let start = {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if !w.groups.contains(group) {
                w.groups.insert(group.to_string());
            }
            w.since.get_or_insert_with(Instant::now);
            w.urgent |= urgent;
            !std::mem::replace(&mut w.running, true)
        };
        if urgent {
            self.wake.notify_one();
        }
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.gather().await });
        }
    }

    /// The gatherer: while groups wait, waits [`GATHER`] from the oldest commit (unless
    /// one is urgent), then flushes all of them together. Ends when none waits; the next
    /// commit starts it again.
    async fn gather(self: Arc<Self>) {
        // A panic that ends this task lets the next commit start another.
        struct Stopped<'a> {
            waiting: &'a Mutex<Waiting>,
            cleanly: bool,
        }
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                if !self.cleanly {
                    self.waiting.lock().unwrap_or_else(|e| e.into_inner()).running = false;
                }
            }
        }
        let mut stopped = Stopped { waiting: &self.waiting, cleanly: false };
        loop {
            let (since, urgent) = {
                let w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                (w.since, w.urgent)
            };
            let waited = since.map_or(Duration::ZERO, |t| t.elapsed());
            if !urgent && waited < GATHER {
                tokio::select! {
                    _ = tokio::time::sleep(GATHER - waited) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            let groups = {
                let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if w.groups.is_empty() {
                    w.running = false;
                    stopped.cleanly = true;
                    return;
                }
                w.since = None;
                w.urgent = false;
                std::mem::take(&mut w.groups)
            };
            self.flush_gathered(groups).await;
        }
    }

    /// Flushes the gathered groups: their leases taken together, one block for all that
    /// can share it, their batches pulled together. MongoDB sees three or four commands
    /// per gathering whatever the number of groups (under a stream of PATCHes over 16
    /// groups, one lease update and one pull per group per gathering were a third of
    /// MongoDB's time).
    async fn flush_gathered(self: &Arc<Self>, groups: HashSet<String>) {
        let started = Instant::now();
        // A reader of this process flushing a group now: the group goes next time (waiting
        // here would hold up every other group of the gathering).
        let mut guards = HashMap::new();
        for group in groups {
            let state = self.state(&group);
            state.dirty.store(false, Ordering::SeqCst);
            match state.cycle.clone().try_lock_owned() {
                Ok(guard) => {
                    guards.insert(group, guard);
                }
                Err(_) => self.requeue(&group),
            }
        }
        let tenure = uuid::Uuid::new_v4().to_string();
        let leased = match self.take_many(guards.keys().cloned().collect(), &tenure).await {
            Ok(leased) => leased,
            Err(e) => {
                tracing::warn!(error = %e,
                    "member events committed but not yet in ClickHouse; the next reader or the sweep inserts them");
                return;
            }
        };
        let leased_at = started.elapsed();
        let (mut shared, own): (Vec<Leased>, Vec<Leased>) =
            leased.into_iter().partition(|l| l.clean && l.batches.iter().all(|b| b.inline().is_some()));
        let groups = shared.len();
        // The groups that share a block: one insert (more when they hold many rows), done
        // within INSERT_TIMEOUT of taking their leases.
        if !shared.is_empty() {
            let deadline = started + INSERT_TIMEOUT;
            let leases: Vec<&Leased> = shared.iter().collect();
            let inserted = tokio::time::timeout_at(deadline.into(), self.insert_together(&leases)).await;
            let inserted = inserted.unwrap_or_else(|_| {
                Err(OutboxError::Busy(format!("inserting {groups} groups' events took over {INSERT_TIMEOUT:?}")))
            });
            if let Err(e) = inserted {
                tracing::warn!(groups, error = %e,
                    "member events committed but not yet in ClickHouse; the next reader or the sweep inserts them");
                let ids: Vec<&str> = shared.iter().map(|l| l.group.as_str()).collect();
                self.release_failed(&ids, &tenure, &e).await;
                shared.clear();
            }
        }
        let inserted_at = started.elapsed();
        // The others each on its own, as a lone flusher would.
        let own: Vec<Leased> = futures_util::stream::iter(own)
            .map(|l| async move {
                match self.insert_own(&l).await {
                    Ok(()) => Some(l),
                    Err(e) => {
                        tracing::warn!(group = l.group, error = %e,
                            "member events committed but not yet in ClickHouse; the next reader or the sweep inserts them");
                        self.release_failed(&[l.group.as_str()], &l.lease_id, &e).await;
                        None
                    }
                }
            })
            .buffer_unordered(PARALLEL)
            .filter_map(|done| async move { done })
            .collect()
            .await;
        shared.extend(own);
        if let Err(e) = self.finish(&shared).await {
            tracing::warn!(groups, error = %e, "flushed member batches not yet pulled; the next flusher counts them");
        }
        drop(guards);
        // Where a gathering's time goes (`ROSTER_LOG=roster::group=debug`), cumulative.
        tracing::debug!(
            groups,
            leased_us = leased_at.as_micros() as u64,
            inserted_us = inserted_at.as_micros() as u64,
            pulled_us = started.elapsed().as_micros() as u64,
            "gathering timings"
        );
    }

    /// Takes the leases of the groups with pending batches for `tenure`, and reads their
    /// batches: two commands (three when a lease was left behind). A group whose lease
    /// another flusher holds goes back into the queue.
    async fn take_many(self: &Arc<Self>, groups: Vec<String>, tenure: &str) -> Result<Vec<Leased>, OutboxError> {
        let taken_at = Instant::now();
        let pending = doc! { "outbox.batchId": { "$exists": true } };
        self.lease.take_many(&pending, &groups, tenure).await?;
        let found: Vec<Document> = self
            .groups()
            .find(doc! { "_id": { "$in": &groups }, "outbox.batchId": { "$exists": true } })
            .projection(doc! { "outbox": 1, "flushLease": 1 })
            .await?
            .try_collect()
            .await?;
        let mut leased = Vec::with_capacity(found.len());
        for d in found {
            let group = d.get_str("_id").unwrap_or_default().to_string();
            let lease = d.get_document("flushLease").ok();
            if lease.and_then(|l| l.get_str("by").ok()) != Some(tenure) {
                self.requeue(&group);
                continue;
            }
            let clean = lease.and_then(|l| l.get_bool("fresh").ok()).unwrap_or(false);
            match outbox::pending_in(&d) {
                Ok(batches) => leased.push(Leased { group, lease_id: tenure.to_string(), batches, clean, taken_at }),
                // The lease stays until it expires; the reader that needs the group reports it.
                Err(e) => tracing::warn!(group, error = %e, "a pending member batch is malformed"),
            }
        }
        Ok(leased)
    }

    /// Puts a group back for the next gathering.
    fn requeue(self: &Arc<Self>, group: &str) {
        self.kick(group, 0);
    }

    /// Flushes every group with pending batches (start-up, the sweep). A group that fails
    /// (ClickHouse down, a damaged batch) is logged and the others still go. Returns how
    /// many groups were flushed.
    pub async fn flush_all(&self) -> Result<usize, OutboxError> {
        let mut flushed = 0;
        for group in self.pending_touching(None).await? {
            match self.flush_and_clear_flag(&group).await {
                Ok(()) => flushed += 1,
                Err(e) => tracing::warn!(group, error = %e, "pending member batches not flushed; retried later"),
            }
        }
        Ok(flushed)
    }

    /// Flushes the given groups; the first failure is returned after all were tried.
    pub async fn flush_each(&self, groups: &[String]) -> Result<(), OutboxError> {
        let mut first = None;
        for group in groups {
            if let Err(e) = self.flush_and_clear_flag(group).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The groups whose pending batches may name `member` (every group with pending
    /// batches when `None`): `Group?member=` need not wait on the others.
    pub async fn pending_touching(&self, member: Option<&str>) -> Result<Vec<String>, OutboxError> {
        let pending: Vec<Document> = self
            .groups()
            .find(doc! { "outboxPending": true })
            // The flag is the second key of the sparse index of unfinished work
            // (`mongo/005_pending_work_index.json`): a scan of that small index, not of
            // the collection.
            .hint(Hint::Name(PENDING_INDEX.into()))
            .projection(doc! { "outbox": 1 })
            .await?
            .try_collect()
            .await?;
        let concerned = |d: &Document| match member {
            None => true,
            // A batch that does not parse concerns everyone: the flush reports it.
            Some(m) => outbox::pending_in(d).map_or(true, |batches| batches.iter().any(|b| may_name(b, m))),
        };
        Ok(pending.iter().filter(|d| concerned(d)).filter_map(|d| d.get_str("_id").ok().map(str::to_string)).collect())
    }

    /// [`Self::flush`], then drops a pending flag left over by an interrupted flusher.
    async fn flush_and_clear_flag(&self, group: &str) -> Result<(), OutboxError> {
        self.flush(group).await?;
        self.groups()
            .update_one(
                doc! { "_id": group, "outboxPending": true, "outbox.0": { "$exists": false } },
                doc! { "$unset": { "outboxPending": "" } },
            )
            .await?;
        Ok(())
    }

    /// One attempt of a lone flusher: take the lease, insert what ClickHouse lacks, pull
    /// the batches.
    async fn cycle(&self, group: &str) -> Result<Cycle, OutboxError> {
        let leased = match self.take(group).await? {
            Took::Leased(l) => l,
            Took::Cycle(c) => return Ok(c),
        };
        if let Err(e) = self.insert_own(&leased).await {
            self.release_failed(&[leased.group.as_str()], &leased.lease_id, &e).await;
            return Err(e);
        }
        self.finish(std::slice::from_ref(&leased)).await?;
        Ok(Cycle::Done)
    }

    /// Takes the group's lease, with the batches pending under it.
    async fn take(&self, group: &str) -> Result<Took, OutboxError> {
        let taken_at = Instant::now();
        let lease_id = uuid::Uuid::new_v4().to_string();
        let pending = doc! { "_id": group, "outbox.batchId": { "$exists": true } };
        let projection = doc! { "outbox": 1, "flushLease": 1 };
        let taken = match self.lease.take(&pending, &lease_id, projection).await? {
            Taken::Granted(Some(before)) => before,
            Taken::Granted(None) | Taken::Absent => return Ok(Took::Cycle(Cycle::Done)),
            Taken::Held => return Ok(Took::Cycle(Cycle::Held)),
        };
        let batches = outbox::pending_in(&taken).map_err(|e| OutboxError::Corrupt(format!("group {group}: {e}")))?;
        // No lease at all (not even an expired one): the last flusher pulled what it
        // inserted, or none ever ran. Every failure below leaves the lease in place, so
        // ClickHouse holds no row of these batches and there is nothing to count.
        let clean = !taken.contains_key("flushLease");
        Ok(Took::Leased(Leased { group: group.to_string(), lease_id, batches, clean, taken_at }))
    }

    /// After a failed insert. ClickHouse refused it: it did not land, the next flusher may
    /// go at once (the leases expire now). Anything else (a cut connection, a timeout) may
    /// still land: the leases stay a little longer. Either way no lease is removed: an
    /// earlier insert may have landed, so the next flusher counts.
    async fn release_failed(&self, groups: &[&str], lease_id: &str, e: &OutboxError) {
        let definite = matches!(e, OutboxError::ClickHouse(clickhouse::error::Error::BadResponse(_)));
        let grace = if definite { 0 } else { AMBIGUOUS_GRACE.as_millis() as i64 };
        let until = DateTime::from_millis(DateTime::now().timestamp_millis() + grace);
        let release = doc! { "$set": { "flushLease.until": until } };
        let leased = doc! { "_id": { "$in": groups }, "flushLease.by": lease_id };
        let _ = self.groups().update_many(leased, release).await;
    }

    /// Pulls the flushed batches of the groups and drops their leases in one update (batch
    /// ids are unique, so one list serves every group), clears the pending flag of those
    /// whose outbox emptied, then forgets their chunks.
    async fn finish(&self, leased: &[Leased]) -> Result<(), OutboxError> {
        if leased.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = leased.iter().flat_map(|l| l.batches.iter().map(|b| b.batch_id.as_str())).collect();
        let groups: Vec<&str> = leased.iter().map(|l| l.group.as_str()).collect();
        let leases: Vec<&str> = leased.iter().map(|l| l.lease_id.as_str()).collect();
        self.groups()
            .update_many(
                doc! { "_id": { "$in": &groups }, "flushLease.by": { "$in": &leases } },
                doc! { "$pull": { "outbox": { "batchId": { "$in": &ids } } }, "$unset": { "flushLease": "" } },
            )
            .await?;
        // The flag goes where the outbox is empty now; a group this process committed to
        // meanwhile has a batch again (it keeps the flag, and the next flush clears it).
        let quiet: Vec<&str> = groups.iter().copied().filter(|g| !self.state(g).dirty.load(Ordering::SeqCst)).collect();
        if !quiet.is_empty() {
            self.groups()
                .update_many(
                    doc! { "_id": { "$in": &quiet }, "outboxPending": true, "outbox": { "$size": 0 } },
                    doc! { "$unset": { "outboxPending": "" } },
                )
                .await?;
        }
        for l in leased {
            // A writer's remembered copy of the document still lists these batches.
            if let Some(through) = l.batches.iter().map(|b| b.version).max() {
                self.store.batches_flushed("Group", &l.group, through);
            }
        }
        let batches: Vec<OutboxBatch> =
            leased.iter().flat_map(|l| l.batches.iter().filter(|b| b.inline().is_none()).cloned()).collect();
        outbox::forget_chunks(&self.db, &batches).await
    }

    /// Inserts the rows of groups with clean leases and inline batches: all groups in one
    /// block, unless they hold more than [`CHUNK_ROWS`] rows together.
    async fn insert_together(&self, leases: &[&Leased]) -> Result<(), OutboxError> {
        let mut block: Vec<MemberEvent> = Vec::new();
        for leased in leases {
            let mut rows = Vec::new();
            for batch in &leased.batches {
                rows.extend(outbox::inline_events(&leased.group, batch)?);
            }
            if !block.is_empty() && block.len() + rows.len() > CHUNK_ROWS {
                events::insert(&self.ch, &std::mem::take(&mut block)).await?;
            }
            block.extend(rows);
        }
        events::insert(&self.ch, &block).await?;
        Ok(())
    }

    /// Inserts one group's rows that ClickHouse lacks, within [`INSERT_TIMEOUT`] of taking
    /// its lease.
    async fn insert_own(&self, leased: &Leased) -> Result<(), OutboxError> {
        let deadline = leased.taken_at + INSERT_TIMEOUT;
        let inserting = self.insert_missing(&leased.group, &leased.batches, leased.clean);
        match tokio::time::timeout_at(deadline.into(), inserting).await {
            Ok(result) => result,
            Err(_) => Err(OutboxError::Busy(format!(
                "inserting group {}'s events took over {INSERT_TIMEOUT:?}",
                leased.group
            ))),
        }
    }

    /// Inserts the batches' rows that ClickHouse does not have (a flusher before this one
    /// may have died half-way), inline batches several to an insert. `clean`: no earlier
    /// flusher left its lease behind, so none stopped half-way and nothing is counted (one
    /// ClickHouse query fewer per flush).
    async fn insert_missing(&self, group: &str, batches: &[OutboxBatch], clean: bool) -> Result<(), OutboxError> {
        let versions: Vec<u32> = batches.iter().map(|b| b.version as u32).collect();
        let stored: HashMap<u32, u64> = if clean {
            HashMap::new()
        } else {
            self.ch
                .query(
                    "SELECT group_version, count() FROM Group_4_0_0_MemberEvents \
                 WHERE group_id = {g:String} AND group_version IN {v:Array(UInt32)} GROUP BY group_version",
                )
                .param("g", group)
                .param("v", &versions)
                .fetch_all::<(u32, u64)>()
                .await?
                .into_iter()
                .collect()
        };
        let mut pending: Vec<MemberEvent> = Vec::new();
        for batch in batches {
            let version = batch.version as u32;
            let have = stored.get(&version).copied().unwrap_or(0);
            if have >= batch.count as u64 {
                continue;
            }
            let have = if have > 0 { Some(events::stored_seqs(&self.ch, group, version).await?) } else { None };
            let missing = |block: Vec<MemberEvent>| match &have {
                Some(have) => block.into_iter().filter(|e| !have.contains(&e.seq)).collect(),
                None => block,
            };
            if batch.inline().is_some() {
                let rows = missing(outbox::inline_events(group, batch)?);
                if !pending.is_empty() && pending.len() + rows.len() > CHUNK_ROWS {
                    events::insert(&self.ch, &std::mem::take(&mut pending)).await?;
                }
                pending.extend(rows);
            } else {
                // A chunked (big) batch goes a chunk at a time, never all in memory.
                if !pending.is_empty() {
                    events::insert(&self.ch, &std::mem::take(&mut pending)).await?;
                }
                let ch = &self.ch;
                outbox::for_each_block(&self.db, group, batch, |block| {
                    let rows = missing(block);
                    async move { events::insert(ch, &rows).await.map_err(OutboxError::from) }
                })
                .await?;
            }
        }
        events::insert(&self.ch, &pending).await?;
        Ok(())
    }
}

impl crate::eventstore::log::GroupMembers for Flusher {
    fn finish_pending<'a>(&'a self, group: &'a str) -> futures_util::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.flush(group).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_concerns_a_member_it_names() {
        let batch = outbox::tests::batch(r#"[[1,5,"{\"entity\":{\"reference\":\"Patient/12\"}}"],[2,3,"Patient/7"]]"#);
        assert!(may_name(&batch, "Patient/12"));
        assert!(may_name(&batch, "Patient/7"));
        assert!(may_name(&batch, "Patient/1"), "a prefix may match: flushing too much is safe");
        assert!(!may_name(&batch, "Patient/9"));
        let chunked = OutboxBatch { rows: crate::store::BatchRows::Chunked { chunks: 3 }, ..batch.clone() };
        assert!(may_name(&chunked, "Patient/9"), "chunked batches are not read here");
        assert!(may_name(&batch, "Patient/\"x"));
    }
}
