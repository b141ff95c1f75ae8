use axum::http::StatusCode;
use bson::DateTime;
use serde_json::{Map, Value};

use super::{Flag, Interaction, RequestContext, Saved};
use crate::error::{FhirError, IssueCode};
use crate::group::body::CompactMember;
use crate::group::index::MemberIndex;
use crate::group::plan::{Known, Origin, Planner};
use crate::group::split::MemberOp;
use crate::group::{outbox, split, MemberStorage};
use crate::model::patching::Patch;
use crate::model::{datetime, json_bson, lenient, validate};
use crate::state::AppState;
use crate::store::{Base, Commit, MemberCount, ResourceKey, StoreError, Version, Writes};

/// How often a write without `If-Match` re-reads and retries after losing a version race
/// before answering 409.
const MAX_ATTEMPTS: usize = 32;

/// What a write does.
#[derive(Debug)]
pub enum Change {
    /// `POST`: the id is server-assigned (the body's id is ignored, as FHIR says).
    Create(Value),
    /// `PUT`: update, or create at the client's id.
    Update(Value),
    /// `PATCH`, in any of the three formats: applied to the current version.
    Patch(Patch),
    Delete,
}

pub struct SaveRequest<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub change: Change,
    /// The version named by `If-Match`.
    pub if_match: Option<i64>,
    /// POST/PUT of a Group whose members are events: the members, parsed and checked by
    /// `group::body` (the body itself then has no `member`). `None`: no `member` element.
    pub members: Option<Vec<CompactMember>>,
}

#[derive(Debug)]
pub struct SaveOutcome {
    pub version: Version,
    /// The resource did not exist (or was deleted) before this write.
    pub created: bool,
    /// False when nothing was written (deleting what is already deleted).
    pub changed: bool,
    /// For a Group with event-sourced members: the active member count after the write.
    pub member_count: Option<u64>,
}

/// Changes to `Group.member` carried by a write, when members are event-sourced.
enum MemberChange<'a> {
    /// A PATCH's member operations, with their index in the patch.
    Ops(&'a [(usize, MemberOp)]),
    /// A full member array (POST, PUT): the membership becomes exactly this.
    Replace(&'a [CompactMember]),
}

fn outbox_error(e: outbox::OutboxError) -> FhirError {
    match e {
        outbox::OutboxError::Corrupt(_) => FhirError::internal(e),
        outbox::OutboxError::Mongo(ref m)
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

/// Finishes a group's pending member batches before its members are read, so nobody sees a
/// version whose events are missing (503 while ClickHouse is down).
pub async fn finish_pending(state: &AppState, id: &str, current: &Version) -> Result<(), FhirError> {
    if !current.outbox.is_empty() {
        state.flusher.flush(id).await.map_err(outbox_error)?;
    }
    Ok(())
}

pub async fn save(state: &AppState, ctx: &mut RequestContext, req: SaveRequest<'_>) -> Result<SaveOutcome, FhirError> {
    let store = &state.store;
    let rt = req.resource_type;
    let member_events = rt == "Group" && state.group_members == MemberStorage::Events;
    // Bodies of POST and PUT do not depend on the current version: validate them once.
    match &req.change {
        Change::Create(body) | Change::Update(body) => {
            let mut body = body.clone();
            if let Some(obj) = body.as_object_mut() {
                obj.insert("id".into(), Value::String(req.id.to_string()));
            }
            refuse_subset(rt, &body, StatusCode::BAD_REQUEST)?;
            validate::validate_resource(rt, &body)?;
        }
        Change::Patch(_) | Change::Delete => {}
    }
    // A Group PATCH's member operations are split from the rest once, whatever the retries.
    let (change, member_ops, numbers) = match req.change {
        Change::Patch(ops) if member_events => {
            let split = split::split(ops).map_err(|e| FhirError::unprocessable(e.to_string()))?;
            (Change::Patch(split.other), split.member, split.other_numbers)
        }
        other => (other, Vec::new(), Vec::new()),
    };
    // A POST's fresh id has no other writer; everything else queues per resource.
    let _queued = match change {
        Change::Create(_) => None,
        _ => Some(state.write_locks.lock(ResourceKey::new(rt, req.id)).await),
    };
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            backoff(attempt).await;
        }
        let started = std::time::Instant::now();
        // A Group member PATCH may start from the document this process committed last;
        // anything that contradicts it (a failed guard, a precondition) reads for real.
        let guess = attempt == 0 && member_events && matches!(change, Change::Patch(_));
        // A member-only PATCH keeps the stored content: earlier versions not yet in history
        // can wait in the document's version log (copied in batches) instead of one copy
        // per version on the write path.
        let members_only = member_events && matches!(&change, Change::Patch(other) if other.is_empty());
        let base = if guess { Base::Remembered } else { Base::Stored };
        let writes = if members_only { Writes::MetaOnly } else { Writes::Content };
        let (current, from) = store.read_for_write(rt, req.id, base, writes).await?;
        let guessed = from == Base::Remembered;
        let read_at = started.elapsed();
        if let Some(expected) = req.if_match {
            match &current {
                Some(c) if c.version == expected => {}
                _ if guessed => {
                    store.forget_recent(rt, req.id);
                    continue;
                }
                Some(c) => {
                    return Err(FhirError::precondition_failed(format!(
                        "If-Match W/\"{expected}\" does not match the current version W/\"{}\"",
                        c.version
                    )))
                }
                None => {
                    return Err(FhirError::precondition_failed(format!(
                        "If-Match W/\"{expected}\" given, but {rt}/{} does not exist",
                        req.id
                    )))
                }
            }
        }
        let live = current.as_ref().filter(|c| !c.deleted);
        let mut meta_only = false;
        let (interaction, resource, members) = match &change {
            Change::Create(body) => (Interaction::Create, Some(body.clone()), None),
            Change::Update(body) => {
                if let (Some(c), Some(sent)) = (live, body.pointer("/meta/versionId").and_then(Value::as_str)) {
                    if req.if_match.is_none() && sent != c.version.to_string() {
                        return Err(FhirError::conflict(format!(
                            "meta.versionId {sent} in the body is not the current version {}; \
                             re-read the resource or send If-Match",
                            c.version
                        ))
                        .at(format!("{rt}.meta.versionId")));
                    }
                }
                (Interaction::Update, Some(body.clone()), None)
            }
            Change::Patch(ops) => {
                let Some(c) = &current else {
                    return Err(FhirError::not_found(format!("{rt}/{} does not exist", req.id)));
                };
                let Some(old) = live.and_then(|c| c.resource.clone()) else {
                    return Err(FhirError::gone(format!("{rt}/{} is deleted", req.id), c.version));
                };
                if member_events {
                    // `ops` holds the other operations; the member ones are in `member_ops`.
                    let members = (!member_ops.is_empty()).then_some(MemberChange::Ops(&member_ops));
                    // Only members change: the stored content stays as it is, but for meta.
                    meta_only = ops.is_empty();
                    let resource =
                        if meta_only { Value::Object(old) } else { patched(rt, req.id, old, ops, &numbers)? };
                    (Interaction::Patch, Some(resource), members)
                } else {
                    (Interaction::Patch, Some(patched(rt, req.id, old, ops, &numbers)?), None)
                }
            }
            Change::Delete => match &current {
                None => return Err(FhirError::not_found(format!("{rt}/{} does not exist", req.id))),
                Some(c) if c.deleted => {
                    return Ok(SaveOutcome { version: c.clone(), created: false, changed: false, member_count: None })
                }
                Some(_) => (Interaction::Delete, None, None),
            },
        };
        // POST and PUT carry the whole member array: it becomes events, not a stored element.
        let members = match members {
            None if member_events && matches!(interaction, Interaction::Create | Interaction::Update) => {
                Some(MemberChange::Replace(req.members.as_deref().unwrap_or_default()))
            }
            other => other,
        };
        let version = current.as_ref().map_or(1, |c| c.version + 1);
        let last_updated = next_timestamp(current.as_ref());
        let mut stored = None;
        let mut document = None;
        if let Some(Value::Object(mut obj)) = resource {
            stamp(&mut obj, req.id, version, last_updated);
            let status = if interaction == Interaction::Patch {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_REQUEST
            };
            let doc = json_bson::to_document(&obj)
                .map_err(|e| FhirError::new(status, IssueCode::Value, e.to_string()).at(format!("{rt}.{}", e.path)))?;
            document = Some(doc);
            stored = Some(obj);
        }
        let mut staged = None;
        let mut planned = None;
        let mut member_count = None;
        // What is known of the membership at the base version: a new group has none; an
        // existing one carries its count in its document (unknown only for data written
        // before counts were recorded, then ClickHouse is asked).
        let known_count = match &current {
            None => MemberCount::NeverEnumerated,
            Some(c) => c.member_count,
        };
        // The batches still pending at the base version, as far as this write knows (when
        // it changes members: what the planner was given, after any flush).
        let mut pending_before = None;
        if let Some(change) = members {
            let known = base_state(state, req.id, current.as_ref(), known_count, &change).await?;
            pending_before = Some(known.pending.clone());
            let origin = Origin {
                group_id: req.id.to_string(),
                version: version as u32,
                actor: ctx.actor.clone().unwrap_or_default(),
                request_id: ctx.request_id.clone(),
                source: match interaction {
                    Interaction::Create => "create",
                    Interaction::Update => "update",
                    _ => "patch",
                },
                event_time: last_updated.timestamp_millis(),
            };
            let mut planner = Planner::new(&state.clickhouse, origin, known_count, known).await?;
            match change {
                MemberChange::Ops(ops) => {
                    planner.prefetch_ops(ops).await?;
                    for (index, op) in ops {
                        planner.apply_member(*index, op).await?;
                    }
                }
                MemberChange::Replace(members) => planner.replace_all(members).await?,
            }
            let p = planner.finish()?;
            member_count = p.count;
            if !p.is_empty() {
                staged = Some(outbox::stage(store.database(), &p).await.map_err(outbox_error)?);
            }
            planned = Some(p);
        } else if member_events && interaction != Interaction::Delete {
            member_count = match known_count {
                MemberCount::NeverEnumerated => None,
                MemberCount::Active(n) => Some(n),
                MemberCount::Unrecorded => crate::group::read::enumerated_count(&state.clickhouse, req.id, None)
                    .await
                    .map_err(FhirError::from)?,
            };
        }
        // A write that changes nothing (an empty patch, re-adding an active member, a PUT of
        // the same content) answers the current version and writes nothing: no version, no
        // history entry, no event. A guessed base is re-read first, so the answer is never a
        // version this process merely remembers.
        if let (Some(c), Some(new), None) = (live, stored.as_ref(), &staged) {
            let old = c.resource.as_ref();
            if interaction != Interaction::Create && old.is_some_and(|old| same_content(old, new)) {
                if guessed {
                    store.forget_recent(rt, req.id);
                    continue;
                }
                let mut version = c.clone();
                version.outbox.clear();
                version.version_log.clear();
                return Ok(SaveOutcome { version, created: false, changed: false, member_count });
            }
        }
        // The base version goes to the log when it is not in history yet (only a member-only
        // PATCH defers that; every other write finds the log copied and empty).
        let mut version_log = current.as_ref().map_or_else(Vec::new, |c| c.version_log.clone());
        if let Some(c) = current.as_ref().filter(|c| c.history_pending) {
            version_log.push(c.log_entry());
        }
        let commit = Commit {
            id: req.id,
            version_log,
            base: current.as_ref().map(|c| c.version),
            version,
            last_updated,
            method: interaction.method(),
            resource: document,
            meta_only,
            outbox: staged.as_ref().map(|s| s.doc.clone()),
            member_count: match member_events && interaction != Interaction::Delete {
                true => MemberCount::known(member_count),
                false => MemberCount::Unrecorded,
            },
            events_pending: state.hooks.durable_for(rt),
        };
        let planned_at = started.elapsed();
        let committed = match store.commit(rt, commit).await {
            Ok(committed) => committed,
            Err(e) => {
                // A lost race wrote nothing: its chunks are orphans. After any other error the
                // commit may have happened, and the chunks may be referenced: they stay.
                if let (Some(batch), StoreError::Conflict) = (&staged, &e) {
                    outbox::discard(store.database(), batch).await;
                }
                match e {
                    StoreError::Conflict if guessed => {
                        store.forget_recent(rt, req.id);
                        continue;
                    }
                    StoreError::Conflict if req.if_match.is_some() => {
                        return Err(FhirError::precondition_failed(format!(
                            "{rt}/{} changed concurrently; W/\"{}\" is no longer current",
                            req.id,
                            req.if_match.unwrap_or_default()
                        )))
                    }
                    StoreError::Conflict => continue,
                    e => {
                        // The commit may or may not have happened: what this process knows
                        // of the resource and the group's members is no longer trustworthy.
                        store.forget_recent(rt, req.id);
                        state.member_index.forget(req.id);
                        return Err(FhirError::from(e));
                    }
                }
            }
        };
        if member_events {
            let base = current.as_ref().map(|c| c.version);
            let empty_before = matches!(known_count, MemberCount::NeverEnumerated | MemberCount::Active(0));
            match (&interaction, &planned) {
                (Interaction::Delete, _) => state.member_index.forget(req.id),
                (_, Some(p)) => state.member_index.advance(req.id, base, version, empty_before, p.changes()),
                (_, None) => state.member_index.advance(req.id, base, version, empty_before, []),
            }
            // What MongoDB now holds: the commit's fields plus every batch still pending.
            if interaction == Interaction::Delete {
                store.forget_recent(rt, req.id);
            } else {
                let mut doc = committed.clone();
                let pending_before =
                    pending_before.unwrap_or_else(|| current.as_ref().map_or_else(Vec::new, |c| c.outbox.clone()));
                let mut pending: Vec<bson::Bson> = pending_before.into_iter().map(Into::into).collect();
                pending.extend(staged.as_ref().map(|s| bson::Bson::Document(s.doc.clone())));
                doc.insert("outbox", pending);
                store.remember_recent(rt, req.id, doc);
            }
        }
        // A PATCH's member events are written by this path (after the answer); the POST/PUT
        // member array is the sync hook's job. Hooks see which through the flag.
        // Events of this PATCH that the background flusher inserts (0: none, or not a PATCH).
        let patched_events = match (&interaction, &staged) {
            (Interaction::Patch, Some(batch)) => batch.doc.get_i64("count").unwrap_or(1).max(1) as usize,
            _ => 0,
        };
        if patched_events > 0 {
            ctx.set(Flag::MemberEventsWritten);
        }
        finish_later(state, rt, committed, patched_events, members_only);
        let finished_at = started.elapsed();
        let previous = live.and_then(|c| c.resource.as_ref());
        state
            .hooks
            .run(
                ctx,
                &Saved { interaction, resource_type: rt, id: req.id, version, resource: stored.as_ref(), previous },
            )
            .await;
        // Where a write's time goes (`ROSTER_LOG=roster::pipeline=debug`), cumulative.
        tracing::debug!(
            resource_type = rt,
            read_us = read_at.as_micros() as u64,
            planned_us = planned_at.as_micros() as u64,
            committed_us = finished_at.as_micros() as u64,
            hooks_us = started.elapsed().as_micros() as u64,
            "write timings"
        );
        return Ok(SaveOutcome {
            created: live.is_none(),
            changed: true,
            member_count,
            version: Version {
                id: req.id.to_string(),
                version,
                last_updated,
                deleted: stored.is_none(),
                method: interaction.method().to_string(),
                resource: stored,
                outbox: Vec::new(),
                member_count: MemberCount::known(member_count),
                version_log: Vec::new(),
                history_pending: false,
            },
        });
    }
    Err(FhirError::conflict(format!(
        "{rt}/{} is being changed by many writers at once; gave up after {MAX_ATTEMPTS} attempts",
        req.id
    )))
}

/// What the planner may rely on besides ClickHouse's views, for a write of `change` on
/// the base version `current`:
/// * the pending batches, laid over the views, when every operation names its member by
///   reference; otherwise (positions, whole-array replacement) they are finished first;
/// * the member index at the base version, built from the events when this process has
///   none yet (ClickHouse unreachable: the write goes on without it).
async fn base_state<'s>(
    state: &'s AppState,
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
        finish_pending(state, id, current).await?;
        pending.clear();
    }
    if !keyed {
        return Ok(Known { index: None, pending });
    }
    let index: &MemberIndex = &state.member_index;
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
        finish_pending(state, id, current).await?;
        pending.clear();
    }
    let loaded: Result<_, clickhouse::error::Error> = async {
        let mut cursor = crate::group::read::references_as_of(&state.clickhouse, id, version as u32)?;
        let mut loading = crate::group::index::Loading::default();
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

/// How long the background history copy waits before clearing the version's flag.
const QUIET_BEFORE_COPY: std::time::Duration = std::time::Duration::from_millis(100);

/// The rest of a committed write, off the request path: the history copy (then its flag is
/// cleared) and, for a Group PATCH, the flush of its `member_events` (see `group::flusher`).
/// Whatever does not finish stays marked in MongoDB and is finished by the next reader or
/// writer of the resource or by the sweep.
fn finish_later(state: &AppState, rt: &str, committed: bson::Document, member_events: usize, members_only: bool) {
    let id = committed.get_str("_id").unwrap_or_default().to_string();
    if member_events > 0 {
        state.flusher.kick(&id, member_events);
    }
    let store = state.store.clone();
    let rt = rt.to_string();
    tokio::spawn(async move {
        let version = committed.get_i64("versionId").unwrap_or_default();
        // A member-only version waits: while PATCHes keep coming, each carries the previous
        // versions in its log, copied a few at a time as the log grows.
        if members_only {
            if let Err(e) = store.copy_log_early(&rt, &committed).await {
                tracing::warn!(resource_type = rt, id, error = %e, "logged versions stay in the log for now");
            }
            tokio::time::sleep(QUIET_BEFORE_COPY).await;
            if store.superseded(&rt, &id, version) {
                return;
            }
        }
        let done = match store.copy_history(&rt, &committed).await {
            Ok(()) => {
                // The flag goes with the next commit anyway: while writes of the resource
                // keep coming, clearing it is a wasted write (MongoDB's time is the scarce
                // resource under a stream of PATCHes).
                if !members_only {
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

/// Whether two versions of a resource have the same content: equal but for
/// `meta.versionId` and `meta.lastUpdated`, which every write sets.
fn same_content(old: &Map<String, Value>, new: &Map<String, Value>) -> bool {
    fn meta_rest(resource: &Map<String, Value>) -> Vec<(&String, &Value)> {
        match resource.get("meta") {
            Some(Value::Object(meta)) => {
                meta.iter().filter(|(k, _)| !matches!(k.as_str(), "versionId" | "lastUpdated")).collect()
            }
            _ => Vec::new(),
        }
    }
    let content = |r: &Map<String, Value>| r.iter().filter(|(k, _)| *k != "meta").count();
    content(old) == content(new) && new.iter().filter(|(k, _)| *k != "meta").all(|(k, v)| old.get(k) == Some(v)) && {
        let (mut a, mut b) = (meta_rest(old), meta_rest(new));
        a.sort_by_key(|(k, _)| *k);
        b.sort_by_key(|(k, _)| *k);
        a == b
    }
}

/// After losing a version race to another process: wait a random 0..2^attempt ms (at most
/// 50 ms) so the writers spread out.
async fn backoff(attempt: usize) {
    let cap = (1u64 << attempt.min(6)).min(50);
    let jitter = (uuid::Uuid::new_v4().as_u128() % (cap as u128 + 1)) as u64;
    tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
}

/// Applies a patch and validates the result (422 when either fails). Empty elements the
/// patch leaves behind are dropped, as on every write. `numbers`: see `Patch::apply_numbered`.
fn patched(rt: &str, id: &str, old: Map<String, Value>, ops: &Patch, numbers: &[usize]) -> Result<Value, FhirError> {
    let mut doc = Value::Object(old);
    ops.apply_numbered(&mut doc, numbers)
        .map_err(|e| FhirError::unprocessable(format!("the {} cannot be applied: {e}", ops.format())))?;
    lenient::drop_empty(&mut doc, rt);
    if doc.get("id").and_then(Value::as_str) != Some(id) {
        return Err(FhirError::unprocessable("a patch may not change or remove the resource id").at(format!("{rt}.id")));
    }
    if doc.get("resourceType").and_then(Value::as_str) != Some(rt) {
        return Err(
            FhirError::unprocessable("a patch may not change the resourceType").at(format!("{rt}.resourceType"))
        );
    }
    refuse_subset(rt, &doc, StatusCode::UNPROCESSABLE_ENTITY)?;
    validate::validate_resource(rt, &doc).map_err(|mut e| {
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e.diagnostics = format!("the patched resource is not valid: {}", e.diagnostics);
        e
    })?;
    Ok(doc)
}

/// The tag FHIR puts on a resource shown in part (`_summary`, `_elements`, a Group without
/// its members).
const SUBSETTED: &str = "SUBSETTED";

/// Refuses to store a resource tagged `SUBSETTED`: it is a partial copy, and storing it
/// (a PUT is a full replacement) would delete what was left out, e.g. every member of a
/// Group read from a search result or a write response. FHIR: subsetted resources must
/// not be used for updates.
fn refuse_subset(rt: &str, resource: &Value, status: StatusCode) -> Result<(), FhirError> {
    let tags = resource.pointer("/meta/tag").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let Some(i) = tags.iter().position(|t| t.get("code").and_then(Value::as_str) == Some(SUBSETTED)) else {
        return Ok(());
    };
    Err(FhirError::new(
        status,
        IssueCode::Invalid,
        format!(
            "this {rt} is tagged SUBSETTED: it is a partial copy (from a search, a write response, \
             _summary or _elements) and writing it would delete what it leaves out. Read the \
             full resource with GET [base]/{rt}/[id] and write that, or change it with PATCH"
        ),
    )
    .at(format!("{rt}.meta.tag[{i}]")))
}

/// Now, at millisecond precision, and strictly after the previous version, so a resource's
/// versions are ordered by `lastUpdated` even when the clock stalls or steps back.
fn next_timestamp(previous: Option<&Version>) -> DateTime {
    let now = DateTime::now();
    match previous {
        Some(p) if p.last_updated >= now => DateTime::from_millis(p.last_updated.timestamp_millis() + 1),
        _ => now,
    }
}

/// Sets id and the server-owned `meta` elements, keeping the client's other `meta`
/// elements, with `resourceType`, `id`, `meta` first.
fn stamp(resource: &mut Map<String, Value>, id: &str, version: i64, last_updated: DateTime) {
    let mut meta = match resource.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(datetime::format_bson_instant(last_updated)));
    let resource_type = resource.shift_remove("resourceType");
    resource.shift_remove("id");
    let rest = std::mem::take(resource);
    if let Some(rt) = resource_type {
        resource.insert("resourceType".into(), rt);
    }
    resource.insert("id".into(), Value::String(id.to_string()));
    resource.insert("meta".into(), Value::Object(meta));
    resource.extend(rest);
}
