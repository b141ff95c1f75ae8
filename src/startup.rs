//! Building and running the application: connect to both stores, apply migrations, wire
//! routes and middleware, serve until SIGTERM/Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use serde_json::json;
use serde_json::Value;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::timeout::{RequestBodyDeadlineLayer, RequestBodyTimeoutLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tower_http::LatencyUnit;
use tracing::Level;

use std::sync::Arc;

use crate::config::{EventRoutes, HttpSettings, Settings};
use crate::error::FhirError;
use crate::group::hook::GroupMemberSync;
use crate::pipeline::{Hooks, RequestContext};
use crate::recording::recorder::EventRecorder;
use crate::recording::routes::RoutingFile;
use crate::state::AppState;
use crate::store::ops::OpCounts;
use crate::store::ResourceStore;
use crate::{fhir, migrate};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub struct Application {
    listener: TcpListener,
    router: Router,
    address: SocketAddr,
    state: AppState,
    background: Background,
    http: HttpSettings,
}

/// Background work besides the member batches: event recording recovery, retention.
#[derive(Clone)]
struct Background {
    recorder: Option<Arc<EventRecorder>>,
    retention: Vec<crate::eventstore::retention::Rule>,
    /// Feed the built-in projections, with this configuration.
    projections: Option<crate::projection::runner::RunnerConfig>,
}

/// Connects to MongoDB. Server selection is bounded so an unreachable store becomes a
/// quick 503, not a 30 s hang.
///
/// Every write waits for MongoDB's journal (`j: true`), and on a replica set for a majority
/// of its members (`w: "majority"`), unless the URI sets its own write concern: a client is
/// answered after the version guard, the outbox batch, the event journal or a lease is
/// written, and without `j` a standalone mongod acknowledges before its journal is flushed
/// (every 100 ms), so a power failure could lose writes a client was told were stored.
/// What it costs is in `docs/benchmarks.md`.
pub async fn mongo_database(settings: &Settings) -> Result<mongodb::Database, BoxError> {
    Ok(mongo_connect(settings).await?.0)
}

/// Most connections to MongoDB at once, unless the URI sets `maxPoolSize`. Above the
/// driver's default of 10 so that the pool is never what caps concurrent requests (16
/// writers plus the background flushes, history copies and event journal); on SecantusDB,
/// which runs one command at a time, 8, 16 and 64 measured alike. Not unbounded: each
/// connection costs the server a thread or a task and memory.
pub const MONGO_POOL: u32 = 64;

/// [`mongo_database`], with the command counts when `mongo.count_ops` is on.
pub async fn mongo_connect(settings: &Settings) -> Result<(mongodb::Database, Option<Arc<OpCounts>>), BoxError> {
    let mut options = ClientOptions::parse(&settings.mongo.uri).await?;
    options.app_name.get_or_insert_with(|| "roster".to_string());
    options.server_selection_timeout.get_or_insert(Duration::from_secs(5));
    options.connect_timeout.get_or_insert(Duration::from_secs(5));
    options.max_pool_size.get_or_insert(MONGO_POOL);
    let replica_set = options.repl_set_name.is_some();
    options.write_concern.get_or_insert_with(|| durable_writes(replica_set));
    let counts = settings.mongo.count_ops.then(OpCounts::new);
    if let Some(counts) = &counts {
        options.command_event_handler = Some(counts.handler());
    }
    let client = mongodb::Client::with_options(options)?;
    Ok((client.database(&settings.mongo.database), counts))
}

/// The write concern of every write: journaled, and on a replica set acknowledged by a
/// majority (a write only the old primary had is rolled back after a failover).
pub fn durable_writes(replica_set: bool) -> WriteConcern {
    let concern = WriteConcern::builder().journal(true);
    match replica_set {
        true => concern.w(Acknowledgment::Majority).build(),
        false => concern.build(),
    }
}

/// Applies both stores' migrations.
pub async fn run_migrations(settings: &Settings, db: &mongodb::Database) -> Result<(), BoxError> {
    let ch = migrate::clickhouse(&settings.clickhouse).await?;
    let mg = migrate::mongo(db).await?;
    tracing::info!(clickhouse = ?ch, mongo = ?mg, "migrations applied");
    refuse_old_outbox(db).await
}

/// Before the outbox became an array of compact batches, a pending batch was one embedded
/// document of full event rows. This version cannot flush those: refuse to start rather
/// than serve groups whose events it would never insert.
async fn refuse_old_outbox(db: &mongodb::Database) -> Result<(), BoxError> {
    let old = db
        .collection::<bson::Document>("Group_4_0_0")
        // An embedded document, not an array (`$type` would also match an array of them).
        .find_one(bson::doc! { "outbox.batchId": { "$exists": true }, "outbox.0": { "$exists": false } })
        .projection(bson::doc! { "_id": 1 })
        .await?;
    match old {
        Some(d) => Err(format!(
            "Group/{} has a member batch pending in the format of an earlier roster: start that \
             version once (its start-up sweep flushes it), then upgrade",
            d.get_str("_id").unwrap_or_default()
        )
        .into()),
        None => Ok(()),
    }
}

impl Application {
    /// Connects, migrates and binds. `hooks` are the post-save hooks to run.
    pub async fn build(settings: Settings, hooks: Hooks) -> Result<Application, BoxError> {
        let (db, mongo_ops) = mongo_connect(&settings).await?;
        run_migrations(&settings, &db).await?;
        let listener = TcpListener::bind(settings.listen).await?;
        let address = listener.local_addr()?;
        let base_url = settings
            .base_url
            .clone()
            .map_or_else(|| format!("http://{address}"), |b| b.trim_end_matches('/').to_string());
        let clickhouse = migrate::clickhouse_client(&settings.clickhouse);
        let mut state = AppState::new(
            ResourceStore::new(db),
            clickhouse,
            Hooks::default(),
            &base_url,
            settings.body_limit_bytes,
            &settings.groups,
        );
        // Member arrays of POST/PUT are synced by this hook, first in line; FHIR writes
        // become events (unless routing is off) after it.
        let mut builtin = Hooks::default().with(Arc::new(GroupMemberSync::new(state.flusher.clone())));
        let routes = match &settings.events.routes {
            EventRoutes::Builtin => Some(RoutingFile::builtin()),
            EventRoutes::File(path) => Some(RoutingFile::load(path)?),
            EventRoutes::Off => None,
        };
        let recorder = match routes {
            Some(routes) => {
                let recorder = EventRecorder::new(routes, state.events.clone(), state.store.clone());
                recorder.ensure_indexes().await?;
                builtin = builtin.with(recorder.clone());
                Some(recorder)
            }
            None => None,
        };
        state.writer = state.writer.clone().with_hooks(builtin.extend(hooks));
        if settings.fhir.search_indexing == Some(false) {
            tracing::warn!(
                "fhir.search_indexing is off: writes are not indexed and searches miss them (measurement only)"
            );
            state.writer = state.writer.clone().without_search_index();
        }
        state.max_patch_ops = settings.max_patch_ops();
        state.max_conditional_delete = settings.fhir.max_conditional_delete.unwrap_or(1).max(1);
        state.max_bundle_entries =
            settings.fhir.max_bundle_entries.unwrap_or(crate::config::DEFAULT_MAX_BUNDLE_ENTRIES);
        state.search_listed_ids = settings.fhir.search_listed_ids.unwrap_or(crate::search::execute::LISTED_IDS);
        state.mongo_ops = mongo_ops;
        if settings.groups.max_patch_ops.is_some() {
            tracing::warn!("groups.max_patch_ops (ROSTER_GROUP_MAX_PATCH_OPS) is deprecated: use fhir.max_patch_ops");
        }
        let router = router(state.clone(), &settings.http);
        let projections = settings.projections.run.then(|| crate::projection::runner::RunnerConfig {
            batch: settings.projections.batch,
            ..Default::default()
        });
        let background = Background { recorder, retention: settings.events.retention.clone(), projections };
        Ok(Application { listener, router, address, state, background, http: settings.http.clone() })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until SIGTERM or Ctrl-C, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        tracing::info!(address = %self.address, "roster listening");
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves, with the background recovery running meanwhile.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        // Every background loop runs supervised: restarted after a panic, and reported by
        // `/ready` while it waits to be (see `supervise`).
        let tasks = self.state.tasks.clone();
        let (store, flusher) = (self.state.store.clone(), self.state.flusher.clone());
        let mut running =
            vec![tasks.spawn("member batch sweep", move || background_recovery(store.clone(), flusher.clone()))];
        self.state.events.recover_journal();
        if let Some(config) = self.background.projections.clone() {
            let state = &self.state;
            let runner = crate::projection::runner::Runner::new(
                state.store.database(),
                state.clickhouse.clone(),
                state.events.clone(),
                config,
            );
            running.extend(runner.spawn_supervised(&tasks, crate::projection::builtin::all()));
        }
        let (db, ch, base) =
            (self.state.store.database().clone(), self.state.clickhouse.clone(), self.state.fhir_base());
        let store = self.state.store.clone();
        running.push(
            tasks.spawn("search index upkeep", move || {
                search_upkeep(db.clone(), ch.clone(), base.clone(), store.clone())
            }),
        );
        let (background, ch) = (self.background, self.state.clickhouse.clone());
        running
            .push(tasks.spawn("event recording and retention", move || event_upkeep(background.clone(), ch.clone())));
        let served = crate::server::serve(self.listener, self.router, &self.http, stop).await;
        for task in running {
            task.abort();
        }
        served
    }
}

/// How often retention rules are applied while serving.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Records events of writes whose hook did not finish (see `recording::recorder`) and
/// applies retention.
async fn event_upkeep(background: Background, ch: clickhouse::Client) {
    let mut last_retention: Option<std::time::Instant> = None;
    loop {
        if let Some(recorder) = &background.recorder {
            match recorder.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(versions = n, "events of unfinished writes recorded"),
                Err(e) => tracing::warn!(error = %e, "event recording recovery failed; retrying later"),
            }
        }
        if !background.retention.is_empty() && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
            last_retention = Some(std::time::Instant::now());
            match crate::eventstore::retention::apply(&ch, &background.retention).await {
                Ok(done) => {
                    for (rule, n) in done.into_iter().filter(|(_, n)| *n > 0) {
                        tracing::info!(prefix = %rule.prefix, days = rule.days, deleted = n, "event retention applied");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "event retention failed; retrying later"),
            }
        }
        tokio::time::sleep(OUTBOX_SWEEP_EVERY).await;
    }
}

/// How often pending member batches are looked for while serving (reads and writes of a
/// group finish its batch at once; this catches groups nobody touches).
const OUTBOX_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Finishes work a crash left half-done: history copies once at start-up, member event
/// batches at start-up and then periodically.
async fn background_recovery(store: ResourceStore, flusher: Arc<crate::group::flusher::Flusher>) {
    repair_history(store).await;
    loop {
        match flusher.flush_all().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(groups = n, "pending member event batches inserted"),
            Err(e) => tracing::warn!(error = %e, "member batch recovery failed; retrying later"),
        }
        tokio::time::sleep(OUTBOX_SWEEP_EVERY).await;
    }
}

/// How long a version may stay `historyPending` before the sweep finishes it (its
/// writer normally does within a few hundred milliseconds).
const PENDING_SWEEP_AGE: Duration = Duration::from_secs(10);

/// Indexes what was stored before search keys were (once; `search::reindex`), then
/// finishes versions whose history copy or search keys a failure left pending (ClickHouse
/// away, a crash), so searches do not read them from MongoDB for long.
async fn search_upkeep(db: mongodb::Database, ch: clickhouse::Client, base: String, store: ResourceStore) {
    match crate::search::reindex::migrate(&db, &ch, &base).await {
        Ok(d) if d.indexed > 0 => tracing::info!(indexed = d.indexed, "resources stored before search keys indexed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "search reindex stopped; it resumes at the next start"),
    }
    loop {
        tokio::time::sleep(OUTBOX_SWEEP_EVERY).await;
        for rt in fhir_model::RESOURCE_TYPES {
            match store.repair_history_older(rt, PENDING_SWEEP_AGE).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(resource_type = rt, versions = n, "pending versions finished"),
                Err(e) => {
                    tracing::warn!(error = %e, "pending version sweep failed; retrying later");
                    break;
                }
            }
        }
    }
}

/// Writes history copies left pending by a crash (see `store`).
async fn repair_history(store: ResourceStore) {
    let mut repaired = 0;
    for rt in fhir_model::RESOURCE_TYPES {
        match store.repair_history(rt).await {
            Ok(n) => repaired += n,
            Err(e) => {
                tracing::warn!(error = %e, "history repair sweep stopped; it runs again at the next start");
                return;
            }
        }
    }
    if repaired > 0 {
        tracing::info!(repaired, "pending history copies written");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

/// The whole HTTP surface. `limits` bound how long a request body may take: a body that
/// pauses for longer than `body_timeout_ms`, or is not complete `body_deadline_ms` after the
/// request began, fails its read, which handlers answer with a 408 in their own format.
pub fn router(state: AppState, limits: &HttpSettings) -> Router {
    Router::new()
        .merge(fhir::routes())
        .merge(crate::eventstore::http::routes())
        .merge(crate::graphql::routes())
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(not_found)
        .layer(middleware::from_fn(request_context))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_millis(limits.body_timeout_ms)))
        .layer(RequestBodyDeadlineLayer::new(Duration::from_millis(limits.body_deadline_ms)))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO).latency_unit(LatencyUnit::Micros)),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Builds the [`RequestContext`] every write path receives.
async fn request_context(mut request: Request, next: Next) -> Response {
    let id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or_default()
        .to_string();
    let actor = request.headers().get("x-actor").and_then(|v| v.to_str().ok()).map(str::to_string);
    request.extensions_mut().insert(RequestContext::new(id, actor));
    next.run(request).await
}

/// 404 in the format of the API the path is under: the event store's JSON under `/events`,
/// an OperationOutcome everywhere else.
async fn not_found(request: Request) -> Response {
    let message = format!("no route for {} {}", request.method(), request.uri().path());
    let path = request.uri().path();
    if path == "/events" || path.starts_with("/events/") {
        json_response(StatusCode::NOT_FOUND, json!({ "error": message }))
    } else {
        FhirError::not_found(message).into_response()
    }
}

/// A plain JSON response (operational endpoints are not FHIR).
fn json_response(status: StatusCode, body: Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn health() -> Response {
    json_response(StatusCode::OK, json!({ "status": "up" }))
}

/// Ready when both stores answer within 2 s.
async fn ready(State(state): State<AppState>) -> Response {
    let timeout = Duration::from_secs(2);
    // Which store is down is shown; the driver's message is logged (it may name hosts).
    let mongo = match tokio::time::timeout(timeout, state.store.ping()).await {
        Ok(Ok(())) => "up",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: MongoDB is down");
            "down"
        }
        Err(_) => "down: timed out",
    };
    let ch = match tokio::time::timeout(timeout, state.clickhouse.query("SELECT 1").execute()).await {
        Ok(Ok(())) => "up",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: ClickHouse is down");
            "down"
        }
        Err(_) => "down: timed out",
    };
    // A background task that panicked and waits to be restarted makes the server not ready.
    let down = state.tasks.down();
    let ok = mongo == "up" && ch == "up" && down.is_empty();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(
        status,
        json!({ "status": if ok { "ready" } else { "not ready" }, "mongo": mongo, "clickhouse": ch, "tasksDown": down }),
    )
}
