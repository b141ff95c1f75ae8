//! The one write path: every create, update, patch and delete goes through [`save()`], which
//! validates, commits under the version guard, and then runs the post-save hooks with the
//! request's [`RequestContext`].

pub mod context;
pub mod hooks;
pub mod locks;
pub mod save;

pub use context::{Flag, RequestContext};
pub use hooks::{HookError, Hooks, Interaction, PostSaveHook, Saved};
pub use locks::WriteLocks;
pub use save::{save, Change, SaveOutcome, SaveRequest};
