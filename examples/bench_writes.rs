//! Concurrent write benchmark: many clients at once against a release `roster serve`, with
//! the floor the stores give for the same work measured in the same run through the Rust
//! MongoDB driver.
//!
//! Run with `make bench` (after `bench` and `bench_events`). 16 closed-loop clients (each
//! sends its next request when the last is answered) for a fixed time per measure:
//! - member-only PATCH (one member added) spread over 16 Groups, then all on 1 Group;
//! - `POST /Patient`, and `PUT /Patient/{id}` of existing Patients;
//! - the floors: guarded read+update cycles on 16 documents (read the version, update where
//!   it is unchanged, pushing onto an array, as a member-only PATCH's commit does), and
//!   single inserts, both with the server's write concern;
//! - ClickHouse's and MongoDB's CPU time per request, read from `/proc` for the test
//!   services' processes (`.local/test/*.pid`).
//!
//! The load generator runs on the same 2 cores as the server and both stores, as do the
//! floors: compare rows of one run. `--server PATH` benchmarks another `roster` binary
//! (an older build) with the same load; `--quick` runs each measure for a second.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use bson::doc;
use common::{machine, pct, write_section, Server};
use serde_json::{json, Value};

const CLIENTS: usize = 16;
const GROUP_MEMBERS: usize = 1_000;

/// What a closed-loop run measured.
struct Run {
    ok: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&mut self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        pct(&mut self.latencies, q)
    }
}

/// Runs `one(client, i)` in a loop on each of [`CLIENTS`] tasks for `time`.
async fn closed_loop<F, Fut>(time: Duration, one: F) -> Run
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let started = Instant::now();
    let until = started + time;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let one = one.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
                let mut i = 0;
                while Instant::now() < until {
                    let t = Instant::now();
                    if one(c, i).await {
                        ok += 1;
                        latencies.push(t.elapsed());
                    } else {
                        failed += 1;
                    }
                    i += 1;
                }
                (ok, failed, latencies)
            })
        })
        .collect();
    let mut run = Run { ok: 0, failed: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for t in tasks {
        let (ok, failed, latencies) = t.await.unwrap();
        run.ok += ok;
        run.failed += failed;
        run.latencies.extend(latencies);
    }
    run.elapsed = started.elapsed();
    run
}

/// CPU time (user + system) of a process so far.
fn cpu(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces), 1-based: utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // USER_HZ = 100
}

fn service_pid(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!(".local/test/{name}.pid")).ok()?.trim().parse().ok()
}

/// The stores' CPU while a measure runs.
struct Cpu {
    ch: Option<Duration>,
    mongo: Option<Duration>,
}

impl Cpu {
    fn now() -> Cpu {
        Cpu { ch: cpu(service_pid("clickhouse")), mongo: cpu(service_pid("mongo")) }
    }

    /// "ClickHouse x ms, MongoDB y ms" of CPU per request since `self`.
    fn per_request(&self, requests: usize) -> String {
        let after = Cpu::now();
        let each = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if requests > 0 => format!("{:.2}", (b - a).as_secs_f64() * 1000.0 / requests as f64),
            _ => "n/a".into(),
        };
        format!("{} / {}", each(self.ch, after.ch), each(self.mongo, after.mongo))
    }
}

fn row(md: &mut String, measure: &str, run: &mut Run, cpu: &str) {
    let failed = if run.failed > 0 { format!(" ({} failed)", run.failed) } else { String::new() };
    md.push_str(&format!(
        "| {measure} | {:.0}{failed} | {:.1} / {:.1} | {cpu} |\n",
        run.rate(),
        run.p(0.5),
        run.p(0.99)
    ));
    eprintln!(
        "{measure}: {:.0}/s{failed}, p50 {:.1} ms, p99 {:.1} ms, CPU per request (ClickHouse / MongoDB, ms) {cpu}",
        run.rate(),
        run.p(0.5),
        run.p(0.99)
    );
}

const FHIR_JSON: &str = "application/fhir+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// One request: method, path under the FHIR base, content type, body.
type Request = (reqwest::Method, String, &'static str, Value);

/// Sends a request with `Prefer: return=minimal`; true when it succeeded.
async fn send(client: &reqwest::Client, base: &str, (method, path, content_type, body): Request) -> bool {
    let r = client
        .request(method, format!("{base}/{path}"))
        .header("content-type", content_type)
        .header("prefer", "return=minimal")
        .body(body.to_string())
        .send()
        .await;
    matches!(r, Ok(r) if r.status().is_success())
}

/// Runs the requests `make(client, i)` from every client for `time` and writes the row,
/// with the stores' CPU until the work the requests left behind (member flushes, history
/// copies, events) is done.
async fn measure_requests<F>(
    md: &mut String,
    measure: &str,
    time: Duration,
    client: &reqwest::Client,
    base: &str,
    make: F,
) where
    F: Fn(usize, usize) -> Request + Clone + Send + Sync + 'static,
{
    let cpu_before = Cpu::now();
    let (client, base) = (client.clone(), base.to_string());
    let mut run = closed_loop(time, move |c, i| {
        let (client, base, request) = (client.clone(), base.clone(), make(c, i));
        async move { send(&client, &base, request).await }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_before.per_request(run.ok);
    row(md, measure, &mut run, &cpu);
}

/// The guarded read+update floor: each client reads its document's version and updates
/// it where the version is unchanged, pushing a batch onto `outbox` (as a member-only
/// PATCH's commit does). `group_shaped`: the documents look and are indexed like a Group's
/// current version, and the update also sets what the commit sets.
async fn guarded_cycles(md: &mut String, measure: &str, time: Duration, db: &mongodb::Database, group_shaped: bool) {
    let docs = db.collection::<bson::Document>(if group_shaped { "floor_group_shaped" } else { "floor_guarded" });
    if group_shaped {
        for (name, keys, sparse) in [
            ("search_by_lastUpdated", doc! { "deleted": 1, "lastUpdated": 1, "_id": 1 }, false),
            ("pending_work", doc! { "historyPending": 1, "outboxPending": 1 }, true),
        ] {
            let options = mongodb::options::IndexOptions::builder().name(name.to_string()).sparse(sparse).build();
            docs.create_index(mongodb::IndexModel::builder().keys(keys).options(options).build()).await.unwrap();
        }
    }
    for d in 0..CLIENTS as i64 {
        let mut document = doc! { "_id": d, "versionId": 1i64, "outbox": [] };
        if group_shaped {
            let resource = doc! { "resourceType": "Group", "id": d.to_string(), "type": "person", "actual": true,
            "meta": { "versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z" } };
            document.extend(doc! { "lastUpdated": bson::DateTime::now(), "deleted": false, "method": "PUT",
            "versionLog": "[]", "memberCount": 0i64, "resource": resource });
        }
        docs.insert_one(document).await.unwrap();
    }
    let cpu_before = Cpu::now();
    let mut run = closed_loop(time, move |c, _| {
        let docs = docs.clone();
        async move {
            let id = c as i64;
            let Ok(Some(d)) = docs.find_one(doc! { "_id": id }).await else { return false };
            let v = d.get_i64("versionId").unwrap_or(0);
            let batch = doc! { "batchId": uuid::Uuid::new_v4().to_string(), "events": "[[1,0,\"{}\"]]" };
            let mut set = doc! { "versionId": v + 1 };
            if group_shaped {
                set.extend(doc! { "lastUpdated": bson::DateTime::now(), "outboxPending": true,
                "resource.meta.versionId": (v + 1).to_string() });
            }
            let update = doc! { "$set": set, "$push": { "outbox": { "$each": [batch], "$slice": -20 } } };
            matches!(docs.update_one(doc! { "_id": id, "versionId": v }, update).await, Ok(r) if r.modified_count == 1)
        }
    })
    .await;
    let cpu = cpu_before.per_request(run.ok);
    row(md, measure, &mut run, &cpu);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let out = arg("--out").unwrap_or_else(|| "docs/benchmarks.md".into());
    let time = if quick { Duration::from_secs(1) } else { Duration::from_secs(8) };

    let mut settings = roster::config::Settings::load(None).unwrap();
    settings.mongo.database = format!("bench_floor_{}", std::process::id());
    let db = roster::startup::mongo_database(&settings).await.unwrap();
    let mut md = String::new();
    md.push_str("## Concurrent writes\n\n");
    md.push_str(&format!(
        "{} clients, closed loop, {} s per measure, release build, fresh local services; the load generator \
         shares the machine ({}). CPU: the stores' processes' user+system time during the measure, divided \
         by the requests answered. Written by `examples/bench_writes.rs`.\n\n",
        CLIENTS,
        time.as_secs(),
        machine()
    ));
    md.push_str(
        "| measure | req/s | p50 / p99 (ms) | CPU per request: ClickHouse / MongoDB (ms) |\n|---|---|---|---|\n",
    );

    // The floors, through the driver, with the server's write concern.
    guarded_cycles(&mut md, "floor: guarded read+update cycle, 16 documents (driver)", time, &db, false).await;
    // The same cycle on a document shaped and indexed like a Group's current version (the
    // indexes of mongo/001 and 005; SecantusDB maintains every index on every update).
    let measure = "floor: the same cycle on Group-shaped documents with the Group collection's indexes (driver)";
    guarded_cycles(&mut md, measure, time, &db, true).await;
    let inserts = db.collection::<bson::Document>("floor_insert");
    let cpu_before = Cpu::now();
    let mut run = closed_loop(time, move |c, i| {
        let inserts = inserts.clone();
        async move {
            let d = doc! { "_id": format!("{c}-{i}"), "resource": { "resourceType": "Patient", "name": [{ "family": "Floor" }] } };
            inserts.insert_one(d).await.is_ok()
        }
    })
    .await;
    let cpu = cpu_before.per_request(run.ok);
    row(&mut md, "floor: single insert (driver)", &mut run, &cpu);
    db.drop().await.ok();

    let server_bin = arg("--server");
    let server = match &server_bin {
        Some(bin) => Server::start_binary(bin, "events", "writes", &[]),
        None => Server::start("events", "writes", &[]),
    };
    let base = format!("{}/4_0_0", server.base);
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    for g in 0..CLIENTS {
        let members: Vec<Value> =
            (0..GROUP_MEMBERS).map(|m| json!({ "entity": { "reference": format!("Patient/g{g}-{m}") } })).collect();
        let group = json!({ "resourceType": "Group", "id": format!("cw{g}"), "type": "person", "actual": true, "member": members });
        assert!(send(&client, &base, (reqwest::Method::PUT, format!("Group/cw{g}"), FHIR_JSON, group)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (label, groups) in [("16 Groups", CLIENTS), ("1 Group", 1)] {
        let measure = format!("member-only PATCH (one member added), 16 clients over {label}");
        measure_requests(&mut md, &measure, time, &client, &base, move |c, i| {
            let ops = json!([{ "op": "add", "path": "/member/-",
                "value": { "entity": { "reference": format!("Patient/t{groups}-{c}-{i}") } } }]);
            (reqwest::Method::PATCH, format!("Group/cw{}", c % groups), JSON_PATCH, ops)
        })
        .await;
    }

    measure_requests(&mut md, "`POST /Patient`, 16 clients", time, &client, &base, |c, i| {
        let patient = json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:bench", "value": format!("{c}-{i}") }],
                              "name": [{ "family": format!("Bench{c}"), "given": ["Ada"] }], "gender": "female", "birthDate": "1990-05-17" });
        (reqwest::Method::POST, "Patient".to_string(), FHIR_JSON, patient)
    })
    .await;

    // Updates of existing Patients: each client its own 20.
    for c in 0..CLIENTS {
        for k in 0..20 {
            let patient =
                json!({ "resourceType": "Patient", "id": format!("u{c}-{k}"), "name": [{ "family": "Before" }] });
            send(&client, &base, (reqwest::Method::PUT, format!("Patient/u{c}-{k}"), FHIR_JSON, patient)).await;
        }
    }
    measure_requests(&mut md, "`PUT /Patient/{id}` (update), 16 clients", time, &client, &base, |c, i| {
        let id = format!("u{c}-{}", i % 20);
        let patient = json!({ "resourceType": "Patient", "id": id, "name": [{ "family": format!("After{i}") }] });
        (reqwest::Method::PUT, format!("Patient/{id}"), FHIR_JSON, patient)
    })
    .await;
    drop(server);

    if let Some(bin) = server_bin {
        md.push_str(&format!("\nServer: `{bin}`.\n"));
    }
    write_section(&out, "writes", &md);
    println!("{md}");
}
