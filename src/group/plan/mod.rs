//! Turning changes to `Group.member` into member events.
//!
//! A PATCH's member operations are applied in order to a *virtual* member list: the
//! group's active members at the base version (in ClickHouse, ordered by position) with
//! this patch's changes laid over it. Only the members an operation touches are read, so a
//! one-member PATCH costs the same for a group of 10 or 10 million.
//!
//! Rules:
//! * `add /member/-` and `add /member/N` add a member at the end (the stable order is the
//!   order of addition; an index on `add` is accepted but not honoured). Adding a member
//!   that is already active is a no-op, but its value is validated all the same.
//! * `remove /member/N` removes the N-th member of the virtual list, so earlier operations
//!   of the same patch shift indexes exactly as RFC 6902 says.
//! * `remove /member` with `value.entity.reference` (the extension of the peer server)
//!   removes that member; a member that is not active is a 422 naming the operation, as
//!   RFC 6902 makes removing a missing target an error. Without a value it removes every
//!   member.
//! * `replace /member/N` with the same entity updates it; with another entity it removes
//!   the old and adds the new. `add`/`replace`/`remove`/`test` below `/member/N/` change or
//!   check that member (`entity` cannot change: remove and add instead).
//! * `test /member/N` compares against the current member; `add`/`replace /member` with
//!   an array replaces the whole membership (like PUT).
//! * A member's identity is `entity.reference`; a body listing one entity twice is refused.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

use axum::http::StatusCode;
use serde_json::Value;

use super::body::{group_of, is_plain_member, CompactMember};
use super::events::{ver, EventType};
use super::index::{MemberIndex, Presence};
use super::outbox;
use super::read::{self, MemberRow};
use super::source::MemberSource;
use super::split::{MemberOp, Selector};
use crate::error::{FhirError, IssueCode};
use crate::model::fhirpath_patch;
use crate::model::patch::{self, Operation};
use crate::model::validate::{repeat_as_arrays, validate_resource};
use crate::store::{MemberCount, OutboxBatch};

/// Who and what wrote the events.
#[derive(Debug, Clone)]
pub struct Origin {
    pub group_id: String,
    /// The Group version the events belong to (the version being written).
    pub version: u32,
    pub actor: String,
    pub request_id: String,
    pub source: &'static str,
    pub event_time: i64,
}

struct Draft<'a> {
    event_type: EventType,
    /// For `removed`: the reference only (empty JSON). Borrowed from a POST/PUT body's
    /// parsed members when it comes from there, so a big body is not held twice.
    member: Cow<'a, CompactMember>,
    position: u64,
}

/// What the virtual list knows about a member this patch touched.
#[derive(Clone)]
enum Touched {
    /// Active with this member and position.
    Active {
        member: Box<CompactMember>,
        position: u64,
    },
    /// Activated by this patch: the member lives in `drafts[draft]` (not copied twice).
    Added {
        draft: usize,
        position: u64,
    },
    Removed,
}

/// What a planner knows of the base state besides ClickHouse's views.
#[derive(Default)]
pub struct Known<'a> {
    /// The in-process member index, at the base version (see `index`).
    pub index: Option<&'a MemberIndex>,
    /// The base version's pending batches (committed, not yet in ClickHouse), laid over
    /// the views. Only for keyed operations (add, remove by reference): positional ones
    /// need the views complete, so the caller finishes pending batches first.
    pub pending: Vec<OutboxBatch>,
}

/// The pending state of touched members: reference → `Some((JSON, position))` or removed.
type Overlay = HashMap<String, Option<(String, u64)>>;

pub struct Planner<'a> {
    source: &'a dyn MemberSource,
    origin: Origin,
    /// The base version (the index is consulted at it).
    base_version: i64,
    index: Option<&'a MemberIndex>,
    pending: Vec<OutboxBatch>,
    /// Built from `pending` on first need.
    overlay: Option<Overlay>,
    base_count: u64,
    /// The group had member events before this write.
    enumerated: bool,
    touched: HashMap<String, Touched>,
    base: HashMap<String, Option<MemberRow>>,
    /// Positions of base members this patch removed.
    removed_base: BTreeSet<u64>,
    /// Members activated by this patch, in order, still active.
    appended: Vec<String>,
    drafts: Vec<Draft<'a>>,
    /// (operation index, member) pairs from PATCH operations, validated at the end.
    to_validate: Vec<(usize, Value)>,
}

fn op_error(index: usize, path: &str, message: impl std::fmt::Display) -> FhirError {
    FhirError::unprocessable(format!("operation {index} ({path}): {message}"))
}

/// The identity of a member element: its `entity.reference`.
pub fn member_reference(member: &Value) -> Option<&str> {
    member.pointer("/entity/reference").and_then(Value::as_str).filter(|r| !r.is_empty())
}

impl<'a> Planner<'a> {
    /// `known` = the group's member count at the base version as its version records it;
    /// when unrecorded it is read from `source`.
    pub async fn new(
        source: &'a dyn MemberSource,
        origin: Origin,
        known: MemberCount,
        state: Known<'a>,
    ) -> Result<Planner<'a>, FhirError> {
        let base = match known.recorded() {
            Some(count) => count,
            None => source.enumerated_count(&origin.group_id).await?,
        };
        Ok(Planner {
            source,
            base_version: origin.version as i64 - 1,
            index: state.index,
            pending: state.pending,
            overlay: None,
            origin,
            base_count: base.unwrap_or(0),
            enumerated: base.is_some(),
            touched: HashMap::new(),
            base: HashMap::new(),
            removed_base: BTreeSet::new(),
            appended: Vec::new(),
            drafts: Vec::new(),
            to_validate: Vec::new(),
        })
    }

    /// Loads the base state of many members in few round trips (before a batch of adds).
    /// Members the index rules out, or the pending batches know, need no query.
    pub async fn prefetch(&mut self, references: Vec<String>) -> Result<(), FhirError> {
        if !self.enumerated {
            return Ok(()); // no member events yet: nobody is a member
        }
        let mut wanted = Vec::new();
        for r in references {
            if !self.base.contains_key(&r) && !self.ruled_out(&r) && self.pending_state(&r)?.is_none() {
                wanted.push(r);
            }
        }
        for chunk in read::parameter_chunks(&wanted) {
            let found = self.source.lookup(&self.origin.group_id, chunk).await?;
            for r in chunk {
                self.base.insert(r.clone(), found.get(r).cloned());
            }
        }
        Ok(())
    }

    /// True when the index says the member is certainly not active at the base version.
    fn ruled_out(&self, reference: &str) -> bool {
        self.index.and_then(|i| i.presence(&self.origin.group_id, self.base_version, reference))
            == Some(Presence::Absent)
    }

    /// The member's state in the pending batches, if they touch it: `Some(None)` removed.
    fn pending_state(&mut self, reference: &str) -> Result<Option<Option<(CompactMember, u64)>>, FhirError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        if self.overlay.is_none() {
            self.overlay = Some(outbox::overlay(&self.pending).map_err(FhirError::internal)?);
        }
        let overlay = self.overlay.as_ref().expect("built above");
        Ok(overlay.get(reference).map(|state| {
            state.as_ref().map(|(json, position)| {
                (CompactMember { reference: reference.to_string(), json: json.clone() }, *position)
            })
        }))
    }

    /// Positional reads need the views to hold every committed event.
    fn require_no_pending(&self) -> Result<(), FhirError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(FhirError::internal("positional member operation planned over pending events"))
        }
    }

    /// Loads, in batched round trips, every member a patch names by reference, so adding
    /// 10,000 members costs two queries, not 10,000.
    pub async fn prefetch_ops(&mut self, ops: &[(usize, MemberOp)]) -> Result<(), FhirError> {
        let mut refs = Vec::new();
        for (_, op) in ops {
            match op {
                MemberOp::Json(
                    Operation::Add { value, .. }
                    | Operation::Replace { value, .. }
                    | Operation::Remove { value: Some(value), .. },
                ) => match value {
                    Value::Array(items) => refs.extend(items.iter().filter_map(member_reference).map(str::to_string)),
                    other => refs.extend(member_reference(other).map(str::to_string)),
                },
                MemberOp::Add(value) => refs.extend(member_reference(value).map(str::to_string)),
                MemberOp::Remove(Selector::Reference(r))
                | MemberOp::Replace(Selector::Reference(r), _)
                | MemberOp::Edit(Selector::Reference(r), _) => refs.push(r.clone()),
                _ => {}
            }
        }
        refs.sort_unstable();
        refs.dedup();
        self.prefetch(refs).await
    }

    /// The member's current state in the virtual list: (member, position) when active.
    async fn current(&mut self, reference: &str) -> Result<Option<(CompactMember, u64)>, FhirError> {
        match self.touched.get(reference) {
            Some(Touched::Active { member, position }) => return Ok(Some(((**member).clone(), *position))),
            Some(Touched::Added { draft, position }) => {
                return Ok(Some((self.drafts[*draft].member.clone().into_owned(), *position)))
            }
            Some(Touched::Removed) => return Ok(None),
            None => {}
        }
        if !self.enumerated || self.ruled_out(reference) {
            return Ok(None); // not a member at the base version
        }
        if let Some(state) = self.pending_state(reference)? {
            return Ok(state);
        }
        if !self.base.contains_key(reference) {
            self.prefetch(vec![reference.to_string()]).await?;
        }
        Ok(self.base.get(reference).cloned().flatten().filter(|row| row.active).map(|row| {
            let value: Value = serde_json::from_str(&row.member_json).unwrap_or(Value::Null);
            let member = CompactMember::from_value(&value)
                .unwrap_or(CompactMember { reference: row.member_reference.clone(), json: row.member_json.clone() });
            (member, row.position)
        }))
    }

    fn virtual_len(&self) -> u64 {
        self.base_count - self.removed_base.len() as u64 + self.appended.len() as u64
    }

    /// The member at index `n` of the virtual list: (reference, member, position).
    async fn at(&mut self, n: u64) -> Result<Option<(String, CompactMember, u64)>, FhirError> {
        let base_visible = self.base_count - self.removed_base.len() as u64;
        if n >= base_visible {
            let Some(reference) = self.appended.get((n - base_visible) as usize).cloned() else {
                return Ok(None);
            };
            return Ok(self.current(&reference).await?.map(|(m, p)| (reference, m, p)));
        }
        // Find base index b whose member is not removed and has exactly n visible members
        // before it: b = n + (removed members positioned before it).
        self.require_no_pending()?;
        let mut b = n;
        loop {
            let Some(row) = self.source.at_index(&self.origin.group_id, b).await? else {
                return Ok(None);
            };
            let removed_before = self.removed_base.range(..row.position).count() as u64;
            if self.removed_base.contains(&row.position) {
                b += 1;
            } else if b == n + removed_before {
                let reference = row.member_reference.clone();
                self.base.entry(reference.clone()).or_insert(Some(row));
                return Ok(self.current(&reference).await?.map(|(m, p)| (reference, m, p)));
            } else {
                b = n + removed_before;
            }
        }
    }

    fn parse_index(&self, index: usize, path: &str, token: &str) -> Result<u64, FhirError> {
        let valid =
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) && (token == "0" || !token.starts_with('0'));
        let n: u64 = if valid { token.parse().unwrap_or(u64::MAX) } else { u64::MAX };
        if n == u64::MAX {
            return Err(op_error(index, path, format!("'{token}' is not an array index")));
        }
        if n >= self.virtual_len() {
            return Err(op_error(
                index,
                path,
                format!("index {n} is out of bounds (the group has {} members)", self.virtual_len()),
            ));
        }
        Ok(n)
    }

    async fn resolve(
        &mut self,
        index: usize,
        path: &str,
        token: &str,
    ) -> Result<(String, CompactMember, u64), FhirError> {
        let n = self.parse_index(index, path, token)?;
        self.at(n).await?.ok_or_else(|| op_error(index, path, format!("no member at index {n}")))
    }

    fn draft(&mut self, event_type: EventType, member: Cow<'a, CompactMember>, position: Option<u64>) -> u64 {
        let position = position.unwrap_or_else(|| ver(self.origin.version, self.drafts.len() as u32));
        self.drafts.push(Draft { event_type, member, position });
        position
    }

    /// Queues a member from a PATCH for validation at [`Self::finish`]; plain members are
    /// valid as they are (see `body::is_plain_member`) and are not copied.
    fn check_later(&mut self, index: usize, member: &Value) {
        if !is_plain_member(member) {
            self.to_validate.push((index, member.clone()));
        }
    }

    /// Adds a member given in a PATCH (validated at [`Self::finish`]).
    pub async fn add(&mut self, index: usize, member: &Value) -> Result<(), FhirError> {
        let compact = CompactMember::from_value(member).ok_or_else(|| {
            FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                IssueCode::Required,
                format!(
                    "operation {index}: a member needs entity.reference (this server identifies members by reference)"
                ),
            )
        })?;
        // Validated whether or not it changes anything: a no-op add is no licence for an
        // invalid value.
        self.check_later(index, member);
        self.add_compact(Cow::Owned(compact)).await?;
        Ok(())
    }

    /// Adds a member at the end unless it is already active; true when it was added.
    async fn add_compact(&mut self, member: Cow<'a, CompactMember>) -> Result<bool, FhirError> {
        if self.current(&member.reference).await?.is_some() {
            return Ok(false);
        }
        let reference = member.reference.clone();
        let draft = self.drafts.len();
        let position = self.draft(EventType::Added, member, None);
        self.touched.insert(reference.clone(), Touched::Added { draft, position });
        self.appended.push(reference);
        Ok(true)
    }

    /// Removes a member if it is active; false when it was not.
    pub async fn remove(&mut self, reference: &str) -> Result<bool, FhirError> {
        let Some((_, position)) = self.current(reference).await? else {
            return Ok(false);
        };
        if let Some(i) = self.appended.iter().position(|r| r == reference) {
            self.appended.remove(i);
        } else {
            self.removed_base.insert(position);
        }
        self.draft(EventType::Removed, Cow::Owned(CompactMember::gone(reference)), Some(position));
        self.touched.insert(reference.to_string(), Touched::Removed);
        Ok(true)
    }

    fn update(&mut self, index: usize, member: Value, position: u64) {
        let Some(compact) = CompactMember::from_value(&member) else { return };
        self.check_later(index, &member);
        self.draft(EventType::Updated, Cow::Owned(compact.clone()), Some(position));
        self.touched.insert(compact.reference.clone(), Touched::Active { member: Box::new(compact), position });
    }

    /// Every active member's reference (for remove-all and whole-array replacement).
    async fn all_active(&mut self) -> Result<Vec<String>, FhirError> {
        self.require_no_pending()?;
        let mut base = Vec::new();
        for row in self.source.all_active(&self.origin.group_id).await? {
            base.push(row.member_reference.clone());
            self.base.insert(row.member_reference.clone(), Some(row));
        }
        let mut out = Vec::new();
        for reference in base.into_iter().chain(self.appended.clone()) {
            if self.current(&reference).await?.is_some() {
                out.push(reference);
            }
        }
        Ok(out)
    }

    /// Makes the membership exactly `members` (PUT, POST, or replacing `/member`).
    /// Members must have distinct references (see `group::body`).
    pub async fn replace_all(&mut self, members: &'a [CompactMember]) -> Result<(), FhirError> {
        if !self.enumerated && self.drafts.is_empty() {
            // A group with no members yet (POST, first PUT): every member is an add, and
            // this is the write's only member change, so no per-member bookkeeping is
            // needed; each event borrows its member from the parsed body.
            for member in members {
                self.draft(EventType::Added, Cow::Borrowed(member), None);
            }
            return Ok(());
        }
        if self.virtual_len() > 0 {
            let keep: HashSet<&str> = members.iter().map(|m| m.reference.as_str()).collect();
            for reference in self.all_active().await? {
                if !keep.contains(reference.as_str()) {
                    self.remove(&reference).await?;
                }
            }
        }
        self.prefetch(members.iter().map(|m| m.reference.clone()).collect()).await?;
        for member in members {
            match self.current(&member.reference).await? {
                Some((old, _)) if old.json == member.json || patch::json_equal(&old.value(), &member.value()) => {}
                Some((_, position)) => {
                    self.draft(EventType::Updated, Cow::Borrowed(member), Some(position));
                    self.touched.insert(
                        member.reference.clone(),
                        Touched::Active { member: Box::new(member.clone()), position },
                    );
                }
                None => {
                    self.add_compact(Cow::Borrowed(member)).await?;
                }
            }
        }
        Ok(())
    }

    /// Validates the added and changed members and returns the planned batch.
    pub fn finish(self) -> Result<Planned<'a>, FhirError> {
        validate_members(&self.to_validate)?;
        let count = self.drafts.iter().fold(self.base_count, |c, d| match d.event_type {
            EventType::Added => c + 1,
            EventType::Removed => c - 1,
            EventType::Updated => c,
        });
        let enumerated = self.enumerated || !self.drafts.is_empty();
        Ok(Planned {
            origin: self.origin,
            base_count: self.base_count,
            drafts: self.drafts,
            count: enumerated.then_some(count),
        })
    }
}

mod ops;
mod planned;
#[cfg(test)]
mod tests;

use planned::validate_members;
pub use planned::Planned;
