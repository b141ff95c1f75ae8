//! What requests cost MongoDB, counted: the driver's command monitoring adds one to the
//! count of each command started, by command and collection (`update Patient_4_0_0`).
//!
//! Off unless `mongo.count_ops` is set: with a handler installed the driver copies every
//! command document into its event, which for a big write (a million-member Group) is a
//! copy of the whole body. Tests and the benchmark turn it on to state what a member-only
//! PATCH, a create and an update cost (README, "MongoDB operations per request").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;

/// Commands started, by command and collection, since the client was made.
#[derive(Debug, Default)]
pub struct OpCounts(Mutex<BTreeMap<String, u64>>);

impl OpCounts {
    pub fn new() -> Arc<OpCounts> {
        Arc::default()
    }

    /// The handler to install as the client's `command_event_handler`.
    pub fn handler(self: &Arc<Self>) -> EventHandler<CommandEvent> {
        let counts = self.clone();
        EventHandler::callback(move |event| {
            if let CommandEvent::Started(started) = event {
                // The command's first field names its collection (`{update: "Patient_4_0_0", …}`).
                let key = match started.command.iter().next().and_then(|(_, v)| v.as_str()) {
                    Some(collection) => format!("{} {collection}", started.command_name),
                    None => started.command_name,
                };
                let mut map = counts.0.lock().unwrap_or_else(|e| e.into_inner());
                *map.entry(key).or_default() += 1;
            }
        })
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All commands so far.
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }
}
