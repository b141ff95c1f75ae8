//! The Group's share of the write path (`pipeline::Behaviour`), when members are events.
//!
//! What it adds to the generic stages, in order:
//! 1. `begin`: a PATCH's `/member` operations are split from the rest (they become events,
//!    the rest patches the stored content); a POST/PUT brings its member array, parsed
//!    compactly by `group::body`, which replaces the membership;
//! 2. `plan`: the member operations are resolved against the membership at the base version
//!    (`plan`), and the events staged as one outbox batch that the commit pushes with the
//!    version (`outbox`); the active member count travels with the version;
//! 3. `abandon`: a lost version race deletes the staged batch's chunks; an unknown outcome
//!    drops the in-process member index of the group;
//! 4. `committed`: the member index follows the write, the committed document is
//!    remembered (with its pending batches) for the next PATCH, and a PATCH's batch is
//!    handed to the background flusher; the request context says so
//!    ([`Flag::MemberEventsWritten`]), so the member-sync hook leaves it alone.

use std::sync::Arc;

use bson::Document;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::body::CompactMember;
use super::flusher::Flusher;
use super::index::{Changes, Loading, MemberIndex};
use super::outbox::{self, OutboxError};
use super::plan::{Known, Origin, Planner};
use super::split::{self, MemberOp};
use crate::error::FhirError;
use crate::pipeline::behaviour::{Begun, Behaviour, Detached, Draft, Failed, Planned, Share};
use crate::pipeline::{Change, Flag, Interaction, RequestContext};
use crate::store::{MemberCount, OutboxBatch, ResourceStore, Version, Writes};

/// Reads and writes of Groups whose members are event-sourced.
#[derive(Clone)]
pub struct GroupWrites(Arc<Parts>);

struct Parts {
    store: ResourceStore,
    clickhouse: clickhouse::Client,
    flusher: Arc<Flusher>,
    index: Arc<MemberIndex>,
}

impl GroupWrites {
    pub fn new(
        store: ResourceStore,
        clickhouse: clickhouse::Client,
        flusher: Arc<Flusher>,
        index: Arc<MemberIndex>,
    ) -> GroupWrites {
        GroupWrites(Arc::new(Parts { store, clickhouse, flusher, index }))
    }
}

/// Finishes a group's pending member batches before its members are read, so nobody sees a
/// version whose events are missing (503 while ClickHouse is down).
pub async fn finish_pending(flusher: &Flusher, id: &str, current: &Version) -> Result<(), FhirError> {
    if !current.outbox.is_empty() {
        flusher.flush(id).await.map_err(outbox_error)?;
    }
    Ok(())
}

fn outbox_error(e: OutboxError) -> FhirError {
    match e {
        OutboxError::Corrupt(_) => FhirError::internal(e),
        OutboxError::Mongo(ref m)
            if !matches!(
                *m.kind,
                mongodb::error::ErrorKind::Io(_) | mongodb::error::ErrorKind::ServerSelection { .. }
            ) =>
        {
            FhirError::internal(e)
        }
        _ => FhirError::unavailable("could not finish the group's pending member events; retry", e),
    }
}

impl Behaviour for GroupWrites {
    fn detached_element(&self) -> Option<&'static str> {
        Some("member")
    }

    fn read_body(&self, json: &[u8], strict: bool) -> Option<Result<(Value, Option<Detached>), FhirError>> {
        Some(super::body::parse(json, strict).map(|body| (body.rest, body.members.map(Detached::new))))
    }

    fn begin(&self, id: &str, change: Change, detached: Option<Detached>) -> Result<Begun, FhirError> {
        let (change, members, patch_numbers) = match change {
            Change::Patch(patch) => {
                let split = split::split(patch).map_err(|e| FhirError::unprocessable(e.to_string()))?;
                (Change::Patch(split.other), Members::Ops(split.member), split.other_numbers)
            }
            body @ (Change::Create(_) | Change::Update(_)) => {
                let members = match detached {
                    None => Vec::new(),
                    Some(d) => d
                        .take::<Vec<CompactMember>>()
                        .ok_or_else(|| FhirError::internal("a Group body's members were not read by group::body"))?,
                };
                (body, Members::Replace(members), Vec::new())
            }
            Change::Delete => (Change::Delete, Members::Unchanged, Vec::new()),
        };
        let only_members = matches!(&change, Change::Patch(other) if other.is_empty());
        let share = MemberShare {
            group: self.clone(),
            id: id.to_string(),
            patch: matches!(change, Change::Patch(_)),
            only_members,
            members,
            attempt: Attempt::default(),
        };
        Ok(Begun { change, patch_numbers, share: Box::new(share) })
    }

    fn before_read<'a>(&'a self, id: &'a str, current: &'a Version) -> BoxFuture<'a, Result<(), FhirError>> {
        Box::pin(finish_pending(&self.0.flusher, id, current))
    }

    fn abridge(&self, resource: &mut Map<String, Value>, count: Option<u64>) {
        super::read::subsetted(resource, count);
    }
}

/// What a write does to the membership.
enum Members {
    /// A PATCH's member operations, with their index in the patch (maybe none).
    Ops(Vec<(usize, MemberOp)>),
    /// A full member array (POST, PUT): the membership becomes exactly this.
    Replace(Vec<CompactMember>),
    /// A delete.
    Unchanged,
}

/// What the current attempt planned, kept until its commit is known.
#[derive(Default)]
struct Attempt {
    staged: Option<OutboxBatch>,
    /// The planned events as the member index applies them.
    changes: Changes,
    /// The batches still pending at the base version as far as the plan knew them (after
    /// any it finished itself); `None`: it did not look, they are the base version's.
    pending_before: Option<Vec<OutboxBatch>>,
    /// The group had no active member at the base version.
    empty_before: bool,
}

struct MemberShare {
    group: GroupWrites,
    id: String,
    patch: bool,
    /// A PATCH with only member operations: the stored content stays as it is.
    only_members: bool,
    members: Members,
    attempt: Attempt,
}

impl Share for MemberShare {
    /// A member PATCH may start from the document this process committed last; anything
    /// that contradicts it (a failed guard, a precondition) reads for real.
    fn may_start_from_memory(&self) -> bool {
        self.patch
    }

    /// A member-only PATCH keeps the stored content: earlier versions not yet in history
    /// can wait in the document's version log (copied in batches) instead of one copy per
    /// version on the write path.
    fn writes(&self) -> Writes {
        if self.only_members {
            Writes::MetaOnly
        } else {
            Writes::Content
        }
    }

    fn plan<'a>(
        &'a mut self,
        ctx: &'a RequestContext,
        draft: &'a Draft<'a>,
    ) -> BoxFuture<'a, Result<Planned, FhirError>> {
        Box::pin(self.plan_members(ctx, draft))
    }

    fn abandon(&mut self, why: Failed) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let parts = &self.group.0;
            match (why, &self.attempt.staged) {
                // A lost race wrote nothing: its chunks are orphans.
                (Failed::LostRace, Some(batch)) => outbox::discard(parts.store.database(), batch).await,
                (Failed::LostRace, None) => {}
                // The commit may have happened, and its chunks may be referenced: they
                // stay; what this process knows of the members is no longer trustworthy.
                (Failed::Unknown, _) => parts.index.forget(&self.id),
            }
        })
    }

    fn committed(&mut self, ctx: &mut RequestContext, draft: &Draft<'_>, committed: &Document) {
        let parts = &self.group.0;
        let (id, base) = (draft.id, draft.base.map(|c| c.version));
        let attempt = std::mem::take(&mut self.attempt);
        if draft.interaction == Interaction::Delete {
            parts.index.forget(id);
            parts.store.forget_recent(draft.resource_type, id);
            return;
        }
        parts.index.advance(id, base, draft.version, attempt.empty_before, &attempt.changes);
        // A PATCH's events are inserted by the background flusher; a POST/PUT member array
        // is the sync hook's job. Hooks see which through the flag.
        if let (true, Some(batch)) = (self.patch, &attempt.staged) {
            ctx.set(Flag::MemberEventsWritten);
            parts.flusher.kick(id, batch.count.max(1) as usize);
        }
        // What MongoDB now holds: the commit's fields plus every batch still pending.
        let mut pending =
            attempt.pending_before.unwrap_or_else(|| draft.base.map_or_else(Vec::new, |c| c.outbox.clone()));
        pending.extend(attempt.staged);
        parts.store.remember_recent(draft.resource_type, id, committed, pending);
    }
}

impl MemberShare {
    async fn plan_members(&mut self, ctx: &RequestContext, draft: &Draft<'_>) -> Result<Planned, FhirError> {
        self.attempt = Attempt::default();
        if draft.interaction == Interaction::Delete {
            return Ok(Planned::default());
        }
        let parts = &self.group.0;
        // What is known of the membership at the base version: a new group has none; an
        // existing one carries its count in its document (unknown only for data written
        // before counts were recorded, then ClickHouse is asked).
        let known_count = draft.base.map_or(MemberCount::NeverEnumerated, |c| c.member_count);
        self.attempt.empty_before = matches!(known_count, MemberCount::NeverEnumerated | MemberCount::Active(0));
        let change = match &self.members {
            Members::Ops(ops) if ops.is_empty() => None,
            Members::Ops(ops) => Some(MemberChange::Ops(ops)),
            Members::Replace(members) => Some(MemberChange::Replace(members)),
            Members::Unchanged => None,
        };
        let Some(change) = change else {
            let count = super::read::active_members(&parts.clickhouse, draft.id, None, known_count).await?;
            return Ok(Planned { outbox: None, member_count: MemberCount::known(count) });
        };
        let known = base_state(parts, draft.id, draft.base, known_count, &change).await?;
        let pending_before = known.pending.clone();
        let origin = Origin {
            group_id: draft.id.to_string(),
            version: draft.version as u32,
            actor: ctx.actor.clone().unwrap_or_default(),
            request_id: ctx.request_id.clone(),
            source: match draft.interaction {
                Interaction::Create => "create",
                Interaction::Update => "update",
                _ => "patch",
            },
            event_time: draft.last_updated.timestamp_millis(),
        };
        let mut planner = Planner::new(&parts.clickhouse, origin, known_count, known).await?;
        match change {
            MemberChange::Ops(ops) => {
                planner.prefetch_ops(ops).await?;
                for (index, op) in ops {
                    planner.apply_member(*index, op).await?;
                }
            }
            MemberChange::Replace(members) => planner.replace_all(members).await?,
        }
        let planned = planner.finish()?;
        let staged = match planned.is_empty() {
            true => None,
            false => Some(outbox::stage(parts.store.database(), &planned).await.map_err(outbox_error)?),
        };
        let changes = Changes::of(planned.changes());
        let count = planned.count;
        drop(planned);
        let outbox = staged.clone();
        self.attempt.staged = staged;
        self.attempt.changes = changes;
        self.attempt.pending_before = Some(pending_before);
        Ok(Planned { outbox, member_count: MemberCount::known(count) })
    }
}

/// The member change of one attempt, borrowed from the share.
enum MemberChange<'a> {
    Ops(&'a [(usize, MemberOp)]),
    Replace(&'a [CompactMember]),
}

/// What the planner may rely on besides ClickHouse's views, for a write of `change` on
/// the base version `current`:
/// * the pending batches, laid over the views, when every operation names its member by
///   reference; otherwise (positions, whole-array replacement) they are finished first;
/// * the member index at the base version, built from the events when this process has
///   none yet (ClickHouse unreachable: the write goes on without it).
async fn base_state<'s>(
    parts: &'s Parts,
    id: &str,
    current: Option<&Version>,
    known_count: MemberCount,
    change: &MemberChange<'_>,
) -> Result<Known<'s>, FhirError> {
    let Some(current) = current else { return Ok(Known::default()) };
    let keyed = match change {
        MemberChange::Ops(ops) => ops.iter().all(|(_, op)| split::is_keyed(op)),
        MemberChange::Replace(_) => false,
    };
    let mut pending = current.outbox.clone();
    let overlaid = pending.is_empty() || (keyed && outbox::can_overlay(&pending));
    if !overlaid {
        tracing::debug!(group = id, batches = pending.len(), keyed, "pending batches finished before planning");
        finish_pending(&parts.flusher, id, current).await?;
        pending.clear();
    }
    if !keyed {
        return Ok(Known { index: None, pending });
    }
    let index: &MemberIndex = &parts.index;
    let version = current.version;
    if index.is_current(id, version) {
        return Ok(Known { index: Some(index), pending });
    }
    match known_count {
        MemberCount::NeverEnumerated | MemberCount::Active(0) => {
            index.load(id, version, []);
            return Ok(Known { index: Some(index), pending });
        }
        MemberCount::Active(n) if !index.fits(n) => return Ok(Known { index: None, pending }),
        _ => {}
    }
    // Built from the events as of the base version, so they must all be in ClickHouse.
    tracing::debug!(group = id, version, batches = pending.len(), "member index rebuilt");
    if !pending.is_empty() {
        finish_pending(&parts.flusher, id, current).await?;
        pending.clear();
    }
    let loaded: Result<_, clickhouse::error::Error> = async {
        let mut cursor = super::read::references_as_of(&parts.clickhouse, id, version as u32)?;
        let mut loading = Loading::default();
        while let Some(reference) = cursor.next().await? {
            loading.add(&reference);
        }
        Ok(loading)
    }
    .await;
    match loaded {
        Ok(loading) => {
            let index = index.install(id, version, loading).then_some(index);
            Ok(Known { index, pending })
        }
        Err(e) => {
            tracing::debug!(group = id, error = %e, "member index not built; planning with ClickHouse reads");
            Ok(Known { index: None, pending })
        }
    }
}
