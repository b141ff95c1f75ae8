//! Search benchmark (issue 18): 100k Patients and 1M Observations stored the way a server
//! without search keys stored them, indexed by `roster reindex` (its rate is a row), then
//! sequential searches of each kind (p50/p99 over many different values), the write cost
//! of indexing (PUT p50 with and without it), and `Patient?_has:Group:member:_id=` on a
//! 1M-member Group.
//!
//! Data: Patients `pat000000…` with one of 1,000 family names (100 each) and a unique MRN;
//! Observations `obs0000000…` of the first 10,000 Patients (100 each), one of 20 LOINC codes
//! (50k each), dates spread over 2015–2024, a quantity value. The Group's members are
//! `Patient/pat000000…pat999999` (the first 100k exist).
//!
//! Run with `make bench`; `--quick` divides the sizes by 10. For work on the searches,
//! `BENCH_SEARCH_DB=name` keeps the data in databases of that name: a later run with the
//! same name skips loading, reindexing and the write-cost rows, and prints the searches
//! without writing `docs/benchmarks.md`.

mod common;

use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::{machine, pct, write_section, Server};
use serde_json::{json, Value};

const CODES: usize = 20;
const FAMILIES: usize = 1_000;

fn family(i: usize) -> String {
    let syllables = ["ka", "lo", "mi", "ne", "ra", "so", "tu", "vi", "ze", "ba"];
    let n = i % FAMILIES;
    let mut s: String = [n / 100, (n / 10) % 10, n % 10].iter().map(|d| syllables[*d]).collect();
    s.replace_range(0..1, &s[0..1].to_uppercase());
    s
}

fn stored(rt: &str, id: &str, resource: Value) -> Document {
    let mut r = resource;
    r["resourceType"] = json!(rt);
    r["id"] = json!(id);
    r["meta"] = json!({"versionId": "1", "lastUpdated": "2024-01-01T00:00:00.000Z"});
    let obj = r.as_object().unwrap().clone();
    doc! {
        "_id": id, "versionId": 1_i64, "lastUpdated": bson::DateTime::from_millis(1_704_067_200_000), "deleted": false,
        "method": "PUT", "resource": roster::model::json_bson::to_document(&obj).unwrap(),
    }
}

fn patient(i: usize) -> Value {
    json!({"name": [{"family": family(i), "given": ["Alex"]}], "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("{}-0{}-1{}", 1930 + i % 90, 1 + i % 9, i % 10),
        "identifier": [{"system": "http://bench/mrn", "value": format!("MRN{i:07}")}]})
}

fn observation(i: usize) -> Value {
    let day = i % 3650;
    let date = time::Date::from_ordinal_date(2015, 1).unwrap() + time::Duration::days(day as i64);
    json!({"status": "final", "subject": {"reference": format!("Patient/pat{:06}", i % 10_000)},
        "code": {"coding": [{"system": "http://loinc.org", "code": format!("{}-{}", 1000 + i % CODES, i % CODES)}]},
        "effectiveDateTime": format!("{date}T08:00:00Z"),
        "valueQuantity": {"value": (i % 200) as f64 + 0.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}})
}

async fn load(db: &mongodb::Database, rt: &str, n: usize, make: impl Fn(usize) -> (String, Value)) -> Duration {
    let coll = db.collection::<Document>(&format!("{rt}_4_0_0"));
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let (id, r) = make(i);
        batch.push(stored(rt, &id, r));
        if batch.len() == 10_000 || i + 1 == n {
            coll.insert_many(std::mem::take(&mut batch)).ordered(false).await.unwrap();
        }
    }
    started.elapsed()
}

/// Times `n` sequential GETs of `query(i)`; (p50, p99) ms, and the last body.
async fn timed(client: &reqwest::Client, base: &str, n: usize, query: impl Fn(usize) -> String) -> (f64, f64, Value) {
    let mut samples = Vec::with_capacity(n);
    let mut last = Value::Null;
    for i in 0..n {
        let url = format!("{base}/4_0_0/{}", query(i));
        let t = Instant::now();
        let r = client.get(&url).send().await.unwrap();
        let status = r.status();
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        samples.push(t.elapsed());
        assert!(status.is_success(), "{url}: {body}");
        last = body;
    }
    (pct(&mut samples, 0.5), pct(&mut samples, 0.99), last)
}

fn entries(b: &Value, mode: &str) -> usize {
    b["entry"].as_array().map_or(0, |e| e.iter().filter(|e| e["search"]["mode"] == mode).count())
}

/// p50 ms of `n` sequential PUTs (updates) of `rt` ids made by `id(i)`.
async fn put_p50(client: &reqwest::Client, base: &str, rt: &str, n: usize, body: impl Fn(usize) -> Value) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let mut b = body(i);
        let id = b["id"].as_str().unwrap().to_string();
        b["resourceType"] = json!(rt);
        let t = Instant::now();
        let r = client
            .put(format!("{base}/4_0_0/{rt}/{id}"))
            .header("content-type", "application/fhir+json")
            .body(b.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {rt}/{id}: {}", r.status());
        samples.push(t.elapsed());
    }
    pct(&mut samples, 0.5)
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let (patients, observations, members) = (100_000 / scale, 1_000_000 / scale, 1_000_000 / scale);
    let kept = std::env::var("BENCH_SEARCH_DB").ok();
    let db_name = kept.clone().unwrap_or_else(|| format!("bench_search_{}", std::process::id()));
    let mongo = mongodb::Client::with_uri_str(std::env::var("ROSTER_MONGO_URI").unwrap()).await.unwrap();
    let db = mongo.database(&db_name);
    let loaded = db.collection::<Document>("Group_4_0_0").count_documents(doc! {"_id": "big"}).await.unwrap_or(0) > 0;
    let names = [("ROSTER_MONGO_DATABASE", db_name.as_str()), ("ROSTER_CLICKHOUSE_DATABASE", db_name.as_str())];
    let server = Server::start("events", "search", &names);
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let searches_only = kept.is_some() && loaded;
    if searches_only {
        eprintln!("search: reusing the data in {db_name}");
        searches(&client, &base, quick, patients, observations, members).await;
        return;
    }
    // The server's start-up step ran on empty collections; what is loaded now is "old".
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("search: loading {patients} Patients and {observations} Observations");
    let lp = load(&db, "Patient", patients, |i| (format!("pat{i:06}"), patient(i))).await;
    let lo = load(&db, "Observation", observations, |i| (format!("obs{i:07}"), observation(i))).await;
    eprintln!("loaded in {:.0} s + {:.0} s; reindexing", lp.as_secs_f64(), lo.as_secs_f64());
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("roster");
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .arg("reindex")
        .env("ROSTER_MONGO_DATABASE", &db_name)
        .env("ROSTER_CLICKHOUSE_DATABASE", &db_name)
        .env("ROSTER_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "reindex failed");
    let reindex_s = started.elapsed().as_secs_f64();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());

    eprintln!("search: a {members}-member Group");
    let member_list: Vec<Value> =
        (0..members).map(|i| json!({"entity": {"reference": format!("Patient/pat{i:06}")}})).collect();
    let group = json!({"resourceType": "Group", "id": "big", "type": "person", "actual": true, "member": member_list});
    let r = client
        .put(format!("{base}/4_0_0/Group/big"))
        .header("content-type", "application/fhir+json")
        .body(group.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT Group: {}", r.status());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = searches(&client, &base, quick, patients, observations, members).await;
    if kept.is_none() {
        write_cost_and_report(&client, &base, quick, (patients, observations, members), rows, reindex_s).await;
    }
}

type Row = (String, f64, f64, String);

/// The search rows (each timed over many values), printed as they finish.
async fn searches(
    client: &reqwest::Client,
    base: &str,
    quick: bool,
    patients: usize,
    observations: usize,
    members: usize,
) -> (usize, Vec<Row>) {
    let (client, base) = (client.clone(), base.to_string());
    let n = if quick { 50 } else { 300 };
    let mut rows: Vec<Row> = Vec::new();
    let (p50, p99, b) = timed(&client, &base, n, |i| format!("Patient?family={}", &family(i * 7)[..4])).await;
    rows.push((
        "`Patient?family=` (4-letter prefix, ~100 matches)".into(),
        p50,
        p99,
        format!("{} per page", entries(&b, "match")),
    ));
    let (p50, p99, b) =
        timed(&client, &base, n, |i| format!("Patient?identifier=http://bench/mrn|MRN{:07}", (i * 331) % patients))
            .await;
    assert_eq!(entries(&b, "match"), 1);
    rows.push(("`Patient?identifier=system|value`".into(), p50, p99, "1 match".into()));
    let (p50, p99, b) = timed(&client, &base, n, |i| {
        let p = (i * 37) % 10_000.min(patients);
        format!("Observation?subject=Patient/pat{p:06}&code=http://loinc.org|{}-{}", 1000 + p % CODES, p % CODES)
    })
    .await;
    rows.push(("`Observation?subject=&code=`".into(), p50, p99, format!("{} matches", entries(&b, "match"))));
    let (p50, p99, b) = timed(&client, &base, n, |i| {
        format!(
            "Observation?code={}-{}&date=ge2024-0{}-01&_sort=-date&_count=50",
            1000 + i % CODES,
            i % CODES,
            1 + i % 9
        )
    })
    .await;
    assert_eq!(entries(&b, "match"), 50);
    rows.push((
        "`Observation?code=&date=ge…&_sort=-date&_count=50`".into(),
        p50,
        p99,
        format!("{} per code", observations / CODES),
    ));
    let (p50, p99, b) = timed(&client, &base, n, |i| {
        format!("Observation?subject:Patient.family={}&_count=50", family((i * 13) % FAMILIES))
    })
    .await;
    rows.push((
        "chain `Observation?subject:Patient.family=`".into(),
        p50,
        p99,
        format!("~{} Patients, {} per page", patients / FAMILIES, entries(&b, "match")),
    ));
    let (p50, p99, b) = timed(&client, &base, n, |i| {
        format!("Patient?_id=pat{:06}&_revinclude=Observation:subject", (i * 17) % 10_000.min(patients))
    })
    .await;
    rows.push((
        "`Patient?_id=&_revinclude=Observation:subject`".into(),
        p50,
        p99,
        format!("{} included", entries(&b, "include")),
    ));
    // Inner searches too large to list (50k Observations of a code, 50k female Patients):
    // they stay subqueries of the outer search.
    let (p50, p99, b) = timed(&client, &base, n / 3, |i| {
        format!("Patient?_has:Observation:subject:code=http://loinc.org|{}-{}&_count=20", 1000 + i % CODES, i % CODES)
    })
    .await;
    rows.push((
        "`Patient?_has:Observation:subject:code=` (subquery)".into(),
        p50,
        p99,
        format!("{} sources, {} per page", observations / CODES, entries(&b, "match")),
    ));
    let (p50, p99, b) = timed(&client, &base, n / 3, |i| {
        let c = 2 * (i % (CODES / 2));
        format!("Observation?subject:Patient.gender=female&code=http://loinc.org|{}-{c}&_count=50", 1000 + c)
    })
    .await;
    assert_eq!(entries(&b, "match"), 50);
    rows.push((
        "chain `Observation?subject:Patient.gender=&code=` (subquery)".into(),
        p50,
        p99,
        format!("{} Patients, {} per code", patients / 2, observations / CODES),
    ));
    let (p50, p99, b) = timed(&client, &base, n, |_| "Patient?_has:Group:member:_id=big".to_string()).await;
    assert_eq!(entries(&b, "match"), 20);
    rows.push((format!("`Patient?_has:Group:member:_id=` ({members} members)"), p50, p99, "first page of 20".into()));
    let (p50, p99, _) =
        timed(&client, &base, n, |i| format!("Patient?_has:Group:member:_id=big&_id=pat{:06}", (i * 101) % patients))
            .await;
    rows.push(("… with `_id=` (one member)".into(), p50, p99, String::new()));
    for (name, p50, p99, note) in &rows {
        eprintln!("{name:<60} p50 {p50:>7.1} p99 {p99:>7.1}  {note}");
    }
    (n, rows)
}

/// The write cost of indexing, then the section of `docs/benchmarks.md`.
async fn write_cost_and_report(
    client: &reqwest::Client,
    base: &str,
    quick: bool,
    (patients, observations, members): (usize, usize, usize),
    (n, rows): (usize, Vec<Row>),
    reindex_s: f64,
) {
    let reindex_rate = (patients + observations) as f64 / reindex_s;

    // Write cost: PUT p50 of updates, with indexing and without (a second server on its
    // own databases, same data shapes).
    eprintln!("search: write cost of indexing");
    let writes = if quick { 100 } else { 500 };
    let plain = Server::start("events", "search_noindex", &[("ROSTER_FHIR_SEARCH_INDEXING", "false")]);
    let mut cost = Vec::new();
    for (label, srv) in [("indexed", base), ("not indexed", plain.base.as_str())] {
        // Created first, then updated: the rows are updates.
        put_p50(client, srv, "Patient", writes, |i| {
            let mut p = patient(i);
            p["id"] = json!(format!("w{i:05}"));
            p
        })
        .await;
        let pp = put_p50(client, srv, "Patient", writes, |i| {
            let mut p = patient(i + 1);
            p["id"] = json!(format!("w{i:05}"));
            p
        })
        .await;
        put_p50(client, srv, "Observation", writes, |i| {
            let mut o = observation(i);
            o["id"] = json!(format!("w{i:05}"));
            o
        })
        .await;
        let po = put_p50(client, srv, "Observation", writes, |i| {
            let mut o = observation(i + 1);
            o["id"] = json!(format!("w{i:05}"));
            o
        })
        .await;
        cost.push((label, pp, po));
    }
    drop(plain);

    let mut body = String::new();
    body.push_str(&format!(
        "## Search (issue 18)\n\n{}; release build; one sequential client; {patients} Patients, {observations} \
         Observations, a {members}-member Group; {n} searches per row, each with a different value.\n\n",
        machine()
    ));
    body.push_str("| search | p50 ms | p99 ms | result |\n|---|---:|---:|---|\n");
    for (name, p50, p99, note) in &rows {
        body.push_str(&format!("| {name} | {p50:.1} | {p99:.1} | {note} |\n"));
    }
    body.push_str(&format!(
        "\n`roster reindex` of {} resources stored without keys: {reindex_s:.0} s, **{reindex_rate:.0} resources/s**.\n\n",
        patients + observations
    ));
    body.push_str("| PUT (update), p50 ms | Patient | Observation |\n|---|---:|---:|\n");
    for (label, pp, po) in &cost {
        body.push_str(&format!("| {label} | {pp:.2} | {po:.2} |\n"));
    }
    let (on, off) = (&cost[0], &cost[1]);
    body.push_str(&format!(
        "\nIndexing adds {:.0} % to a Patient PUT and {:.0} % to an Observation PUT ({writes} sequential updates each).\n",
        (on.1 / off.1 - 1.0) * 100.0,
        (on.2 / off.2 - 1.0) * 100.0
    ));
    println!("{body}");
    write_section("docs/benchmarks.md", "search", &body);
}
