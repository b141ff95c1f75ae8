use std::collections::BTreeSet;

/// Facts about one request that travel with its write, from the handler through the store
/// to the post-save hooks.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The `X-Request-Id` of the request (generated when the client sent none).
    pub request_id: String,
    /// Who made the request, when known (`X-Actor` header until authentication exists).
    pub actor: Option<String>,
    flags: BTreeSet<Flag>,
}

/// Things a step of the write path tells later steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Flag {
    /// Group member changes of this write were already stored as member events, so hooks
    /// must not process `Group.member` again.
    MemberEventsWritten,
}

impl RequestContext {
    pub fn new(request_id: impl Into<String>, actor: Option<String>) -> Self {
        RequestContext { request_id: request_id.into(), actor, flags: BTreeSet::new() }
    }

    pub fn set(&mut self, flag: Flag) {
        self.flags.insert(flag);
    }

    pub fn has(&self, flag: Flag) -> bool {
        self.flags.contains(&flag)
    }
}
