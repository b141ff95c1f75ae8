//! An in-process index of who is an active member of a group, at a known group version.
//!
//! Why: a single-member PATCH must know whether the member is already active (adding an
//! active member is a no-op, and the count travels with the version), and asking
//! ClickHouse costs a round trip of several milliseconds, more than the whole write is
//! allowed. The index keeps a 64-bit hash of every active member's reference, so:
//! * a miss means "not an active member" for certain: no ClickHouse query at all (the
//!   common case: adding new members);
//! * a hit means "probably": the planner then reads the member's row (or the pending
//!   batch) to be exact, so a hash collision can cost a query but never a wrong answer.
//!
//! The index is only trusted at the exact version it was built or advanced to. A write
//! from this process advances it with its own events after its commit; a version it has
//! not seen (another server process wrote, a commit whose outcome is unknown) makes it
//! stale, and the next writer rebuilds it from the events as of the version it reads.
//! Memory is bounded: about 26 bytes per indexed member, at most `capacity` members over
//! all groups, least recently used groups dropped first.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::events::EventType;

/// The hash a reference is indexed under (fixed keys: stable within the process).
fn key(reference: &str) -> u64 {
    let mut h = DefaultHasher::new();
    reference.hash(&mut h);
    h.finish()
}

struct Entry {
    version: i64,
    /// Hash → how many active members have it (more than one only on a collision).
    members: HashMap<u64, u32>,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<String, Entry>,
    /// Members indexed over all groups.
    total: usize,
    tick: u64,
}

pub struct MemberIndex {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// What the index says of a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Certainly not an active member.
    Absent,
    /// Perhaps an active member: read its row to be sure.
    Maybe,
}

impl MemberIndex {
    /// `capacity`: most members indexed over all groups (0 disables the index).
    pub fn new(capacity: usize) -> MemberIndex {
        MemberIndex { inner: Mutex::new(Inner::default()), capacity }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the group is indexed at exactly `version`.
    pub fn is_current(&self, group: &str, version: i64) -> bool {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        match inner.groups.get_mut(group) {
            Some(e) if e.version == version => {
                e.last_used = tick;
                true
            }
            _ => false,
        }
    }

    /// Whether a group of `members` active members may be indexed at all.
    pub fn fits(&self, members: u64) -> bool {
        members as usize <= self.capacity
    }

    /// `None` when the group is not indexed at `version` (ask ClickHouse).
    pub fn presence(&self, group: &str, version: i64, reference: &str) -> Option<Presence> {
        let inner = self.lock();
        let e = inner.groups.get(group).filter(|e| e.version == version)?;
        Some(if e.members.contains_key(&key(reference)) { Presence::Maybe } else { Presence::Absent })
    }

    /// Replaces the group's entry with `references` (the active members at `version`).
    /// Gives up (the group stays unindexed) when they do not fit.
    pub fn load<'r>(&self, group: &str, version: i64, references: impl IntoIterator<Item = &'r str>) -> bool {
        let mut loading = Loading::default();
        for r in references {
            loading.add(r);
        }
        self.install(group, version, loading)
    }

    /// Installs an entry built with [`Loading`] (the references arrive as a stream).
    pub fn install(&self, group: &str, version: i64, loading: Loading) -> bool {
        self.insert(group, Entry { version, members: loading.members, last_used: 0 })
    }

    fn insert(&self, group: &str, mut entry: Entry) -> bool {
        let mut inner = self.lock();
        let size = entry.members.len();
        if size > self.capacity {
            return false;
        }
        if let Some(old) = inner.groups.remove(group) {
            inner.total -= old.members.len();
        }
        // Least recently used groups make room.
        while inner.total + size > self.capacity {
            let Some(victim) = inner.groups.iter().min_by_key(|(_, e)| e.last_used).map(|(g, _)| g.clone()) else {
                break;
            };
            if let Some(old) = inner.groups.remove(&victim) {
                inner.total -= old.members.len();
            }
        }
        inner.tick += 1;
        entry.last_used = inner.tick;
        inner.total += size;
        inner.groups.insert(group.to_string(), entry);
        true
    }

    /// After a committed write moved the group from `from` to `to` with these events:
    /// applies them when the index was at `from`, else drops the (stale) entry. A group
    /// with no entry gets one when it had no members at `from` (nothing to load).
    pub fn advance(&self, group: &str, from: Option<i64>, to: i64, empty_before: bool, changes: &Changes) {
        let mut inner = self.lock();
        let total_before = inner.total;
        let Some(entry) = inner.groups.get_mut(group) else {
            drop(inner);
            if empty_before && self.capacity > 0 {
                let mut members: HashMap<u64, u32> = HashMap::new();
                apply(&mut members, changes);
                self.insert(group, Entry { version: to, members, last_used: 0 });
            }
            return;
        };
        if Some(entry.version) != from {
            let size = entry.members.len();
            inner.groups.remove(group);
            inner.total = total_before - size;
            return;
        }
        let before = entry.members.len();
        apply(&mut entry.members, changes);
        entry.version = to;
        let after = entry.members.len();
        inner.total = total_before - before + after;
        if inner.total > self.capacity {
            let size = inner.groups.remove(group).map_or(0, |e| e.members.len());
            inner.total -= size;
        }
    }

    /// Drops a group's entry (its state is no longer known here).
    pub fn forget(&self, group: &str) {
        let mut inner = self.lock();
        if let Some(old) = inner.groups.remove(group) {
            inner.total -= old.members.len();
        }
    }
}

/// An entry being built from a stream of active member references.
#[derive(Default)]
pub struct Loading {
    members: HashMap<u64, u32>,
}

impl Loading {
    pub fn add(&mut self, reference: &str) {
        *self.members.entry(key(reference)).or_default() += 1;
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// A write's member changes as the index applies them: `(event, hash of the reference)`,
/// 16 bytes an event, so a planned batch need not be kept until its commit is known.
#[derive(Debug, Default, Clone)]
pub struct Changes(Vec<(EventType, u64)>);

impl Changes {
    pub fn of<'r>(changes: impl IntoIterator<Item = (EventType, &'r str)>) -> Changes {
        Changes(changes.into_iter().map(|(t, reference)| (t, key(reference))).collect())
    }
}

fn apply(members: &mut HashMap<u64, u32>, changes: &Changes) {
    for &(event_type, k) in &changes.0 {
        match event_type {
            EventType::Added => *members.entry(k).or_default() += 1,
            EventType::Removed => {
                if let Some(n) = members.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        members.remove(&k);
                    }
                }
            }
            EventType::Updated => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_at_its_version_and_follows_writes() {
        let index = MemberIndex::new(100);
        assert!(index.load("g", 3, ["Patient/1", "Patient/2"]));
        assert_eq!(index.presence("g", 3, "Patient/1"), Some(Presence::Maybe));
        assert_eq!(index.presence("g", 3, "Patient/9"), Some(Presence::Absent));
        assert_eq!(index.presence("g", 4, "Patient/1"), None, "another version is not known");
        index.advance(
            "g",
            Some(3),
            4,
            false,
            &Changes::of([(EventType::Removed, "Patient/1"), (EventType::Added, "Patient/9")]),
        );
        assert_eq!(index.presence("g", 4, "Patient/1"), Some(Presence::Absent));
        assert_eq!(index.presence("g", 4, "Patient/9"), Some(Presence::Maybe));
        // A write this process did not see (5 → 6) makes the entry stale: it is dropped.
        index.advance("g", Some(5), 6, false, &Changes::default());
        assert!(!index.is_current("g", 6));
        assert!(!index.is_current("g", 4));
    }

    #[test]
    fn a_new_group_is_indexed_from_its_first_write_and_capacity_evicts_the_oldest() {
        let index = MemberIndex::new(3);
        index.advance(
            "a",
            None,
            1,
            true,
            &Changes::of([(EventType::Added, "Patient/1"), (EventType::Added, "Patient/2")]),
        );
        assert!(index.is_current("a", 1));
        index.advance(
            "b",
            None,
            1,
            true,
            &Changes::of([(EventType::Added, "Patient/1"), (EventType::Added, "Patient/2")]),
        );
        assert!(index.is_current("b", 1));
        assert!(!index.is_current("a", 1), "a was least recently used and made room for b");
        assert!(!index.load("c", 1, ["1", "2", "3", "4"]), "larger than the whole index");
        assert!(!index.fits(4));
    }
}
