//! Event store benchmark: appends over HTTP (single events from concurrent writers, and
//! 100-event batches), `read_all` through the store API and over HTTP, how far a live
//! subscriber (SSE) trails the writers; then projections over the same log: catch-up
//! rate, rebuild times, and GraphQL `patientTimeline` latency on a 10,000-event patient.
//!
//! Run with `make bench` (services up, release build). Writes the `events` section of
//! `docs/benchmarks.md`. `--quick` shrinks the sizes by 10×.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use roster::eventstore::EventStore;
use roster::projection::builtin;
use roster::projection::rebuild::Rebuild;
use roster::projection::runner::{Checkpoints, Runner, RunnerConfig};
use roster::projection::snapshot::SnapshotStore;
use roster::projection::Projection;
use serde_json::{json, Value};

mod common;
use common::{machine, pct, write_section, Server};

const WRITERS: usize = 16;
const BATCH: usize = 100;
const BATCH_WRITERS: usize = 8;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn post(http: &reqwest::Client, base: &str, stream: &str, body: String) -> Duration {
    let start = Instant::now();
    let r = http.post(format!("{base}/events/{stream}")).body(body).send().await.unwrap();
    let status = r.status();
    let _ = r.bytes().await;
    assert_eq!(status, 201, "append to {stream}");
    start.elapsed()
}

/// Follows `/events/subscribe` from `from`; records (now − event timestamp) per event
/// until `stop` events have arrived.
///
/// The client must keep up with the server, or its own backlog shows up as lag: frames are
/// cut from each chunk by offset (the buffer is drained once per chunk, not once per
/// frame, which is quadratic in the chunk size when the chunks grow), and only the
/// timestamp is decoded.
async fn follow(http: reqwest::Client, base: String, from: u64, stop: u64) -> Vec<Duration> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        timestamp: i64,
    }
    let r = http.get(format!("{base}/events/subscribe?from={from}")).send().await.unwrap();
    let mut body = r.bytes_stream();
    let (mut text, mut lags, mut seen) = (String::new(), Vec::new(), 0u64);
    while seen < stop {
        let Some(Ok(chunk)) = body.next().await else { break };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        let mut start = 0;
        while let Some(end) = text[start..].find("\n\n") {
            let frame = &text[start..start + end];
            start += end + 2;
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                let e: Stamp = serde_json::from_str(data).unwrap();
                let lag = now_ms() - e.timestamp;
                lags.push(Duration::from_millis(lag.max(0) as u64));
                seen += 1;
            }
        }
        text.drain(..start);
    }
    lags
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let out = std::env::args().skip_while(|a| a != "--out").nth(1).unwrap_or_else(|| "docs/benchmarks.md".into());
    let singles_per_writer = 1_000 / scale;
    let total_batched = 1_000_000 / scale;
    // Projections are fed by this benchmark (to time them), not by the server.
    let server = Server::start("events", "es", &[("ROSTER_PROJECTIONS", "off")]);
    let base = server.base.clone();
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();

    // 1. Single-event appends from concurrent writers, with a live subscriber.
    eprintln!("events: {WRITERS} writers × {singles_per_writer} single-event appends");
    let single_total = (WRITERS * singles_per_writer) as u64;
    let subscriber = tokio::spawn(follow(http.clone(), base.clone(), 0, single_total));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(singles_per_writer);
                for i in 0..singles_per_writer {
                    let body = json!([{ "eventType": "vitals_recorded", "data": { "writer": w, "i": i } }]).to_string();
                    samples.push(post(&http, &base, &format!("patient:w{w}"), body).await);
                }
                samples
            })
        })
        .collect();
    let mut single = Vec::new();
    for t in tasks {
        single.extend(t.await.unwrap());
    }
    let single_rate = single_total as f64 / started.elapsed().as_secs_f64();
    let mut lags = tokio::time::timeout(Duration::from_secs(60), subscriber).await.unwrap().unwrap();

    // 2. 100-event batches up to 1M events.
    eprintln!("events: {total_batched} events in {BATCH}-event appends from {BATCH_WRITERS} writers");
    let per_writer = total_batched / BATCH / BATCH_WRITERS;
    let batch_subscriber =
        tokio::spawn(follow(http.clone(), base.clone(), single_total, (per_writer * BATCH * BATCH_WRITERS) as u64));
    let started = Instant::now();
    let tasks: Vec<_> = (0..BATCH_WRITERS)
        .map(|w| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let events: Vec<Value> = (0..BATCH)
                        .map(|k| json!({ "eventType": "lab_result", "data": { "writer": w, "batch": i, "k": k, "value": 5.4 } }))
                        .collect();
                    samples.push(post(&http, &base, &format!("encounter:w{w}-{}", i % 100), Value::Array(events).to_string()).await);
                }
                samples
            })
        })
        .collect();
    let mut batched = Vec::new();
    for t in tasks {
        batched.extend(t.await.unwrap());
    }
    let batched_events = per_writer * BATCH * BATCH_WRITERS;
    let batched_rate = batched_events as f64 / started.elapsed().as_secs_f64();
    let mut batch_lags = tokio::time::timeout(Duration::from_secs(120), batch_subscriber).await.unwrap().unwrap();

    // 3. read_all over everything: the store API, then HTTP pages.
    let total = single_total + batched_events as u64;
    eprintln!("events: read_all over {total} events");
    let settings = {
        let mut s = roster::config::Settings::load(None).unwrap();
        let db = format!("bench_es_{}", std::process::id());
        s.mongo.database = db.clone();
        s.clickhouse.database = db;
        s
    };
    let db = roster::startup::mongo_database(&settings).await.unwrap();
    let store = Arc::new(roster::eventstore::log::ClickHouseEventStore::new(
        &db,
        roster::migrate::clickhouse_client(&settings.clickhouse),
    ));
    let started = Instant::now();
    let (mut from, mut read) = (0u64, 0u64);
    loop {
        let page = store.read_all(from, 100_000).await.unwrap();
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        read += page.len() as u64;
    }
    let api_rate = read as f64 / started.elapsed().as_secs_f64();
    assert_eq!(read, total, "read_all returns every event once");
    let started = Instant::now();
    let (mut from, mut http_read) = (0u64, 0u64);
    while http_read < total.min(200_000) {
        let r = http.get(format!("{base}/events?from={from}&max=10000")).send().await.unwrap();
        let page: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let n = page["events"].as_array().unwrap().len() as u64;
        if n == 0 {
            break;
        }
        http_read += n;
        from = page["next"].as_u64().unwrap();
    }
    let http_rate = http_read as f64 / started.elapsed().as_secs_f64();

    // 4. Projections: catch-up from the first event, rebuilds, GraphQL on a long timeline.
    eprintln!("events: projections over {total} events");
    let ch = roster::migrate::clickhouse_client(&settings.clickhouse);
    let checkpoints = Checkpoints::new(&db);
    let caught_up = |name: &'static str, until: i64| {
        let checkpoints = checkpoints.clone();
        async move {
            while checkpoints.status(name).await.unwrap().position < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let runner = Runner::new(&db, ch.clone(), store.clone(), RunnerConfig { batch: 50_000, ..RunnerConfig::default() });
    let started = Instant::now();
    let tasks = runner.spawn(vec![Arc::new(builtin::EventStatistics) as Arc<dyn Projection>]);
    caught_up("event_statistics", total as i64 - 1).await;
    let catch_up_rate = total as f64 / started.elapsed().as_secs_f64();
    tasks.into_iter().for_each(|t| t.abort());
    let snapshots = SnapshotStore::new(&db);
    let rebuild = Rebuild { ch: &ch, store: &store, checkpoints: &checkpoints, snapshots: &snapshots };
    let mut rebuilds = Vec::new();
    for p in builtin::all() {
        let report = rebuild.run(&*p, false, false, |_| {}).await.unwrap();
        rebuilds.push(format!("{} {:.1} s", p.name(), report.elapsed.as_secs_f64()));
    }
    let long = 10_000usize;
    for chunk in 0..long / BATCH {
        let events: Vec<Value> = (0..BATCH)
            .map(|k| json!({ "eventType": "lab_result", "data": { "code": "2345-7", "value": chunk * BATCH + k, "unit": "mmol/L" } }))
            .collect();
        post(&http, &base, "patient:BENCH-1", Value::Array(events).to_string()).await;
    }
    let end = store.last_position().await.unwrap();
    let tasks = runner.spawn(vec![Arc::new(builtin::PatientTimeline) as Arc<dyn Projection>]);
    caught_up("patient_timeline", end).await;
    tasks.into_iter().for_each(|t| t.abort());
    let mut timeline = Vec::new();
    let query = json!({ "query": r#"{ patientTimeline(mrn: "BENCH-1", first: 100) { position timestamp eventType summary } }"# }).to_string();
    for _ in 0..300 {
        let start = Instant::now();
        let r = http.post(format!("{base}/graphql")).body(query.clone()).send().await.unwrap();
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        timeline.push(start.elapsed());
        assert_eq!(body["data"]["patientTimeline"].as_array().map(Vec::len), Some(100), "{body}");
    }

    let f = |v: f64| format!("{v:.1}");
    let rows = [
        (
            format!("single-event append, {WRITERS} concurrent writers: p50 / p99 (ms); throughput (events/s)"),
            "p99 ≤ 10 ms".to_string(),
            format!("{} / {}; {:.0}", f(pct(&mut single, 0.5)), f(pct(&mut single, 0.99)), single_rate),
        ),
        (
            format!("{BATCH}-event appends, {BATCH_WRITERS} concurrent writers, {batched_events} events: throughput (events/s); request p50 / p99 (ms)"),
            "≥ 50,000 events/s".to_string(),
            format!("{batched_rate:.0}; {} / {}", f(pct(&mut batched, 0.5)), f(pct(&mut batched, 0.99))),
        ),
        (
            format!("read_all over {total} events: store API, pages of 100k (events/s); HTTP, pages of 10k, first {http_read} (events/s)"),
            "≥ 1,000,000 events/s".to_string(),
            format!("{api_rate:.0}; {http_rate:.0}"),
        ),
        (
            "SSE subscriber lag behind the append (event timestamp → received): p50 / p99 (ms), single-event load; batched load".to_string(),
            "p99 ≤ 200 ms".to_string(),
            format!(
                "{} / {}; {} / {}",
                f(pct(&mut lags, 0.5)),
                f(pct(&mut lags, 0.99)),
                f(pct(&mut batch_lags, 0.5)),
                f(pct(&mut batch_lags, 0.99))
            ),
        ),
        (
            format!("projection catch-up from the first event, event statistics, {total} events (events/s)"),
            "≥ 200,000 events/s".to_string(),
            format!("{catch_up_rate:.0}"),
        ),
        (format!("rebuild of each built-in projection over {total} events"), "".to_string(), rebuilds.join("; ")),
        (
            format!("GraphQL patientTimeline (first 100) on a patient with {long} events: p50 / p99 (ms)"),
            "p99 ≤ 20 ms".to_string(),
            format!("{} / {}", f(pct(&mut timeline, 0.5)), f(pct(&mut timeline, 0.99))),
        ),
    ];
    let mut md = String::from("## Event store and projections\n\n");
    md.push_str(&format!(
        "Measured by `make bench` (`examples/bench_events.rs`) on {}; release build; the same local services; \
         one `roster serve`, clients in one process over HTTP/1.1 keep-alive. An append is acknowledged once journaled \
         in MongoDB; ClickHouse gets it from the flusher (blocks at most every 200 ms under load). The event \
         timestamp is taken when the appender's cycle starts; the subscriber runs in the server that appends, so \
         it is fed journaled events from memory.\n\n",
        machine()
    ));
    if quick {
        md.push_str("**Quick run: every size divided by 10.**\n\n");
    }
    md.push_str("| measure | target | roster |\n|---|---|---|\n");
    for (a, b, c) in &rows {
        md.push_str(&format!("| {a} | {b} | {c} |\n"));
    }
    write_section(&out, "events", &md);
    println!("{md}");
}
