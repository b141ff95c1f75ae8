//! Stage 5, after the commit: the history copy and the search keys' flush to the index,
//! off the request path.
//!
//! The commit marked its version `historyPending` (and, for a type with a durable hook,
//! `eventsPending`); the copy to the history collection and the clearing of the flags
//! happen here, after the client's answer. When the durable hooks succeeded, both flags go
//! in one update right after the copy (a create or an update then costs MongoDB the commit,
//! the history insert and this one update). `historyPending` is cleared only once the
//! version's search keys are in ClickHouse's index (they go in batches, concurrently with
//! the copy): until then searches read the document from MongoDB (see `search::execute`). Whatever does not finish (a crash, MongoDB
//! down) stays marked in MongoDB and is finished by the next reader or writer of the
//! resource or by the sweeps: nothing acknowledged is lost.

use std::time::Duration;

use bson::Document;

use crate::store::{ResourceStore, Writes};

/// How long the background history copy waits before clearing the version's flag.
const QUIET_BEFORE_COPY: Duration = Duration::from_millis(100);

/// The mark a commit set for durable hooks (see `PostSaveHook::durable_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HookMark {
    /// No hook needed one.
    None,
    /// The hooks succeeded: it goes with the history flag.
    Done,
    /// A hook failed: it stays for that hook's sweep.
    Kept,
}

/// Copies the committed version to history in the background, then clears its flag (and
/// a [`HookMark::Done`] mark).
pub(super) fn copy_history_later(store: &ResourceStore, rt: &str, committed: Document, writes: Writes, mark: HookMark) {
    let store = store.clone();
    let rt = rt.to_string();
    let meta_only = writes == Writes::MetaOnly;
    tokio::spawn(async move {
        let id = committed.get_str("_id").unwrap_or_default().to_string();
        let version = committed.get_i64("versionId").unwrap_or_default();
        if mark == HookMark::Done && !meta_only {
            if let Err(e) = finish_both(&store, &rt, &committed, &id, version).await {
                tracing::warn!(resource_type = rt, id, version, error = %e, "history copy deferred to the next repair");
            }
            return;
        }
        if mark == HookMark::Done {
            if let Err(e) = store.clear_events_pending(&rt, &id, version).await {
                tracing::warn!(resource_type = rt, id, version, error = %e, "event mark left for the sweep");
            }
        }
        // A meta-only version waits: while such writes keep coming (member-only Group
        // PATCHes), each carries the previous versions in its log, copied a few at a time
        // as the log grows.
        if meta_only {
            if let Err(e) = store.copy_log_early(&rt, &committed).await {
                tracing::warn!(resource_type = rt, id, error = %e, "logged versions stay in the log for now");
            }
            tokio::time::sleep(QUIET_BEFORE_COPY).await;
            if store.superseded(&rt, &id, version) {
                // The next version carries this one's keys; but in a stream none would
                // reach the index until it pauses, and every commit would carry the
                // keys changed since (see `SearchKeys::next`): now and then one goes.
                if store.claim_search_flush(&rt, &id) {
                    if let Err(e) = store.flush_search(&rt, &committed).await {
                        tracing::warn!(resource_type = rt, id, version, error = %e, "search keys stay pending");
                    }
                }
                return;
            }
        }
        let (copied, indexed) = tokio::join!(store.copy_history(&rt, &committed), store.flush_search(&rt, &committed));
        let done = match copied.and(indexed) {
            Ok(false) => Ok(()), // not indexed here: the flag stays (see `store`)
            Ok(true) => {
                // The flag goes with the next commit anyway: while writes of the resource
                // keep coming, clearing it is a wasted write (MongoDB's time is the scarce
                // resource under a stream of PATCHes).
                if !meta_only {
                    tokio::time::sleep(QUIET_BEFORE_COPY).await;
                }
                if store.superseded(&rt, &id, version) {
                    Ok(())
                } else {
                    store.clear_history_flag(&rt, &id, version).await
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            tracing::warn!(resource_type = rt, id, version, error = %e, "history copy deferred to the next repair");
        }
    });
}

/// The history copy, then both flags in one update; each on its own when that update
/// cannot match (a newer version, other marked versions).
async fn finish_both(
    store: &ResourceStore,
    rt: &str,
    committed: &Document,
    id: &str,
    version: i64,
) -> Result<(), crate::store::StoreError> {
    let (copied, indexed) = tokio::join!(store.copy_history(rt, committed), store.flush_search(rt, committed));
    copied?;
    if !indexed? {
        // Not indexed here: the history flag stays (see `store`), the mark goes.
        return store.clear_events_pending(rt, id, version).await;
    }
    if store.clear_history_and_events_flags(rt, id, version).await? {
        return Ok(());
    }
    store.clear_events_pending(rt, id, version).await?;
    if !store.superseded(rt, id, version) {
        store.clear_history_flag(rt, id, version).await?;
    }
    Ok(())
}
