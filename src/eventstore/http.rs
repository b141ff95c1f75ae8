//! The event store over HTTP (plain JSON, not FHIR):
//!
//! - `POST /events/{streamId}` with `[{"eventType","data","metadata"?,"eventId"?}]` and
//!   `ES-Expected-Version: any|no-stream|exists|<n>` (default `any`) → 201
//!   `{"nextExpectedVersion","firstPosition","position"}`, 409 on a wrong expected version;
//! - `GET /events/{streamId}?from=&max=`, `GET /events?from=&max=`,
//!   `GET /events/{streamId}/version`;
//! - `GET /events/subscribe?from=` as Server-Sent Events: catch-up, then live; each event's
//!   SSE id is its position, so a reconnecting client's `Last-Event-ID` resumes after it.
//!
//! Bad input is a 400 `{"error","field"}` naming the field. `subscribe` is therefore not a
//! readable stream id over HTTP.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::BTreeMap;

use serde_json::json;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::log::SharedEventStore;
use super::subscribe::subscribe;
use super::{
    parse_position, EventStore, EventStoreError, ExpectedVersion, NewEvent, StoredEvent, MAX_APPEND_BODY,
    MAX_APPEND_BYTES,
};
use crate::body::{read_limited, BodyError};

/// Most events one read returns.
pub const MAX_READ: usize = 10_000;
const DEFAULT_READ: usize = 100;

/// The routes, for any application state the event store can be taken from.
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    SharedEventStore: FromRef<S>,
{
    Router::new()
        .route("/events", get(read_all))
        .route("/events/subscribe", get(sse))
        .route("/events/{stream}", get(read_stream).post(append))
        .route("/events/{stream}/version", get(stream_version))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::rejection::events_panic))
        .layer(axum::middleware::from_fn(crate::rejection::events))
}

impl IntoResponse for EventStoreError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            EventStoreError::WrongExpectedVersion { stream, expected, actual } => (
                StatusCode::CONFLICT,
                json!({ "error": self.to_string(), "streamId": stream,
                        "expectedVersion": expected.to_string(), "actualVersion": actual }),
            ),
            EventStoreError::Invalid { field, .. } => {
                (StatusCode::BAD_REQUEST, json!({ "error": self.to_string(), "field": field }))
            }
            EventStoreError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": self.to_string(), "field": "body" }))
            }
            EventStoreError::TimedOut => {
                (StatusCode::REQUEST_TIMEOUT, json!({ "error": self.to_string(), "field": "body" }))
            }
            EventStoreError::Unavailable(_) => {
                tracing::warn!(error = %self, "event store unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": self.to_string() }))
            }
            EventStoreError::Store { store, cause } => {
                tracing::warn!(store, cause, "event store unavailable");
                let message = format!("event store unavailable: {store} did not answer; retry with the same event ids");
                (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": message }))
            }
        };
        json_response(status, &body)
    }
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".into());
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

#[derive(Deserialize)]
struct Paging {
    from: Option<String>,
    max: Option<String>,
}

impl Paging {
    fn parse(&self) -> Result<(u64, usize), EventStoreError> {
        let number = |field: &str, v: &Option<String>, default: u64| match v {
            None => Ok(default),
            Some(s) => parse_position(s).map_err(|m| EventStoreError::invalid(field, m)),
        };
        let from = number("from", &self.from, 0)?;
        let max = number("max", &self.max, DEFAULT_READ as u64)?;
        if max == 0 || max > MAX_READ as u64 {
            return Err(EventStoreError::invalid("max", format!("must be 1 to {MAX_READ}")));
        }
        Ok((from, max as usize))
    }
}

fn events_json(events: &[StoredEvent], extra: &str) -> Response {
    let mut out = String::with_capacity(events.len() * 256 + 64);
    out.push('{');
    out.push_str(extra);
    out.push_str("\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        e.write_json(&mut out);
    }
    out.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

async fn read_all(
    State(events): State<SharedEventStore>,
    Query(p): Query<Paging>,
) -> Result<Response, EventStoreError> {
    let (from, max) = p.parse()?;
    let events = events.read_all(from, max).await?;
    let next = events.last().map_or(from, |e| e.position + 1);
    Ok(events_json(&events, &format!("\"next\":{next},")))
}

async fn read_stream(
    State(events): State<SharedEventStore>,
    Path(stream): Path<String>,
    Query(p): Query<Paging>,
) -> Result<Response, EventStoreError> {
    let (from, max) = p.parse()?;
    let events = events.read_stream(&stream, from, max).await?;
    let next = events.last().map_or(from, |e| e.stream_version + 1);
    let id = serde_json::to_string(&stream).unwrap_or_default();
    Ok(events_json(&events, &format!("\"streamId\":{id},\"next\":{next},")))
}

async fn stream_version(
    State(events): State<SharedEventStore>,
    Path(stream): Path<String>,
) -> Result<Response, EventStoreError> {
    let version = events.stream_version(&stream).await?;
    Ok(json_response(StatusCode::OK, &json!({ "streamId": stream, "version": version })))
}

/// One event of an append body, as sent. Every field is optional here so that a missing
/// one is reported by name; `data` stays the JSON text it was sent as (no tree is built).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, expecting = "an event object")]
struct Incoming<'a> {
    event_type: Option<String>,
    #[serde(default, borrow)]
    data: Data<'a>,
    metadata: Option<BTreeMap<String, String>>,
    event_id: Option<Uuid>,
}

/// `data` as sent, `null` included (`Option<&RawValue>` would read `null` as absent).
#[derive(Default)]
struct Data<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|raw| Data(Some(raw)))
    }
}

/// The body of an append: an array of events.
pub fn parse_events(body: &[u8]) -> Result<Vec<NewEvent>, EventStoreError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let items: Vec<Incoming> = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return EventStoreError::invalid("body", format!("not JSON: {inner}"));
        }
        if path == "." {
            return EventStoreError::invalid("body", "must be a JSON array of events");
        }
        EventStoreError::invalid(&path, inner.to_string())
    })?;
    json.end().map_err(|e| EventStoreError::invalid("body", format!("not JSON: {e}")))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |f: &str| format!("[{i}].{f}");
            let event_type =
                item.event_type.ok_or_else(|| EventStoreError::invalid(&field("eventType"), "a string is required"))?;
            let data =
                item.data.0.ok_or_else(|| EventStoreError::invalid(&field("data"), "required (any JSON value)"))?;
            Ok(NewEvent {
                event_id: item.event_id,
                event_type,
                data: data.get().to_string(),
                metadata: item.metadata.unwrap_or_default(),
            })
        })
        .collect()
}

async fn append(
    State(events): State<SharedEventStore>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, EventStoreError> {
    // Read here rather than by axum's extractor, whose limit (2 MB) is below what an
    // append may carry and whose refusal is plain text.
    let body = read_limited(&headers, body, MAX_APPEND_BODY).await.map_err(|e| match e {
        BodyError::TooLarge => EventStoreError::TooLarge(format!(
            "over {} MiB; an append carries at most {} MiB of event data",
            MAX_APPEND_BODY >> 20,
            MAX_APPEND_BYTES >> 20
        )),
        BodyError::TimedOut => EventStoreError::TimedOut,
        BodyError::Unreadable(e) => EventStoreError::invalid("body", format!("could not be read: {e}")),
    })?;
    let expected = match headers.get("es-expected-version") {
        None => ExpectedVersion::Any,
        Some(v) => v
            .to_str()
            .map_err(|_| EventStoreError::invalid("ES-Expected-Version", "not text"))?
            .parse()
            .map_err(|m: String| EventStoreError::invalid("ES-Expected-Version", m))?,
    };
    let batch = parse_events(&body)?;
    let result = events.append(&stream, expected, batch).await?;
    Ok(json_response(StatusCode::CREATED, &result))
}

#[derive(Deserialize)]
struct Resume {
    from: Option<String>,
}

async fn sse(
    State(events): State<SharedEventStore>,
    Query(q): Query<Resume>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, EventStoreError> {
    // Last-Event-ID (a reconnect) wins over `from`: it is the last position delivered.
    let from = match (headers.get("last-event-id"), &q.from) {
        (Some(id), _) => {
            let id = id.to_str().map_err(|_| EventStoreError::invalid("Last-Event-ID", "not text"))?;
            // `parse_position` leaves room for the + 1.
            parse_position(id.trim()).map_err(|m| EventStoreError::invalid("Last-Event-ID", m))? + 1
        }
        (None, Some(f)) => parse_position(f).map_err(|m| EventStoreError::invalid("from", m))?,
        (None, None) => 0,
    };
    let events = subscribe(events.clone(), from, 1000).map(|r| -> Result<Event, Infallible> {
        Ok(match r {
            Ok(e) => {
                let mut data = String::with_capacity(256);
                e.write_json(&mut data);
                Event::default().id(e.position.to_string()).data(data)
            }
            Err(e) => Event::default().event("error").data(e.to_string()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match parse_events(body.as_bytes()) {
            Err(EventStoreError::Invalid { field, .. }) => field,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn data_stays_the_json_text_it_was_sent_as() {
        let events = parse_events(
            br#"[{"eventType":"a","data":{"n": 1.50, "s":"\u00e9"}},
                 {"eventType":"b","data":null,"metadata":{"k":"v"},"eventId":"6a2f41a3-c54c-4c36-8b7e-2f8f2a0d1b01"}]"#,
        )
        .unwrap();
        assert_eq!(events[0].data, r#"{"n": 1.50, "s":"\u00e9"}"#, "numbers and escapes exactly as sent");
        assert_eq!(events[1].data, "null", "null is data, not a missing field");
        assert_eq!(events[1].metadata["k"], "v");
        assert!(events[1].event_id.is_some());
    }

    #[test]
    fn each_mistake_names_its_field() {
        for (body, field) in [
            ("[{", "body"),
            (r#"[] x"#, "body"),
            (r#"{"eventType":"x"}"#, "body"),
            (r#"[{"data":1}]"#, "[0].eventType"),
            (r#"[{"eventType":"x","data":1},{"eventType":"y"}]"#, "[1].data"),
            (r#"[{"eventType":5,"data":1}]"#, "[0].eventType"),
            (r#"[{"eventType":"x","data":1,"eventId":"nope"}]"#, "[0].eventId"),
            (r#"[{"eventType":"x","data":1,"metadata":{"a":1}}]"#, "[0].metadata.a"),
            (r#"[{"eventType":"x","data":1,"metadata":[]}]"#, "[0].metadata"),
            (r#"[{"eventType":"x","data":1,"colour":"red"}]"#, "[0].colour"),
            ("[7]", "[0]"),
        ] {
            assert_eq!(field_of(body), field, "{body}");
        }
    }
}
