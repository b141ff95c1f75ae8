//! The write loop: one write runs the stages in order, and again after a lost version race.
//!
//! 1. [`load`] the base version (checking `If-Match`);
//! 2. [`draft`] the new content;
//! 3. the type's [`Share::plan`] adds what it writes with the commit;
//! 4. [`commit`] under the version guard;
//! 5. after the commit: [`Share::committed`], the history copy in the
//!    [`background`](super::after), and the post-save hooks.
//!
//! A write without `If-Match` that loses a version race to another writer starts again
//! from 1 (the attempt wrote nothing); after [`MAX_ATTEMPTS`] it answers 409.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::Value;

use super::after::{self, HookMark};
use super::behaviour::{Behaviour, Behaviours, Detached, Draft, Share};
use super::commit::{self, Target};
use super::draft::{self, Drafting};
use super::load::{self, Load};
use super::{Hooks, RequestContext, Saved, WriteLocks};
use crate::error::FhirError;
use crate::model::patching::Patch;
use crate::store::{Base, ResourceKey, ResourceStore, Version};

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
    /// What the type's body reader kept out of a POST/PUT body (see
    /// [`Behaviour::read_body`]).
    pub detached: Option<Detached>,
}

#[derive(Debug)]
pub struct SaveOutcome {
    /// The version written, or the current one when nothing was written; its member count
    /// is the Group's active members after the write (when members are events).
    pub version: Version,
    /// The resource did not exist (or was deleted) before this write.
    pub created: bool,
    /// False when nothing was written (an unchanged resource, deleting what is deleted).
    pub changed: bool,
}

/// How an attempt ends when it does not commit.
pub(super) enum Stop {
    /// Read again and retry (a lost race, a remembered base that proved stale).
    Retry,
    Fail(FhirError),
    /// Nothing to write: the answer is the current version.
    Unchanged(Box<SaveOutcome>),
}

impl From<FhirError> for Stop {
    fn from(e: FhirError) -> Stop {
        Stop::Fail(e)
    }
}

/// What the write path needs, and nothing else: the store, the in-process write queues,
/// the post-save hooks and the resource types' behaviours. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    store: ResourceStore,
    locks: WriteLocks,
    hooks: Hooks,
    behaviours: Behaviours,
    /// This server's base URL, when writes are indexed for search (see `search`).
    search_base: Option<Arc<str>>,
}

/// One write, once its type took its share.
struct Prepared<'a> {
    resource_type: &'a str,
    id: &'a str,
    if_match: Option<i64>,
    change: Change,
    patch_numbers: Vec<usize>,
    share: Box<dyn Share>,
}

impl Writer {
    pub fn new(store: ResourceStore, behaviours: Behaviours) -> Writer {
        Writer { store, locks: WriteLocks::default(), hooks: Hooks::default(), behaviours, search_base: None }
    }

    /// The same writer, indexing nothing (to measure what indexing costs a write).
    pub fn without_search_index(self) -> Writer {
        Writer { search_base: None, ..self }
    }

    /// The same writer, indexing every write for search; `base` is this server's base URL.
    pub fn with_search_index(self, base: &str) -> Writer {
        Writer { search_base: Some(Arc::from(base)), ..self }
    }

    /// The same writer with these post-save hooks.
    pub fn with_hooks(self, hooks: Hooks) -> Writer {
        Writer { hooks, ..self }
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The behaviour of a resource type (what it adds to reads and writes).
    pub fn behaviour(&self, resource_type: &str) -> &dyn Behaviour {
        self.behaviours.of(resource_type)
    }

    /// Writes one resource.
    pub async fn save(&self, ctx: &RequestContext, req: SaveRequest<'_>) -> Result<SaveOutcome, FhirError> {
        let mut outcomes = self.save_all(ctx, vec![req]).await;
        outcomes.pop().unwrap_or_else(|| Err(FhirError::internal("a write produced no outcome")))
    }

    /// Writes several resources, in order, each under its own version guard, and returns
    /// an outcome per request. The writes hold the in-process write queues of all of them
    /// until the last is done (taken in key order, so two such calls never deadlock).
    /// Each write gets its own copy of `ctx`: what one write tells its hooks is not seen
    /// by the next. Not atomic: a failed write leaves the others as they are.
    pub async fn save_all(
        &self,
        ctx: &RequestContext,
        reqs: Vec<SaveRequest<'_>>,
    ) -> Vec<Result<SaveOutcome, FhirError>> {
        let prepared: Vec<_> = reqs.into_iter().map(|r| self.prepare(r)).collect();
        // A POST's fresh id has no other writer; everything else queues per resource.
        let keys: BTreeSet<ResourceKey> = prepared
            .iter()
            .flatten()
            .filter(|p| !matches!(p.change, Change::Create(_)))
            .map(|p| ResourceKey::new(p.resource_type, p.id))
            .collect();
        let mut queued = Vec::with_capacity(keys.len());
        for key in keys {
            queued.push(self.locks.lock(key).await);
        }
        let mut outcomes = Vec::with_capacity(prepared.len());
        for p in prepared {
            outcomes.push(match p {
                Ok(p) => self.write(ctx.clone(), p).await,
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    fn prepare<'a>(&self, req: SaveRequest<'a>) -> Result<Prepared<'a>, FhirError> {
        let (rt, id) = (req.resource_type, req.id);
        // Bodies of POST and PUT do not depend on the current version: checked once.
        draft::check_body(rt, id, &req.change)?;
        let begun = self.behaviours.of(rt).begin(id, req.change, req.detached)?;
        Ok(Prepared {
            resource_type: rt,
            id,
            if_match: req.if_match,
            change: begun.change,
            patch_numbers: begun.patch_numbers,
            share: begun.share,
        })
    }

    async fn write(&self, mut ctx: RequestContext, mut p: Prepared<'_>) -> Result<SaveOutcome, FhirError> {
        let mut delays = retry_delays();
        for attempt in 0.. {
            match self.attempt(&mut ctx, &mut p, attempt).await {
                Ok(outcome) => return Ok(outcome),
                Err(Stop::Unchanged(outcome)) => return Ok(*outcome),
                Err(Stop::Fail(e)) => return Err(e),
                Err(Stop::Retry) => match delays.next() {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => break,
                },
            }
        }
        Err(FhirError::conflict(format!(
            "{}/{} is being changed by many writers at once; gave up after {MAX_ATTEMPTS} attempts",
            p.resource_type, p.id
        )))
    }

    async fn attempt(&self, ctx: &mut RequestContext, p: &mut Prepared<'_>, n: usize) -> Result<SaveOutcome, Stop> {
        let (rt, id) = (p.resource_type, p.id);
        let started = Instant::now();
        let writes = p.share.writes();
        let base = match n == 0 && p.share.may_start_from_memory() {
            true => Base::Remembered,
            false => Base::Stored,
        };
        let fresh_id = matches!(p.change, Change::Create(_));
        let loaded =
            load::load(&self.store, Load { resource_type: rt, id, base, writes, if_match: p.if_match, fresh_id })
                .await?;
        let read_at = started.elapsed();
        let drafting = Drafting {
            resource_type: rt,
            id,
            change: &p.change,
            patch_numbers: &p.patch_numbers,
            writes,
            if_match: p.if_match,
            search_base: self.search_base.as_deref(),
            search_indexed: self.search_base.as_ref().and_then(|_| self.store.search_indexed(rt, id)),
        };
        let mut content = draft::draft(&drafting, &loaded)?;
        let draft = Draft {
            resource_type: rt,
            id,
            interaction: content.interaction,
            base: loaded.current.as_ref(),
            version: content.version,
            last_updated: content.last_updated,
        };
        let planned = p.share.plan(ctx, &draft).await?;
        let member_count = planned.member_count;
        // A write that changes nothing (an empty patch, re-adding an active member, a PUT
        // of the same content) answers the current version and writes nothing: no
        // version, no history entry, no event. A remembered base is read again first, so
        // the answer is never a version this process merely remembers.
        if planned.outbox.is_none() {
            if let Some(mut version) = draft::unchanged(&loaded, &content) {
                if loaded.guessed {
                    self.store.forget_recent(rt, id);
                    return Err(Stop::Retry);
                }
                version.member_count = member_count;
                return Ok(SaveOutcome { version, created: false, changed: false });
            }
        }
        let planned_at = started.elapsed();
        let target =
            Target { resource_type: rt, id, if_match: p.if_match, writes, events_pending: self.hooks.durable_for(rt) };
        let committed = commit::commit(&self.store, &target, &loaded, &mut content, planned, p.share.as_mut()).await?;
        p.share.committed(ctx, &draft, &committed);
        let committed_at = started.elapsed();
        let previous = loaded.live().and_then(|c| c.resource.as_ref());
        let saved = Saved {
            interaction: content.interaction,
            resource_type: rt,
            id,
            version: content.version,
            resource: content.resource.as_ref(),
            previous,
        };
        let hooks_done = self.hooks.run(ctx, &saved).await;
        let mark = match target.events_pending {
            false => HookMark::None,
            true if hooks_done => HookMark::Done,
            true => HookMark::Kept,
        };
        after::copy_history_later(&self.store, rt, committed, writes, mark);
        // Where a write's time goes (`ROSTER_LOG=roster::pipeline=debug`), cumulative.
        tracing::debug!(
            resource_type = rt,
            read_us = read_at.as_micros() as u64,
            planned_us = planned_at.as_micros() as u64,
            committed_us = committed_at.as_micros() as u64,
            hooks_us = started.elapsed().as_micros() as u64,
            "write timings"
        );
        Ok(SaveOutcome {
            created: loaded.live().is_none(),
            changed: true,
            version: Version {
                id: id.to_string(),
                version: content.version,
                last_updated: content.last_updated,
                deleted: content.resource.is_none(),
                method: content.interaction.method().to_string(),
                resource: content.resource,
                outbox: Vec::new(),
                member_count,
                version_log: Vec::new(),
                history_pending: false,
                search: Default::default(),
            },
        })
    }
}

/// The waits between attempts after lost version races: 1 ms doubling to 50 ms, each with
/// a random share added so that writers who collided spread out; [`MAX_ATTEMPTS`] in all.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(50))
        .with_jitter()
        .with_max_times(MAX_ATTEMPTS - 1)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_and_spread() {
        let delays: Vec<Duration> = retry_delays().collect();
        assert_eq!(delays.len(), MAX_ATTEMPTS - 1);
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(1) && *d <= Duration::from_millis(100)));
        let late: Vec<&Duration> = delays[10..].iter().collect();
        assert!(late.iter().all(|d| **d >= Duration::from_millis(50)), "capped at 50 ms plus jitter");
        assert_ne!(retry_delays().collect::<Vec<_>>(), delays, "jittered: two writers do not wait alike");
    }
}
