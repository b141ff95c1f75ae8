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
//!   that is already active is a no-op.
//! * `remove /member/N` removes the N-th member of the virtual list, so earlier operations
//!   of the same patch shift indexes exactly as RFC 6902 says.
//! * `remove /member` with `value.entity.reference` (the extension of the peer server)
//!   removes that member if active; without a value it removes every member.
//! * `replace /member/N` with the same entity updates it; with another entity it removes
//!   the old and adds the new. `add`/`replace`/`remove`/`test` below `/member/N/` change or
//!   check that member (`entity` cannot change: remove and add instead).
//! * `test /member/N` compares against the current member; `add`/`replace /member` with
//!   an array replaces the whole membership (like PUT).
//! * A member's identity is `entity.reference`; a body listing one entity twice is refused.

use std::collections::{BTreeSet, HashMap, HashSet};

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::events::{ver, EventType, MemberEvent};
use super::read::{self, MemberRow};
use crate::error::{FhirError, IssueCode};
use crate::model::patch::{self, Operation};
use crate::model::validate::validate_resource;

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

struct Draft {
    event_type: EventType,
    reference: String,
    member: Value,
    position: u64,
}

/// What the virtual list knows about a member this patch touched.
#[derive(Clone)]
enum Touched {
    Active { member: Value, position: u64 },
    Removed,
}

pub struct Planner<'a> {
    ch: &'a clickhouse::Client,
    origin: Origin,
    base_count: u64,
    /// The group had member events before this write.
    enumerated: bool,
    touched: HashMap<String, Touched>,
    base: HashMap<String, Option<MemberRow>>,
    /// Positions of base members this patch removed.
    removed_base: BTreeSet<u64>,
    /// Members activated by this patch, in order, still active.
    appended: Vec<String>,
    drafts: Vec<Draft>,
    /// (operation index, member) pairs to validate.
    to_validate: Vec<(usize, Value)>,
    /// Members arrive already validated (a whole POST/PUT body).
    validated: bool,
}

fn ch_error(e: clickhouse::error::Error) -> FhirError {
    FhirError::unavailable(format!("the member store is unavailable: {e}"))
}

fn op_error(index: usize, path: &str, message: impl std::fmt::Display) -> FhirError {
    FhirError::unprocessable(format!("operation {index} ({path}): {message}"))
}

/// The identity of a member element: its `entity.reference`.
pub fn member_reference(member: &Value) -> Option<&str> {
    member.pointer("/entity/reference").and_then(Value::as_str).filter(|r| !r.is_empty())
}

fn member_type(member: &Value, reference: &str) -> String {
    if let Some(t) = member.pointer("/entity/type").and_then(Value::as_str) {
        return t.to_string();
    }
    let parts: Vec<&str> = reference.rsplitn(3, '/').collect();
    match parts.as_slice() {
        [_, t, ..] if fhir_model::is_resource_type(t) => t.to_string(),
        _ => String::new(),
    }
}

impl<'a> Planner<'a> {
    /// `known` = the group's member count at the base version when the caller knows it
    /// (`Some(None)`: never enumerated); otherwise it is read from ClickHouse.
    pub async fn new(
        ch: &'a clickhouse::Client,
        origin: Origin,
        known: Option<Option<u64>>,
    ) -> Result<Planner<'a>, FhirError> {
        let base = match known {
            Some(known) => known,
            None => read::enumerated_count(ch, &origin.group_id, None).await.map_err(ch_error)?,
        };
        Ok(Planner {
            ch,
            origin,
            base_count: base.unwrap_or(0),
            enumerated: base.is_some(),
            touched: HashMap::new(),
            base: HashMap::new(),
            removed_base: BTreeSet::new(),
            appended: Vec::new(),
            drafts: Vec::new(),
            to_validate: Vec::new(),
            validated: false,
        })
    }

    /// The members given to this planner were validated with their resource already.
    pub fn members_validated(&mut self) {
        self.validated = true;
    }

    /// Loads the base state of many members in one round trip (before a batch of adds).
    pub async fn prefetch(&mut self, references: Vec<String>) -> Result<(), FhirError> {
        let wanted: Vec<String> = references.into_iter().filter(|r| !self.base.contains_key(r)).collect();
        if !self.enumerated {
            // No member events yet: nobody is a member.
            self.base.extend(wanted.into_iter().map(|r| (r, None)));
            return Ok(());
        }
        for chunk in wanted.chunks(5_000) {
            let found = read::lookup(self.ch, &self.origin.group_id, chunk).await.map_err(ch_error)?;
            for r in chunk {
                self.base.insert(r.clone(), found.get(r).cloned());
            }
        }
        Ok(())
    }

    /// Loads, in batched round trips, every member a patch names by reference, so adding
    /// 10,000 members costs two queries, not 10,000.
    pub async fn prefetch_ops(&mut self, ops: &[(usize, Operation)]) -> Result<(), FhirError> {
        let mut refs = Vec::new();
        for (_, op) in ops {
            match op {
                Operation::Add { value, .. }
                | Operation::Replace { value, .. }
                | Operation::Remove { value: Some(value), .. } => match value {
                    Value::Array(items) => refs.extend(items.iter().filter_map(member_reference).map(str::to_string)),
                    other => refs.extend(member_reference(other).map(str::to_string)),
                },
                _ => {}
            }
        }
        refs.sort_unstable();
        refs.dedup();
        self.prefetch(refs).await
    }

    /// The member's current state in the virtual list: (member, position) when active.
    async fn current(&mut self, reference: &str) -> Result<Option<(Value, u64)>, FhirError> {
        match self.touched.get(reference) {
            Some(Touched::Active { member, position }) => return Ok(Some((member.clone(), *position))),
            Some(Touched::Removed) => return Ok(None),
            None => {}
        }
        if !self.base.contains_key(reference) {
            self.prefetch(vec![reference.to_string()]).await?;
        }
        Ok(self.base.get(reference).cloned().flatten().filter(|row| row.active).map(|row| {
            let member = serde_json::from_str(&row.member_json).unwrap_or(Value::Null);
            (member, row.position)
        }))
    }

    fn virtual_len(&self) -> u64 {
        self.base_count - self.removed_base.len() as u64 + self.appended.len() as u64
    }

    /// The member at index `n` of the virtual list: (reference, member, position).
    async fn at(&mut self, n: u64) -> Result<Option<(String, Value, u64)>, FhirError> {
        let base_visible = self.base_count - self.removed_base.len() as u64;
        if n >= base_visible {
            let Some(reference) = self.appended.get((n - base_visible) as usize).cloned() else {
                return Ok(None);
            };
            return Ok(self.current(&reference).await?.map(|(m, p)| (reference, m, p)));
        }
        // Find base index b whose member is not removed and has exactly n visible members
        // before it: b = n + (removed members positioned before it).
        let mut b = n;
        loop {
            let Some(row) = read::at_index(self.ch, &self.origin.group_id, b).await.map_err(ch_error)? else {
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

    async fn resolve(&mut self, index: usize, path: &str, token: &str) -> Result<(String, Value, u64), FhirError> {
        let n = self.parse_index(index, path, token)?;
        self.at(n).await?.ok_or_else(|| op_error(index, path, format!("no member at index {n}")))
    }

    fn draft(&mut self, event_type: EventType, reference: &str, member: Value, position: Option<u64>) -> u64 {
        let position = position.unwrap_or_else(|| ver(self.origin.version, self.drafts.len() as u32));
        self.drafts.push(Draft { event_type, reference: reference.to_string(), member, position });
        position
    }

    /// Adds a member at the end unless it is already active.
    pub async fn add(&mut self, index: usize, member: Value) -> Result<(), FhirError> {
        let reference = member_reference(&member)
            .ok_or_else(|| {
                FhirError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueCode::Required,
                    format!(
                    "operation {index}: a member needs entity.reference (this server identifies members by reference)"
                ),
                )
            })?
            .to_string();
        if self.current(&reference).await?.is_some() {
            return Ok(());
        }
        if !self.validated {
            self.to_validate.push((index, member.clone()));
        }
        let position = self.draft(EventType::Added, &reference, member.clone(), None);
        self.touched.insert(reference.clone(), Touched::Active { member, position });
        self.appended.push(reference);
        Ok(())
    }

    /// Removes a member if it is active.
    pub async fn remove(&mut self, reference: &str) -> Result<(), FhirError> {
        let Some((_, position)) = self.current(reference).await? else {
            return Ok(());
        };
        if let Some(i) = self.appended.iter().position(|r| r == reference) {
            self.appended.remove(i);
        } else {
            self.removed_base.insert(position);
        }
        self.draft(EventType::Removed, reference, Value::Null, Some(position));
        self.touched.insert(reference.to_string(), Touched::Removed);
        Ok(())
    }

    fn update(&mut self, index: usize, reference: &str, member: Value, position: u64) {
        if !self.validated {
            self.to_validate.push((index, member.clone()));
        }
        self.draft(EventType::Updated, reference, member.clone(), Some(position));
        self.touched.insert(reference.to_string(), Touched::Active { member, position });
    }

    /// Every active member (for remove-all and whole-array replacement).
    async fn all_active(&mut self) -> Result<Vec<(String, Value)>, FhirError> {
        let mut cursor = read::members(self.ch, &self.origin.group_id, None).map_err(ch_error)?;
        let mut base = Vec::new();
        while let Some(row) = cursor.next().await.map_err(ch_error)? {
            base.push(row.member_reference.clone());
            self.base.insert(row.member_reference.clone(), Some(row));
        }
        let mut out = Vec::new();
        for reference in base.into_iter().chain(self.appended.clone()) {
            if let Some((member, _)) = self.current(&reference).await? {
                out.push((reference, member));
            }
        }
        Ok(out)
    }

    /// Makes the membership exactly `members` (PUT, or replacing `/member`).
    pub async fn replace_all(&mut self, index: usize, members: Vec<Value>) -> Result<(), FhirError> {
        let mut wanted = Vec::with_capacity(members.len());
        let mut seen = HashSet::with_capacity(members.len());
        for (i, member) in members.into_iter().enumerate() {
            let reference = member_reference(&member)
                .ok_or_else(|| {
                    FhirError::new(StatusCode::BAD_REQUEST, IssueCode::Required, "a member needs entity.reference")
                        .at(format!("Group.member[{i}].entity.reference"))
                })?
                .to_string();
            if !seen.insert(reference.clone()) {
                return Err(FhirError::bad_request(format!(
                    "{reference} is listed twice; this server keeps one member entry per entity"
                ))
                .at(format!("Group.member[{i}]")));
            }
            wanted.push((reference, member));
        }
        if self.virtual_len() > 0 {
            let keep: HashSet<&String> = seen.iter().collect();
            for (reference, _) in self.all_active().await? {
                if !keep.contains(&reference) {
                    self.remove(&reference).await?;
                }
            }
        }
        self.prefetch(wanted.iter().map(|(r, _)| r.clone()).collect()).await?;
        for (reference, member) in wanted {
            match self.current(&reference).await? {
                Some((old, _)) if patch::json_equal(&old, &member) => {}
                Some((_, position)) => self.update(index, &reference, member, position),
                None => self.add(index, member).await?,
            }
        }
        Ok(())
    }

    /// Applies one member operation (its path starts with `/member`).
    pub async fn apply(&mut self, index: usize, op: &Operation) -> Result<(), FhirError> {
        let path = op.path().to_string();
        let tokens = patch::tokens(&path);
        match (op, tokens.len()) {
            (Operation::Add { value, .. } | Operation::Replace { value, .. }, 1) => {
                let Value::Array(members) = value else {
                    return Err(op_error(index, &path, "the member array must be a JSON array"));
                };
                self.replace_all(index, members.clone()).await
            }
            (Operation::Remove { value: Some(value), .. }, 1) => {
                let reference = member_reference(value)
                    .ok_or_else(|| op_error(index, &path, "remove by value needs value.entity.reference"))?
                    .to_string();
                self.remove(&reference).await
            }
            (Operation::Remove { value: None, .. }, 1) => {
                for (reference, _) in self.all_active().await? {
                    self.remove(&reference).await?;
                }
                Ok(())
            }
            (Operation::Add { value, .. }, 2) => {
                if tokens[1] != "-" {
                    let n = tokens[1].parse::<u64>().map_err(|_| op_error(index, &path, "not an array index"))?;
                    if n > self.virtual_len() {
                        return Err(op_error(
                            index,
                            &path,
                            format!("index {n} is past the end ({})", self.virtual_len()),
                        ));
                    }
                }
                self.add(index, value.clone()).await
            }
            (Operation::Remove { .. }, 2) => {
                let (reference, _, _) = self.resolve(index, &path, &tokens[1]).await?;
                self.remove(&reference).await
            }
            (Operation::Replace { value, .. }, 2) => {
                let (reference, old, position) = self.resolve(index, &path, &tokens[1]).await?;
                match member_reference(value) {
                    Some(r) if r == reference => {
                        if !patch::json_equal(&old, value) {
                            self.update(index, &reference, value.clone(), position);
                        }
                        Ok(())
                    }
                    _ => {
                        self.remove(&reference).await?;
                        self.add(index, value.clone()).await
                    }
                }
            }
            (Operation::Test { value, .. }, 2) => {
                let (_, current, _) = self.resolve(index, &path, &tokens[1]).await?;
                if patch::json_equal(&current, value) {
                    Ok(())
                } else {
                    Err(op_error(index, &path, format!("test failed: the member is {current}")))
                }
            }
            (Operation::Move { .. } | Operation::Copy { .. }, _) => {
                Err(op_error(index, &path, "move and copy are not supported on Group.member; use add and remove"))
            }
            (_, 1) => Err(op_error(index, &path, "test on the whole member array is not supported")),
            (_, _) => self.apply_inside(index, op, &tokens).await,
        }
    }

    /// An operation below `/member/N/`: applied to that member alone.
    async fn apply_inside(&mut self, index: usize, op: &Operation, tokens: &[String]) -> Result<(), FhirError> {
        let path = op.path().to_string();
        let (reference, current, position) = self.resolve(index, &path, &tokens[1]).await?;
        let inner: String =
            tokens[2..].iter().map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1"))).collect();
        if tokens[2] == "entity" && !matches!(op, Operation::Test { .. }) {
            return Err(op_error(
                index,
                &path,
                "a member's entity cannot change; remove the member and add the new one",
            ));
        }
        let relative = match op {
            Operation::Add { value, .. } => Operation::Add { path: inner, value: value.clone() },
            Operation::Remove { .. } => Operation::Remove { path: inner, value: None },
            Operation::Replace { value, .. } => Operation::Replace { path: inner, value: value.clone() },
            Operation::Test { value, .. } => Operation::Test { path: inner, value: value.clone() },
            Operation::Move { .. } | Operation::Copy { .. } => unreachable!("handled by the caller"),
        };
        let mut member = current.clone();
        patch::apply(&mut member, std::slice::from_ref(&relative)).map_err(|e| op_error(index, &path, e.reason))?;
        if member != current {
            self.update(index, &reference, member, position);
        }
        Ok(())
    }

    /// Validates the added and changed members; returns the events, in order, and the
    /// active member count after them (`None`: the membership was never enumerated).
    pub fn finish(self) -> Result<(Vec<MemberEvent>, Option<u64>), FhirError> {
        let enumerated = self.enumerated || !self.drafts.is_empty();
        validate_members(&self.to_validate)?;
        let o = &self.origin;
        let mut count = self.base_count;
        let events = self
            .drafts
            .into_iter()
            .enumerate()
            .map(|(seq, d)| {
                match d.event_type {
                    EventType::Added => count += 1,
                    EventType::Removed => count -= 1,
                    EventType::Updated => {}
                }
                let text = |p: &str| d.member.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
                MemberEvent {
                    group_id: o.group_id.clone(),
                    group_version: o.version,
                    seq: seq as u32,
                    ver: ver(o.version, seq as u32),
                    event_id: format!("{}/{}/{seq}", o.group_id, o.version),
                    event_type: d.event_type,
                    member_type: member_type(&d.member, &d.reference),
                    period_start: text("/period/start"),
                    period_end: text("/period/end"),
                    inactive: d.member.pointer("/inactive").and_then(Value::as_bool).unwrap_or(false),
                    member_json: if d.member.is_null() { String::new() } else { d.member.to_string() },
                    member_reference: d.reference,
                    position: d.position,
                    active_count: count,
                    actor: o.actor.clone(),
                    request_id: o.request_id.clone(),
                    source: o.source.to_string(),
                    event_time: o.event_time,
                }
            })
            .collect();
        Ok((events, enumerated.then_some(count)))
    }
}

/// Validates members as elements of an R4 Group (one parse for all of them).
fn validate_members(members: &[(usize, Value)]) -> Result<(), FhirError> {
    if members.is_empty() {
        return Ok(());
    }
    let group = json!({
        "resourceType": "Group", "type": "person", "actual": true,
        "member": members.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
    });
    validate_resource("Group", &group).map_err(|mut e| {
        // "Group.member[k]…" → the operation that brought member k.
        if let Some(expr) = &e.expression {
            if let Some(k) = expr
                .strip_prefix("Group.member[")
                .and_then(|r| r.split(']').next())
                .and_then(|k| k.parse::<usize>().ok())
            {
                if let Some((op, _)) = members.get(k) {
                    e.diagnostics = format!("operation {op}: {}", e.diagnostics);
                }
            }
        }
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e
    })
}
