//! Group membership benchmark: roster's event-sourced members against the same server with
//! members embedded in the MongoDB document (`ROSTER_GROUP_MEMBERS=embedded`).
//!
//! Run with `make bench` (services up, release build). It starts two `roster serve`
//! processes on fresh databases, drives them over HTTP from one client (sequential requests:
//! latency, not throughput), and writes `docs/benchmarks.md`.
//!
//! `--quick` shrinks every size by 10× for a smoke run.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{machine, ms, pct, rss_kib, write_section, Server};

struct Client {
    http: reqwest::Client,
    base: String,
}

fn member(i: u64) -> Value {
    json!({ "entity": { "reference": format!("Patient/p{i}") }, "period": { "start": "2024-01-01" } })
}

impl Client {
    /// Creates a group with one seed member (RFC 6902 `add /member/-` needs the array to
    /// exist in the embedded baseline; both modes get the same seed).
    async fn put_group(&self, id: &str) {
        let body = json!({ "resourceType": "Group", "id": id, "type": "person", "actual": true, "name": id,
                           "member": [{ "entity": { "reference": "Patient/seed" } }] });
        let r = self
            .http
            .put(format!("{}/4_0_0/Group/{id}", self.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "create {id}: {}", r.status());
    }

    /// Adds members `from..to` in one PATCH; returns its latency.
    async fn add(&self, id: &str, from: u64, to: u64) -> Duration {
        let ops: Vec<Value> =
            (from..to).map(|i| json!({ "op": "add", "path": "/member/-", "value": member(i) })).collect();
        let body = Value::Array(ops).to_string();
        let start = Instant::now();
        let r = self
            .http
            .patch(format!("{}/4_0_0/Group/{id}", self.base))
            .header("content-type", "application/json-patch+json")
            .header("prefer", "return=minimal")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "PATCH {id} +{}: {status} {text}", to - from);
        start.elapsed()
    }

    /// Times a GET. A 503 is retried (twice): SecantusDB can stall for seconds under the
    /// embedded baseline's multi-megabyte documents, and the driver then drops its
    /// connections; the time reported is that of the answer that succeeded.
    async fn get(&self, path: &str) -> (Duration, usize) {
        for attempt in 0..3 {
            let start = Instant::now();
            let r = self.http.get(format!("{}/4_0_0/{path}", self.base)).send().await.unwrap();
            let status = r.status();
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && attempt < 2 {
                eprintln!("GET {path}: 503, retrying");
                continue;
            }
            assert!(status.is_success(), "GET {path}: {status}");
            let bytes = r.bytes().await.unwrap();
            return (start.elapsed(), bytes.len());
        }
        unreachable!("the last attempt asserts")
    }
}

/// Runs `f` while sampling the server's RSS every 5 ms; returns (f's output, peak growth in MiB).
async fn with_rss<T>(server: &Server, f: impl std::future::Future<Output = T>) -> (T, f64) {
    let pid = server.child.id();
    let before = rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(v) = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1))
            {
                peak = peak.max(v.parse().unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let out = f.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    (out, peak.saturating_sub(before) as f64 / 1024.0)
}

/// On `groups` fresh groups: one PATCH of `k1` adds, then one of `k10` adds; returns
/// the latencies of each kind.
async fn bulk_patches(c: &Client, groups: usize, k1: u64, k10: u64) -> (Vec<Duration>, Vec<Duration>) {
    let (mut t1, mut t10) = (Vec::new(), Vec::new());
    for g in 0..groups {
        let id = format!("small{g}");
        c.put_group(&id).await;
        t1.push(c.add(&id, 0, k1).await);
        t10.push(c.add(&id, k1, k1 + k10).await);
    }
    (t1, t10)
}

/// `n` single-member PATCHes adding new members from `next`; returns (p50, p99) ms.
async fn singles(c: &Client, id: &str, next: &mut u64, n: usize) -> (f64, f64) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(c.add(id, *next, *next + 1).await);
        *next += 1;
    }
    (pct(&mut samples, 0.5), pct(&mut samples, 0.99))
}

/// What the stores alone cost per round trip on this machine, measured on the events
/// server's databases while it is idle: a single-member PATCH needs a MongoDB update (and,
/// without a remembered document, a read); nothing of ClickHouse's.
async fn backend_floor(db: &str) -> (f64, f64, f64) {
    use bson::doc;
    let mut settings = roster::config::Settings::load(None).unwrap();
    settings.clickhouse.database = db.to_string();
    let mongo = mongodb::Client::with_uri_str(&settings.mongo.uri).await.unwrap().database(db);
    let groups = mongo.collection::<bson::Document>("Group_4_0_0");
    groups
        .insert_one(doc! { "_id": "floor", "versionId": 0i64, "resource": { "resourceType": "Group" } })
        .await
        .unwrap();
    let mut reads = Vec::new();
    let mut updates = Vec::new();
    for v in 0..200i64 {
        let t = Instant::now();
        groups.find_one(doc! { "_id": "floor" }).await.unwrap();
        reads.push(t.elapsed());
        let t = Instant::now();
        groups
            .update_one(doc! { "_id": "floor", "versionId": v }, doc! { "$set": { "versionId": v + 1 } })
            .await
            .unwrap();
        updates.push(t.elapsed());
    }
    groups.delete_one(doc! { "_id": "floor" }).await.unwrap();
    let ch = roster::migrate::clickhouse_client(&settings.clickhouse);
    let mut selects = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        ch.query("SELECT 1").fetch_one::<u8>().await.unwrap();
        selects.push(t.elapsed());
    }
    (pct(&mut reads, 0.5), pct(&mut updates, 0.5), pct(&mut selects, 0.5))
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let out = std::env::args().skip_while(|a| a != "--out").nth(1).unwrap_or_else(|| "docs/benchmarks.md".into());
    let (k1, k10, k100, m1) = (1_000 / scale, 10_000 / scale, 100_000 / scale, 1_000_000 / scale);
    let single_n = if quick { 50 } else { 200 };
    let http = reqwest::Client::builder().pool_max_idle_per_host(4).build().unwrap();
    let mut rows: Vec<(String, String, String, String)> = Vec::new();

    // ---- events (the product) ----
    let events = Server::start("events", "events", &[("ROSTER_PROJECTIONS", "off")]);
    let c = Client { http: http.clone(), base: events.base.clone() };
    eprintln!("events: 1k and 10k PATCH");
    let (t1k, t10k) = bulk_patches(&c, 5, k1, k10).await;
    eprintln!("events: growing to {m1} members by {}-member PATCHes", k10);
    c.put_group("big").await;
    let mut next = 0u64;
    let mut load = Duration::ZERO;
    let mut at = Vec::new();
    let checkpoints = [k1, k100, m1];
    let mut size = 0u64;
    for target in checkpoints {
        while size < target {
            let step = (target - size).min(k10);
            load += c.add("big", next, next + step).await;
            next += step;
            size += step;
        }
        eprintln!("events: single-member PATCHes at {size}");
        let (p50, p99) = singles(&c, "big", &mut next, single_n).await;
        size += single_n as u64;
        at.push((target, p50, p99));
    }
    let floor = backend_floor(&format!("bench_events_{}", std::process::id())).await;
    eprintln!("events so far: singles (members, p50, p99) {at:?}; load {load:?}; floor {floor:?}");
    eprintln!("events: Group?member= and full GET");
    let mut lookups = Vec::new();
    for i in 0..500u64 {
        let p = (i * 7919) % m1;
        lookups.push(c.get(&format!("Group?member=Patient/p{p}&_count=10")).await.0);
    }
    let mut lk = lookups.clone();
    eprintln!("events: Group?member= p50 {:.1} p99 {:.1} ms", pct(&mut lk, 0.5), pct(&mut lk, 0.99));
    let ((get_time, get_bytes), rss_growth_mib) = with_rss(&events, c.get("Group/big")).await;

    eprintln!("events: POST of a {m1}-member Group");
    let post_body = json!({ "resourceType": "Group", "type": "person", "actual": true,
                            "member": (0..m1).map(member).collect::<Vec<_>>() })
    .to_string();
    let post_len = post_body.len();
    let ((post_time, post_status), post_growth_mib) = with_rss(&events, async {
        let start = Instant::now();
        let r = http
            .post(format!("{}/4_0_0/Group", events.base))
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=minimal")
            .body(post_body)
            .send()
            .await
            .unwrap();
        (start.elapsed(), r.status())
    })
    .await;
    assert!(post_status.is_success(), "POST {m1} members: {post_status}");

    // ---- embedded baseline ----
    // The baseline keeps members in the document, as servers without member events do,
    // and no search keys: indexing each member's reference there would carry the keys of
    // 100k members in the document too (past MongoDB's 16 MiB at ~70k).
    let embedded = Server::start(
        "embedded",
        "embedded",
        &[("ROSTER_PROJECTIONS", "off"), ("ROSTER_FHIR_SEARCH_INDEXING", "false")],
    );
    let b = Client { http: http.clone(), base: embedded.base.clone() };
    eprintln!("embedded: 1k and 10k PATCH");
    let (b1k, b10k) = bulk_patches(&b, 3, k1, k10).await;
    b.put_group("big").await;
    let mut bnext = 0u64;
    b.add("big", 0, k1).await;
    bnext += k1;
    eprintln!("embedded: single-member PATCHes at {k1}");
    let (b_p50_1k, b_p99_1k) = singles(&b, "big", &mut bnext, single_n / 4).await;
    eprintln!("embedded: growing to {k100}");
    let mut bsize = k1 + (single_n / 4) as u64;
    while bsize < k100 {
        let step = (k100 - bsize).min(k10);
        b.add("big", bnext, bnext + step).await;
        bnext += step;
        bsize += step;
    }
    eprintln!("embedded: single-member PATCHes at {bsize}");
    let (b_p50_100k, b_p99_100k) = singles(&b, "big", &mut bnext, 20).await;
    let (b_get_100k, _) = b.get("Group/big").await;

    let f = |x: f64| format!("{x:.1}");
    let avg = |v: &[Duration]| v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    let (p50_1k, p99_1k) = (at[0].1, at[0].2);
    let (p50_100k, p99_100k) = (at[1].1, at[1].2);
    let (p50_1m, p99_1m) = (at[2].1, at[2].2);
    let mut lk = lookups.clone();
    let n = |x: u64| {
        if x >= 1_000_000 {
            format!("{}M", x / 1_000_000)
        } else if x >= 1000 {
            format!("{}k", x / 1000)
        } else {
            x.to_string()
        }
    };
    rows.push((
        format!("single-member PATCH p50 / p99 at {} members (ms)", n(k1)),
        "≤ 5 (p50)".into(),
        format!("{} / {}", f(p50_1k), f(p99_1k)),
        format!("{} / {}", f(b_p50_1k), f(b_p99_1k)),
    ));
    rows.push((
        format!("single-member PATCH p50 / p99 at {} members (ms)", n(k100)),
        "≤ 5 (p50), ≥ 100× baseline".into(),
        format!("{} / {}", f(p50_100k), f(p99_100k)),
        format!("{} / {} ({:.0}× slower)", f(b_p50_100k), f(b_p99_100k), b_p50_100k / p50_100k),
    ));
    rows.push((
        format!("single-member PATCH p50 / p99 at {} members (ms)", n(m1)),
        "≤ 5 (p50), flat".into(),
        format!("{} / {}", f(p50_1m), f(p99_1m)),
        "n/a: 1M members exceed MongoDB's 16 MiB document".into(),
    ));
    rows.push((format!("one PATCH of {} adds (ms, mean)", n(k1)), "".into(), f(avg(&t1k)), f(avg(&b1k))));
    rows.push((format!("one PATCH of {} adds (ms, mean)", n(k10)), "≤ 150".into(), f(avg(&t10k)), f(avg(&b10k))));
    rows.push((
        format!("{} members via {}-member PATCHes (s)", m1, k10),
        "≤ 20".into(),
        format!("{:.1}", load.as_secs_f64()),
        "n/a".into(),
    ));
    rows.push((
        format!("Group?member= p50 / p99 at {} member rows (ms)", next),
        "≤ 10 (p99)".into(),
        format!("{} / {}", f(pct(&mut lk, 0.5)), f(pct(&mut lk, 0.99))),
        "n/a (no member index)".into(),
    ));
    rows.push((
        format!("full GET of a {}-member Group: time (s), body (MiB), server RSS growth (MiB)", size),
        "≤ 3 s, ≤ 50 MiB".into(),
        format!("{:.2} s, {:.0} MiB, {:.1} MiB", get_time.as_secs_f64(), get_bytes as f64 / 1048576.0, rss_growth_mib),
        format!("{:.2} s at {} members", b_get_100k.as_secs_f64(), bsize),
    ));

    rows.push((
        format!("POST of a {}-member Group: time (s), server RSS growth (MiB) vs body (MiB)", n(m1)),
        "growth < 10× body".into(),
        format!(
            "{:.1} s, {:.0} MiB vs {:.0} MiB ({:.1}×)",
            post_time.as_secs_f64(),
            post_growth_mib,
            post_len as f64 / 1048576.0,
            post_growth_mib * 1048576.0 / post_len as f64
        ),
        "n/a".into(),
    ));
    rows.push((
        "backend floor, idle: MongoDB find by _id / version-guarded update of a Group document; ClickHouse `SELECT 1` (ms, p50)"
            .into(),
        "".into(),
        format!("{} / {}; {}", f(floor.0), f(floor.1), f(floor.2)),
        "".into(),
    ));
    let mut md = String::new();
    md.push_str("## Group membership\n\n");
    md.push_str(&format!(
        "Group membership, measured by `make bench` (`examples/bench.rs`) on {}; release build; local services \
         from `scripts/services.sh` (ClickHouse 26.9 via chdb-core, SecantusDB for MongoDB); one client, sequential requests, \
         `Prefer: return=minimal`; projections off (they would poll the event log beside the measured requests). Each single-member PATCH adds a new member (`add /member/-` with a period).\n\n",
        machine()
    ));
    if quick {
        md.push_str("**Quick run: every size divided by 10.**\n\n");
    }
    md.push_str("| measure | target | roster (member events) | embedded baseline |\n|---|---|---|---|\n");
    for (a, b, c, d) in &rows {
        md.push_str(&format!("| {a} | {b} | {c} | {d} |\n"));
    }
    write_section(&out, "group", &md);
    println!("{md}");
}
