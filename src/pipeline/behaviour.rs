//! Resource-specific behaviour, behind one small trait, so the generic write path never
//! tests a resource type.
//!
//! A type that stores more than its JSON document (a Group whose members are event-sourced
//! today; search indexing next) registers a [`Behaviour`] in [`Behaviours`]. Every write of
//! that type gets a [`Share`], made by [`Behaviour::begin`], which the stages consult at
//! fixed points:
//!
//! 1. load: [`Share::may_start_from_memory`] and [`Share::writes`] decide how the base
//!    version is read;
//! 2. draft: the generic stage builds the new content;
//! 3. plan: [`Share::plan`] adds what the type writes with the commit (an outbox batch, a
//!    member count);
//! 4. commit: on failure [`Share::abandon`] undoes what `plan` prepared outside the commit;
//! 5. after-commit: [`Share::committed`] updates in-process caches and starts the type's
//!    background work, before the post-save hooks run.
//!
//! Types without a registered behaviour get [`Plain`], whose share does nothing.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use bson::{DateTime, Document};

use crate::store::OutboxBatch;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::{Change, Interaction, RequestContext};
use crate::error::FhirError;
use crate::store::{MemberCount, Version, Writes};

/// What a type's body reader kept out of the JSON body (a Group's parsed member array),
/// carried to that type's [`Behaviour::begin`] without the pipeline looking inside.
pub struct Detached(Box<dyn Any + Send + Sync>);

impl Detached {
    pub fn new<T: Any + Send + Sync>(value: T) -> Detached {
        Detached(Box::new(value))
    }

    /// The value, when it is a `T` (a behaviour reads what its own body reader made).
    pub fn take<T: Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Detached(..)")
    }
}

/// What a resource type adds to reads and writes.
pub trait Behaviour: Send + Sync + 'static {
    /// The element this type keeps out of its stored content (a Group's `member`): reads
    /// put it back, and responses that show less than a read say so ([`Self::abridge`]).
    fn detached_element(&self) -> Option<&'static str> {
        None
    }

    /// Reads a JSON POST/PUT body into the stored content and the detached part. `None`:
    /// the type has nothing detached, read the body as plain JSON.
    fn read_body(&self, _json: &[u8], _strict: bool) -> Option<Result<(Value, Option<Detached>), FhirError>> {
        None
    }

    /// Starts one write's share: takes from `change` what the type handles itself (a
    /// Group's member operations) and returns the rest.
    fn begin(&self, id: &str, change: Change, detached: Option<Detached>) -> Result<Begun, FhirError>;

    /// Runs before any version of a resource is shown (a Group's pending member batches
    /// are finished, so nobody sees a version whose events are missing).
    fn before_read<'a>(&'a self, _id: &'a str, _current: &'a Version) -> BoxFuture<'a, Result<(), FhirError>> {
        Box::pin(async { Ok(()) })
    }

    /// Shapes a version shown in a Bundle or a write response, where the detached element
    /// is left out (a Group gets `quantity` and the `SUBSETTED` tag).
    fn abridge(&self, _resource: &mut Map<String, Value>, _count: Option<u64>) {}
}

/// A write once its type took its part: the rest of the change, and the share.
pub struct Begun {
    pub change: Change,
    /// For a PATCH whose operations were split: the original number of each remaining
    /// operation, for error messages (see `Patch::apply_numbered`); empty: as they come.
    pub patch_numbers: Vec<usize>,
    pub share: Box<dyn Share>,
}

/// The version being written, as drafted by the generic stages; what a share plans against.
pub struct Draft<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub interaction: Interaction,
    /// The base version (`None`: the resource is created).
    pub base: Option<&'a Version>,
    pub version: i64,
    pub last_updated: DateTime,
}

/// What a share adds to a commit.
#[derive(Debug, Default)]
pub struct Planned {
    /// A batch pushed onto the document's `outbox` with the version (see `group::outbox`).
    pub outbox: Option<OutboxBatch>,
    /// Recorded with the version (`Unrecorded` writes nothing).
    pub member_count: MemberCount,
}

/// Why a commit did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// The version guard refused it: nothing was written.
    LostRace,
    /// MongoDB failed: the commit may or may not have happened.
    Unknown,
}

/// One write's type-specific part; every method has a do-nothing default.
pub trait Share: Send {
    /// The first attempt may start from the document this process committed last
    /// ([`Base::Remembered`](crate::store::Base::Remembered)), because the write is one of a stream to the same resource.
    fn may_start_from_memory(&self) -> bool {
        false
    }

    /// What the write changes of the stored content: [`Writes::MetaOnly`] keeps it as it is
    /// (the generic stage then applies nothing) and only stamps `meta`.
    fn writes(&self) -> Writes {
        Writes::Content
    }

    /// Plans what the type writes with the commit, once per attempt.
    fn plan<'a>(
        &'a mut self,
        _ctx: &'a RequestContext,
        _draft: &'a Draft<'a>,
    ) -> BoxFuture<'a, Result<Planned, FhirError>> {
        Box::pin(async { Ok(Planned::default()) })
    }

    /// The commit of the last plan failed.
    fn abandon(&mut self, _why: Failed) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The commit happened: `committed` is the document as written. Runs before the
    /// post-save hooks, and may tell them something through `ctx`.
    fn committed(&mut self, _ctx: &mut RequestContext, _draft: &Draft<'_>, _committed: &Document) {}
}

/// A type written as its JSON document and nothing else.
pub struct Plain;

struct PlainShare;

impl Share for PlainShare {}

impl Behaviour for Plain {
    fn begin(&self, _id: &str, change: Change, _detached: Option<Detached>) -> Result<Begun, FhirError> {
        Ok(Begun { change, patch_numbers: Vec::new(), share: Box::new(PlainShare) })
    }
}

/// The registered behaviours, by resource type.
#[derive(Clone, Default)]
pub struct Behaviours(Arc<HashMap<&'static str, Arc<dyn Behaviour>>>);

impl Behaviours {
    /// These behaviours and `behaviour` for `resource_type`.
    pub fn with(self, resource_type: &'static str, behaviour: Arc<dyn Behaviour>) -> Behaviours {
        let mut map: HashMap<_, _> = self.0.iter().map(|(k, v)| (*k, v.clone())).collect();
        map.insert(resource_type, behaviour);
        Behaviours(Arc::new(map))
    }

    /// The behaviour of `resource_type` ([`Plain`] when none is registered).
    pub fn of(&self, resource_type: &str) -> &dyn Behaviour {
        match self.0.get(resource_type) {
            Some(b) => b.as_ref(),
            None => &Plain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_types_are_plain_and_detached_values_come_back_typed() {
        struct Tagged;
        impl Behaviour for Tagged {
            fn detached_element(&self) -> Option<&'static str> {
                Some("member")
            }
            fn begin(&self, _id: &str, change: Change, _d: Option<Detached>) -> Result<Begun, FhirError> {
                Plain.begin("", change, None)
            }
        }
        let behaviours = Behaviours::default().with("Group", Arc::new(Tagged));
        assert_eq!(behaviours.of("Group").detached_element(), Some("member"));
        assert_eq!(behaviours.of("Patient").detached_element(), None);
        assert_eq!(Detached::new(vec![1u8, 2]).take::<Vec<u8>>(), Some(vec![1, 2]));
        assert_eq!(Detached::new(1u8).take::<String>(), None, "another type is not taken");
    }
}
