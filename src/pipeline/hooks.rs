use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::RequestContext;

/// The interaction that produced a saved version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Update,
    Patch,
    Delete,
}

impl Interaction {
    /// The HTTP method recorded in history (`Bundle.entry.request.method`).
    pub fn method(self) -> &'static str {
        match self {
            Interaction::Create => "POST",
            Interaction::Update => "PUT",
            Interaction::Patch => "PATCH",
            Interaction::Delete => "DELETE",
        }
    }
}

/// What a hook is told about a committed write.
#[derive(Debug)]
pub struct Saved<'a> {
    pub interaction: Interaction,
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version: i64,
    /// The stored resource; `None` for a delete.
    pub resource: Option<&'a Map<String, Value>>,
    /// The version this write replaced, if any.
    pub previous: Option<&'a Map<String, Value>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

/// Work that follows a committed write (event recording, projections, …).
///
/// Hooks run after the commit: a failing hook cannot undo the write, so it is logged with
/// the request id and the client still gets its success. A hook whose work must not be
/// lost records it durably before the commit (an outbox) and uses the hook only to finish.
pub trait PostSaveHook: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// True when this hook's work for writes of `rt` must survive a crash: the save path
    /// then marks the write in its commit, and clears the mark once every such hook
    /// succeeded (with the version's history flag, in one update); a mark left behind is
    /// the hook's own sweep's (see `recording::recorder`).
    fn durable_for(&self, _rt: &str) -> bool {
        false
    }
    fn after_save<'a>(&'a self, ctx: &'a RequestContext, saved: &'a Saved<'a>) -> BoxFuture<'a, Result<(), HookError>>;
}

/// The registered hooks, run in registration order.
#[derive(Clone, Default)]
pub struct Hooks(Arc<Vec<Arc<dyn PostSaveHook>>>);

impl Hooks {
    pub fn with(self, hook: Arc<dyn PostSaveHook>) -> Self {
        let mut hooks: Vec<_> = self.0.iter().cloned().collect();
        hooks.push(hook);
        Hooks(Arc::new(hooks))
    }

    /// These hooks followed by `other`'s.
    pub fn extend(self, other: Hooks) -> Self {
        let mut hooks: Vec<_> = self.0.iter().cloned().collect();
        hooks.extend(other.0.iter().cloned());
        Hooks(Arc::new(hooks))
    }

    /// Some hook's work for writes of `rt` must survive a crash.
    pub fn durable_for(&self, rt: &str) -> bool {
        self.0.iter().any(|h| h.durable_for(rt))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|h| h.name()).collect()
    }

    /// Runs the hooks in order. True when every hook durable for the type succeeded: the
    /// mark the commit set for them may go (see [`PostSaveHook::durable_for`]).
    pub async fn run(&self, ctx: &RequestContext, saved: &Saved<'_>) -> bool {
        let mut durable_done = true;
        for hook in self.0.iter() {
            if let Err(e) = hook.after_save(ctx, saved).await {
                tracing::error!(hook = hook.name(), resource_type = saved.resource_type, id = saved.id,
                    version = saved.version, error = %e, "post-save hook failed");
                durable_done &= !hook.durable_for(saved.resource_type);
            }
        }
        durable_done
    }
}
