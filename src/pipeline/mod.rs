//! The one write path: every create, update, patch and delete goes through a [`Writer`],
//! in named stages, each in its own file:
//!
//! 1. [`load`]: the base version, and `If-Match`;
//! 2. [`draft`]: the new content (a body checked, a patch applied, `meta` stamped);
//! 3. plan: what the resource type adds, through its [`behaviour::Share`];
//! 4. [`commit`]: under the version guard (the commit point);
//! 5. [`after`]: the history copy in the background; then the post-save [`hooks`] run with
//!    the request's [`RequestContext`].
//!
//! [`save`] runs them, and again after a lost race. Resource-specific behaviour (a Group's
//! event-sourced members) plugs in through [`behaviour::Behaviour`]: nothing here names a
//! resource type. The writer takes a narrow context (store, write queues, hooks,
//! behaviours), not the application state, and writes several resources per call
//! ([`Writer::save_all`]).

mod after;
pub mod behaviour;
mod commit;
pub mod context;
mod draft;
pub mod hooks;
mod load;
pub mod locks;
pub mod save;

pub use behaviour::{Behaviour, Behaviours, Detached};
pub use context::{Flag, RequestContext};
pub use hooks::{HookError, Hooks, Interaction, PostSaveHook, Saved};
pub use locks::WriteLocks;
use save::Stop;
pub use save::{Change, SaveOutcome, SaveRequest, Writer};
