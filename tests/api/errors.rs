//! Every error status the server produces comes as an OperationOutcome with a precise
//! diagnostic, and nothing is written.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn bad_request_cases_name_the_problem() {
    let app = spawn_app().await;
    let cases: Vec<(&str, serde_json::Value, &str, &str)> = vec![
        ("unknown element", json!({"resourceType":"Patient","foo":1}), "Patient.foo", "foo"),
        (
            "nested unknown element",
            json!({"resourceType":"Patient","name":[{"famly":"x"}]}),
            "Patient.name[0].famly",
            "famly",
        ),
        ("wrong JSON type", json!({"resourceType":"Patient","active":"yes"}), "Patient.active", "boolean"),
        ("wrong resourceType", json!({"resourceType":"Observation"}), "Patient.resourceType", "Observation"),
        ("bad date", json!({"resourceType":"Patient","birthDate":"yesterday"}), "Patient.birthDate", "yesterday"),
        (
            "bad instant",
            json!({"resourceType":"Patient","meta":{"lastUpdated":"yesterday"}}),
            "Patient.meta.lastUpdated",
            "instant",
        ),
        ("object where array", json!({"resourceType":"Patient","name":{"family":"x"}}), "Patient.name", "array"),
        ("bad code", json!({"resourceType":"Patient","gender":"banana"}), "Patient.gender", "banana"),
    ];
    for (what, body, expression, mentions) in cases {
        let issue = assert_outcome(app.post("Patient", &body).await, 400).await;
        assert_eq!(issue["expression"][0], expression, "{what}: {issue}");
        let d = issue["diagnostics"].as_str().unwrap();
        assert!(d.contains(mentions), "{what}: '{d}' should mention '{mentions}'");
    }
    let group = json!({"resourceType":"Group","type":"banana","actual":true});
    let issue = assert_outcome(app.post("Group", &group).await, 400).await;
    assert_eq!(issue["expression"][0], "Group.type");
    let missing = json!({"resourceType":"Group","type":"person"});
    let issue = assert_outcome(app.post("Group", &missing).await, 400).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("actual"), "{issue}");
    // Members that fhirbolt 0.4 panics on (a string where a boolean is expected below
    // a member): a 4xx naming the member, in a POST body and in a PATCH.
    let bad = json!({"entity":{"reference":"Patient/1"},"inactive":"yes"});
    let body = json!({"resourceType":"Group","type":"person","actual":true,"member":[bad]});
    let issue = assert_outcome(app.post("Group", &body).await, 400).await;
    assert!(issue["expression"][0].as_str().unwrap().starts_with("Group.member[0]"), "{issue}");
    app.put("Group/g", &json!({"resourceType":"Group","id":"g","type":"person","actual":true})).await;
    let issue =
        assert_outcome(app.patch("Group/g", &json!([{"op":"add","path":"/member/-","value":bad}])).await, 422).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("operation 0"), "{issue}");
    assert_eq!(etag(&app.get("Group/g").await), "W/\"1\"", "the refused PATCH wrote nothing");
    let count = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(count["total"], 0, "nothing was stored");
}

#[tokio::test]
async fn malformed_json_ids_and_bodies() {
    let app = spawn_app().await;
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .body("{\"resourceType\":")
        .send()
        .await
        .unwrap();
    let issue = assert_outcome(r, 400).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("not valid JSON"));
    let r = app.client.post(app.url("Patient")).header("content-type", FHIR_JSON).body("").send().await.unwrap();
    assert_outcome(r, 400).await;
    assert_outcome(app.put("Patient/a", &json!({"resourceType":"Patient","id":"b"})).await, 400).await;
    assert_outcome(app.put("Patient/a", &json!({"resourceType":"Patient"})).await, 400).await;
    assert_outcome(app.get("Patient/a_b$").await, 400).await;
    assert_outcome(app.get("Patient/x/_history/zero").await, 400).await;
    assert_outcome(app.get("Patient?_count=lots").await, 400).await;
    assert_outcome(app.put("Patient/a", &json!([1, 2])).await, 400).await;
}

#[tokio::test]
async fn not_found_gone_and_method_not_allowed() {
    let app = spawn_app().await;
    let issue = assert_outcome(app.get("Banana/1").await, 404).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("Banana"));
    assert_outcome(app.get("Patient/nobody").await, 404).await;
    assert_outcome(app.get("Patient/nobody/_history").await, 404).await;
    assert_outcome(app.delete("Patient/nobody").await, 404).await;
    assert_outcome(app.patch("Patient/nobody", &json!([])).await, 404).await;
    assert_outcome(app.client.get(format!("{}/nowhere", app.address)).send().await.unwrap(), 404).await;
    assert_outcome(app.client.delete(app.url("Patient")).send().await.unwrap(), 405).await;
    assert_outcome(app.client.post(app.url("Patient/x")).send().await.unwrap(), 405).await;

    let body = json(app.post("Patient", &patient("Gone")).await).await;
    let id = body["id"].as_str().unwrap();
    app.delete(&format!("Patient/{id}")).await;
    assert_outcome(app.get(&format!("Patient/{id}")).await, 410).await;
    assert_outcome(app.patch(&format!("Patient/{id}"), &json!([])).await, 410).await;
}

#[tokio::test]
async fn conflict_on_a_stale_version_in_the_body() {
    let app = spawn_app().await;
    let mut v1 = json(app.post("Patient", &patient("Stale")).await).await;
    let id = v1["id"].as_str().unwrap().to_string();
    v1["gender"] = json!("other");
    assert_eq!(app.put(&format!("Patient/{id}"), &v1).await.status(), 200);
    // v1 still says meta.versionId 1; the resource is at 2.
    let issue = assert_outcome(app.put(&format!("Patient/{id}"), &v1).await, 409).await;
    assert_eq!(issue["expression"][0], "Patient.meta.versionId");
    assert_eq!(etag(&app.get(&format!("Patient/{id}")).await), "W/\"2\"");
}

#[tokio::test]
async fn media_types_and_body_limit() {
    let mut settings = test_settings();
    settings.body_limit_bytes = 2048;
    let app = spawn_with(settings, Default::default()).await;
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "text/plain")
        .body(patient("x").to_string())
        .send()
        .await
        .unwrap();
    let issue = assert_outcome(r, 415).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("text/plain"));
    let r = app.client.post(app.url("Patient")).body(patient("x").to_string()).send().await.unwrap();
    assert_outcome(r, 415).await;
    let r = app.client.patch(app.url("Patient/x")).header("content-type", FHIR_JSON).body("[]").send().await.unwrap();
    assert_outcome(r, 415).await;
    // application/json is accepted for resources.
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "application/json; charset=utf-8")
        .body(patient("x").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mut big = patient("Big");
    big["name"][0]["text"] = json!("x".repeat(4096));
    assert_outcome(app.post("Patient", &big).await, 413).await;
    // Without Content-Length (chunked) the limit still holds.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.to_string())];
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 413).await;
    let r = app.client.get(app.url("Patient")).header("accept", "text/turtle").send().await.unwrap();
    assert_outcome(r, 406).await;
    let count = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(count["total"], 1);
}

#[tokio::test]
async fn a_corrupt_stored_document_is_a_logged_500_not_a_crash() {
    let app = spawn_app().await;
    app.mongo
        .collection::<bson::Document>("Patient_4_0_0")
        .insert_one(bson::doc! { "_id": "broken", "versionId": "not-a-number", "deleted": false })
        .await
        .unwrap();
    let issue = assert_outcome(app.get("Patient/broken").await, 500).await;
    assert_eq!(issue["severity"], "fatal");
    assert!(!issue["diagnostics"].as_str().unwrap().contains("not-a-number"), "internals are not leaked");
}

#[tokio::test]
async fn an_unreachable_store_is_a_503() {
    // A server whose MongoDB is gone: state built directly, since start-up would refuse.
    let settings = test_settings();
    let options = mongodb::options::ClientOptions::builder()
        .hosts(vec![mongodb::options::ServerAddress::Tcp { host: "127.0.0.1".into(), port: Some(1) }])
        .server_selection_timeout(std::time::Duration::from_millis(300))
        .direct_connection(true)
        .build();
    let db = mongodb::Client::with_options(options).unwrap().database("nowhere");
    let state = roster::state::AppState::new(
        roster::store::ResourceStore::new(db),
        roster::migrate::clickhouse_client(&settings.clickhouse),
        Default::default(),
        "http://test",
        1 << 20,
        &settings.groups,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, roster::startup::router(state, &settings.http)).await });
    let client = reqwest::Client::new();
    let r = client.get(format!("http://{address}/4_0_0/Patient/x")).send().await.unwrap();
    assert_outcome(r, 503).await;
    let r = client
        .post(format!("http://{address}/4_0_0/Patient"))
        .header("content-type", FHIR_JSON)
        .body(patient("x").to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(r, 503).await;
    let r = client.get(format!("http://{address}/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = json(r).await;
    assert!(body["mongo"].as_str().unwrap().starts_with("down"), "{body}");
}
