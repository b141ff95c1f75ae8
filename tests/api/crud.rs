use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn create_read_vread_update_delete_lifecycle() {
    let app = spawn_app().await;

    let created = app.post("Patient", &patient("Lovelace")).await;
    assert_eq!(created.status(), 201);
    assert_eq!(etag(&created), "W/\"1\"");
    assert!(created.headers().get("last-modified").is_some());
    let location = created.headers()["location"].to_str().unwrap().to_string();
    let body = json(created).await;
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(location, app.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(body["meta"]["versionId"], "1");
    assert!(body["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));

    let read = app.get(&format!("Patient/{id}")).await;
    assert_eq!(read.status(), 200);
    assert!(read.headers()["content-type"].to_str().unwrap().starts_with("application/fhir+json"));
    assert_eq!(json(read).await["name"][0]["family"], "Lovelace");

    let mut changed = body.clone();
    changed["name"][0]["family"] = json!("Byron");
    let updated = app.put(&format!("Patient/{id}"), &changed).await;
    assert_eq!(updated.status(), 200);
    assert_eq!(etag(&updated), "W/\"2\"");
    let updated = json(updated).await;
    assert_eq!(updated["meta"]["versionId"], "2");
    assert!(updated["meta"]["lastUpdated"].as_str() > body["meta"]["lastUpdated"].as_str());

    let v1 = json(app.get(&format!("Patient/{id}/_history/1")).await).await;
    assert_eq!(v1["name"][0]["family"], "Lovelace");
    let v2 = json(app.get(&format!("Patient/{id}/_history/2")).await).await;
    assert_eq!(v2["name"][0]["family"], "Byron");
    assert_outcome(app.get(&format!("Patient/{id}/_history/3")).await, 404).await;

    let deleted = app.delete(&format!("Patient/{id}")).await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(etag(&deleted), "W/\"3\"");
    let gone = app.get(&format!("Patient/{id}")).await;
    assert_eq!(etag(&gone), "W/\"3\"");
    let issue = assert_outcome(gone, 410).await;
    assert_eq!(issue["code"], "deleted");
    assert_outcome(app.get(&format!("Patient/{id}/_history/3")).await, 410).await;
    assert_eq!(app.get(&format!("Patient/{id}/_history/2")).await.status(), 200, "old versions stay readable");
    // Deleting again is idempotent and writes no version.
    let again = app.delete(&format!("Patient/{id}")).await;
    assert_eq!(again.status(), 204);
    assert_eq!(etag(&again), "W/\"3\"");

    // Updating a deleted resource brings it back as a new version.
    let back = app.put(&format!("Patient/{id}"), &changed).await;
    assert_eq!(back.status(), 201);
    assert_eq!(etag(&back), "W/\"4\"");

    let history = json(app.get(&format!("Patient/{id}/_history")).await).await;
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 4);
    let entries = history["entry"].as_array().unwrap();
    let versions: Vec<&str> = entries.iter().map(|e| e["response"]["etag"].as_str().unwrap()).collect();
    assert_eq!(versions, ["W/\"4\"", "W/\"3\"", "W/\"2\"", "W/\"1\""]);
    let methods: Vec<&str> = entries.iter().map(|e| e["request"]["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["PUT", "DELETE", "PUT", "POST"]);
    assert!(entries[1].get("resource").is_none(), "a deletion entry carries no resource");
}

#[tokio::test]
async fn update_as_create_uses_the_client_id() {
    let app = spawn_app().await;
    let mut p = patient("Hopper");
    p["id"] = json!("grace-1");
    let r = app.put("Patient/grace-1", &p).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"].to_str().unwrap(), app.url("Patient/grace-1/_history/1"));
    assert_eq!(json(app.get("Patient/grace-1").await).await["name"][0]["family"], "Hopper");
}

#[tokio::test]
async fn post_ignores_the_body_id() {
    let app = spawn_app().await;
    let mut p = patient("Noether");
    p["id"] = json!("chosen-by-client");
    let body = json(app.post("Patient", &p).await).await;
    assert_ne!(body["id"], "chosen-by-client");
    assert_eq!(app.get("Patient/chosen-by-client").await.status(), 404);
}

#[tokio::test]
async fn if_match_guards_updates_and_deletes() {
    let app = spawn_app().await;
    let mut body = json(app.post("Patient", &patient("Curie")).await).await;
    let id = body["id"].as_str().unwrap().to_string();
    let path = format!("Patient/{id}");
    body["gender"] = json!("other"); // a change: a PUT of the same content writes nothing

    assert_outcome(app.put_if_match(&path, &body, "W/\"7\"").await, 412).await;
    let ok = app.put_if_match(&path, &body, "W/\"1\"").await;
    assert_eq!(ok.status(), 200);
    assert_eq!(etag(&ok), "W/\"2\"");
    let stale_delete = app.client.delete(app.url(&path)).header("if-match", "W/\"1\"").send().await.unwrap();
    assert_outcome(stale_delete, 412).await;
    assert_eq!(app.get(&path).await.status(), 200, "nothing deleted");
    let garbage = app.client.delete(app.url(&path)).header("if-match", "yesterday").send().await.unwrap();
    assert_outcome(garbage, 400).await;
}

#[tokio::test]
async fn concurrent_updates_from_one_base_version_have_exactly_one_winner() {
    let app = spawn_app().await;
    let body = json(app.post("Patient", &patient("Race")).await).await;
    let id = body["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = app.client.clone();
        let url = app.url(&format!("Patient/{id}"));
        let mut b = body.clone();
        b["name"][0]["family"] = json!(format!("Writer{i}"));
        tasks.push(tokio::spawn(async move {
            client
                .put(url)
                .header("content-type", FHIR_JSON)
                .header("if-match", "W/\"1\"")
                .body(b.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 11, "{statuses:?}");
    let current = app.get(&format!("Patient/{id}")).await;
    assert_eq!(etag(&current), "W/\"2\"");
}

#[tokio::test]
async fn concurrent_updates_without_if_match_all_land_in_distinct_versions() {
    let app = spawn_app().await;
    let body = json(app.post("Patient", &patient("Queue")).await).await;
    let id = body["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = app.client.clone();
        let url = app.url(&format!("Patient/{id}"));
        let mut b = body.clone();
        b.as_object_mut().unwrap().remove("meta");
        b["name"][0]["family"] = json!(format!("Writer{i}"));
        tasks.push(tokio::spawn(async move {
            let r = client.put(url).header("content-type", FHIR_JSON).body(b.to_string()).send().await.unwrap();
            (r.status().as_u16(), etag(&r))
        }));
    }
    let mut etags = Vec::new();
    for t in tasks {
        let (status, etag) = t.await.unwrap();
        assert_eq!(status, 200);
        etags.push(etag);
    }
    etags.sort();
    etags.dedup();
    assert_eq!(etags.len(), 10, "every write got its own version: {etags:?}");
    let history = json(app.get(&format!("Patient/{id}/_history?_count=50")).await).await;
    assert_eq!(history["total"], 11);
}

#[tokio::test]
async fn conditional_create_with_if_none_exist() {
    let app = spawn_app().await;
    let mut p = patient("Only");
    p["id"] = json!("only-one");
    assert_eq!(app.put("Patient/only-one", &p).await.status(), 201);

    let send = |condition: &'static str| {
        app.client
            .post(app.url("Patient"))
            .header("content-type", FHIR_JSON)
            .header("if-none-exist", condition)
            .body(patient("Cond").to_string())
            .send()
    };
    let existing = send("_id=only-one").await.unwrap();
    assert_eq!(existing.status(), 200, "a match returns the existing resource");
    assert_eq!(json(existing).await["id"], "only-one");

    let created = send("_id=nobody").await.unwrap();
    assert_eq!(created.status(), 201);
    let count = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(count["total"], 2);

    let mut second = patient("Two");
    second["id"] = json!("second");
    app.put("Patient/second", &second).await;
    assert_outcome(send("_id=only-one,second").await.unwrap(), 412).await;
    assert_outcome(send("nonsense=x").await.unwrap(), 400).await;
}

#[tokio::test]
async fn prefer_return_controls_the_body() {
    let app = spawn_app().await;
    let minimal = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(patient("Min").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(minimal.status(), 201);
    assert!(minimal.headers().get("location").is_some());
    assert!(minimal.text().await.unwrap().is_empty());

    let outcome = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=OperationOutcome")
        .body(patient("Oo").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(outcome.status(), 201);
    let body: Value = json(outcome).await;
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["severity"], "information");
}

#[tokio::test]
async fn history_is_repaired_after_a_crash_between_commit_and_copy() {
    let app = spawn_app().await;
    let mut body = json(app.post("Patient", &patient("Crash")).await).await;
    let id = body["id"].as_str().unwrap().to_string();
    body["gender"] = json!("other");
    app.put(&format!("Patient/{id}"), &body).await;
    // The PUT's own background copy finishes first (it would otherwise clear the flag set
    // below: in a real crash there is no such task).
    let current = app.mongo.collection::<bson::Document>("Patient_4_0_0");
    for _ in 0..100 {
        let doc = current.find_one(bson::doc! { "_id": &id }).await.unwrap().unwrap();
        if !doc.contains_key("historyPending") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Simulate a crash right after the commit of version 2: its history copy is missing
    // and the current document still says so.
    let history = app.mongo.collection::<bson::Document>("Patient_4_0_0_History");
    history.delete_one(bson::doc! { "_id": format!("{id}/2") }).await.unwrap();
    app.mongo
        .collection::<bson::Document>("Patient_4_0_0")
        .update_one(bson::doc! { "_id": &id }, bson::doc! { "$set": { "historyPending": true } })
        .await
        .unwrap();
    let bundle = json(app.get("Patient/_history").await).await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    assert_eq!(bundle["entry"][0]["response"]["etag"], "W/\"2\"");
    let current = app
        .mongo
        .collection::<bson::Document>("Patient_4_0_0")
        .find_one(bson::doc! { "_id": &id })
        .await
        .unwrap()
        .unwrap();
    assert!(!current.contains_key("historyPending"));
}
