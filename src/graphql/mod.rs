//! GraphQL over the read models: `POST /graphql` (GraphQL over HTTP, JSON), and a
//! GraphiQL page at `GET /graphql`.
//!
//! Queries are bounded: depth ≤ [`MAX_DEPTH`], complexity ≤ [`MAX_COMPLEXITY`], and every
//! list takes a `first` of at most [`MAX_FIRST`]. Errors come back in GraphQL's own
//! format (`{"errors":[{"message",…}]}`), never as HTTP 500s.
//!
//! Before async-graphql sees a request, [`guard()`] bounds what its parser and validators
//! would cost: the body is at most [`MAX_BODY`] bytes, brackets nest at most
//! [`MAX_NESTING`] deep (the parser recurses per bracket), and the operation, with every
//! fragment spread expanded, selects at most [`MAX_SELECTIONS`] fields. The last is
//! counted without expanding (once per fragment), so a "fragment bomb", where each fragment
//! spreads the next twice, is refused in microseconds instead of doubling the validators'
//! work per level; the complexity limit alone counts only after expansion.
//!
//! Status codes follow GraphQL over HTTP (`application/graphql-response+json`): a request
//! that cannot be parsed or validated is a 400; one that ran answers 200, with field errors
//! in `errors`.

use std::sync::Arc;

use async_graphql::{Context, EmptyMutation, EmptySubscription, Error, Object, Schema};

use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use crate::body::{read_limited, BodyError};
use crate::eventstore::log::ClickHouseEventStore;
use crate::projection::builtin::{EncounterRow, ENCOUNTERS, STATISTICS, TIMELINE};
use crate::projection::runner::Checkpoints;
use crate::projection::snapshot::SnapshotStore;
use crate::projection::temporal;

pub const MAX_DEPTH: usize = 8;
pub const MAX_COMPLEXITY: usize = 1_000;
pub const MAX_FIRST: i32 = 1_000;
/// Largest request body (query, variables and all).
pub const MAX_BODY: usize = 64 * 1024;
/// Deepest nesting of `{`, `(` and `[` in a query.
pub const MAX_NESTING: usize = 64;
/// Most fields one operation may select once fragments are expanded.
pub const MAX_SELECTIONS: u64 = 5_000;

pub type RosterSchema = Schema<Query, EmptyMutation, EmptySubscription>;

/// What resolvers reach.
pub struct Sources {
    pub ch: clickhouse::Client,
    pub events: Arc<ClickHouseEventStore>,
    pub checkpoints: Checkpoints,
    pub snapshots: SnapshotStore,
    pub projections: Vec<&'static str>,
}

pub fn schema(sources: Sources) -> RosterSchema {
    Schema::build(Query, EmptyMutation, EmptySubscription)
        .data(sources)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .finish()
}

/// The routes, for any application state the schema can be taken from.
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    RosterSchema: FromRef<S>,
{
    Router::new().route("/graphql", get(graphiql).post(execute))
}

async fn execute(State(schema): State<RosterSchema>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_limited(&headers, body, MAX_BODY).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("the request is over {} KiB", MAX_BODY >> 10))
        }
        Err(BodyError::TimedOut) => {
            return refuse(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time".into())
        }
        Err(BodyError::Unreadable(e)) => return refuse(StatusCode::BAD_REQUEST, format!("unreadable body: {e}")),
    };
    let mut request = match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => request,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not a GraphQL request (JSON with `query`): {e}"),
            )
        }
    };
    match guard(&request.query) {
        Ok(document) => request.set_parsed_query(document),
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    }
    let response = schema.execute(request).await;
    // Errors without a path come from parsing or validation: nothing ran.
    let refused = response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(|e| e.path.is_empty());
    let status = if refused { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    graphql_response(status, &response)
}

fn refuse(status: StatusCode, message: String) -> Response {
    let response = async_graphql::Response::from_errors(vec![async_graphql::ServerError::new(message, None)]);
    graphql_response(status, &response)
}

fn graphql_response(status: StatusCode, response: &async_graphql::Response) -> Response {
    let body =
        serde_json::to_string(response).unwrap_or_else(|_| r#"{"errors":[{"message":"unserializable"}]}"#.into());
    (status, [(header::CONTENT_TYPE, "application/graphql-response+json")], body).into_response()
}

async fn graphiql() -> Html<&'static str> {
    Html(GRAPHIQL)
}

const GRAPHIQL: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>roster GraphQL</title>
<link rel="stylesheet" href="https://unpkg.com/graphiql@3/graphiql.min.css"></head>
<body style="margin:0"><div id="graphiql" style="height:100vh"></div>
<script src="https://unpkg.com/react@18/umd/react.production.min.js"></script>
<script src="https://unpkg.com/react-dom@18/umd/react-dom.production.min.js"></script>
<script src="https://unpkg.com/graphiql@3/graphiql.min.js"></script>
<script>
ReactDOM.createRoot(document.getElementById('graphiql')).render(
  React.createElement(GraphiQL, { fetcher: GraphiQL.createFetcher({ url: '/graphql' }) }));
</script></body></html>"#;

/// RFC 3339 text → ms since the epoch.
fn millis(field: &str, text: &str) -> Result<i64, Error> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::new(format!("{field}: '{text}' is not an RFC 3339 date-time ({e})")))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn rfc3339(ms: i64) -> String {
    crate::model::datetime::format_bson_instant(bson::DateTime::from_millis(ms))
}

fn first(n: i32) -> Result<u64, Error> {
    match n {
        1..=MAX_FIRST => Ok(n as u64),
        _ => Err(Error::new(format!("first: must be 1 to {MAX_FIRST}"))),
    }
}

/// A store failed under a resolver: the cause is logged, the client reads which part.
fn unavailable(e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "GraphQL resolver failed");
    Error::new("the read models are unavailable; retry (the cause is in the server log)")
}

pub struct Query;

/// (key, count) pairs, largest first.
type Counts = Vec<(String, u64)>;

#[Object]
impl Query {
    /// A patient's timeline, oldest first, optionally between two times (RFC 3339).
    async fn patient_timeline(
        &self,
        ctx: &Context<'_>,
        mrn: String,
        from: Option<String>,
        to: Option<String>,
        #[graphql(default = 100)] first: i32,
    ) -> Result<Vec<TimelineEntryOut>, Error> {
        let s = ctx.data::<Sources>()?;
        let from = from.as_deref().map(|t| millis("from", t)).transpose()?.unwrap_or(i64::MIN / 2);
        let to = to.as_deref().map(|t| millis("to", t)).transpose()?.unwrap_or(i64::MAX / 2);
        let rows: Vec<TimelineRow> = s
            .ch
            .query(&format!(
                "SELECT position, toUnixTimestamp64Milli(timestamp) AS timestamp_ms, event_type, summary, stream_id, stream_version \
                 FROM {TIMELINE} FINAL WHERE mrn = {{m:String}} \
                 AND timestamp >= fromUnixTimestamp64Milli({{f:Int64}}) AND timestamp <= fromUnixTimestamp64Milli({{t:Int64}}) \
                 ORDER BY position LIMIT {{n:UInt64}}"
            ))
            .param("m", &mrn)
            .param("f", from.max(0))
            .param("t", to.min(253402300799000))
            .param("n", self::first(first)?)
            .fetch_all()
            .await
            .map_err(unavailable)?;
        Ok(rows.into_iter().map(TimelineEntryOut::from).collect())
    }

    /// Event counts by type and by source, optionally only of some types and sources.
    async fn event_statistics(
        &self,
        ctx: &Context<'_>,
        event_types: Option<Vec<String>>,
        sources: Option<Vec<String>>,
    ) -> Result<EventStatistics, Error> {
        let s = ctx.data::<Sources>()?;
        let (types, sources) = (event_types.unwrap_or_default(), sources.unwrap_or_default());
        let filter = "(empty({ts:Array(String)}) OR has({ts:Array(String)}, event_type)) \
                      AND (empty({ss:Array(String)}) OR has({ss:Array(String)}, source))";
        let by = |column: &str| {
            s.ch.query(&format!(
                "SELECT toString({column}) AS k, count() AS n FROM {STATISTICS} FINAL WHERE {filter} GROUP BY k ORDER BY n DESC, k"
            ))
            .param("ts", &types)
            .param("ss", &sources)
        };
        let (by_type, by_source): (Counts, Counts) =
            tokio::try_join!(by("event_type").fetch_all::<(String, u64)>(), by("source").fetch_all::<(String, u64)>())
                .map_err(unavailable)?;
        let total = by_type.iter().map(|(_, n)| n).sum();
        Ok(EventStatistics {
            by_type: by_type.into_iter().map(|(event_type, count)| TypeCount { event_type, count }).collect(),
            by_source: by_source.into_iter().map(|(source, count)| SourceCount { source, count }).collect(),
            total,
        })
    }

    /// Encounters in progress, optionally at one location: its reference, else its display,
    /// else its identifier (`system|value`, or the value alone).
    async fn active_encounters(
        &self,
        ctx: &Context<'_>,
        location: Option<String>,
        #[graphql(default = 100)] first: i32,
    ) -> Result<Vec<Encounter>, Error> {
        let s = ctx.data::<Sources>()?;
        let rows: Vec<EncounterRow> =
            s.ch.query(&format!(
                "SELECT ?fields FROM {ENCOUNTERS} FINAL WHERE active AND ({{l:String}} = '' OR location = {{l:String}} \
                 OR endsWith(location, concat('|', {{l:String}}))) \
                 ORDER BY encounter_id LIMIT {{n:UInt64}}"
            ))
            .param("l", location.unwrap_or_default())
            .param("n", self::first(first)?)
            .fetch_all()
            .await
            .map_err(unavailable)?;
        Ok(rows.into_iter().map(Encounter::from).collect())
    }

    /// One encounter by id, while it is in progress.
    async fn active_encounter(&self, ctx: &Context<'_>, id: String) -> Result<Option<Encounter>, Error> {
        let s = ctx.data::<Sources>()?;
        let row: Option<EncounterRow> = s
            .ch
            .query(&format!("SELECT ?fields FROM {ENCOUNTERS} FINAL WHERE encounter_id = {{id:String}} AND active"))
            .param("id", id)
            .fetch_optional()
            .await
            .map_err(unavailable)?;
        Ok(row.map(Encounter::from))
    }

    /// The patient's encounter in progress (the latest admitted, if several).
    async fn active_encounter_by_patient(&self, ctx: &Context<'_>, mrn: String) -> Result<Option<Encounter>, Error> {
        let s = ctx.data::<Sources>()?;
        let row: Option<EncounterRow> = s
            .ch
            .query(&format!(
                "SELECT ?fields FROM {ENCOUNTERS} FINAL WHERE mrn = {{m:String}} AND active ORDER BY admit_time DESC, version DESC LIMIT 1"
            ))
            .param("m", mrn)
            .fetch_optional()
            .await
            .map_err(unavailable)?;
        Ok(row.map(Encounter::from))
    }

    /// Every projection's checkpoint, state and lag.
    async fn projection_status(&self, ctx: &Context<'_>) -> Result<Vec<ProjectionStatus>, Error> {
        use crate::eventstore::EventStore;
        let s = ctx.data::<Sources>()?;
        let last = s.events.last_position().await.map_err(unavailable)?;
        let mut out = Vec::new();
        for name in &s.projections {
            let st = s.checkpoints.status(name).await.map_err(unavailable)?;
            out.push(ProjectionStatus {
                name: st.name,
                state: st.state.to_string(),
                position: st.position,
                lag: last - st.position,
                events_processed: st.events_processed,
                error: st.error,
                failed_position: st.failed_position,
            });
        }
        Ok(out)
    }

    /// The patient's demographics, encounters in progress and latest lab results as of
    /// `timestamp` (RFC 3339), folded from the patient's stream.
    async fn patient_state_at(&self, ctx: &Context<'_>, mrn: String, timestamp: String) -> Result<PatientState, Error> {
        let s = ctx.data::<Sources>()?;
        let at = millis("timestamp", &timestamp)?;
        let st = temporal::patient_state_at(&s.events, &s.snapshots, &mrn, at).await.map_err(unavailable)?;
        Ok(PatientState {
            mrn: st.mrn.clone(),
            demographics: st.demographics.as_ref().map(Value::to_string),
            active_encounters: st
                .active_encounters
                .into_iter()
                .map(|(id, e)| Encounter {
                    id,
                    patient_mrn: st.mrn.clone(),
                    class: e.class,
                    location: e.location,
                    admit_time: e.admit_time,
                    provider: e.provider,
                    active: true,
                })
                .collect(),
            latest_labs: st
                .latest_labs
                .into_iter()
                .map(|(code, l)| LabResult {
                    code,
                    display: l.display,
                    value: l.value.map(|v| v.to_string()),
                    unit: l.unit,
                    effective: l.effective,
                    observation_id: l.observation_id,
                })
                .collect(),
            version: st.version,
        })
    }

    /// A Group's members as of `at` (RFC 3339; default now), in stable order, paged by
    /// cursor.
    async fn group_members(
        &self,
        ctx: &Context<'_>,
        group_id: String,
        at: Option<String>,
        #[graphql(default = 100)] first: i32,
        after: Option<String>,
    ) -> Result<MemberConnection, Error> {
        let s = ctx.data::<Sources>()?;
        let at = match at {
            Some(t) => millis("at", &t)?,
            None => bson::DateTime::now().timestamp_millis(),
        };
        let after = match after {
            Some(c) => {
                c.parse::<u64>().map_err(|_| Error::new(format!("after: '{c}' is not a cursor from this query")))?
            }
            None => 0,
        };
        let n = self::first(first)? as usize;
        s.events.finish_group_batches(&group_id).await.map_err(unavailable)?;
        let (rows, more) = temporal::group_members_at(&s.ch, &group_id, at, n, after).await.map_err(unavailable)?;
        let end_cursor = rows.last().map(|m| m.position.to_string());
        Ok(MemberConnection {
            edges: rows
                .into_iter()
                .map(|m| MemberEdge {
                    cursor: m.position.to_string(),
                    node: Member { reference: m.reference, member: m.member },
                })
                .collect(),
            page_info: PageInfo { has_next_page: more, end_cursor },
        })
    }
}

mod guard;
mod types;
pub use guard::guard;
pub use types::*;
