//! Stage 4, commit: writes the drafted version under the version guard, with what the
//! type's share planned (see `store::mongo` for the protocol). This is the commit point:
//! before it nothing of the write is visible; after it the write is acknowledged.
//!
//! A lost version race wrote nothing: the attempt is retried (or 412 under `If-Match`).
//! Any other failure may or may not have committed, so what this process remembers of the
//! resource is dropped and the client gets a 5xx; the next reader or writer finds the
//! truth in MongoDB.

use bson::Document;

use super::behaviour::{Failed, Planned, Share};
use super::draft::Content;
use super::load::Loaded;
use super::Stop;
use crate::error::FhirError;
use crate::store::{Commit, ResourceStore, StoreError, Writes};

/// Where the commit goes and under which preconditions.
pub(super) struct Target<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub if_match: Option<i64>,
    pub writes: Writes,
    /// Some post-save hook's work must survive a crash (see `PostSaveHook::durable_for`).
    pub events_pending: bool,
}

pub(super) async fn commit(
    store: &ResourceStore,
    t: &Target<'_>,
    loaded: &Loaded,
    content: &mut Content,
    planned: Planned,
    share: &mut dyn Share,
) -> Result<Document, Stop> {
    let (rt, id) = (t.resource_type, t.id);
    let current = loaded.current.as_ref();
    // The base version goes to the log when it is not in history yet (only a meta-only
    // write defers that; every other write finds the log copied and empty).
    let mut version_log = current.map_or_else(Vec::new, |c| c.version_log.clone());
    if let Some(c) = current.filter(|c| c.history_pending) {
        version_log.push(c.log_entry());
    }
    let commit = Commit {
        id,
        version_log,
        base: current.map(|c| c.version),
        version: content.version,
        last_updated: content.last_updated,
        method: content.interaction.method(),
        resource: content.document.take(),
        meta_only: t.writes == Writes::MetaOnly,
        outbox: planned.outbox,
        member_count: planned.member_count,
        events_pending: t.events_pending,
        search: content.search.take(),
    };
    match store.commit(rt, commit).await {
        Ok(committed) => Ok(committed),
        Err(StoreError::Conflict) => {
            share.abandon(Failed::LostRace).await;
            if loaded.guessed {
                store.forget_recent(rt, id);
                return Err(Stop::Retry);
            }
            match t.if_match {
                Some(expected) => Err(Stop::Fail(FhirError::precondition_failed(format!(
                    "{rt}/{id} changed concurrently; W/\"{expected}\" is no longer current"
                )))),
                None => Err(Stop::Retry),
            }
        }
        Err(e) => {
            store.forget_recent(rt, id);
            share.abandon(Failed::Unknown).await;
            Err(Stop::Fail(FhirError::from(e)))
        }
    }
}
