//! The post-save hook that syncs the member array of a full-resource write (POST/PUT) to
//! ClickHouse: the write path staged the member events in the outbox with the commit; this
//! hook inserts them. A member PATCH inserts its own events and sets
//! [`Flag::MemberEventsWritten`], so the hook skips it: member processing happens once.

use std::sync::atomic::{AtomicU64, Ordering};

use bson::{doc, Document};
use futures_util::future::BoxFuture;

use super::outbox;
use crate::pipeline::{Flag, HookError, PostSaveHook, RequestContext, Saved};
use crate::store::mongo::current_collection;

pub struct GroupMemberSync {
    db: mongodb::Database,
    ch: clickhouse::Client,
    /// Writes whose member batch this hook inserted.
    pub synced: AtomicU64,
    /// Writes it skipped because their events were already written.
    pub skipped: AtomicU64,
}

impl GroupMemberSync {
    pub fn new(db: mongodb::Database, ch: clickhouse::Client) -> Self {
        GroupMemberSync { db, ch, synced: AtomicU64::new(0), skipped: AtomicU64::new(0) }
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
            let current = self
                .db
                .collection::<Document>(&current_collection("Group"))
                .find_one(doc! { "_id": saved.id, "versionId": saved.version })
                .projection(doc! { "outbox": 1 })
                .await
                .map_err(|e| HookError(e.to_string()))?;
            // This write's batch (earlier ones may still be pending: their own flushers or
            // the next reader finish them).
            let mine: Vec<Document> = current
                .as_ref()
                .map(outbox::pending_in)
                .unwrap_or_default()
                .into_iter()
                .filter(|b| b.get_i64("version").ok() == Some(saved.version))
                .collect();
            if !mine.is_empty() {
                // The batch stays in MongoDB if this fails; a read or the sweep finishes it.
                outbox::flush(&self.db, &self.ch, saved.id, &mine, false)
                    .await
                    .map_err(|e| HookError(e.to_string()))?;
                self.synced.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }
}
