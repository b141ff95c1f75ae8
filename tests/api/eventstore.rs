//! The general event store on the real services: over HTTP, and as two store instances
//! with their own connections (two processes, as far as the stores can tell).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use roster::eventstore::appender::Faults;
use roster::eventstore::log::ClickHouseEventStore;
use roster::eventstore::subscribe::subscribe;
use roster::eventstore::{EventStore, EventStoreError, ExpectedVersion, NewEvent};
use serde_json::{json, Value};

use crate::helpers::{json, spawn_app, TestApp};

async fn append(app: &TestApp, stream: &str, expected: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = app.client.post(format!("{}/events/{stream}", app.address)).body(body.to_string());
    if let Some(e) = expected {
        r = r.header("ES-Expected-Version", e);
    }
    r.send().await.unwrap()
}

async fn get(app: &TestApp, path: &str) -> Value {
    let r = app.client.get(format!("{}{path}", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    json(r).await
}

fn one(event_type: &str) -> Value {
    json!([{ "eventType": event_type, "data": { "n": 1 } }])
}

/// A second store on the app's databases, with its own MongoDB and ClickHouse connections.
async fn second_store(app: &TestApp, faults: Faults) -> Arc<ClickHouseEventStore> {
    let db = roster::startup::mongo_database(&app.settings).await.unwrap();
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    Arc::new(ClickHouseEventStore::with_faults(&db, ch, faults))
}

fn events(tag: &str, n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| NewEvent::new(tag, &json!({ "i": i }))).collect()
}

#[tokio::test]
async fn expected_versions_reads_and_bad_input_over_http() {
    let app = spawn_app().await;
    let status = |r: &reqwest::Response| r.status().as_u16();
    // no-stream: only for a new stream.
    let r = append(
        &app,
        "order-1",
        Some("no-stream"),
        &json!([
            { "eventType": "placed", "data": { "total": 10 }, "metadata": { "actor": "ann" } },
            { "eventType": "paid", "data": [1, 2] }
        ]),
    )
    .await;
    assert_eq!(status(&r), 201);
    assert_eq!(json(r).await, json!({ "nextExpectedVersion": 1, "firstPosition": 0, "position": 1 }));
    let r = append(&app, "order-1", Some("no-stream"), &one("x")).await;
    assert_eq!(status(&r), 409);
    let conflict = json(r).await;
    assert_eq!(
        (conflict["actualVersion"].clone(), conflict["expectedVersion"].clone()),
        (json!(1), json!("no-stream"))
    );
    // exists: only for an existing one.
    assert_eq!(status(&append(&app, "order-2", Some("exists"), &one("x")).await), 409);
    assert_eq!(status(&append(&app, "order-1", Some("exists"), &one("shipped")).await), 201);
    // exact versions.
    assert_eq!(status(&append(&app, "order-1", Some("1"), &one("x")).await), 409);
    let r = append(&app, "order-1", Some("2"), &one("delivered")).await;
    assert_eq!(json(r).await["nextExpectedVersion"], 3);
    // any (also the default).
    assert_eq!(status(&append(&app, "order-2", None, &one("placed")).await), 201);
    assert_eq!(status(&append(&app, "order-2", Some("any"), &one("paid")).await), 201);

    let stream = get(&app, "/events/order-1?from=1&max=2").await;
    let types: Vec<&str> =
        stream["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    assert_eq!(types, ["paid", "shipped"]);
    assert_eq!(stream["next"], 3);
    assert_eq!(stream["events"][0]["data"], json!([1, 2]));
    let first = get(&app, "/events/order-1?max=1").await;
    assert_eq!(first["events"][0]["metadata"], json!({ "actor": "ann" }));
    assert_eq!(get(&app, "/events/order-1/version").await["version"], 3);
    assert_eq!(get(&app, "/events/nobody/version").await["version"], -1);
    let all = get(&app, "/events?from=3&max=10").await;
    let positions: Vec<(u64, &str)> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["position"].as_u64().unwrap(), e["streamId"].as_str().unwrap()))
        .collect();
    assert_eq!(positions, [(3, "order-1"), (4, "order-2"), (5, "order-2")]);
    assert_eq!(all["next"], 6);

    // Bad input names the field.
    for (expected, body, field) in [
        (Some("-1"), one("x"), "ES-Expected-Version"),
        (Some("soon"), one("x"), "ES-Expected-Version"),
        (None, json!({ "eventType": "x" }), "body"),
        (None, json!([]), "events"),
        (None, json!([{ "data": 1 }]), "[0].eventType"),
        (None, json!([{ "eventType": "x" }]), "[0].data"),
        (None, json!([{ "eventType": "x", "data": 1, "eventId": "nope" }]), "[0].eventId"),
        (None, json!([{ "eventType": "x", "data": 1, "metadata": { "a": 1 } }]), "[0].metadata.a"),
        (None, json!([{ "eventType": "x", "data": 1, "colour": "red" }]), "[0].colour"),
    ] {
        let r = append(&app, "order-3", expected, &body).await;
        assert_eq!(status(&r), 400, "{body}");
        assert_eq!(json(r).await["field"], field, "{body}");
    }
    let r = app.client.get(format!("{}/events?max=0", app.address)).send().await.unwrap();
    assert_eq!((status(&r), json(r).await["field"].clone()), (400, json!("max")));
    assert_eq!(get(&app, "/events/order-3/version").await["version"], -1, "nothing of a refused append is written");
}

#[tokio::test]
async fn a_retried_append_is_not_written_twice() {
    let app = spawn_app().await;
    let body = json!([
        { "eventType": "a", "data": {}, "eventId": "6a2f41a3-c54c-4c36-8b7e-2f8f2a0d1b01" },
        { "eventType": "b", "data": {}, "eventId": "6a2f41a3-c54c-4c36-8b7e-2f8f2a0d1b02" }
    ]);
    let first = json(append(&app, "s", Some("no-stream"), &body).await).await;
    // The client did not see the answer and sends the same append again.
    let again = append(&app, "s", Some("no-stream"), &body).await;
    assert_eq!(again.status(), 201, "a retry is not a conflict");
    assert_eq!(json(again).await, first);
    assert_eq!(get(&app, "/events/s/version").await["version"], 1);
    assert_eq!(get(&app, "/events?max=100").await["events"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn two_stores_racing_on_one_stream_never_duplicate_or_skip_a_version() {
    let app = spawn_app().await;
    let stores = [second_store(&app, Faults::default()).await, second_store(&app, Faults::default()).await];
    let mut tasks = Vec::new();
    for (w, store) in stores.iter().enumerate().flat_map(|(s, st)| (0..4).map(move |w| (s * 4 + w, st.clone()))) {
        tasks.push(tokio::spawn(async move {
            let (mut won, mut lost) = (0, 0);
            for i in 0..8 {
                let v = store.stream_version("race").await.unwrap();
                let expected = if v < 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(v as u64) };
                match store.append("race", expected, events(&format!("w{w}-{i}"), 1)).await {
                    Ok(r) => {
                        assert_eq!(r.next_expected_version as i64, v + 1);
                        won += 1;
                    }
                    Err(EventStoreError::WrongExpectedVersion { .. }) => lost += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            (won, lost)
        }));
    }
    let (mut won, mut lost) = (0, 0);
    for t in tasks {
        let (w, l) = t.await.unwrap();
        won += w;
        lost += l;
    }
    assert!(lost > 0, "8 writers racing on one stream must see conflicts");
    let stream = stores[0].read_stream("race", 0, 1000).await.unwrap();
    let versions: Vec<u64> = stream.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, (0..won as u64).collect::<Vec<_>>(), "every win is one version, none twice or skipped");
    let all = stores[1].read_all(0, 1000).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, (0..won as u64).collect::<Vec<_>>(), "positions have no gap");
    assert_eq!(stores[1].stream_version("race").await.unwrap(), won as i64 - 1);
}

/// Marten #4953: an appender that holds a reserved position and stalls must not let a
/// subscriber run past it.
#[tokio::test]
async fn a_stalled_appender_delays_the_log_but_no_subscriber_skips_its_events() {
    let app = spawn_app().await;
    // As in the test below: the next holder's recovery and write must fit its fresh lease.
    let lease = Duration::from_secs(8);
    let fast = second_store(&app, Faults { lease, ..Faults::default() }).await;
    let seen = {
        let fast = fast.clone();
        tokio::spawn(async move {
            let sub = subscribe(fast, 0, 100);
            let got: Vec<_> = sub.take(3).map(|e| e.unwrap()).collect().await;
            got.into_iter().map(|e| (e.position, e.stream_id)).collect::<Vec<_>>()
        })
    };
    fast.append("before", ExpectedVersion::Any, events("x", 1)).await.unwrap();
    // The slow appender journals its events, then stalls with the lease still held, before
    // its flusher gets them: only the journal has them.
    let slow = second_store(&app, Faults { lease, after_write: Duration::from_secs(10), ..Faults::default() }).await;
    let slow_append = tokio::spawn(async move { slow.append("slow", ExpectedVersion::Any, events("s", 1)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Later appends wait for the lease to expire; the next holder flushes the stalled one's
    // journal first and goes after it.
    let later = fast.append("later", ExpectedVersion::Any, events("l", 1)).await.unwrap();
    assert_eq!(later.position, 2);
    let seen = tokio::time::timeout(Duration::from_secs(20), seen).await.unwrap().unwrap();
    assert_eq!(seen, [(0, "before".to_string()), (1, "slow".to_string()), (2, "later".to_string())]);
    // Its events were journaled, so the stalled appender's client is told they are stored.
    assert_eq!(slow_append.await.unwrap().unwrap().position, 1);
}

/// A follower serves its own process's appends from memory; once it has caught up on
/// them it must still see another process's, which only ClickHouse has.
#[tokio::test]
async fn a_follower_caught_up_on_its_own_appends_sees_another_process_append() {
    let app = spawn_app().await;
    let (mine, theirs) = (second_store(&app, Faults::default()).await, second_store(&app, Faults::default()).await);
    let mut sub = Box::pin(subscribe(mine.clone(), 0, 100));
    let mut next = async || {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("an event").unwrap().unwrap();
        (e.position, e.stream_id)
    };
    mine.append("mine", ExpectedVersion::Any, events("m", 2)).await.unwrap();
    assert_eq!(next().await, (0, "mine".to_string()));
    assert_eq!(next().await, (1, "mine".to_string()));
    theirs.append("theirs", ExpectedVersion::Any, events("t", 1)).await.unwrap();
    assert_eq!(next().await, (2, "theirs".to_string()));
    mine.append("mine", ExpectedVersion::Any, events("m", 1)).await.unwrap();
    assert_eq!(next().await, (3, "mine".to_string()));
}

/// The other half: an appender that dies (stalls past its lease) before its events are
/// stored is declared dead; its append never lands, the log moves on, and the client's
/// retry lands later.
#[tokio::test]
async fn an_appender_declared_dead_before_storing_never_lands_and_the_log_moves_on() {
    let app = spawn_app().await;
    // Long enough that the retry's fresh lease leaves time to prepare its write (a holder
    // starts no write within 2 s + the write timeout of the lease's end): a 6 s lease left
    // 1 s, which a head lookup could take when every test of the suite runs at once.
    let lease = Duration::from_secs(8);
    let fast = second_store(&app, Faults { lease, ..Faults::default() }).await;
    fast.append("before", ExpectedVersion::Any, events("x", 1)).await.unwrap();
    let slow = second_store(&app, Faults { lease, before_write: Duration::from_secs(10), ..Faults::default() }).await;
    let mut lost = events("s", 2);
    for (i, e) in lost.iter_mut().enumerate() {
        e.event_id = Some(uuid::Uuid::from_u128(0x5100 + i as u128));
    }
    let retry = lost.clone();
    let slow_append = {
        let slow = slow.clone();
        tokio::spawn(async move { slow.append("slow", ExpectedVersion::NoStream, lost).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = fast.append("later", ExpectedVersion::Any, events("l", 1)).await.unwrap();
    assert_eq!(later.position, 1, "the dead appender's positions are reused: nothing was stored at them");
    assert_eq!(fast.stream_version("slow").await.unwrap(), -1);
    let outcome = slow_append.await.unwrap();
    assert!(matches!(outcome, Err(EventStoreError::Unavailable(_))), "{outcome:?}");
    // The client retries; the stream never got the events, so no-stream still holds.
    let landed = slow.append("slow", ExpectedVersion::NoStream, retry).await.unwrap();
    assert_eq!((landed.first_position, landed.next_expected_version), (2, 1));
    let all: Vec<(u64, String)> =
        fast.read_all(0, 100).await.unwrap().into_iter().map(|e| (e.position, e.stream_id)).collect();
    let expect = [(0, "before"), (1, "later"), (2, "slow"), (3, "slow")];
    assert_eq!(all, expect.map(|(p, s)| (p, s.to_string())));
}

#[tokio::test]
async fn server_sent_events_catch_up_follow_and_resume() {
    let app = spawn_app().await;
    append(&app, "a", None, &json!([{ "eventType": "one", "data": 1 }, { "eventType": "two", "data": 2 }])).await;
    let open = |from: Option<&str>| {
        let mut r = app.client.get(format!("{}/events/subscribe?from=1", app.address));
        if let Some(id) = from {
            r = r.header("Last-Event-ID", id);
        }
        r.send()
    };
    let r = open(None).await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut next_event = async || -> Value {
        loop {
            if let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return serde_json::from_str(data).unwrap();
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    assert_eq!(next_event().await["eventType"], "two", "catch-up starts at from=1");
    append(&app, "b", None, &one("three")).await;
    let live = next_event().await;
    assert_eq!((live["position"].clone(), live["eventType"].clone()), (json!(2), json!("three")));
    // A reconnect with Last-Event-ID resumes after it, whatever `from` says.
    let mut again = open(Some("1")).await.unwrap().bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(10), again.next()).await.unwrap().unwrap().unwrap();
    let text = std::str::from_utf8(&chunk).unwrap();
    assert!(text.contains("id: 2") && text.contains("\"three\""), "{text}");
}

/// A server whose FHIR writes become events through `routes` (YAML text).
async fn spawn_routed(routes: &str) -> TestApp {
    let mut settings = crate::helpers::test_settings();
    let path = std::env::temp_dir().join(format!("routes-{}.yaml", settings.mongo.database));
    std::fs::write(&path, routes).unwrap();
    settings.events.routes = roster::config::EventRoutes::File(path);
    crate::helpers::spawn_with(settings, roster::pipeline::Hooks::default()).await
}

/// Event types of a stream, in order.
async fn stream_types(app: &TestApp, stream: &str) -> Vec<String> {
    let body = get(app, &format!("/events/{stream}?max=1000")).await;
    body["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap().to_string()).collect()
}

fn patient_with_mrn(id: &str, mrn: &str) -> Value {
    json!({ "resourceType": "Patient", "id": id, "identifier": [
        { "system": "urn:ssn", "value": "000-11" },
        { "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR" }] },
          "system": "urn:mrn", "value": mrn }
    ], "name": [{ "family": "Doe" }] })
}

fn encounter(id: &str, status: &str, location: &str) -> Value {
    json!({ "resourceType": "Encounter", "id": id, "status": status,
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP" },
            "subject": { "reference": "Patient/p1" },
            "period": { "start": "2024-01-15T08:00:00Z" },
            "location": [{ "location": { "reference": location } }] })
}

#[tokio::test]
async fn fhir_writes_become_routed_events() {
    let app = spawn_routed(&std::fs::read_to_string("config/event-routes.yaml").unwrap()).await;
    assert_eq!(app.put("Patient/p1", &patient_with_mrn("p1", "MRN-1")).await.status(), 201);
    assert_eq!(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/ward-1")).await.status(), 201);
    assert_eq!(app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/icu")).await.status(), 200);
    let mut finished = encounter("e1", "finished", "Location/icu");
    finished["period"]["end"] = json!("2024-01-20T10:00:00Z");
    assert_eq!(app.put("Encounter/e1", &finished).await.status(), 200);
    let lab = json!({ "resourceType": "Observation", "id": "o1", "status": "final",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory" }] }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": "2345-7" }] },
        "subject": { "reference": "Patient/p1" }, "valueQuantity": { "value": 5.4, "unit": "mmol/L" } });
    assert_eq!(app.put("Observation/o1", &lab).await.status(), 201);
    assert_eq!(app.delete("Observation/o1").await.status(), 204);

    assert_eq!(
        stream_types(&app, "patient:MRN-1").await,
        [
            "resource_created",
            "resource_created",
            "patient_admit",
            "resource_updated",
            "patient_transfer",
            "resource_updated",
            "patient_discharge",
            "resource_created",
            "lab_result",
            "resource_deleted",
        ]
    );
    assert_eq!(
        stream_types(&app, "encounter:e1").await,
        [
            "resource_created",
            "patient_admit",
            "resource_updated",
            "patient_transfer",
            "resource_updated",
            "patient_discharge"
        ]
    );
    let admit = get(&app, "/events/encounter:e1?from=1&max=1").await["events"][0].clone();
    assert_eq!(admit["data"]["location"], "Location/ward-1");
    assert_eq!(admit["data"]["admitTime"], "2024-01-15T08:00:00Z");
    assert_eq!(admit["metadata"]["causationId"], "Encounter/e1/_history/1");
    assert!(admit["metadata"]["correlationId"].as_str().is_some_and(|c| !c.is_empty()));
    // The caller named in X-Actor is the events' actor.
    let r = app
        .client
        .put(app.url("Patient/p3"))
        .header("content-type", "application/fhir+json")
        .header("x-actor", "Practitioner/dr-who")
        .body(patient_with_mrn("p3", "MRN-3").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created = get(&app, "/events/patient:MRN-3").await["events"][0].clone();
    assert_eq!(created["metadata"]["actor"], "Practitioner/dr-who");
    assert_eq!(created["data"]["resource"]["identifier"][1]["value"], "MRN-3");
    // A resource too big for an event (appends are capped) is recorded as a pointer.
    let mut big = patient_with_mrn("p4", "MRN-4");
    big["name"][0]["family"] = json!("x".repeat(600 * 1024));
    assert_eq!(app.put("Patient/p4", &big).await.status(), 201);
    let created = get(&app, "/events/patient:MRN-4").await["events"][0].clone();
    assert_eq!(
        (created["eventType"].as_str(), created["data"]["versionId"].as_str()),
        (Some("resource_created"), Some("1"))
    );
    assert!(created["data"]["omitted"].as_str().unwrap().contains("Patient/p4/_history/1"), "{}", created["data"]);
    // A write without meta.source has no `source:` stream; one with it does.
    let mut sourced = patient_with_mrn("p2", "MRN-2");
    sourced["meta"] = json!({ "source": "adt-feed" });
    app.put("Patient/p2", &sourced).await;
    assert_eq!(stream_types(&app, "source:adt-feed").await, ["resource_created"]);
    // The marks that make recording durable are cleared once the events are in (off the
    // request path, with the history flag: within moments).
    let mut marked = u64::MAX;
    for _ in 0..50 {
        marked = app
            .mongo
            .collection::<bson::Document>("Encounter_4_0_0")
            .count_documents(bson::doc! { "eventsPending": true })
            .await
            .unwrap();
        if marked == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(marked, 0);

    // Another routing file sends the same writes elsewhere.
    let other = spawn_routed(
        "routes:\n  - name: admissions\n    filter: { resource_types: [Encounter], event_types: [patient_admit] }\n    actions:\n      - type: event_store\n        config: { stream_template: 'admissions-{{Patient.MRN}}' }\n",
    )
    .await;
    other.put("Patient/p1", &patient_with_mrn("p1", "MRN-9")).await;
    other.put("Encounter/e1", &encounter("e1", "in-progress", "Location/ward-1")).await;
    assert_eq!(stream_types(&other, "admissions-MRN-9").await, ["patient_admit"]);
    assert_eq!(get(&other, "/events?max=100").await["events"].as_array().unwrap().len(), 1, "nothing else is routed");
}

#[tokio::test]
async fn events_of_a_write_whose_hook_never_ran_are_recorded_by_the_sweep_once() {
    // The write commits on a server without routes (its hook "crashed"); the mark it would
    // have carried is put in place by hand, as old as the sweep wants.
    let app = spawn_routed("routes: []\n").await;
    app.put("Patient/p1", &patient_with_mrn("p1", "MRN-1")).await;
    app.put("Encounter/e1", &encounter("e1", "in-progress", "Location/ward-1")).await;
    let old = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 120_000);
    let mark = bson::doc! { "$set": { "eventsPending": true, "eventsVersions": [1_i64], "lastUpdated": old } };
    app.mongo
        .collection::<bson::Document>("Encounter_4_0_0")
        .update_one(bson::doc! { "_id": "e1" }, mark.clone())
        .await
        .unwrap();
    let routes =
        roster::recording::routes::RoutingFile::parse(&std::fs::read_to_string("config/event-routes.yaml").unwrap())
            .unwrap();
    let store = roster::store::ResourceStore::new(app.mongo.clone());
    let events = second_store(&app, Faults::default()).await;
    let recorder = roster::recording::recorder::EventRecorder::new(routes, events, store);
    assert_eq!(recorder.sweep().await.unwrap(), 1);
    assert_eq!(stream_types(&app, "encounter:e1").await, ["resource_created", "patient_admit"]);
    assert_eq!(stream_types(&app, "patient:MRN-1").await, ["resource_created", "patient_admit"]);
    // The mark is gone; a mark left by a crash after the append replays to nothing new.
    assert_eq!(recorder.sweep().await.unwrap(), 0);
    app.mongo
        .collection::<bson::Document>("Encounter_4_0_0")
        .update_one(bson::doc! { "_id": "e1" }, mark)
        .await
        .unwrap();
    assert_eq!(recorder.sweep().await.unwrap(), 1);
    assert_eq!(stream_types(&app, "encounter:e1").await, ["resource_created", "patient_admit"], "no duplicate");
}

#[tokio::test]
async fn group_member_events_read_as_a_group_stream() {
    let app = spawn_app().await;
    let member = |r: &str| json!({ "entity": { "reference": r } });
    let group = json!({ "resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                        "member": [member("Patient/1"), member("Patient/2")] });
    assert_eq!(app.put("Group/g1", &group).await.status(), 201);
    let removed = app.patch("Group/g1", &json!([{ "op": "remove", "path": "/member/0" }])).await;
    assert_eq!(removed.status(), 200);
    let stream = get(&app, "/events/group:g1?max=10").await;
    let events = stream["events"].as_array().unwrap();
    let seen: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| {
            let reference = e["data"]["entity"]["reference"].as_str().unwrap();
            (e["streamVersion"].as_u64().unwrap(), e["eventType"].as_str().unwrap(), reference)
        })
        .collect();
    assert_eq!(
        seen,
        [(0, "member_added", "Patient/1"), (1, "member_added", "Patient/2"), (2, "member_removed", "Patient/1")]
    );
    assert_eq!(events[2]["metadata"]["groupVersion"], "2");
    assert_eq!(get(&app, "/events/group:g1/version").await["version"], 2);
    assert_eq!(get(&app, "/events/group:g1?from=2").await["events"].as_array().unwrap().len(), 1);
    // Read-only, and not written twice: the log itself is empty.
    let r = append(&app, "group:g1", None, &one("x")).await;
    assert_eq!((r.status().as_u16(), json(r).await["field"].clone()), (400, json!("streamId")));
    assert!(get(&app, "/events").await["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn retention_deletes_old_events_of_a_prefix_but_never_the_last_position() {
    let app = spawn_app().await;
    for (stream, n) in [("source:a", 2), ("keep:b", 1), ("source:a", 1)] {
        let body: Vec<Value> = (0..n).map(|_| json!({ "eventType": "e", "data": {} })).collect();
        assert_eq!(append(&app, stream, None, &Value::Array(body)).await.status(), 201);
    }
    // Retention works on what ClickHouse holds: a read waits until it holds the appends.
    assert_eq!(get(&app, "/events").await["events"].as_array().unwrap().len(), 4);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let rule = roster::eventstore::retention::Rule { prefix: "source:".into(), days: 0 };
    let done = roster::eventstore::retention::apply(&ch, std::slice::from_ref(&rule)).await.unwrap();
    assert_eq!(done, [(rule, 2)]);
    let left: Vec<(u64, String)> = get(&app, "/events").await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["position"].as_u64().unwrap(), e["streamId"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        left,
        [(2, "keep:b".to_string()), (3, "source:a".to_string())],
        "the newest event stays: positions continue after it"
    );
    let page = get(&app, "/events?from=0&max=1").await;
    assert_eq!(page["events"][0]["position"], 2, "a page starting in a deleted run skips it: {page}");
    assert_eq!(json(append(&app, "keep:b", None, &one("e")).await).await["position"], 4);
}

/// An append may be larger than axum's default body limit (2 MB) up to its own cap; a body
/// beyond what an append can carry is a 413 in the event API's JSON, naming the body.
#[tokio::test]
async fn append_bodies_are_limited_by_the_append_caps_not_by_axum() {
    let app = spawn_app().await;
    let blob = "x".repeat(300_000);
    let scans = |n: usize| {
        Value::Array((0..n).map(|i| json!({ "eventType": "scan", "data": { "i": i, "blob": blob } })).collect())
    };
    let r = append(&app, "big-body", Some("no-stream"), &scans(10)).await;
    assert_eq!(r.status(), 201, "a 3 MB append is within the 4 MiB data cap");
    let r = append(&app, "big-body", None, &scans(30)).await;
    assert_eq!(r.status(), 413);
    let body = json(r).await;
    assert_eq!(body["field"], "body", "{body}");
    assert!(body["error"].as_str().unwrap().contains("at most 4 MiB of event data"), "{body}");
    let r = append(&app, "big-body", None, &scans(2)).await;
    assert_eq!(r.status(), 201, "the refused append left the stream as it was");
    assert_eq!(json(r).await["nextExpectedVersion"], 11);
}

/// Large `read_all` pages are read as two halves at once; whatever the split, and across a
/// retention hole, a page is the run of stored positions from the one asked, never longer
/// than asked.
#[tokio::test]
async fn large_read_all_pages_are_one_contiguous_run() {
    let app = spawn_app().await;
    let store = second_store(&app, Faults::default()).await;
    for (stream, n) in [("big-a", 10_000), ("big-b", 10_000), ("big-c", 5_000)] {
        store.append(stream, ExpectedVersion::NoStream, events("e", n)).await.unwrap();
    }
    let positions = |page: Vec<roster::eventstore::StoredEvent>| page.iter().map(|e| e.position).collect::<Vec<_>>();
    for (from, max, expect) in
        [(0, 30_000, 25_000), (3, 20_000, 20_000), (10_000, 20_000, 15_000), (20_000, 20_000, 5_000)]
    {
        let page = store.read_all(from, max).await.unwrap();
        assert_eq!(positions(page), (from..from + expect as u64).collect::<Vec<_>>(), "read_all({from}, {max})");
    }
    assert!(store.read_all(25_000, 20_000).await.unwrap().is_empty());
    // Retention leaves a hole (positions 0-9,999): pages skip it and stay in order.
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let rule = roster::eventstore::retention::Rule { prefix: "big-a".into(), days: 0 };
    roster::eventstore::retention::apply(&ch, std::slice::from_ref(&rule)).await.unwrap();
    assert_eq!(positions(store.read_all(0, 20_000).await.unwrap()), (10_000..20_000).collect::<Vec<_>>());
    assert_eq!(positions(store.read_all(20_000, 20_000).await.unwrap()), (20_000..25_000).collect::<Vec<_>>());
}

/// An append is acknowledged once journaled, before ClickHouse has it; a read that starts
/// after the acknowledgement, in any process, waits for it rather than miss it.
#[tokio::test]
async fn a_read_after_an_acknowledged_append_sees_it_from_any_process() {
    let app = spawn_app().await;
    let stall = Duration::from_millis(1500);
    let writer = second_store(&app, Faults { before_flush: stall, ..Faults::default() }).await;
    let reader = second_store(&app, Faults::default()).await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let started = std::time::Instant::now();
    let r = writer.append("ryw", ExpectedVersion::NoStream, events("e", 3)).await.unwrap();
    assert_eq!((r.first_position, r.position), (0, 2));
    let in_clickhouse: u64 = ch.query("SELECT count() FROM EventStore_Events").fetch_one().await.unwrap();
    assert_eq!(in_clickhouse, 0, "acknowledged from the journal, before the flush");
    let got = reader.read_stream("ryw", 0, 10).await.unwrap();
    assert_eq!(got.iter().map(|e| e.stream_version).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(started.elapsed() >= stall, "the read waited for the flush");
    assert_eq!(reader.stream_version("ryw").await.unwrap(), 2);
    assert_eq!(reader.read_all(0, 10).await.unwrap().len(), 3);
    assert_eq!(reader.last_position().await.unwrap(), 2);
}

/// Journal entries are deleted once ClickHouse holds their events, a few at a time beside
/// the appends, whether the store stays busy or goes idle.
#[tokio::test]
async fn flushed_journal_entries_are_deleted() {
    let app = spawn_app().await;
    let store = second_store(&app, Faults::default()).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    store.append(&format!("busy-{w}"), ExpectedVersion::Any, events("b", 1)).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(store.read_all(0, 1000).await.unwrap().len(), 100);
    let db = roster::startup::mongo_database(&app.settings).await.unwrap();
    let journal = db.collection::<bson::Document>("EventStore_Journal");
    let mut left = u64::MAX;
    for _ in 0..100 {
        left = journal.count_documents(bson::doc! {}).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "every flushed entry was deleted");
}

/// A holder that died mid-flush: the next holder re-inserts the block it had in flight,
/// with the same deduplication token, then the rest of its journal; when the dead
/// holder's insert lands late after all, ClickHouse keeps one copy.
#[tokio::test]
async fn a_new_holder_finishes_a_dead_holders_flush_without_duplicates() {
    use roster::eventstore::journal::{Entry, Journal};
    use roster::eventstore::log::EventRow;
    let app = spawn_app().await;
    let store = second_store(&app, Faults::default()).await;
    store.append("before", ExpectedVersion::Any, events("x", 1)).await.unwrap();
    let db = roster::startup::mongo_database(&app.settings).await.unwrap();
    let journal = Journal::new(&db, roster::migrate::clickhouse_client(&app.settings.clickhouse));
    let entry = |first: u64, n: u64| Entry {
        first,
        rows: Arc::new(
            (first..first + n)
                .map(|p| EventRow {
                    position: p,
                    stream_id: "ghost".into(),
                    stream_version: p - 1,
                    event_id: uuid::Uuid::from_u128(0x6000 + p as u128),
                    event_type: "haunt".into(),
                    data: "{}".into(),
                    metadata: Vec::new(),
                    timestamp: 1_700_000_000_000,
                })
                .collect(),
        ),
    };
    // The store lets the lease go once idle.
    let log = db.collection::<bson::Document>("EventStore_Log");
    for _ in 0..100 {
        match log.find_one(bson::doc! { "_id": "log", "lease": { "$exists": true } }).await.unwrap() {
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => break,
        }
    }
    // The dead holder journaled positions 1 and 2-3, had 1 in flight, and let its lease lapse.
    assert!(journal.write(&entry(1, 1), "ghost").await.is_ok());
    assert!(journal.write(&entry(2, 2), "ghost").await.is_ok());
    let past = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1000);
    log.update_one(
            bson::doc! { "_id": "log" },
            bson::doc! { "$set": { "lease": { "by": "ghost", "until": past }, "flushing": { "from": 1_i64, "to": 1_i64 } } },
        )
        .await
        .unwrap();
    let after = store.append("after", ExpectedVersion::Any, events("y", 1)).await.unwrap();
    assert_eq!(after.position, 4, "the journal's positions are taken");
    // The dead holder's insert lands now.
    journal.insert(1, 1, &[entry(1, 1)]).await.unwrap();
    let all: Vec<(u64, String)> =
        store.read_all(0, 100).await.unwrap().into_iter().map(|e| (e.position, e.stream_id)).collect();
    let expect = [(0, "before"), (1, "ghost"), (2, "ghost"), (3, "ghost"), (4, "after")];
    assert_eq!(all, expect.map(|(p, s)| (p, s.to_string())));
    assert_eq!(store.stream_version("ghost").await.unwrap(), 2);
    assert_eq!(journal.pending_end().await.unwrap(), None, "flushed entries leave the journal");
}
