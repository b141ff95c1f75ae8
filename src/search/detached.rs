//! References a type keeps out of its stored content, so the key index has none of them:
//! a Group's `member` (event-sourced in ClickHouse, see `group`). The type answers them
//! itself through this trait; generic search code never names the type.
//!
//! - `Group?member=Patient/1` and the Patient compartment's Groups: [`sources_of`];
//! - `Patient?_has:Group:member:_id=G`: a subquery of the targets ([`write_targets`]),
//!   which also drives the search when nothing else narrows it, so a page of a
//!   million-member Group costs one range read, not a million ids.
//!
//! [`sources_of`]: DetachedReferences::sources_of
//! [`write_targets`]: DetachedReferences::write_targets

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::sql::Sql;

pub trait DetachedReferences: Send + Sync + 'static {
    /// Whether `source_type.code` is such a reference.
    fn covers(&self, source_type: &str, code: &str) -> bool;

    /// The sources (ids) that refer to `target` (`Type/id`), as of every acknowledged write.
    fn sources_of<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>>;

    /// Makes every acknowledged change of these sources visible to [`Self::write_targets`].
    fn settle<'a>(&'a self, sources: &'a [String]) -> BoxFuture<'a, Result<(), String>>;

    /// A subquery whose single column `id` lists the ids of `target_type` resources these
    /// sources refer to, only those after `after` when given, only those `among` these
    /// ids when given (looked up, not filtered from all); with `limit`, the first `limit`
    /// of them in ascending order (read in the table's order, so a page of a million
    /// targets costs a page).
    fn write_targets(
        &self,
        sql: &mut Sql,
        sources: &[String],
        target_type: &str,
        after: Option<&str>,
        among: Option<&[String]>,
        limit: Option<u64>,
    );
}

/// A resolved `_has` over a detached reference: targets referred to by these sources.
#[derive(Clone)]
pub struct Targets {
    pub refs: Arc<dyn DetachedReferences>,
    pub sources: Vec<String>,
    pub target_type: String,
    /// Of the documents a search reads from MongoDB, those among the targets (filled by
    /// the engine before it evaluates them).
    pub among: Arc<HashSet<String>>,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Targets({} of {} sources)", self.target_type, self.sources.len())
    }
}
