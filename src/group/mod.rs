//! Event-sourced Group membership.
//!
//! `Group.member` never lives in MongoDB (unless `group_members = "embedded"`, the baseline
//! mode). Every change to membership is a [`events::MemberEvent`] in ClickHouse; views
//! keep current members by group, groups by member, and the active count.
//!
//! The write path, in the files named for their jobs:
//! 1. [`plan`] turns PATCH operations on `/member` (or a PUT/POST member array) into
//!    events, resolved against the group's state at the version being changed;
//!    [`index`] (an in-process hash index of active members at a known version) spares
//!    the planner a ClickHouse query for members that are certainly not active;
//! 2. [`outbox`] stores the events with the Group's version bump in one MongoDB document
//!    write (the commit point); after the answer, [`flusher`] inserts them into ClickHouse
//!    (one flusher per group at a time, several batches per insert) and clears them;
//! 3. [`read`] answers reads from the views, first finishing any pending batch so that no
//!    reader sees a version whose events are missing;
//! 4. [`hook`] is the post-save hook that syncs member arrays of full-resource writes; it
//!    skips writes whose context says member events were already written.
//!
//! [`writes`] plugs 1 and 2 into the generic write path (`pipeline`) as the Group's
//! behaviour.

pub mod body;
pub mod events;
pub mod flusher;
pub mod hook;
pub mod index;
pub mod outbox;
pub mod plan;
pub mod read;
pub mod search;
pub mod source;
pub mod split;
pub mod writes;

pub use crate::config::MemberStorage;
