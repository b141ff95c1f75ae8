use crate::helpers::*;

#[tokio::test]
async fn health_ready_and_metadata() {
    let app = spawn_app().await;
    let r = app.client.get(format!("{}/health", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(format!("{}/ready", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["mongo"], "up");
    assert_eq!(body["clickhouse"], "up");

    let r = app.get("metadata").await;
    assert_eq!(r.status(), 200);
    let cs = json(r).await;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["implementation"]["url"], app.fhir);
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    assert_eq!(resources.len(), 146);
    let group = resources.iter().find(|r| r["type"] == "Group").unwrap();
    let interactions: Vec<&str> =
        group["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
    for needed in
        ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
    {
        assert!(interactions.contains(&needed), "{needed}");
    }
}

#[tokio::test]
async fn migrations_are_recorded_and_idempotent() {
    let app = spawn_app().await;
    // The app applied everything at start; a second run applies nothing.
    assert!(roster::migrate::clickhouse(&app.settings.clickhouse).await.unwrap().is_empty());
    assert!(roster::migrate::mongo(&app.mongo).await.unwrap().is_empty());
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    let names: Vec<String> = ch.query("SELECT name FROM _migrations FINAL ORDER BY name").fetch_all().await.unwrap();
    let expected: Vec<String> = roster::migrate::CLICKHOUSE_MIGRATIONS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(names, expected);
    let version: String =
        ch.query("SELECT value FROM roster_info FINAL WHERE key = ?").bind("fhir_version").fetch_one().await.unwrap();
    assert_eq!(version, "4.0.1");
    let indexes = app.mongo.collection::<bson::Document>("Group_4_0_0_History").list_index_names().await.unwrap();
    assert!(indexes.contains(&"by_resource_version".to_string()), "{indexes:?}");
    // Every index costs every write of a document: the current-version collections keep
    // only what search and the sweeps need (005 dropped three, merged two).
    for collection in ["Group_4_0_0", "Patient_4_0_0"] {
        let mut indexes = app.mongo.collection::<bson::Document>(collection).list_index_names().await.unwrap();
        indexes.sort();
        assert_eq!(indexes, ["_id_", "pending_work", "search_by_lastUpdated"], "{collection}");
    }
}

#[tokio::test]
async fn two_test_servers_do_not_see_each_other() {
    let a = spawn_app().await;
    let b = spawn_app().await;
    a.post("Patient", &patient("OnlyInA")).await;
    let count = json(b.get("Patient?_summary=count").await).await;
    assert_eq!(count["total"], 0);
}

#[tokio::test]
async fn ready_is_503_while_a_background_task_waits_to_be_restarted() {
    let app = spawn_app().await;
    let ready = || async { app.client.get(format!("{}/ready", app.address)).send().await.unwrap() };
    let r = ready().await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["tasksDown"], serde_json::json!([]));
    // A background task that panics at every start: down while the supervisor waits.
    let failing = app.state.tasks.spawn("always failing", || async { panic!("a bug") });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r = ready().await;
    assert_eq!(r.status(), 503);
    assert_eq!(json(r).await["tasksDown"], serde_json::json!(["always failing"]));
    failing.abort();
    let _ = failing.await;
    assert_eq!(ready().await.status(), 200, "ready again once the task is gone");
}
