//! FHIR writes recorded as events in the general event store: the routing file says which
//! writes become which events on which streams (`routes`), and a post-save hook appends
//! them, durably, with a sweep for writes whose hook did not finish (`recorder`).
//!
//! Its own module because it joins two that must not know each other: the write pipeline
//! (it is a hook) and the event store (it appends).

pub mod recorder;
pub mod routes;
