//! Rebuilding a projection while the server serves: replay the log into shadow tables
//! (`…_rebuild`), then take the projection's lease, catch up the last events, swap the
//! shadow tables in (`EXCHANGE TABLES`, atomic) and move the checkpoint. The live tables
//! answer queries until the swap; the runner resumes after it from the new checkpoint.
//! A runner that wrote to the live tables meanwhile wrote rows the rebuild also wrote
//! (every row is keyed by its event's position), so nothing is counted twice.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::runner::{Checkpoints, ProjectionState};
use super::snapshot::SnapshotStore;
use super::{Projection, ProjectionError, Target};
use crate::eventstore::log::ClickHouseEventStore;
use crate::eventstore::EventStore;

const BATCH: usize = 50_000;
/// The lease a rebuild holds while it swaps tables.
const SWAP_LEASE: Duration = Duration::from_secs(60);

/// Where a rebuild is, for a progress bar (which works out rate and time left).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    /// Events replayed (after the snapshot, if one was used).
    pub events: u64,
    pub elapsed: Duration,
    /// Position of the snapshot started from.
    pub snapshot: Option<u64>,
    /// Rows per table in the rebuilt model.
    pub rows: Vec<(String, u64)>,
    /// The rebuilt tables replaced the live ones (false for a dry run).
    pub swapped: bool,
    /// The checkpoint after the rebuild.
    pub position: i64,
}

pub struct Rebuild<'a> {
    pub ch: &'a clickhouse::Client,
    pub store: &'a ClickHouseEventStore,
    pub checkpoints: &'a Checkpoints,
    pub snapshots: &'a SnapshotStore,
}

impl Rebuild<'_> {
    pub async fn run(
        &self,
        p: &dyn Projection,
        from_snapshot: bool,
        dry_run: bool,
        mut progress: impl FnMut(Progress),
    ) -> Result<Report, ProjectionError> {
        let started = Instant::now();
        for table in p.tables() {
            let shadow = Target::SHADOW.table(table);
            self.ch.query(&format!("DROP TABLE IF EXISTS {shadow}")).execute().await?;
            self.ch.query(&format!("CREATE TABLE {shadow} AS {table}")).execute().await?;
        }
        let mut snapshot = None;
        if from_snapshot {
            let s = p.snapshots().ok_or_else(|| {
                ProjectionError::Unavailable(format!(
                    "{} does not take snapshots; rebuild without --from-snapshot",
                    p.name()
                ))
            })?;
            if let Some(found) = self.snapshots.latest(p.name(), None).await? {
                s.restore(self.ch, &Target::SHADOW, &found.state).await?;
                snapshot = Some(found.position);
            }
        }
        let mut next = snapshot.map_or(0, |p| p + 1);
        let first = next;
        let total = (self.store.last_position().await? + 1) as u64;
        while next < total {
            next = self.batch(p, next, total).await?;
            progress(Progress { done: next - first, total: total - first });
        }
        if dry_run {
            let rows = self.rows(p, &Target::SHADOW).await?;
            self.drop_shadow(p).await?;
            let position = self.checkpoints.status(p.name()).await?.position;
            return Ok(Report {
                name: p.name().into(),
                events: next - first,
                elapsed: started.elapsed(),
                snapshot,
                rows,
                swapped: false,
                position,
            });
        }
        // Swap: stop the runner (take its lease), catch up, exchange, hand back.
        let holder = format!("rebuild-{}", Uuid::new_v4());
        self.checkpoints.seize(p.name(), &holder, SWAP_LEASE).await?;
        let end = (self.store.last_position().await? + 1) as u64;
        while next < end {
            next = self.batch(p, next, end).await?;
        }
        for table in p.tables() {
            self.ch.query(&format!("EXCHANGE TABLES {table} AND {}", Target::SHADOW.table(table))).execute().await?;
        }
        let position = next as i64 - 1;
        self.checkpoints.set(p.name(), position, ProjectionState::Running, true).await?;
        self.drop_shadow(p).await?;
        let rows = self.rows(p, &Target::LIVE).await?;
        Ok(Report {
            name: p.name().into(),
            events: next - first,
            elapsed: started.elapsed(),
            snapshot,
            rows,
            swapped: true,
            position,
        })
    }

    /// Replays one batch from `next` (below `until`) into the shadow tables; returns the
    /// position after it.
    async fn batch(&self, p: &dyn Projection, next: u64, until: u64) -> Result<u64, ProjectionError> {
        let events = self.store.read_log(next, BATCH.min((until - next) as usize)).await?;
        let Some(last) = events.last().map(|e| e.position) else { return Ok(until) };
        p.handle(self.ch, &Target::SHADOW, &events).await?;
        Ok(last + 1)
    }

    async fn rows(&self, p: &dyn Projection, target: &Target) -> Result<Vec<(String, u64)>, ProjectionError> {
        let mut out = Vec::new();
        for table in p.tables() {
            let n: u64 =
                self.ch.query(&format!("SELECT count() FROM {} FINAL", target.table(table))).fetch_one().await?;
            out.push((table.to_string(), n));
        }
        Ok(out)
    }

    async fn drop_shadow(&self, p: &dyn Projection) -> Result<(), ProjectionError> {
        for table in p.tables() {
            self.ch.query(&format!("DROP TABLE IF EXISTS {}", Target::SHADOW.table(table))).execute().await?;
        }
        Ok(())
    }
}
