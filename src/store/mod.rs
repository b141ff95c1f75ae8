//! Storage of FHIR resources in MongoDB: one collection per type for current versions, one
//! for history (`Patient_4_0_0`, `Patient_4_0_0_History`).
//!
//! Document layout (the resource itself is nested, so internal fields can never collide
//! with FHIR's `_element` primitive extensions):
//!
//! ```text
//! current: { _id: <id>, versionId: Int64, lastUpdated: Date, deleted: bool,
//!            historyPending?: true, resource?: { ...FHIR JSON... },
//!            versionLog?: "[[versionId, lastUpdated ms, method, memberCount?]…]",
//!            _s?: [search key…], searchAdded?: [key…], searchRemoved?: [key…],
//!            searchChangedAt?: [versionId…] (aligned with searchAdded then searchRemoved),
//!            Groups only: memberCount, outbox?: [batch…], outboxPending?, flushLease? }
//! history: { _id: "<id>/<versionId>", id, versionId, lastUpdated, deleted, method,
//!            resource? }
//! ```
//!
//! Write protocol, without multi-document transactions:
//! 1. the current document is written with a version guard (`insert` for version 1, an
//!    `update where versionId = base` after): this is the commit point, and two writers
//!    from the same base can never both succeed; the client is answered;
//! 2. the history copy is inserted (idempotent: its `_id` is the version);
//! 3. the version's search keys reach ClickHouse's index (`searchAdded`/`searchRemoved`:
//!    the keys changed since the last version known to be indexed, accumulated over
//!    versions, with the version of each one's last change), concurrently with 2;
//! 4. `historyPending` is cleared, with the two search fields (skipped when a newer version
//!    followed: its commit overwrote the flag).
//!
//! So a document without `historyPending` has its search keys in the index: searches take
//! the index's answer for every resource but the flagged ones, which they read from
//! MongoDB (the `pending_work` index holds just those). That is how a search sees every
//! acknowledged write without waiting for ClickHouse.
//!
//! A write that changes only `meta` (a member-only Group PATCH) does not copy the version
//! it replaces: it appends that version's `meta` to the document's `versionLog`, and the
//! logged versions (the current content with their `meta`) are copied to history off the
//! request path, a few at a time while PATCHes keep coming (then left out of the log) and
//! all at once when they stop; or by the next reader of history, the next
//! content-changing write, or a writer that finds 64 logged.
//!
//! If the process or MongoDB fails after 1, the current document still carries
//! `historyPending`, and the copy is written by the next write of that resource, any
//! history read of its type, or the sweep at start-up. Nothing acknowledged is lost and no
//! version is written twice.

pub mod holder;
pub mod lease;
pub mod mongo;
pub mod ops;
pub mod version_log;

pub use mongo::{
    Base, BatchRows, Commit, MemberCount, OutboxBatch, PendingKeys, ResourceStore, SearchKeys, SearchSink, StoreError,
    Version, Writes,
};

/// A resource's identity in this server, `Patient/123`: the key of every per-resource map
/// and lock (one type, so a key is never built two ways).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(String);

impl ResourceKey {
    pub fn new(resource_type: &str, id: &str) -> ResourceKey {
        ResourceKey(format!("{resource_type}/{id}"))
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store failure at the HTTP edge: unreachable MongoDB, or a write whose outcome is
/// unknown, is a 503 (retry), anything else a 500; the driver's message is logged, not shown.
impl From<StoreError> for crate::error::FhirError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            crate::error::FhirError::unavailable("the resource store is unavailable; retry", e)
        } else if matches!(e, StoreError::Ambiguous) {
            crate::error::FhirError::unavailable("the write's outcome is unknown; read the resource before retrying", e)
        } else {
            crate::error::FhirError::internal(e)
        }
    }
}
