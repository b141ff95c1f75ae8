//! Moves a group's pending member batches into ClickHouse: one flusher at a time per
//! group, across all server processes, several batches per insert.
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
//! A lease lasts [`LEASE`]; an insert is abandoned after [`INSERT_TIMEOUT`], shorter, so a
//! flusher that stalls or dies cannot still be inserting when another takes over and
//! counts what is there; after an insert that failed without a clear answer the lease
//! stays [`AMBIGUOUS_GRACE`] more. Lease times come from each process's clock: processes
//! are assumed to keep their clocks within a few seconds of each other (NTP). In this process, flushes of a group queue on a mutex, and the
//! writers' background flushes of a group run in one task that picks up every batch
//! committed meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::options::Hint;
use mongodb::{Collection, Database};

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
/// How long a background flush waits for more batches before it starts.
const GATHER: Duration = Duration::from_millis(100);
/// The sparse index of documents with unfinished work (`mongo/005_pending_work_index.json`).
const PENDING_INDEX: &str = "pending_work";

#[derive(Default)]
struct GroupState {
    /// One flush of the group at a time in this process.
    cycle: tokio::sync::Mutex<()>,
    /// A background flush task runs for the group.
    running: AtomicBool,
    /// Batches were committed since the task last looked.
    dirty: AtomicBool,
    /// When the oldest of those was committed: the task gathers for [`GATHER`] from then.
    since: Mutex<Option<Instant>>,
    /// One of them is big: no point gathering more before inserting.
    urgent: AtomicBool,
}

pub struct Flusher {
    db: Database,
    store: ResourceStore,
    ch: clickhouse::Client,
    groups: Mutex<HashMap<String, Arc<GroupState>>>,
    /// Each Group document's `flushLease`.
    lease: Lease,
}

enum Cycle {
    /// Nothing was pending, or this flusher finished what was.
    Done,
    /// Another flusher holds the lease.
    Held,
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
        Arc::new(Flusher { db, store, ch, groups: Mutex::new(HashMap::new()), lease })
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
        let state = self.state(group);
        let _cycle = state.cycle.lock().await;
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

    /// After a commit: flushes the group in the background. Commits that arrive while the
    /// task runs are picked up by it (one task per group), so a burst of writes becomes a
    /// few inserts. A failure leaves the batches pending for readers and the sweep.
    pub fn kick(self: &Arc<Self>, group: &str, rows: usize) {
        let state = self.state(group);
        if rows >= URGENT_ROWS {
            state.urgent.store(true, Ordering::SeqCst);
        }
        state.since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
        state.dirty.store(true, Ordering::SeqCst);
        if state.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        let group = group.to_string();
        tokio::spawn(async move {
            loop {
                // Let a few more small commits arrive: one insert and one update for all of
                // them. A big batch goes at once (it keeps the Group document large while it
                // waits, and every write of the document pays for that). The gathering
                // counts from the oldest waiting commit, so commits that arrived during the
                // last flush (an insert takes tens of ms) wait no longer than the others.
                let oldest = *state.since.lock().unwrap_or_else(|e| e.into_inner());
                let waited = oldest.map_or(Duration::ZERO, |t| t.elapsed());
                if !state.urgent.swap(false, Ordering::SeqCst) && waited < GATHER {
                    tokio::time::sleep(GATHER - waited).await;
                }
                state.dirty.store(false, Ordering::SeqCst);
                *state.since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Err(e) = this.flush(&group).await {
                    tracing::warn!(group, error = %e,
                        "member events committed but not yet in ClickHouse; the next reader or the sweep inserts them");
                }
                state.running.store(false, Ordering::SeqCst);
                if !state.dirty.load(Ordering::SeqCst) || state.running.swap(true, Ordering::SeqCst) {
                    break;
                }
            }
        });
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

    /// One attempt: take the lease, insert what ClickHouse lacks, pull the batches.
    async fn cycle(&self, group: &str) -> Result<Cycle, OutboxError> {
        let started = Instant::now();
        let lease_id = uuid::Uuid::new_v4().to_string();
        let pending = doc! { "_id": group, "outbox.batchId": { "$exists": true } };
        let projection = doc! { "outbox": 1, "flushLease": 1 };
        let taken = match self.lease.take(&pending, &lease_id, projection).await? {
            Taken::Granted(Some(before)) => before,
            Taken::Granted(None) | Taken::Absent => return Ok(Cycle::Done),
            Taken::Held => return Ok(Cycle::Held),
        };
        let batches = outbox::pending_in(&taken).map_err(|e| OutboxError::Corrupt(format!("group {group}: {e}")))?;
        // No lease at all (not even an expired one): the last flusher pulled what it
        // inserted, or none ever ran. Every failure below leaves the lease in place, so
        // ClickHouse holds no row of these batches and there is nothing to count.
        let clean = !taken.contains_key("flushLease");
        let leased_at = started.elapsed();
        let inserted = match tokio::time::timeout(INSERT_TIMEOUT, self.insert_missing(group, &batches, clean)).await {
            Ok(result) => result,
            Err(_) => Err(OutboxError::Busy(format!("inserting group {group}'s events took over {INSERT_TIMEOUT:?}"))),
        };
        if let Err(e) = inserted {
            // ClickHouse refused the insert: it did not land, the next flusher may go at once
            // (the lease expires now). Anything else (a cut connection, a timeout) may still
            // land: the lease stays a little longer. Either way the lease is never removed:
            // an earlier insert of this cycle may have landed, so the next flusher counts.
            let definite = matches!(e, OutboxError::ClickHouse(clickhouse::error::Error::BadResponse(_)));
            let grace = if definite { 0 } else { AMBIGUOUS_GRACE.as_millis() as i64 };
            let until = DateTime::from_millis(DateTime::now().timestamp_millis() + grace);
            let release = doc! { "$set": { "flushLease.until": until } };
            let _ = self.groups().update_one(doc! { "_id": group, "flushLease.by": &lease_id }, release).await;
            return Err(e);
        }
        let inserted_at = started.elapsed();
        let ids: Vec<&str> = batches.iter().map(|b| b.batch_id.as_str()).collect();
        // When no batch arrived meanwhile, the outbox empties: the flag goes too. When this
        // process committed more since the flush began, that update cannot match: skip it.
        let more = self.state(group).dirty.load(Ordering::SeqCst);
        let emptied = !more
            && self
                .groups()
                .update_one(
                    doc! { "_id": group, "flushLease.by": &lease_id, "outbox": { "$size": ids.len() as i64 } },
                    doc! {
                        "$pull": { "outbox": { "batchId": { "$in": &ids } } },
                        "$unset": { "flushLease": "", "outboxPending": "" },
                    },
                )
                .await?
                .matched_count
                > 0;
        if !emptied {
            self.groups()
                .update_one(
                    doc! { "_id": group, "flushLease.by": &lease_id },
                    doc! { "$pull": { "outbox": { "batchId": { "$in": &ids } } }, "$unset": { "flushLease": "" } },
                )
                .await?;
        }
        // A writer's remembered copy of the document still lists these batches.
        if let Some(through) = batches.iter().map(|b| b.version).max() {
            self.store.batches_flushed("Group", group, through);
        }
        outbox::forget_chunks(&self.db, &batches).await?;
        // Where a flush's time goes (`ROSTER_LOG=roster::group=debug`), cumulative.
        tracing::debug!(
            group,
            batches = batches.len(),
            leased_us = leased_at.as_micros() as u64,
            inserted_us = inserted_at.as_micros() as u64,
            pulled_us = started.elapsed().as_micros() as u64,
            "flush timings"
        );
        Ok(Cycle::Done)
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
