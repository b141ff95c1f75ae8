//! General event store: append-only streams with optimistic concurrency, one global
//! order (positions) and live subscriptions.
//!
//! [`EventStore`] is the contract; [`memory::MemoryEventStore`] implements it for unit
//! tests and [`log::ClickHouseEventStore`] is the product: events in ClickHouse, made
//! durable first in a MongoDB journal, under a log lease in MongoDB (see `log` for why
//! positions can never have gaps a reader could skip, `journal` for why two stores).
//! `http` serves it as JSON, `cli` drives it from a terminal.

pub mod appender;
pub mod catalog;
pub mod http;
pub mod journal;
pub mod log;
pub mod memory;
pub mod retention;
pub mod subscribe;

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;

use serde::Serialize;
use uuid::Uuid;

/// What the writer believes the stream's version to be (`ES-Expected-Version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist (any version).
    Exists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (-1: absent) satisfies it.
    pub fn admits(self, current: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current < 0,
            ExpectedVersion::Exists => current >= 0,
            ExpectedVersion::Exact(n) => i64::try_from(n).is_ok_and(|n| n == current),
        }
    }
}

/// The largest position or stream version a request may name: positions and versions are
/// stored as `i64`, and a reader asks for "the one after" (`+ 1`), which must not overflow.
pub const MAX_POSITION: u64 = i64::MAX as u64 - 1;

/// A position or version from a request: decimal digits, 0 to [`MAX_POSITION`]. Anything else
/// (a sign, spaces inside, a number past the range) is an error message naming the range,
/// never a wrap to another number.
pub fn parse_position(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_POSITION && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("'{text}' is not a number from 0 to {MAX_POSITION}"))
}

impl FromStr for ExpectedVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "any" => Ok(ExpectedVersion::Any),
            "no-stream" => Ok(ExpectedVersion::NoStream),
            "exists" => Ok(ExpectedVersion::Exists),
            n => parse_position(n).map(ExpectedVersion::Exact).map_err(|_| {
                format!(
                    "'{n}' is not an expected version: use any, no-stream, exists or a version number (0 to {MAX_POSITION})"
                )
            }),
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no-stream"),
            ExpectedVersion::Exists => f.write_str("exists"),
            ExpectedVersion::Exact(n) => write!(f, "{n}"),
        }
    }
}

/// An event to append. Without an id the store assigns one (and a retry is then a new
/// event: clients that retry should send ids).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Option<Uuid>,
    pub event_type: String,
    /// JSON text.
    pub data: String,
    pub metadata: BTreeMap<String, String>,
}

impl NewEvent {
    pub fn new(event_type: &str, data: &serde_json::Value) -> NewEvent {
        NewEvent { event_id: None, event_type: event_type.into(), data: data.to_string(), metadata: BTreeMap::new() }
    }

    /// Bytes of type, data and metadata (what [`MAX_APPEND_BYTES`] counts).
    pub fn size(&self) -> usize {
        self.event_type.len() + self.data.len() + self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Global order, from 0, without gaps.
    pub position: u64,
    pub stream_id: String,
    /// Order inside the stream, from 0.
    pub stream_version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    /// JSON text, checked when appended (kept as text: readers that pass events on need
    /// not parse them; see [`StoredEvent::write_json`]).
    pub data: String,
    pub metadata: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch, assigned when the event was appended.
    pub timestamp: i64,
}

impl StoredEvent {
    /// Appends this event as a JSON object to `out`, `data` embedded as the JSON it is.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let metadata = serde_json::to_string(&self.metadata).unwrap_or_else(|_| "{}".into());
        let _ = write!(
            out,
            r#"{{"position":{},"streamId":{},"streamVersion":{},"eventId":"{}","eventType":{},"data":{},"metadata":{},"timestamp":{}}}"#,
            self.position,
            text(&self.stream_id),
            self.stream_version,
            self.event_id,
            text(&self.event_type),
            self.data,
            metadata,
            self.timestamp
        );
    }
}

/// What a successful append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppendResult {
    /// The stream's version after the append (its last event's version).
    pub next_expected_version: u64,
    /// Position of the append's first event; the others follow it without gaps.
    pub first_position: u64,
    /// Position of the append's last event.
    pub position: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("stream '{stream}' is at version {actual}, not {expected}")]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual: i64 },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The request body is larger than an append can be (413).
    #[error("body: {0}")]
    TooLarge(String),
    /// The request body did not arrive in time (408).
    #[error("body: did not arrive in time; the client paused too long or sent too slowly")]
    TimedOut,
    /// The stores did not answer, or the outcome of an append is unknown: retrying with
    /// the same event ids is safe.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// A store's driver failed (`store` names it; `cause` is the driver's message, which is
    /// logged and not shown to clients). Retrying with the same event ids is safe.
    #[error("event store unavailable: {store}: {cause}")]
    Store { store: &'static str, cause: String },
}

impl EventStoreError {
    pub fn invalid(field: &str, message: impl Into<String>) -> EventStoreError {
        EventStoreError::Invalid { field: field.into(), message: message.into() }
    }
}

impl From<clickhouse::error::Error> for EventStoreError {
    fn from(e: clickhouse::error::Error) -> Self {
        EventStoreError::Store { store: "ClickHouse", cause: e.to_string() }
    }
}

impl From<mongodb::error::Error> for EventStoreError {
    fn from(e: mongodb::error::Error) -> Self {
        EventStoreError::Store { store: "MongoDB", cause: e.to_string() }
    }
}

/// Streams named `group:{id}` show a Group's member events (see `log`); nobody appends.
pub const GROUP_PREFIX: &str = "group:";

/// Longest stream id, in bytes.
pub const MAX_STREAM_ID: usize = 256;
/// Most events one append may carry.
pub const MAX_APPEND: usize = 10_000;
/// Most bytes of event data, types and metadata one append may carry: a cycle is one
/// journal document, which MongoDB caps at 16 MiB.
pub const MAX_APPEND_BYTES: usize = 4 << 20;
/// Largest append request body read: the event data cap plus room for the JSON around it
/// (types, ids, metadata, escapes).
pub const MAX_APPEND_BODY: usize = 2 * MAX_APPEND_BYTES;

/// Checks a stream id and an append's events; fills in missing event ids.
pub fn validate_append(stream: &str, events: &mut [NewEvent]) -> Result<(), EventStoreError> {
    if stream.is_empty() || stream.len() > MAX_STREAM_ID || stream.chars().any(char::is_control) {
        return Err(EventStoreError::invalid(
            "streamId",
            format!("must be 1 to {MAX_STREAM_ID} bytes without control characters"),
        ));
    }
    if stream.starts_with(GROUP_PREFIX) {
        return Err(EventStoreError::invalid(
            "streamId",
            "group: streams are read-only views of Group member events (change members with PATCH Group)",
        ));
    }
    if events.is_empty() {
        return Err(EventStoreError::invalid("events", "an append needs at least one event"));
    }
    if events.len() > MAX_APPEND {
        return Err(EventStoreError::invalid("events", format!("at most {MAX_APPEND} events per append")));
    }
    let bytes: usize = events.iter().map(NewEvent::size).sum();
    if bytes > MAX_APPEND_BYTES {
        return Err(EventStoreError::invalid(
            "events",
            format!("{bytes} bytes of event data; at most {} MiB per append", MAX_APPEND_BYTES >> 20),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, e) in events.iter_mut().enumerate() {
        if e.event_type.trim().is_empty() || e.event_type.len() > 256 {
            return Err(EventStoreError::invalid(&format!("[{i}].eventType"), "must be 1 to 256 bytes"));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&e.data).is_err() {
            return Err(EventStoreError::invalid(&format!("[{i}].data"), "must be JSON"));
        }
        let id = *e.event_id.get_or_insert_with(Uuid::new_v4);
        if !seen.insert(id) {
            return Err(EventStoreError::invalid(&format!("[{i}].eventId"), format!("{id} appears twice")));
        }
    }
    Ok(())
}

/// The event store contract (after the classic Append / ReadStream / ReadAll / Subscribe /
/// GetStreamVersion design). Versions and positions are `i64` where -1 means "none".
pub trait EventStore: Send + Sync + 'static {
    /// Appends all `events` to `stream`, or none. A retry of the stream's last append (the
    /// same event ids) returns that append's result instead of writing again.
    fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendResult, EventStoreError>> + Send;

    /// Up to `max` events of `stream` from version `from`, in version order.
    fn read_stream(
        &self,
        stream: &str,
        from: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, EventStoreError>> + Send;

    /// Up to `max` events of all streams from position `from`, in position order.
    fn read_all(&self, from: u64, max: usize)
        -> impl Future<Output = Result<Vec<StoredEvent>, EventStoreError>> + Send;

    /// As [`EventStore::read_all`], but without waiting for appends that are acknowledged
    /// and not yet readable: followers (subscriptions, projections) wait for more anyway,
    /// so they take the log as it stands, which is still a prefix without holes.
    fn read_log(
        &self,
        from: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, EventStoreError>> + Send {
        self.read_all(from, max)
    }

    /// The stream's last version, -1 when it has no event.
    fn stream_version(&self, stream: &str) -> impl Future<Output = Result<i64, EventStoreError>> + Send;

    /// The last position written, -1 when the log is empty.
    fn last_position(&self) -> impl Future<Output = Result<i64, EventStoreError>> + Send;

    /// Resolves when events after `position` may have been appended (or after a while:
    /// appends from other processes are only seen by looking).
    fn wait_for_more(&self, position: i64) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_versions_parse_and_admit() {
        assert_eq!("any".parse(), Ok(ExpectedVersion::Any));
        assert_eq!("no-stream".parse(), Ok(ExpectedVersion::NoStream));
        assert_eq!("exists".parse(), Ok(ExpectedVersion::Exists));
        assert_eq!("7".parse(), Ok(ExpectedVersion::Exact(7)));
        assert!("-1".parse::<ExpectedVersion>().unwrap_err().contains("'-1'"));
        assert!(ExpectedVersion::NoStream.admits(-1) && !ExpectedVersion::NoStream.admits(0));
        assert!(ExpectedVersion::Exists.admits(0) && !ExpectedVersion::Exists.admits(-1));
        assert!(ExpectedVersion::Exact(3).admits(3) && !ExpectedVersion::Exact(3).admits(2));
        assert!(ExpectedVersion::Any.admits(-1) && ExpectedVersion::Any.admits(9));
    }

    #[test]
    fn appends_are_checked_and_get_ids() {
        let mut events = vec![NewEvent::new("a", &serde_json::json!({})), NewEvent::new("b", &serde_json::json!(1))];
        validate_append("s-1", &mut events).unwrap();
        assert!(events.iter().all(|e| e.event_id.is_some()));
        assert_ne!(events[0].event_id, events[1].event_id);
        let err = |s: &str, e: &mut [NewEvent]| validate_append(s, e).unwrap_err().to_string();
        assert!(err("", &mut events).starts_with("streamId"));
        assert!(err("s", &mut []).starts_with("events"));
        events[1].event_id = events[0].event_id;
        assert!(err("s", &mut events).starts_with("[1].eventId"));
        events[1].event_type = " ".into();
        assert!(err("s", &mut events).starts_with("[1].eventType"));
        let mut big = vec![NewEvent::new("a", &serde_json::json!("x".repeat(MAX_APPEND_BYTES)))];
        assert!(err("s", &mut big).starts_with("events: "), "an append larger than a journal document allows");
    }
}
