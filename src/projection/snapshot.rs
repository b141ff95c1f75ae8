//! Snapshots: a projection's (or a folded stream's) serialized state at a position, in
//! MongoDB (`Projection_Snapshots`). They shorten rebuilds and temporal queries; losing
//! one costs time, never correctness (everything can be replayed from the log).

use bson::{doc, Document};
use mongodb::options::FindOneOptions;
use mongodb::{Collection, Database};

pub const COLLECTION: &str = "Projection_Snapshots";
/// States above this are not stored (a MongoDB document holds 16 MiB).
pub const MAX_STATE_BYTES: usize = 15 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// A projection name, or e.g. `patient_state:MRN-1` for a folded stream.
    pub name: String,
    /// Position of the last event folded into `state`.
    pub position: u64,
    /// Timestamp (ms) of that event.
    pub timestamp: i64,
    /// The state, serialized (JSON).
    pub state: String,
}

#[derive(Clone)]
pub struct SnapshotStore {
    snapshots: Collection<Document>,
}

impl SnapshotStore {
    pub fn new(db: &Database) -> SnapshotStore {
        SnapshotStore { snapshots: db.collection(COLLECTION) }
    }

    /// Saves `s` (again: replaces). `false` when the state is too large to store.
    pub async fn save(&self, s: &Snapshot) -> Result<bool, mongodb::error::Error> {
        if s.state.len() > MAX_STATE_BYTES {
            tracing::warn!(name = %s.name, bytes = s.state.len(), "snapshot too large to store; skipped");
            return Ok(false);
        }
        let id = format!("{}@{}", s.name, s.position);
        let d = doc! {
            "_id": &id, "name": &s.name, "position": s.position as i64, "timestamp": s.timestamp,
            "state": &s.state, "createdAt": bson::DateTime::now(),
        };
        self.snapshots.replace_one(doc! { "_id": &id }, d).upsert(true).await?;
        Ok(true)
    }

    /// The latest snapshot of `name` at or before `position` (any when `None`).
    pub async fn latest(&self, name: &str, position: Option<u64>) -> Result<Option<Snapshot>, mongodb::error::Error> {
        let mut filter = doc! { "name": name };
        if let Some(p) = position {
            filter.insert("position", doc! { "$lte": p as i64 });
        }
        self.find_latest(filter).await
    }

    /// The latest snapshot of `name` whose last event is not after `timestamp` (ms).
    pub async fn latest_at(&self, name: &str, timestamp: i64) -> Result<Option<Snapshot>, mongodb::error::Error> {
        self.find_latest(doc! { "name": name, "timestamp": { "$lte": timestamp } }).await
    }

    async fn find_latest(&self, filter: Document) -> Result<Option<Snapshot>, mongodb::error::Error> {
        let options = FindOneOptions::builder().sort(doc! { "position": -1 }).build();
        let found = self.snapshots.find_one(filter).with_options(options).await?;
        Ok(found.map(|d| Snapshot {
            name: d.get_str("name").unwrap_or_default().to_string(),
            position: d.get_i64("position").unwrap_or(0) as u64,
            timestamp: d.get_i64("timestamp").unwrap_or(0),
            state: d.get_str("state").unwrap_or_default().to_string(),
        }))
    }
}
