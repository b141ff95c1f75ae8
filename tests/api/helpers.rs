//! Black-box test harness: each test starts its own server (in-process, random port) on
//! the shared local services, with its own MongoDB and ClickHouse database names, so tests
//! run in parallel and in any order.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use roster::config::Settings;
use roster::pipeline::{HookError, Hooks, Interaction, PostSaveHook, RequestContext, Saved};
use roster::startup::Application;
use serde_json::Value;

pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub address: String,
    /// `http://127.0.0.1:PORT/4_0_0`
    pub fhir: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub mongo: mongodb::Database,
    /// The running application's state (its stores, its supervised tasks).
    pub state: roster::state::AppState,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Settings for the shared test services, with fresh database names.
pub fn test_settings() -> Settings {
    for var in ["ROSTER_MONGO_URI", "ROSTER_CLICKHOUSE_URL"] {
        assert!(
            std::env::var(var).is_ok(),
            "{var} is not set: integration tests run against the real local services; use `make test` \
             (or `eval \"$(scripts/services.sh env test)\"` after `scripts/services.sh start test`)"
        );
    }
    let mut settings = Settings::load_from(None, |k| std::env::var(k).ok()).expect("settings");
    let unique = uuid::Uuid::new_v4().simple().to_string();
    settings.mongo.database = format!("t_{}", &unique[..16]);
    settings.clickhouse.database = format!("t_{}", &unique[..16]);
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.base_url = None;
    // Each test app would otherwise poll ClickHouse for its projections every 100 ms;
    // the projection tests turn them on.
    settings.projections.run = false;
    // Tests about events turn them on; the others need not pay for them.
    settings.events.routes = roster::config::EventRoutes::Off;
    settings
}

pub async fn spawn_app() -> TestApp {
    spawn_with(test_settings(), Hooks::default()).await
}

pub async fn spawn_with(settings: Settings, hooks: Hooks) -> TestApp {
    let app = Application::build(settings.clone(), hooks).await.expect("application starts");
    let address = format!("http://{}", app.address());
    let mongo = app.state().store.database().clone();
    let state = app.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        fhir: format!("{address}/4_0_0"),
        address,
        client: reqwest::Client::new(),
        settings,
        mongo,
        state,
        _stop: stop,
    }
}

pub const FHIR_JSON: &str = "application/fhir+json";
pub const JSON_PATCH: &str = "application/json-patch+json";

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.fhir, path.trim_start_matches('/'))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    /// Sends a JSON body with `method`, optionally with `If-Match`.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> reqwest::Response {
        let mut request =
            self.client.request(method, self.url(path)).header("content-type", content_type).body(body.to_string());
        if let Some(etag) = if_match {
            request = request.header("if-match", etag);
        }
        request.send().await.expect("request")
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, path, FHIR_JSON, body, None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::PUT, path, FHIR_JSON, body, None).await
    }

    pub async fn put_if_match(&self, path: &str, body: &Value, etag: &str) -> reqwest::Response {
        self.send(reqwest::Method::PUT, path, FHIR_JSON, body, Some(etag)).await
    }

    pub async fn patch(&self, path: &str, ops: &Value) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, JSON_PATCH, ops, None).await
    }

    pub async fn patch_if_match(&self, path: &str, ops: &Value, etag: &str) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, JSON_PATCH, ops, Some(etag)).await
    }

    /// Sends every patch to `path` at once; returns the statuses in order.
    pub async fn concurrent_patches(&self, path: &str, patches: Vec<Value>) -> Vec<u16> {
        let tasks: Vec<_> = patches
            .into_iter()
            .map(|ops| {
                let request = self
                    .client
                    .patch(self.url(path))
                    .header("content-type", "application/json-patch+json")
                    .body(ops.to_string());
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        statuses
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.expect("request")
    }
}

/// Reads a body as JSON (keeping number text exactly).
pub async fn json(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts `response` is an OperationOutcome with `status`, and returns its first issue.
pub async fn assert_outcome(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let ct = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(ct.starts_with("application/fhir+json"), "content-type {ct}");
    let body = json(response).await;
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let issue = body["issue"][0].clone();
    assert!(issue["diagnostics"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    issue
}

pub fn etag(r: &reqwest::Response) -> String {
    r.headers().get("etag").expect("etag").to_str().unwrap().to_string()
}

pub fn patient(family: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "name": [{ "family": family, "given": ["Ada"] }],
        "gender": "female",
        "birthDate": "1990-05-17"
    })
}

/// What a hook saw, for assertions.
#[derive(Debug, Clone)]
pub struct SeenSave {
    pub interaction: Interaction,
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub request_id: String,
    pub actor: Option<String>,
    pub had_resource: bool,
    pub member_events_written: bool,
}

#[derive(Default)]
pub struct RecordingHook {
    pub seen: Mutex<Vec<SeenSave>>,
}

impl PostSaveHook for RecordingHook {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn after_save<'a>(&'a self, ctx: &'a RequestContext, saved: &'a Saved<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(SeenSave {
                interaction: saved.interaction,
                resource_type: saved.resource_type.to_string(),
                id: saved.id.to_string(),
                version: saved.version,
                request_id: ctx.request_id.clone(),
                actor: ctx.actor.clone(),
                had_resource: saved.resource.is_some(),
                member_events_written: ctx.has(roster::pipeline::Flag::MemberEventsWritten),
            });
            Ok(())
        })
    }
}

pub fn recording_hooks() -> (Hooks, Arc<RecordingHook>) {
    let hook = Arc::new(RecordingHook::default());
    (Hooks::default().with(hook.clone()), hook)
}

/// `../shared` beside the checkout: found from the checkout cargo runs the tests in (its
/// `CARGO_MANIFEST_DIR` at run time), not the one the binary was compiled in: a test binary
/// built in another clone that shares the target directory is reused as is.
pub fn shared_dir() -> std::path::PathBuf {
    let checkout = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    checkout.join("../shared")
}

/// The ids of a searchset's matches, in the bundle's order.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}
