//! Projections: durable read models in ClickHouse, fed from the event store's log.
//!
//! A [`Projection`] turns batches of events into rows of its tables. The [`runner`] feeds
//! each projection in its own task, records its checkpoint (the last position handled) in
//! MongoDB, and holds a per-projection lease so that one runner at a time, across all
//! processes, feeds it. Delivery is at least once (a crash between the rows and the
//! checkpoint replays the batch); every row is keyed by the position of the event that
//! wrote it, so a replay rewrites the same rows: the effect is exactly once.
//!
//! Built-in projections are in [`builtin`]; [`snapshot`] stores serialized states;
//! [`rebuild`] replays a projection into shadow tables and swaps them in; [`temporal`]
//! answers "what was true at time T".

pub mod builtin;
pub mod rebuild;
pub mod runner;
pub mod snapshot;
pub mod temporal;

use futures_util::future::BoxFuture;

use crate::eventstore::StoredEvent;

/// Where a projection writes: its live tables, or the shadow copies a rebuild fills.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    suffix: &'static str,
}

impl Target {
    pub const LIVE: Target = Target { suffix: "" };
    pub const SHADOW: Target = Target { suffix: "_rebuild" };

    /// The name of `table` in this target. Table names are the projections' own
    /// constants, never request data.
    pub fn table(&self, table: &str) -> String {
        format!("{table}{}", self.suffix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// An event the projection cannot apply: the projection stops and reports it.
    #[error("event at position {position} cannot be applied: {message}")]
    Poison { position: u64, message: String },
    /// A store failed; the batch is retried.
    #[error("{0}")]
    Unavailable(String),
}

impl From<clickhouse::error::Error> for ProjectionError {
    fn from(e: clickhouse::error::Error) -> Self {
        ProjectionError::Unavailable(format!("ClickHouse: {e}"))
    }
}

impl From<mongodb::error::Error> for ProjectionError {
    fn from(e: mongodb::error::Error) -> Self {
        ProjectionError::Unavailable(format!("MongoDB: {e}"))
    }
}

impl From<crate::eventstore::EventStoreError> for ProjectionError {
    fn from(e: crate::eventstore::EventStoreError) -> Self {
        ProjectionError::Unavailable(e.to_string())
    }
}

/// A read model fed from the log.
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// The ClickHouse tables it writes (a rebuild shadows and swaps each).
    fn tables(&self) -> &'static [&'static str];

    /// Applies a batch of events, in position order, to `target`. Must be idempotent per
    /// position: applying an event again rewrites the same rows.
    fn handle<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    /// Snapshot support, for projections whose state is small next to their history.
    fn snapshots(&self) -> Option<&dyn Snapshotting> {
        None
    }
}

/// A projection whose whole state can be saved at a position and restored.
pub trait Snapshotting: Send + Sync {
    /// Whether to save a snapshot after a batch ending at `position`, `since` events after
    /// the last snapshot.
    fn should_snapshot(&self, position: u64, since: u64) -> bool;
    /// The state of `target`, serialized (JSON).
    fn serialize<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<String, ProjectionError>>;
    /// Writes a serialized state into `target` (empty before).
    fn restore<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        state: &'a str,
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;
}
