//! Feeds projections from the log: one task per projection, checkpoints and leases in
//! MongoDB (`Projections`, one document per projection).
//!
//! A task takes its projection's lease (a conditional update; [`LEASE`] long, renewed with
//! each checkpoint), reads batches from its checkpoint on, lets the projection write them,
//! then moves the checkpoint, guarded by the lease: a runner that lost its lease cannot
//! move it. Between batches it waits for new events (woken by local appends, else it
//! looks every 100 ms), and a batch that did not fill is followed by the next no sooner
//! than [`GATHER`] after it began (one insert and one checkpoint per interval under a
//! stream of small appends, not one per append). A store failure retries the batch after a pause; a poison event
//! marks the projection `failed` at that position and stops it (a rebuild, or
//! `roster projection reset`, clears that) while the other projections go on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use mongodb::{Collection, Database};
use serde::Serialize;
use uuid::Uuid;

use super::snapshot::{Snapshot, SnapshotStore};
use super::{Projection, ProjectionError, Target};
use crate::eventstore::log::ClickHouseEventStore;
use crate::eventstore::EventStore;
use crate::store::lease::{Lease, Taken};

pub const COLLECTION: &str = "Projections";
/// How long a runner's lease on a projection lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(15);
const RETRY_PAUSE: Duration = Duration::from_secs(1);
const LEASE_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct RunnerConfig {
    /// Events per batch.
    pub batch: usize,
    pub lease: Duration,
    /// After a batch that did not fill, the next starts no sooner than this after it: under
    /// a stream of single writes each batch would otherwise hold one event and cost a
    /// ClickHouse insert and a MongoDB checkpoint (three projections: three of each per
    /// FHIR create). A projection trails the log by at most this much more.
    pub gather: Duration,
}

/// The default [`RunnerConfig::gather`]: each runner inserts into ClickHouse at most four
/// times a second under a stream of small appends (three runners at 100 ms cost ~6 ms of
/// ClickHouse CPU per FHIR create at 100 creates/s).
pub const GATHER: Duration = Duration::from_millis(250);

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig { batch: 10_000, lease: LEASE, gather: GATHER }
    }
}

/// What a projection is doing, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionState {
    /// Never run.
    Idle,
    /// Fed by a runner (or ready to be).
    Running,
    /// Stopped on an event it could not handle (`error`, `failedPosition`); fed again after a
    /// rebuild or reset.
    Failed,
    /// Being rebuilt into shadow tables; not fed meanwhile.
    Rebuilding,
}

impl ProjectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionState::Idle => "idle",
            ProjectionState::Running => "running",
            ProjectionState::Failed => "failed",
            ProjectionState::Rebuilding => "rebuilding",
        }
    }

    /// The stored text; anything unknown reads as `Failed` (not fed until someone looks).
    fn parse(text: Option<&str>) -> ProjectionState {
        match text {
            None | Some("idle") => ProjectionState::Idle,
            Some("running") => ProjectionState::Running,
            Some("rebuilding") => ProjectionState::Rebuilding,
            Some(_) => ProjectionState::Failed,
        }
    }

    /// Whether a runner may feed the projection.
    pub fn is_fed(self) -> bool {
        matches!(self, ProjectionState::Idle | ProjectionState::Running)
    }
}

impl std::fmt::Display for ProjectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A projection's record: checkpoint, state, lease.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub state: ProjectionState,
    /// Last position handled, -1 for none.
    pub position: i64,
    pub events_processed: i64,
    pub error: Option<String>,
    pub failed_position: Option<i64>,
    pub lease_holder: Option<String>,
    /// Last checkpoint time, ms.
    pub updated_at: Option<i64>,
}

impl Status {
    fn from_doc(name: &str, d: Option<&Document>) -> Status {
        let get_i64 = |k: &str| d.and_then(|d| d.get_i64(k).ok());
        Status {
            name: name.to_string(),
            state: ProjectionState::parse(d.and_then(|d| d.get_str("state").ok())),
            position: get_i64("position").unwrap_or(-1),
            events_processed: get_i64("eventsProcessed").unwrap_or(0),
            error: d.and_then(|d| d.get_str("error").ok()).map(str::to_string),
            failed_position: get_i64("failedPosition"),
            lease_holder: d
                .and_then(|d| d.get_document("lease").ok())
                .filter(|l| l.get_datetime("until").is_ok_and(|u| *u > DateTime::now()))
                .and_then(|l| l.get_str("by").ok())
                .map(str::to_string),
            updated_at: d.and_then(|d| d.get_datetime("updatedAt").ok()).map(|t| t.timestamp_millis()),
        }
    }
}

/// Checkpoints and leases of projections.
#[derive(Clone)]
pub struct Checkpoints {
    docs: Collection<Document>,
}

impl Checkpoints {
    pub fn new(db: &Database) -> Checkpoints {
        Checkpoints { docs: db.collection(COLLECTION) }
    }

    pub async fn status(&self, name: &str) -> Result<Status, mongodb::error::Error> {
        let d = self.docs.find_one(doc! { "_id": name }).await?;
        Ok(Status::from_doc(name, d.as_ref()))
    }

    /// Takes the lease of `name` for `holder` if it is free, expired, held by a process
    /// that is gone, or already `holder`'s (a renewal; see `store::lease`). Returns the
    /// record as it was.
    pub async fn take(&self, name: &str, holder: &str, lease: Duration) -> Result<Option<Status>, ProjectionError> {
        let lease = Lease::new(self.docs.clone(), "lease", lease).creating();
        match lease.take(&doc! { "_id": name }, holder, Document::new()).await? {
            Taken::Granted(before) => Ok(Some(Status::from_doc(name, before.as_ref()))),
            Taken::Held | Taken::Absent => Ok(None),
        }
    }

    /// Moves the checkpoint to `position` (and renews the lease); `false` when `holder`
    /// no longer holds the lease.
    pub async fn advance(
        &self,
        name: &str,
        holder: &str,
        position: u64,
        handled: u64,
        lease: Duration,
    ) -> Result<bool, ProjectionError> {
        let until = DateTime::from_millis(DateTime::now().timestamp_millis() + lease.as_millis() as i64);
        let r = self
            .docs
            .update_one(
                doc! { "_id": name, "lease.by": holder },
                doc! {
                    "$set": { "position": position as i64, "state": "running", "updatedAt": DateTime::now(), "lease.until": until },
                    "$inc": { "eventsProcessed": handled as i64 },
                    "$unset": { "error": "", "failedPosition": "" },
                },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Extends `holder`'s lease; `false` when it no longer holds it.
    pub async fn renew(&self, name: &str, holder: &str, lease: Duration) -> Result<bool, ProjectionError> {
        let until = DateTime::from_millis(DateTime::now().timestamp_millis() + lease.as_millis() as i64);
        let r = self
            .docs
            .update_one(
                doc! { "_id": name, "lease.by": holder },
                doc! { "$set": { "lease.until": until, "state": "running" } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Marks `name` failed at `position`.
    pub async fn fail(&self, name: &str, holder: &str, position: u64, error: &str) -> Result<(), ProjectionError> {
        self.docs
            .update_one(
                doc! { "_id": name, "lease.by": holder },
                doc! { "$set": { "state": "failed", "error": error, "failedPosition": position as i64, "updatedAt": DateTime::now() } },
            )
            .await?;
        Ok(())
    }

    /// Sets the checkpoint and state outright (rebuild, reset), keeping the lease with
    /// `holder` or dropping it.
    pub async fn set(
        &self,
        name: &str,
        position: i64,
        state: ProjectionState,
        release: bool,
    ) -> Result<(), ProjectionError> {
        let mut update = doc! {
            "$set": { "position": position, "state": state.as_str(), "updatedAt": DateTime::now() },
            "$unset": { "error": "", "failedPosition": "" },
        };
        if release {
            update.get_document_mut("$unset").expect("built above").insert("lease", "");
        }
        self.docs.update_one(doc! { "_id": name }, update).upsert(true).await?;
        Ok(())
    }

    /// Takes the lease whoever holds it (a rebuild swapping tables in); the runner that
    /// held it finds out at its next checkpoint.
    pub async fn seize(&self, name: &str, holder: &str, lease: Duration) -> Result<(), ProjectionError> {
        self.docs
            .update_one(doc! { "_id": name }, doc! { "$set": { "lease": crate::store::lease::grant(holder, lease) } })
            .upsert(true)
            .await?;
        Ok(())
    }

    pub async fn release(&self, name: &str, holder: &str) -> Result<(), ProjectionError> {
        self.docs.update_one(doc! { "_id": name, "lease.by": holder }, doc! { "$unset": { "lease": "" } }).await?;
        Ok(())
    }
}

/// Runs projections until dropped.
pub struct Runner {
    pub store: Arc<ClickHouseEventStore>,
    pub ch: clickhouse::Client,
    pub checkpoints: Checkpoints,
    pub snapshots: SnapshotStore,
    pub config: RunnerConfig,
    /// Names this runner in leases.
    pub id: String,
}

impl Runner {
    pub fn new(
        db: &Database,
        ch: clickhouse::Client,
        store: Arc<ClickHouseEventStore>,
        config: RunnerConfig,
    ) -> Arc<Runner> {
        Arc::new(Runner {
            store,
            ch,
            checkpoints: Checkpoints::new(db),
            snapshots: SnapshotStore::new(db),
            config,
            id: format!("runner-{}", Uuid::new_v4()),
        })
    }

    /// One task per projection; abort the handles to stop.
    pub fn spawn(self: &Arc<Self>, projections: Vec<Arc<dyn Projection>>) -> Vec<tokio::task::JoinHandle<()>> {
        self.spawn_supervised(&crate::supervise::Tasks::default(), projections)
    }

    /// [`Self::spawn`], each projection's feeding a task of `tasks` (restarted after a
    /// panic, reported while down).
    pub fn spawn_supervised(
        self: &Arc<Self>,
        tasks: &crate::supervise::Tasks,
        projections: Vec<Arc<dyn Projection>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        projections
            .into_iter()
            .map(|p| {
                let runner = self.clone();
                tasks.spawn(format!("projection {}", p.name()), move || {
                    let (runner, p) = (runner.clone(), p.clone());
                    async move { runner.feed(p).await }
                })
            })
            .collect()
    }

    /// Feeds one projection forever: waits for its lease, then batches.
    async fn feed(&self, p: Arc<dyn Projection>) {
        loop {
            match self.checkpoints.take(p.name(), &self.id, self.config.lease).await {
                Ok(Some(status)) if !status.state.is_fed() => {
                    // Held but not to be fed: wait for a rebuild or reset.
                    let _ = self.checkpoints.release(p.name(), &self.id).await;
                    tokio::time::sleep(LEASE_POLL * 4).await;
                }
                Ok(Some(status)) => {
                    if let Err(e) = self.feed_held(&*p, status.position).await {
                        tracing::warn!(projection = p.name(), error = %e, "projection paused; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Ok(None) => tokio::time::sleep(LEASE_POLL).await,
                Err(e) => {
                    tracing::warn!(projection = p.name(), error = %e, "cannot take the projection lease");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Feeds while the lease holds. Returns `Ok` when the lease is lost or the projection
    /// failed (the caller goes back to waiting), `Err` on a store failure.
    async fn feed_held(&self, p: &dyn Projection, checkpoint: i64) -> Result<(), ProjectionError> {
        let mut position = checkpoint;
        let mut since_snapshot = 0u64;
        let mut renewed = Instant::now();
        loop {
            let started = Instant::now();
            let events = self.store.read_log((position + 1) as u64, self.config.batch).await?;
            let Some(last) = events.last().map(|e| e.position) else {
                // Idle: keep the lease fresh, then wait for appends.
                if renewed.elapsed() > self.config.lease / 3 {
                    if !self.checkpoints.renew(p.name(), &self.id, self.config.lease).await? {
                        return Ok(());
                    }
                    renewed = Instant::now();
                }
                self.store.wait_for_more(position).await;
                continue;
            };
            match p.handle(&self.ch, &Target::LIVE, &events).await {
                Ok(()) => {}
                Err(ProjectionError::Poison { position: at, message }) => {
                    tracing::error!(projection = p.name(), position = at, error = %message, "projection failed on an event");
                    self.checkpoints.fail(p.name(), &self.id, at, &message).await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            if !self.checkpoints.advance(p.name(), &self.id, last, events.len() as u64, self.config.lease).await? {
                return Ok(());
            }
            renewed = Instant::now();
            position = last as i64;
            since_snapshot += events.len() as u64;
            if let Some(s) = p.snapshots().filter(|s| s.should_snapshot(last, since_snapshot)) {
                let state = s.serialize(&self.ch, &Target::LIVE).await?;
                let timestamp = events.last().map_or(0, |e| e.timestamp);
                self.snapshots.save(&Snapshot { name: p.name().to_string(), position: last, timestamp, state }).await?;
                since_snapshot = 0;
            }
            if events.len() < self.config.batch {
                tokio::time::sleep(self.config.gather.saturating_sub(started.elapsed())).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_states_read_back_and_unknown_ones_are_not_fed() {
        for state in
            [ProjectionState::Idle, ProjectionState::Running, ProjectionState::Failed, ProjectionState::Rebuilding]
        {
            assert_eq!(ProjectionState::parse(Some(state.as_str())), state);
        }
        assert_eq!(ProjectionState::parse(None), ProjectionState::Idle);
        assert!(!ProjectionState::parse(Some("paused-by-someone")).is_fed());
        assert!(ProjectionState::Running.is_fed() && !ProjectionState::Rebuilding.is_fed());
    }
}
