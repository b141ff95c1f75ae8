//! Event-sourced Group membership over HTTP.

use serde_json::{json, Value};

use crate::helpers::*;

fn member(reference: &str) -> Value {
    json!({ "entity": { "reference": reference } })
}

fn group(id: &str, members: &[&str]) -> Value {
    let mut g =
        json!({ "resourceType": "Group", "id": id, "type": "person", "actual": true, "name": format!("Cohort {id}") });
    if !members.is_empty() {
        g["member"] = Value::Array(members.iter().map(|m| member(m)).collect());
    }
    g
}

async fn members_of(app: &TestApp, path: &str) -> Vec<String> {
    let body = json(app.get(path).await).await;
    body["member"]
        .as_array()
        .map(|m| m.iter().map(|x| x["entity"]["reference"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

async fn patch_ok(app: &TestApp, path: &str, ops: Value) -> reqwest::Response {
    let r = app.patch(path, &ops).await;
    assert_eq!(r.status(), 200, "{ops}");
    r
}

#[tokio::test]
async fn member_patch_operations_in_order() {
    let app = spawn_app().await;
    assert_eq!(app.put("Group/g1", &group("g1", &["Patient/a", "Patient/b"])).await.status(), 201);
    assert_eq!(members_of(&app, "Group/g1").await, ["Patient/a", "Patient/b"]);

    // Add two, one of them already active (a no-op: no duplicate).
    patch_ok(
        &app,
        "Group/g1",
        json!([
            { "op": "add", "path": "/member/-", "value": member("Patient/c") },
            { "op": "add", "path": "/member/-", "value": member("Patient/a") }
        ]),
    )
    .await;
    assert_eq!(members_of(&app, "Group/g1").await, ["Patient/a", "Patient/b", "Patient/c"]);
    let body = json(app.get("Group/g1").await).await;
    assert_eq!(body["quantity"], 3);

    // remove by index, resolved against the list as earlier ops left it.
    patch_ok(
        &app,
        "Group/g1",
        json!([
            { "op": "remove", "path": "/member/0" },
            { "op": "remove", "path": "/member/0" }
        ]),
    )
    .await;
    assert_eq!(members_of(&app, "Group/g1").await, ["Patient/c"]);

    // The peer's extension: remove by entity reference.
    patch_ok(
        &app,
        "Group/g1",
        json!([
            { "op": "add", "path": "/member/-", "value": member("Patient/d") },
            { "op": "remove", "path": "/member", "value": { "entity": { "reference": "Patient/c" } } }
        ]),
    )
    .await;
    assert_eq!(members_of(&app, "Group/g1").await, ["Patient/d"]);

    // add + remove of one member in one PATCH resolve in op order.
    patch_ok(
        &app,
        "Group/g1",
        json!([
            { "op": "add", "path": "/member/-", "value": member("Patient/e") },
            { "op": "remove", "path": "/member", "value": { "entity": { "reference": "Patient/e" } } },
            { "op": "remove", "path": "/member", "value": { "entity": { "reference": "Patient/d" } } },
            { "op": "add", "path": "/member/-", "value": member("Patient/d") }
        ]),
    )
    .await;
    assert_eq!(members_of(&app, "Group/g1").await, ["Patient/d"]);

    // Update a member's period and inactive flag; test ops check current state.
    patch_ok(
        &app,
        "Group/g1",
        json!([
            { "op": "test", "path": "/member/0/entity/reference", "value": "Patient/d" },
            { "op": "add", "path": "/member/0/period", "value": { "start": "2024-01-01" } },
            { "op": "add", "path": "/member/0/inactive", "value": true }
        ]),
    )
    .await;
    let body = json(app.get("Group/g1").await).await;
    assert_eq!(body["member"][0]["period"]["start"], "2024-01-01");
    assert_eq!(body["member"][0]["inactive"], true);
    assert_eq!(body["quantity"], 1);
    assert_eq!(body["meta"]["versionId"], "6");
}

#[tokio::test]
async fn failing_member_patches_write_nothing() {
    let app = spawn_app().await;
    app.put("Group/g2", &group("g2", &["Patient/a"])).await;
    let cases = [
        (
            json!([{ "op": "add", "path": "/member/-", "value": member("Patient/x") },
                { "op": "test", "path": "/member/0/entity/reference", "value": "Patient/zzz" }]),
            "test failed",
        ),
        (json!([{ "op": "remove", "path": "/member/5" }]), "out of bounds"),
        (
            json!([{ "op": "add", "path": "/member/-", "value": { "entity": { "display": "no reference" } } }]),
            "entity.reference",
        ),
        (
            json!([{ "op": "add", "path": "/member/-", "value": { "entity": { "reference": "Patient/y" }, "colour": "red" } }]),
            "colour",
        ),
        (
            json!([{ "op": "replace", "path": "/member/0/entity/reference", "value": "Patient/q" }]),
            "entity cannot change",
        ),
        (
            json!([{ "op": "add", "path": "/member/-", "value": { "entity": { "reference": "Patient/y" }, "period": { "start": "soon" } } }]),
            "soon",
        ),
        (json!([{ "op": "move", "from": "/member/0", "path": "/member/1" }]), "not supported"),
    ];
    for (ops, mentions) in cases {
        let issue = assert_outcome(app.patch("Group/g2", &ops).await, 422).await;
        let d = issue["diagnostics"].as_str().unwrap();
        assert!(d.contains(mentions), "'{d}' should mention '{mentions}'");
    }
    let r = app.get("Group/g2").await;
    assert_eq!(etag(&r), "W/\"1\"");
    let body = json(r).await;
    assert_eq!(body["member"], json!([member("Patient/a")]));
}

#[tokio::test]
async fn a_member_only_patch_changes_only_meta_in_mongo_and_sets_the_context_flag() {
    let (hooks, recorder) = recording_hooks();
    let app = spawn_with(test_settings(), hooks).await;
    assert_eq!(app.post("Group", &group("ignored", &["Patient/a"])).await.status(), 201);
    let id = recorder.seen.lock().unwrap()[0].id.clone();
    let path = format!("Group/{id}");
    let doc_before = app
        .mongo
        .collection::<bson::Document>("Group_4_0_0")
        .find_one(bson::doc! { "_id": &id })
        .await
        .unwrap()
        .unwrap();
    assert!(
        roster::group::outbox::pending_in(&doc_before).unwrap().is_empty(),
        "the sync hook flushed the POST's member batch"
    );
    patch_ok(&app, &path, json!([{ "op": "add", "path": "/member/-", "value": member("Patient/b") }])).await;
    app.put(&path, &group(&id, &["Patient/c"])).await;

    let doc = app
        .mongo
        .collection::<bson::Document>("Group_4_0_0")
        .find_one(bson::doc! { "_id": &id })
        .await
        .unwrap()
        .unwrap();
    let resource = doc.get_document("resource").unwrap();
    assert!(!resource.contains_key("member"), "members never live in MongoDB");
    let v2 = app
        .mongo
        .collection::<bson::Document>("Group_4_0_0_History")
        .find_one(bson::doc! { "_id": format!("{id}/2") })
        .await
        .unwrap()
        .unwrap();
    let mut before = doc_before.get_document("resource").unwrap().clone();
    let mut after = v2.get_document("resource").unwrap().clone();
    for d in [&mut before, &mut after] {
        d.remove("meta");
    }
    assert_eq!(before, after, "a member-only PATCH changes nothing but meta");
    assert_eq!(v2.get_document("resource").unwrap().get_document("meta").unwrap().get_str("versionId").unwrap(), "2");

    let seen = recorder.seen.lock().unwrap().clone();
    let flags: Vec<bool> = seen.iter().map(|s| s.member_events_written).collect();
    assert_eq!(flags, [false, true, false], "flag set for the PATCH only (POST, PATCH, PUT)");
    assert_eq!(members_of(&app, &path).await, ["Patient/c"], "PUT replaced the membership");
}

#[tokio::test]
async fn concurrent_single_member_patches_all_land() {
    let app = spawn_app().await;
    app.put("Group/busy", &group("busy", &[])).await;
    let patches = (0..50)
        .map(|i| json!([{ "op": "add", "path": "/member/-", "value": member(&format!("Patient/p{i}")) }]))
        .collect();
    assert_eq!(app.concurrent_patches("Group/busy", patches).await, vec![200; 50]);
    let body = json(app.get("Group/busy").await).await;
    assert_eq!(body["quantity"], 50);
    assert_eq!(body["member"].as_array().unwrap().len(), 50);
    assert_eq!(body["meta"]["versionId"], "51");
}

#[tokio::test]
async fn vread_returns_the_members_of_that_version() {
    let app = spawn_app().await;
    app.put("Group/h", &group("h", &["Patient/a", "Patient/b"])).await;
    patch_ok(&app, "Group/h", json!([{ "op": "remove", "path": "/member/0" }])).await;
    patch_ok(&app, "Group/h", json!([{ "op": "add", "path": "/member/-", "value": member("Patient/c") }])).await;
    assert_eq!(members_of(&app, "Group/h/_history/1").await, ["Patient/a", "Patient/b"]);
    assert_eq!(members_of(&app, "Group/h/_history/2").await, ["Patient/b"]);
    assert_eq!(members_of(&app, "Group/h/_history/3").await, ["Patient/b", "Patient/c"]);
    assert_eq!(json(app.get("Group/h/_history/2").await).await["quantity"], 1);
    // _summary leaves the members out and says so.
    let summary = json(app.get("Group/h?_summary=true").await).await;
    assert!(summary.get("member").is_none());
    assert_eq!(summary["quantity"], 2);
    assert_eq!(summary["meta"]["tag"][0]["code"], "SUBSETTED");
}

#[tokio::test]
async fn search_by_member_uses_current_membership() {
    let app = spawn_app().await;
    app.put("Group/s1", &group("s1", &["Patient/1", "Patient/2"])).await;
    app.put("Group/s2", &group("s2", &["Patient/2"])).await;
    let ids = |b: Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .map(|e| e.iter().map(|x| x["resource"]["id"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let both = json(app.get("Group?member=Patient/2").await).await;
    assert_eq!((ids(both.clone()), both["total"].as_u64()), (vec!["s1".to_string(), "s2".into()], Some(2)));
    // A page smaller than the match set still reports the full total and links onwards.
    let first = json(app.get("Group?member=Patient/2&_count=1").await).await;
    assert_eq!((ids(first.clone()), first["total"].as_u64()), (vec!["s1".to_string()], Some(2)));
    let next = first["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").expect("a next link");
    let rest = next["url"].as_str().unwrap().split_once("/4_0_0/").unwrap().1.to_string();
    let second = json(app.get(&rest).await).await;
    assert_eq!((ids(second.clone()), second["total"].as_u64()), (vec!["s2".to_string()], Some(2)));
    // Other parameters narrow the page and the total together.
    let named = json(app.get("Group?member=Patient/2&_id=s2").await).await;
    assert_eq!((ids(named.clone()), named["total"].as_u64()), (vec!["s2".to_string()], Some(1)));
    assert_eq!(ids(json(app.get("Group?member=Patient/1").await).await), ["s1"]);
    patch_ok(&app, "Group/s1", json!([{ "op": "remove", "path": "/member", "value": member("Patient/2") }])).await;
    assert_eq!(ids(json(app.get("Group?member=Patient/2").await).await), ["s2"]);
    let b = json(app.get("Group?member=Patient/2&name=cohort%20s").await).await;
    assert_eq!(b["entry"][0]["resource"]["quantity"], 1);
    assert!(b["entry"][0]["resource"].get("member").is_none(), "search results never inline members");
    assert_eq!(ids(json(app.get("Group?type=person&actual=true&_count=1").await).await).len(), 1);
    // DELETE hides the group from search but keeps its events.
    assert_eq!(app.delete("Group/s2").await.status(), 204);
    assert!(ids(json(app.get("Group?member=Patient/2").await).await).is_empty());
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let events: u64 =
        ch.query("SELECT count() FROM Group_4_0_0_MemberEvents WHERE group_id = 's2'").fetch_one().await.unwrap();
    assert_eq!(events, 1, "the audit trail stays");
    // Brought back by PUT: the membership is exactly the new body's.
    let back = app.put("Group/s2", &group("s2", &["Patient/9"])).await;
    let status = back.status();
    assert_eq!(status, 201, "{}", back.text().await.unwrap());
    assert_eq!(members_of(&app, "Group/s2").await, ["Patient/9"]);
    assert!(ids(json(app.get("Group?member=Patient/2").await).await).is_empty());
    assert_eq!(ids(json(app.get("Group?member=Patient/9").await).await), ["s2"]);
}

#[tokio::test]
async fn put_rules_and_limits() {
    let mut settings = test_settings();
    settings.fhir.max_patch_ops = Some(3);
    let app = spawn_with(settings, Default::default()).await;
    app.put("Group/p", &group("p", &["Patient/a", "Patient/b"])).await;
    // PUT is a full replacement: a body without `member` empties the group.
    let r = app.put("Group/p", &group("p", &[])).await;
    assert_eq!(r.status(), 200);
    assert!(json(app.get("Group/p").await).await.get("member").is_none());
    assert_eq!(json(app.get("Group/p").await).await["quantity"], 0);
    // One entity twice is refused.
    let issue = assert_outcome(app.put("Group/p", &group("p", &["Patient/a", "Patient/a"])).await, 400).await;
    assert_eq!(issue["expression"][0], "Group.member[1]");
    // The operation cap.
    let ops: Vec<Value> =
        (0..4).map(|i| json!({ "op": "add", "path": "/member/-", "value": member(&format!("Patient/{i}")) })).collect();
    let issue = assert_outcome(app.patch("Group/p", &Value::Array(ops)).await, 413).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("at most 3"));
    // If-Match on a member PATCH.
    let add_z = json!([{ "op": "add", "path": "/member/-", "value": member("Patient/z") }]);
    assert_outcome(app.patch_if_match("Group/p", &add_z, "W/\"1\"").await, 412).await;
    // A descriptive group (no member list) keeps the quantity its author gave.
    let mut herd = group("herd", &[]);
    herd["quantity"] = json!(25);
    app.put("Group/herd", &herd).await;
    assert_eq!(json(app.get("Group/herd").await).await["quantity"], 25);
}

#[tokio::test]
async fn every_member_only_version_reaches_history_with_its_own_meta_and_count() {
    // Member-only versions wait in the Group document's version log and are copied to
    // history in batches; 70 PATCHes overflow the log (64) once on the write path.
    let app = spawn_app().await;
    app.put("Group/vl", &group("vl", &["Patient/0"])).await;
    for i in 1..=70 {
        patch_ok(
            &app,
            "Group/vl",
            json!([{ "op": "add", "path": "/member/-", "value": member(&format!("Patient/{i}")) }]),
        )
        .await;
    }
    let bundle = json(app.get("Group/vl/_history?_count=100").await).await;
    assert_eq!(bundle["total"], 71, "every version is in history");
    let versions: Vec<String> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=71).rev().map(|v| v.to_string()).collect();
    assert_eq!(versions, expected, "newest first, each with its own versionId");
    let stamps: Vec<&str> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["meta"]["lastUpdated"].as_str().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] > w[1]), "each version keeps its own lastUpdated");
    let v10 = json(app.get("Group/vl/_history/10").await).await;
    assert_eq!(v10["meta"]["versionId"], "10");
    assert_eq!(v10["quantity"], 10);
    assert_eq!(v10["member"].as_array().unwrap().len(), 10);
}

#[tokio::test]
async fn logged_versions_copied_early_reach_history_and_leave_the_log_of_that_process_only() {
    use roster::store::version_log::{self, LogEntry};
    use roster::store::ResourceStore;
    let app = spawn_app().await;
    app.put("Group/early", &group("early", &[])).await;
    // The document a run of member-only PATCHes leaves: versions 2..=11 logged, 12 current.
    let groups = app.mongo.collection::<bson::Document>("Group_4_0_0");
    let mut doc = groups.find_one(bson::doc! { "_id": "early" }).await.unwrap().unwrap();
    let t0 = doc.get_datetime("lastUpdated").unwrap().timestamp_millis();
    let log: Vec<LogEntry> = (2..=11)
        .map(|v| LogEntry {
            version: v,
            last_updated: bson::DateTime::from_millis(t0 + v),
            method: "PATCH".into(),
            member_count: roster::store::MemberCount::Active(v as u64),
        })
        .collect();
    doc.insert("versionId", 12i64);
    doc.insert("historyPending", true);
    doc.insert("versionLog", version_log::encode(&log));
    groups.replace_one(bson::doc! { "_id": "early" }, &doc).await.unwrap();

    let here = ResourceStore::new(app.mongo.clone());
    here.copy_log_early("Group", &doc).await.unwrap();
    let history = app.mongo.collection::<bson::Document>("Group_4_0_0_History");
    for v in 2..=11i64 {
        let entry = history.find_one(bson::doc! { "_id": format!("early/{v}") }).await.unwrap();
        let entry = entry.unwrap_or_else(|| panic!("version {v} is in history"));
        assert_eq!(entry.get_i64("versionId").unwrap(), v);
        assert_eq!(entry.get_i64("memberCount").unwrap(), v);
        assert_eq!(
            entry.get_document("resource").unwrap().get_document("meta").unwrap().get_str("versionId").unwrap(),
            v.to_string()
        );
    }
    // This process leaves the copied versions out of the log it writes next; another
    // process, which did not copy them, still carries them (and copies them again, harmlessly).
    let (mine, _) = here
        .read_for_write("Group", "early", roster::store::Base::Stored, roster::store::Writes::MetaOnly)
        .await
        .unwrap();
    assert!(mine.unwrap().version_log.is_empty(), "copied versions leave this process's log");
    let (theirs, _) = ResourceStore::new(app.mongo.clone())
        .read_for_write("Group", "early", roster::store::Base::Stored, roster::store::Writes::MetaOnly)
        .await
        .unwrap();
    assert_eq!(theirs.unwrap().version_log, log);
    // Below the threshold nothing is copied.
    let short = bson::doc! { "_id": "early", "versionId": 14i64, "lastUpdated": bson::DateTime::from_millis(t0 + 14),
    "deleted": false, "method": "PATCH", "resource": doc.get_document("resource").unwrap().clone(),
    "versionLog": version_log::encode(&[LogEntry { version: 13, last_updated: bson::DateTime::from_millis(t0 + 13),
        method: "PATCH".into(), member_count: roster::store::MemberCount::Unrecorded }]) };
    here.copy_log_early("Group", &short).await.unwrap();
    assert!(history.find_one(bson::doc! { "_id": "early/13" }).await.unwrap().is_none());
}

#[tokio::test]
async fn a_member_array_over_one_chunk_is_staged_in_chunks_and_read_back_whole() {
    // 25,000 members: more rows than one outbox chunk holds (10,000), so the batch is
    // staged as chunk documents beside the Group, inserted chunk by chunk, then deleted.
    let app = spawn_app().await;
    let references: Vec<String> = (0..25_000).map(|i| format!("Patient/c{i}")).collect();
    let refs: Vec<&str> = references.iter().map(String::as_str).collect();
    assert_eq!(app.put("Group/big", &group("big", &refs)).await.status(), 201);
    let read = members_of(&app, "Group/big").await;
    assert_eq!(read.len(), 25_000);
    assert_eq!(read.first().map(String::as_str), Some("Patient/c0"));
    assert_eq!(read.last().map(String::as_str), Some("Patient/c24999"));
    let chunks = app.mongo.collection::<bson::Document>("Group_4_0_0_MemberOutbox");
    assert_eq!(chunks.count_documents(bson::doc! {}).await.unwrap(), 0, "chunks are deleted once inserted");
    // A positional remove over the big group, then the count follows.
    patch_ok(&app, "Group/big", json!([{ "op": "remove", "path": "/member/0" }])).await;
    let body = json(app.get("Group/big?_summary=true").await).await;
    assert_eq!(body["quantity"], 24_999);
}

/// PATCHes of many groups within one gathering reach ClickHouse as one insert (one part),
/// not one per group; each group's events are all there once.
#[tokio::test]
async fn patches_of_sixteen_groups_in_one_gathering_become_one_insert() {
    let app = spawn_app().await;
    for g in 0..16 {
        let r = app.put(&format!("Group/many{g}"), &group(&format!("many{g}"), &["Patient/a"])).await;
        assert_eq!(r.status(), 201);
    }
    // The PUTs' own events are in (a PUT finishes its members before answering).
    let patches = (0..16).map(|g| {
        let app = &app;
        async move {
            let ops = json!([{ "op": "add", "path": "/member/-", "value": member(&format!("Patient/b{g}")) }]);
            app.patch(&format!("Group/many{g}"), &ops).await.status().as_u16()
        }
    });
    let statuses = futures_util::future::join_all(patches).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let ids: Vec<String> = (0..16).map(|g| format!("many{g}")).collect();
    let mut rows = 0u64;
    for _ in 0..100 {
        rows = ch
            .query("SELECT count() FROM Group_4_0_0_MemberEvents WHERE group_id IN ? AND group_version = 2")
            .bind(&ids)
            .fetch_one()
            .await
            .unwrap();
        if rows == 16 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(rows, 16, "every group's event reached ClickHouse, once");
    // Parts only merge, never split: more than a few parts means one insert per group.
    let parts: u64 = ch
        .query("SELECT uniqExact(_part) FROM Group_4_0_0_MemberEvents WHERE group_id IN ? AND group_version = 2")
        .bind(&ids)
        .fetch_one()
        .await
        .unwrap();
    assert!(parts <= 4, "16 groups' PATCHes landed in {parts} inserts");
    for g in 0..16 {
        let path = format!("Group/many{g}");
        assert_eq!(members_of(&app, &path).await, ["Patient/a".to_string(), format!("Patient/b{g}")]);
    }
}

/// `Patient?_has:Group:member:_id=` lists a Group's members (as of every acknowledged
/// member change), combined with other parameters and paged; the Patient compartment's
/// Groups and `Group?member=` come from the same member events.
#[tokio::test]
async fn patients_of_a_group_by_has() {
    let app = spawn_app().await;
    for (id, gender) in [("1", "female"), ("2", "male"), ("3", "female"), ("4", "female")] {
        let mut p = patient(id);
        p["id"] = json!(id);
        p["gender"] = json!(gender);
        assert!(app.put(&format!("Patient/{id}"), &p).await.status().is_success());
    }
    app.put("Group/h1", &group("h1", &["Patient/1", "Patient/2", "Patient/3"])).await;
    app.put("Group/h2", &group("h2", &["Patient/4"])).await;
    let ids = |b: Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .map(|e| e.iter().map(|x| x["resource"]["id"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let b = json(app.get("Patient?_has:Group:member:_id=h1").await).await;
    assert_eq!((ids(b.clone()), b["total"].as_u64()), (vec!["1".to_string(), "2".into(), "3".into()], Some(3)));
    assert_eq!(ids(json(app.get("Patient?_has:Group:member:_id=h1&gender=female").await).await), ["1", "3"]);
    assert_eq!(ids(json(app.get("Patient?_has:Group:member:_id=h1,h2&gender=female").await).await), ["1", "3", "4"]);
    // A member change is seen at once.
    patch_ok(&app, "Group/h1", json!([{ "op": "add", "path": "/member/-", "value": member("Patient/4") }])).await;
    patch_ok(&app, "Group/h1", json!([{ "op": "remove", "path": "/member", "value": member("Patient/1") }])).await;
    assert_eq!(ids(json(app.get("Patient?_has:Group:member:_id=h1").await).await), ["2", "3", "4"]);
    // Paged one at a time.
    let mut url = app.url("Patient?_has:Group:member:_id=h1&_count=1");
    let mut seen = Vec::new();
    loop {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        seen.extend(ids(b.clone()));
        match b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["2", "3", "4"]);
    assert_eq!(ids(json(app.get("Patient/4/Group").await).await), ["h1", "h2"]);
    assert_eq!(ids(json(app.get("Group?member=4").await).await), ["h1", "h2"]);
    assert_eq!(ids(json(app.get("Patient?_has:Group:member:actual=true&gender=male").await).await), ["2"]);
}
