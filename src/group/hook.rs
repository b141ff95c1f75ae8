//! The post-save hook that syncs the member array of a full-resource write (POST/PUT) to
//! ClickHouse: the write path staged the member events in the outbox with the commit; this
//! hook inserts them. A member PATCH inserts its own events and sets
//! [`Flag::MemberEventsWritten`], so the hook skips it: member processing happens once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::flusher::Flusher;
use crate::pipeline::{Flag, HookError, PostSaveHook, RequestContext, Saved};

pub struct GroupMemberSync {
    flusher: Arc<Flusher>,
    /// Writes whose member batch this hook inserted.
    pub synced: AtomicU64,
    /// Writes it skipped because their events were already written.
    pub skipped: AtomicU64,
}

impl GroupMemberSync {
    pub fn new(flusher: Arc<Flusher>) -> Self {
        GroupMemberSync { flusher, synced: AtomicU64::new(0), skipped: AtomicU64::new(0) }
    }
}

impl PostSaveHook for GroupMemberSync {
    fn name(&self) -> &'static str {
        "group-member-sync"
    }

    fn after_save<'a>(&'a self, ctx: &'a RequestContext, saved: &'a Saved<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            if saved.resource_type != "Group" {
                return Ok(());
            }
            if ctx.has(Flag::MemberEventsWritten) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The batch stays in MongoDB if this fails; a read or the sweep finishes it.
            self.flusher.flush(saved.id).await.map_err(|e| HookError(e.to_string()))?;
            self.synced.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
}
