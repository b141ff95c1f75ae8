//! Stage 1, load: reads the base version of a write and checks the preconditions that
//! depend on it only (`If-Match`).

use super::Stop;
use crate::error::FhirError;
use crate::store::{Base, ResourceStore, Version, Writes};

/// The base version of one attempt.
pub(super) struct Loaded {
    /// The current version, possibly a tombstone; `None` when the resource never existed.
    pub current: Option<Version>,
    /// `current` is the document this process committed last, not a fresh read: anything
    /// that contradicts it makes the attempt read again instead of answering.
    pub guessed: bool,
}

impl Loaded {
    /// The current version unless it is a deletion.
    pub fn live(&self) -> Option<&Version> {
        self.current.as_ref().filter(|c| !c.deleted)
    }
}

/// What to read: where from, what the write will change, and the `If-Match` version.
pub(super) struct Load<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub base: Base,
    pub writes: Writes,
    pub if_match: Option<i64>,
    /// A POST's server-assigned id: no version can exist, so nothing is read (a collision
    /// would fail the insert's guard and be retried like any lost race).
    pub fresh_id: bool,
}

pub(super) async fn load(store: &ResourceStore, l: Load<'_>) -> Result<Loaded, Stop> {
    let (rt, id) = (l.resource_type, l.id);
    let (current, from) = match l.fresh_id {
        true => (None, Base::Stored),
        false => store.read_for_write(rt, id, l.base, l.writes).await.map_err(FhirError::from)?,
    };
    let guessed = from == Base::Remembered;
    if let Some(expected) = l.if_match {
        match &current {
            Some(c) if c.version == expected => {}
            _ if guessed => {
                store.forget_recent(rt, id);
                return Err(Stop::Retry);
            }
            Some(c) => {
                return Err(Stop::Fail(FhirError::precondition_failed(format!(
                    "If-Match W/\"{expected}\" does not match the current version W/\"{}\"",
                    c.version
                ))))
            }
            None => {
                return Err(Stop::Fail(FhirError::precondition_failed(format!(
                    "If-Match W/\"{expected}\" given, but {rt}/{id} does not exist"
                ))))
            }
        }
    }
    Ok(Loaded { current, guessed })
}
