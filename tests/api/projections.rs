//! Projections on the real services: read models fed from FHIR writes, GraphQL over them,
//! temporal queries, crash/restart, rebuilds, one runner per projection, poison events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use roster::eventstore::log::ClickHouseEventStore;
use roster::eventstore::{EventStore, ExpectedVersion, NewEvent, StoredEvent};
use roster::projection::builtin;
use roster::projection::rebuild::Rebuild;
use roster::projection::runner::{Checkpoints, Runner, RunnerConfig};
use roster::projection::snapshot::{Snapshot, SnapshotStore};
use roster::projection::{Projection, ProjectionError, Target};
use serde_json::{json, Value};

use crate::helpers::{json, spawn_with, test_settings, TestApp};

async fn spawn(projections: bool) -> TestApp {
    let mut settings = test_settings();
    let path = std::env::temp_dir().join(format!("routes-{}.yaml", settings.mongo.database));
    std::fs::copy("config/event-routes.yaml", &path).unwrap();
    settings.events.routes = roster::config::EventRoutes::File(path);
    settings.projections.run = projections;
    spawn_with(settings, roster::pipeline::Hooks::default()).await
}

async fn graphql(app: &TestApp, query: &str) -> Value {
    graphql_answering(app, query, 200).await
}

/// A query that cannot be parsed or validated: 400 (GraphQL over HTTP), errors in the body.
async fn graphql_refused(app: &TestApp, query: &str) -> Value {
    graphql_answering(app, query, 400).await
}

async fn graphql_answering(app: &TestApp, query: &str, status: u16) -> Value {
    let r = app
        .client
        .post(format!("{}/graphql", app.address))
        .body(json!({ "query": query }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), status, "{query}");
    json(r).await
}

/// Waits until every projection has handled the whole log.
async fn caught_up(app: &TestApp) -> Value {
    for _ in 0..200 {
        let s = graphql(app, "{ projectionStatus { name state lag position } }").await;
        let all = s["data"]["projectionStatus"].as_array().cloned().unwrap_or_default();
        if all.len() == 3 && all.iter().all(|p| p["lag"] == 0 && p["state"] == "running") {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("projections did not catch up: {}", graphql(app, "{ projectionStatus { name state lag error } }").await);
}

fn patient(mrn: &str, family: &str) -> Value {
    json!({ "resourceType": "Patient", "id": "p1", "name": [{ "family": family }], "identifier": [
        { "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR" }] }, "value": mrn }
    ] })
}

fn encounter(id: &str, status: &str, location: &str) -> Value {
    json!({ "resourceType": "Encounter", "id": id, "status": status,
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP" },
            "subject": { "reference": "Patient/p1" }, "period": { "start": "2024-01-15T08:00:00Z" },
            "participant": [{ "individual": { "reference": "Practitioner/dr-1" } }],
            "location": [{ "location": { "reference": location } }] })
}

fn lab(id: &str, code: &str, value: f64) -> Value {
    json!({ "resourceType": "Observation", "id": id, "status": "final",
            "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory" }] }],
            "code": { "coding": [{ "system": "http://loinc.org", "code": code, "display": format!("test {code}") }] },
            "subject": { "reference": "Patient/p1" }, "valueQuantity": { "value": value, "unit": "mmol/L" } })
}

async fn ok(r: reqwest::Response) {
    let status = r.status();
    assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
}

#[tokio::test]
async fn read_models_and_graphql_follow_fhir_writes() {
    let app = spawn(true).await;
    ok(app.put("Patient/p1", &patient("MRN-1", "Doe")).await).await;
    ok(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/ward-1")).await).await;
    ok(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/icu")).await).await;
    ok(app.put("Encounter/e1", &encounter("e1", "finished", "Location/icu")).await).await;
    ok(app.put("Encounter/e2", &encounter("e2", "in-progress", "Location/ward-2")).await).await;
    ok(app.put("Observation/o1", &lab("o1", "2345-7", 5.4)).await).await;
    ok(app.put("Observation/o2", &lab("o2", "718-7", 13.1)).await).await;
    caught_up(&app).await;

    let t = graphql(&app, r#"{ patientTimeline(mrn: "MRN-1") { position eventType summary timestamp } }"#).await;
    let timeline = t["data"]["patientTimeline"].as_array().unwrap();
    let types: Vec<&str> = timeline.iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "resource_created",
            "resource_created",
            "patient_admit",
            "resource_updated",
            "patient_transfer",
            "resource_updated",
            "patient_discharge",
            "resource_created",
            "patient_admit",
            "resource_created",
            "lab_result",
            "resource_created",
            "lab_result"
        ]
    );
    assert_eq!(timeline[2]["summary"], "admitted (IMP) to Location/ward-1");
    assert_eq!(timeline[4]["summary"], "transferred from Location/ward-1 to Location/icu");
    assert_eq!(timeline[10]["summary"], "lab test 2345-7: 5.4 mmol/L");
    assert!(timeline[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    let page = graphql(&app, r#"{ patientTimeline(mrn: "MRN-1", first: 2) { eventType } }"#).await;
    assert_eq!(page["data"]["patientTimeline"].as_array().unwrap().len(), 2);
    let future =
        graphql(&app, r#"{ patientTimeline(mrn: "MRN-1", from: "2999-01-01T00:00:00Z") { eventType } }"#).await;
    assert_eq!(future["data"]["patientTimeline"], json!([]));

    let total_events = json(app.client.get(format!("{}/events?max=10000", app.address)).send().await.unwrap()).await
        ["events"]
        .as_array()
        .unwrap()
        .len() as u64;
    let s = graphql(&app, "{ eventStatistics { total byType { eventType count } bySource { source count } } }").await;
    let stats = &s["data"]["eventStatistics"];
    assert_eq!(stats["total"], total_events, "one count per event of the log");
    assert_eq!(stats["bySource"], json!([{ "source": "fhir", "count": total_events }]));
    let admits = stats["byType"].as_array().unwrap().iter().find(|t| t["eventType"] == "patient_admit").unwrap();
    assert_eq!(admits["count"], 4, "two admissions, each on patient: and encounter: streams");
    let labs = graphql(&app, r#"{ eventStatistics(eventTypes: ["lab_result"], sources: ["fhir"]) { total } }"#).await;
    assert_eq!(labs["data"]["eventStatistics"]["total"], 2);

    let active = graphql(&app, "{ activeEncounters { id patientMrn location class provider admitTime active } }").await;
    assert_eq!(
        active["data"]["activeEncounters"],
        json!([{ "id": "e2", "patientMrn": "MRN-1", "location": "Location/ward-2",
        "class": "IMP", "provider": "Practitioner/dr-1", "admitTime": "2024-01-15T08:00:00Z", "active": true }])
    );
    let at_icu = graphql(&app, r#"{ activeEncounters(location: "Location/icu") { id } }"#).await;
    assert_eq!(at_icu["data"]["activeEncounters"], json!([]));
    let one = graphql(
        &app,
        r#"{ discharged: activeEncounter(id: "e1") { id } current: activeEncounter(id: "e2") { location }
                                   mine: activeEncounterByPatient(mrn: "MRN-1") { id } }"#,
    )
    .await;
    assert_eq!(
        one["data"],
        json!({ "discharged": null, "current": { "location": "Location/ward-2" }, "mine": { "id": "e2" } })
    );

    // Errors in GraphQL's format, with limits.
    let bad = graphql(&app, r#"{ patientStateAt(mrn: "MRN-1", timestamp: "yesterday") { version } }"#).await;
    assert!(
        bad["errors"][0]["message"].as_str().unwrap().contains("timestamp: 'yesterday' is not an RFC 3339"),
        "{bad}"
    );
    let bad = graphql(&app, r#"{ patientTimeline(mrn: "MRN-1", first: 0) { position } }"#).await;
    assert!(bad["errors"][0]["message"].as_str().unwrap().contains("first"), "{bad}");
    let unknown = graphql_refused(&app, "{ nothingLikeThis }").await;
    assert!(unknown["errors"][0]["message"].as_str().unwrap().contains("nothingLikeThis"), "{unknown}");
    let r = app.client.post(format!("{}/graphql", app.address)).body("not json").send().await.unwrap();
    assert!(json(r).await["errors"][0]["message"].as_str().unwrap().contains("not a GraphQL request"));
    let many: String = (0..600).map(|i| format!("a{i}: projectionStatus {{ name }} ")).collect();
    let costly = graphql_refused(&app, &format!("{{ {many} }}")).await;
    assert!(costly["errors"][0]["message"].as_str().unwrap().to_lowercase().contains("complex"), "{costly}");
    let page = app.client.get(format!("{}/graphql", app.address)).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("GraphiQL"));
}

#[tokio::test]
async fn patient_state_at_three_times_and_group_members_at_a_time() {
    let app = spawn(false).await;
    let now = || time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    let pause = || tokio::time::sleep(Duration::from_millis(30));
    ok(app.put("Patient/p1", &patient("MRN-1", "Doe")).await).await;
    ok(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/ward-1")).await).await;
    pause().await;
    let t1 = now();
    pause().await;
    ok(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/icu")).await).await;
    ok(app.put("Observation/o1", &lab("o1", "2345-7", 5.4)).await).await;
    pause().await;
    let t2 = now();
    pause().await;
    ok(app.put("Encounter/e1", &encounter("e1", "finished", "Location/icu")).await).await;
    ok(app.put("Patient/p1", &patient("MRN-1", "Roe")).await).await;
    ok(app.put("Observation/o2", &lab("o2", "2345-7", 7.9)).await).await;
    pause().await;
    let t3 = now();
    let state = |t: &str| {
        format!(
            r#"{{ patientStateAt(mrn: "MRN-1", timestamp: "{t}") {{ demographics activeEncounters {{ id location }} latestLabs {{ code value }} version }} }}"#
        )
    };
    let at1 = graphql(&app, &state(&t1)).await["data"]["patientStateAt"].clone();
    let at2 = graphql(&app, &state(&t2)).await["data"]["patientStateAt"].clone();
    let at3 = graphql(&app, &state(&t3)).await["data"]["patientStateAt"].clone();
    let family = |s: &Value| -> String {
        let d: Value = serde_json::from_str(s["demographics"].as_str().unwrap()).unwrap();
        d["name"][0]["family"].as_str().unwrap().to_string()
    };
    assert_eq!(
        (family(&at1), at1["activeEncounters"].clone(), at1["latestLabs"].clone()),
        ("Doe".into(), json!([{ "id": "e1", "location": "Location/ward-1" }]), json!([]))
    );
    assert_eq!(
        (family(&at2), at2["activeEncounters"].clone(), at2["latestLabs"].clone()),
        (
            "Doe".into(),
            json!([{ "id": "e1", "location": "Location/icu" }]),
            json!([{ "code": "2345-7", "value": "5.4" }])
        )
    );
    assert_eq!(
        (family(&at3), at3["activeEncounters"].clone(), at3["latestLabs"].clone()),
        ("Roe".into(), json!([]), json!([{ "code": "2345-7", "value": "7.9" }]))
    );
    assert!(at1["version"].as_i64() < at2["version"].as_i64() && at2["version"].as_i64() < at3["version"].as_i64());
    let before = graphql(&app, &state("2000-01-01T00:00:00Z")).await["data"]["patientStateAt"].clone();
    assert_eq!((before["demographics"].clone(), before["version"].clone()), (Value::Null, json!(-1)));

    // Group membership at a time, paged by cursor.
    let member = |r: &str| json!({ "entity": { "reference": r } });
    ok(app
        .put(
            "Group/g1",
            &json!({ "resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                                     "member": [member("Patient/1"), member("Patient/2"), member("Patient/3")] }),
        )
        .await)
    .await;
    pause().await;
    let before_removal = now();
    pause().await;
    ok(app.patch("Group/g1", &json!([{ "op": "remove", "path": "/member/0" }])).await).await;
    let members = |at: &str, after: &str| {
        format!(
            r#"{{ groupMembers(groupId: "g1", at: "{at}", first: 2{after}) {{ edges {{ cursor node {{ reference }} }} pageInfo {{ hasNextPage endCursor }} }} }}"#
        )
    };
    let first = graphql(&app, &members(&before_removal, "")).await["data"]["groupMembers"].clone();
    let refs = |c: &Value| -> Vec<String> {
        c["edges"].as_array().unwrap().iter().map(|e| e["node"]["reference"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(refs(&first), ["Patient/1", "Patient/2"]);
    assert_eq!(first["pageInfo"]["hasNextPage"], true);
    let cursor = first["pageInfo"]["endCursor"].as_str().unwrap().to_string();
    let rest = graphql(&app, &members(&before_removal, &format!(r#", after: "{cursor}""#))).await["data"]
        ["groupMembers"]
        .clone();
    assert_eq!((refs(&rest), rest["pageInfo"]["hasNextPage"].clone()), (vec!["Patient/3".to_string()], json!(false)));
    let after_removal = graphql(&app, &members(&now(), "")).await["data"]["groupMembers"].clone();
    assert_eq!(refs(&after_removal), ["Patient/2", "Patient/3"]);
}

/// Events for the runner tests: admissions, transfers, discharges and labs of many
/// patients, appended straight to the store.
async fn seed(store: &ClickHouseEventStore, patients: usize) -> u64 {
    let mut n = 0;
    for p in 0..patients {
        let mrn = format!("M{p}");
        let enc = |t: &str, loc: &str| {
            NewEvent::new(
                t,
                &json!({ "encounterId": format!("enc-{p}"), "class": "IMP", "location": loc, "admitTime": "2024-01-01" }),
            )
        };
        let mut events = vec![enc("patient_admit", "Location/a"), enc("patient_transfer", "Location/b")];
        events.extend(
            (0..20).map(|i| NewEvent::new("lab_result", &json!({ "code": format!("c{}", i % 3), "value": i }))),
        );
        if p % 2 == 0 {
            events.push(enc("patient_discharge", "Location/b"));
        }
        for e in &mut events {
            e.metadata.insert("source".into(), format!("feed-{}", p % 3));
        }
        n += events.len() as u64;
        store.append(&format!("patient:{mrn}"), ExpectedVersion::Any, events).await.unwrap();
    }
    n
}

/// What the read models hold, for comparisons.
async fn models(
    ch: &clickhouse::Client,
) -> (Vec<(String, u64, String)>, Vec<(String, u64)>, Vec<builtin::EncounterRow>) {
    let timeline = ch
        .query("SELECT mrn, position, summary FROM Projection_PatientTimeline FINAL ORDER BY mrn, position")
        .fetch_all()
        .await
        .unwrap();
    let stats = ch
        .query("SELECT concat(event_type, '/', toString(source)), count() FROM Projection_EventStatistics FINAL GROUP BY 1 ORDER BY 1")
        .fetch_all()
        .await
        .unwrap();
    let encounters = ch
        .query("SELECT ?fields FROM Projection_ActiveEncounters FINAL ORDER BY encounter_id")
        .fetch_all()
        .await
        .unwrap();
    (timeline, stats, encounters)
}

async fn wait_for(checkpoints: &Checkpoints, name: &str, position: i64) {
    for _ in 0..400 {
        if checkpoints.status(name).await.unwrap().position >= position {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} did not reach {position}: {:?}", checkpoints.status(name).await.unwrap());
}

#[tokio::test]
async fn a_runner_killed_mid_batch_and_restarted_equals_a_clean_rebuild_and_snapshots_agree() {
    let app = spawn(false).await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let store = Arc::new(ClickHouseEventStore::new(&app.mongo, ch.clone()));
    let total = seed(&store, 150).await as i64;
    let config = RunnerConfig { batch: 97, lease: Duration::from_secs(2), ..RunnerConfig::default() };
    let first = Runner::new(&app.mongo, ch.clone(), store.clone(), config.clone());
    let tasks = first.spawn(builtin::all());
    let checkpoints = Checkpoints::new(&app.mongo);
    wait_for(&checkpoints, "event_statistics", total / 3).await;
    for t in tasks {
        t.abort(); // mid-batch: rows may be written without their checkpoint
    }
    let stopped_at = checkpoints.status("event_statistics").await.unwrap().position;
    assert!(stopped_at < total - 1, "killed before the end ({stopped_at} of {total})");
    // A new runner takes over once the dead one's leases expire, and replays from the checkpoints.
    let second = Runner::new(&app.mongo, ch.clone(), store.clone(), config);
    let tasks = second.spawn(builtin::all());
    for p in builtin::all() {
        wait_for(&checkpoints, p.name(), total - 1).await;
    }
    for t in tasks {
        t.abort();
    }
    let after_crash = models(&ch).await;
    let counted: u64 = after_crash.1.iter().map(|(_, n)| n).sum();
    assert_eq!(counted, total as u64, "no event counted twice");
    assert_eq!(after_crash.2.iter().filter(|e| e.active).count(), 75, "odd patients are still in");

    // A clean rebuild of every projection gives the same read models.
    let snapshots = SnapshotStore::new(&app.mongo);
    let rebuild = Rebuild { ch: &ch, store: &store, checkpoints: &checkpoints, snapshots: &snapshots };
    for p in builtin::all() {
        let report = rebuild.run(&*p, false, false, |_| {}).await.unwrap();
        assert!(report.swapped && report.position == total - 1, "{report:?}");
    }
    assert_eq!(models(&ch).await, after_crash);

    // Rebuild from a snapshot equals rebuild from zero: snapshot the encounters now, add
    // events, then rebuild both ways.
    let encounters = builtin::ActiveEncounters;
    let state = roster::projection::Snapshotting::serialize(&encounters, &ch, &Target::LIVE).await.unwrap();
    let position = checkpoints.status("active_encounters").await.unwrap().position as u64;
    snapshots.save(&Snapshot { name: "active_encounters".into(), position, timestamp: 0, state }).await.unwrap();
    seed(&store, 20).await; // the same patients again: more admissions, transfers, discharges
    let from_zero = rebuild.run(&encounters, false, false, |_| {}).await.unwrap();
    let zero = models(&ch).await.2;
    let from_snapshot = rebuild.run(&encounters, true, false, |_| {}).await.unwrap();
    assert_eq!(from_snapshot.snapshot, Some(position));
    assert!(from_snapshot.events < from_zero.events, "{} < {}", from_snapshot.events, from_zero.events);
    assert_eq!(models(&ch).await.2, zero);
    // A dry run builds and counts but keeps the live tables.
    let dry = rebuild.run(&encounters, false, true, |_| {}).await.unwrap();
    assert!(!dry.swapped && dry.rows == from_zero.rows);
}

/// Counts the events each instance handles.
struct Counting {
    handled: Arc<AtomicU64>,
}

impl Projection for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }
    fn handle<'a>(
        &'a self,
        _: &'a clickhouse::Client,
        _: &'a Target,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        self.handled.fetch_add(events.len() as u64, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn two_runners_for_one_projection_only_one_feeds_it_and_a_poison_event_stops_only_its_projection() {
    let app = spawn(false).await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let store = Arc::new(ClickHouseEventStore::new(&app.mongo, ch.clone()));
    let total = seed(&store, 20).await as i64;
    let counters = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut tasks = Vec::new();
    for c in &counters {
        let runner =
            Runner::new(&app.mongo, ch.clone(), store.clone(), RunnerConfig { batch: 50, ..RunnerConfig::default() });
        tasks.extend(runner.spawn(vec![Arc::new(Counting { handled: c.clone() }) as Arc<dyn Projection>]));
    }
    let checkpoints = Checkpoints::new(&app.mongo);
    wait_for(&checkpoints, "counting", total - 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut handled = [counters[0].load(Ordering::SeqCst), counters[1].load(Ordering::SeqCst)];
    handled.sort();
    assert_eq!(handled, [0, total as u64], "exactly one runner fed it, once per event");
    for t in tasks {
        t.abort();
    }

    // A poison event: an admission without an encounter id.
    let runner = Runner::new(&app.mongo, ch.clone(), store.clone(), RunnerConfig::default());
    let tasks = runner.spawn(builtin::all());
    let bad = store
        .append("patient:M0", ExpectedVersion::Any, vec![NewEvent::new("patient_admit", &json!({ "class": "IMP" }))])
        .await
        .unwrap();
    store.append("patient:M0", ExpectedVersion::Any, vec![NewEvent::new("note", &json!({}))]).await.unwrap();
    wait_for(&checkpoints, "patient_timeline", bad.position as i64 + 1).await;
    wait_for(&checkpoints, "event_statistics", bad.position as i64 + 1).await;
    let mut failed = checkpoints.status("active_encounters").await.unwrap();
    for _ in 0..100 {
        if failed.state.as_str() == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        failed = checkpoints.status("active_encounters").await.unwrap();
    }
    assert_eq!((failed.state.as_str(), failed.failed_position), ("failed", Some(bad.position as i64)));
    assert!(failed.error.unwrap().contains("without an encounterId"));
    assert!(failed.position < bad.position as i64, "the poison event is not skipped");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn a_projection_lease_is_renewed_by_its_runner_and_taken_over_from_a_dead_one() {
    let app = spawn(false).await;
    let checkpoints = Checkpoints::new(&app.mongo);
    let term = Duration::from_secs(30);
    assert!(checkpoints.take("p", "runner-a", term).await.unwrap().is_some(), "a free lease is taken");
    assert!(checkpoints.take("p", "runner-a", term).await.unwrap().is_some(), "and renewed by its runner");
    assert!(checkpoints.take("p", "runner-b", term).await.unwrap().is_none(), "another runner waits");

    // The holder dies (a process of this machine that is gone) with 30 s of lease left.
    let mut holder = roster::store::holder::this_process();
    if holder.is_empty() {
        return; // no /proc: a dead holder cannot be told from a live one here
    }
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let start = crate::crash::process_start_time(child.id());
    holder.insert("pid", child.id() as i64);
    holder.insert("start", start);
    child.kill().unwrap();
    child.wait().unwrap();
    let until = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 30_000);
    app.mongo
        .collection::<bson::Document>(roster::projection::runner::COLLECTION)
        .update_one(
            bson::doc! { "_id": "p" },
            bson::doc! { "$set": { "lease": { "by": "runner-a", "until": until, "holder": holder } } },
        )
        .await
        .unwrap();
    assert!(checkpoints.take("p", "runner-b", term).await.unwrap().is_some(), "taken over at once, not in 30 s");
    assert!(checkpoints.take("p", "runner-a", term).await.unwrap().is_none(), "the dead tenure cannot renew");
}
