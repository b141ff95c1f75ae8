//! Bundles posted to the FHIR base: batches (each entry on its own, R4's processing order,
//! a `batch-response` in request order), and the checks on the Bundle itself.

use serde_json::{json, Value};

use crate::helpers::*;

/// POSTs a Bundle to the base (no trailing slash, as clients send it).
async fn post_bundle(app: &TestApp, bundle: &Value) -> reqwest::Response {
    app.client.post(&app.fhir).header("content-type", FHIR_JSON).body(bundle.to_string()).send().await.expect("request")
}

fn batch(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "batch", "entry": entries})
}

fn status(entry: &Value) -> &str {
    entry["response"]["status"].as_str().unwrap_or_default()
}

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn a_batch_runs_every_entry_on_its_own_and_answers_in_request_order() {
    let app = spawn_app().await;
    let r = app.put("Patient/old", &json!({"resourceType": "Patient", "id": "old", "active": true})).await;
    assert_eq!(r.status(), 201);
    let bundle = batch(vec![
        // 0: read after the writes (R4's order), so it sees the PUT below.
        json!({"request": {"method": "GET", "url": "Patient/b1"}}),
        // 1: a create.
        json!({"resource": {"resourceType": "Patient", "name": [{"family": "Batchley"}]},
               "request": {"method": "POST", "url": "Patient"}}),
        // 2: an invalid create fails alone.
        json!({"resource": {"resourceType": "Patient", "birthDate": "not-a-date"},
               "request": {"method": "POST", "url": "Patient"}}),
        // 3: a create with the client's id.
        json!({"resource": {"resourceType": "Patient", "id": "b1", "active": true, "name": [{"family": "Batchley"}]},
               "request": {"method": "PUT", "url": "Patient/b1"}}),
        // 4: a JSON Patch as a Binary, on an existing resource.
        json!({"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                "data": b64(r#"[{"op": "replace", "path": "/active", "value": false}]"#)},
               "request": {"method": "PATCH", "url": "Patient/old"}}),
        // 5: a stale version guard fails alone.
        json!({"resource": {"resourceType": "Patient", "id": "old", "active": true},
               "request": {"method": "PUT", "url": "Patient/old", "ifMatch": "W/\"7\""}}),
        // 6: an entry without a request.
        json!({"resource": {"resourceType": "Patient"}}),
        // 7: a search, after the writes.
        json!({"request": {"method": "GET", "url": "Patient?family=batchley"}}),
        // 8: a conditional create that finds an existing resource: nothing created.
        json!({"resource": {"resourceType": "Patient", "active": true},
               "request": {"method": "POST", "url": "Patient", "ifNoneExist": "Patient?_id=old"}}),
        // 9: a delete, run first.
        json!({"request": {"method": "DELETE", "url": "Patient/gone"}}),
    ]);
    app.put("Patient/gone", &json!({"resourceType": "Patient", "id": "gone"})).await;
    let r = post_bundle(&app, &bundle).await;
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(b["type"], "batch-response");
    let e = b["entry"].as_array().unwrap();
    assert_eq!(e.len(), 10, "one response entry per request entry");

    assert_eq!(status(&e[0]), "200 OK", "{}", e[0]);
    assert_eq!(e[0]["resource"]["id"], "b1");
    assert_eq!(status(&e[1]), "201 Created", "{}", e[1]);
    let location = e[1]["response"]["location"].as_str().unwrap();
    assert!(location.contains("/Patient/") && location.ends_with("/_history/1"), "{location}");
    assert_eq!(e[1]["response"]["etag"], "W/\"1\"");
    assert!(e[1]["response"]["lastModified"].as_str().unwrap().ends_with('Z'), "{}", e[1]);
    let created = e[1]["resource"]["id"].as_str().unwrap().to_string();
    assert_eq!(e[1]["fullUrl"], app.url(&format!("Patient/{created}")));
    assert!(status(&e[2]).starts_with("400"), "{}", e[2]);
    assert_eq!(e[2]["response"]["outcome"]["resourceType"], "OperationOutcome");
    assert_eq!(status(&e[3]), "201 Created", "{}", e[3]);
    assert_eq!(status(&e[4]), "200 OK", "{}", e[4]);
    assert_eq!(e[4]["resource"]["active"], false);
    assert!(status(&e[5]).starts_with("409") || status(&e[5]).starts_with("412"), "{}", e[5]);
    assert!(status(&e[6]).starts_with("400"), "{}", e[6]);
    assert!(e[6]["response"]["outcome"]["issue"][0]["diagnostics"].as_str().unwrap().contains("request"));
    assert_eq!(status(&e[7]), "200 OK", "{}", e[7]);
    assert_eq!(e[7]["resource"]["type"], "searchset");
    assert_eq!(e[7]["resource"]["total"], 2, "the search ran after both creates: {}", e[7]);
    assert_eq!(status(&e[8]), "200 OK", "ifNoneExist found Patient/old: {}", e[8]);
    assert!(status(&e[9]).starts_with("20"), "{}", e[9]);

    // What the batch wrote is there, what failed is not.
    assert_eq!(app.get("Patient/gone").await.status(), 410);
    assert_eq!(json(app.get("Patient/old").await).await["active"], false);
    let found = json(app.get("Patient?family=batchley&_total=accurate").await).await;
    assert_eq!(found["total"], 2);
    let all = json(app.get("Patient?_total=accurate").await).await;
    assert_eq!(all["total"], 3, "old, b1 and the created one; no invalid one: {all}");
}

#[tokio::test]
async fn a_batch_honours_prefer_per_entry_and_speaks_xml() {
    let app = spawn_app().await;
    let bundle = batch(vec![json!({"resource": {"resourceType": "Patient", "active": true},
        "request": {"method": "POST", "url": "Patient"}})]);
    let minimal = app
        .client
        .post(app.url(""))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let b = json(minimal).await;
    let entry = &b["entry"][0];
    assert_eq!(status(entry), "201 Created");
    assert!(entry.get("resource").is_none() && entry["response"]["location"].is_string(), "{entry}");

    let xml = r#"<Bundle xmlns="http://hl7.org/fhir"><type value="batch"/>
        <entry><resource><Patient xmlns="http://hl7.org/fhir"><name><family value="Xmlson"/></name></Patient></resource>
        <request><method value="POST"/><url value="Patient"/></request></entry></Bundle>"#;
    let r = app
        .client
        .post(&app.fhir)
        .header("content-type", "application/fhir+xml")
        .header("accept", "application/fhir+xml")
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("<Bundle") && text.contains("batch-response") && text.contains("201 Created"), "{text}");
    let found = json(app.get("Patient?family=xmlson").await).await;
    assert_eq!(match_ids(&found).len(), 1);
}

#[tokio::test]
async fn a_batch_writes_group_members_as_member_events() {
    let app = spawn_app().await;
    let bundle = batch(vec![
        json!({"resource": {"resourceType": "Patient", "id": "m1"}, "request": {"method": "PUT", "url": "Patient/m1"}}),
        json!({"resource": {"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/m1"}}]},
               "request": {"method": "PUT", "url": "Group/g1"}}),
    ]);
    let b = json(post_bundle(&app, &bundle).await).await;
    assert_eq!(status(&b["entry"][1]), "201 Created", "{b}");
    let found = json(app.get("Group?member=Patient/m1").await).await;
    assert_eq!(match_ids(&found), ["g1"]);
    let add = batch(vec![json!({"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
            "data": b64(r#"[{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/m2"}}}]"#)},
        "request": {"method": "PATCH", "url": "Group/g1"}})]);
    let b = json(post_bundle(&app, &add).await).await;
    assert_eq!(status(&b["entry"][0]), "200 OK", "{b}");
    let found = json(app.get("Group?member=Patient/m2").await).await;
    assert_eq!(match_ids(&found), ["g1"]);
}

#[tokio::test]
async fn the_bundle_itself_is_checked() {
    let mut settings = test_settings();
    settings.fhir.max_bundle_entries = Some(2);
    let app = spawn_with(settings, Default::default()).await;
    let get = json!({"request": {"method": "GET", "url": "Patient"}});
    let o = assert_outcome(post_bundle(&app, &batch(vec![get.clone(), get.clone(), get.clone()])).await, 413).await;
    assert!(o["diagnostics"].as_str().unwrap().contains("at most 2"), "{o}");
    assert_eq!(post_bundle(&app, &batch(vec![get.clone(), get.clone()])).await.status(), 200);
    assert_outcome(post_bundle(&app, &json!({"resourceType": "Patient"})).await, 400).await;
    assert_outcome(post_bundle(&app, &json!({"resourceType": "Bundle", "type": "collection"})).await, 400).await;
    assert_outcome(post_bundle(&app, &json!({"resourceType": "Bundle"})).await, 400).await;
    assert_outcome(post_bundle(&app, &json!({"resourceType": "Bundle", "type": "batch", "entry": {}})).await, 400)
        .await;
    let empty = json(post_bundle(&app, &batch(vec![])).await).await;
    assert_eq!((empty["type"].as_str(), empty["entry"].as_array().map(Vec::len)), (Some("batch-response"), Some(0)));
    // Entries that cannot run answer for themselves.
    let odd = batch(vec![
        json!({"request": {"method": "TRACE", "url": "Patient"}}),
        json!({"request": {"method": "GET", "url": "http://elsewhere.example/fhir/Patient/1"}}),
    ]);
    let b = json(post_bundle(&app, &odd).await).await;
    assert!(status(&b["entry"][0]).starts_with("400") && status(&b["entry"][1]).starts_with("400"), "{b}");
    let nested = batch(vec![json!({"resource": batch(vec![]), "request": {"method": "POST", "url": ""}})]);
    let b = json(post_bundle(&app, &nested).await).await;
    assert!(status(&b["entry"][0]).starts_with("400"), "{b}");
}

/// `GET /_history`: every type's versions, newest first, paged with a cursor that neither
/// skips nor repeats across types and equal instants; `_since` narrows it.
#[tokio::test]
async fn system_history_merges_every_type_newest_first() {
    let app = spawn_app().await;
    let mut written = Vec::new();
    let bundle = batch(
        (0..4)
            .flat_map(|i| {
                [
                    json!({"resource": {"resourceType": "Patient", "id": format!("h{i}")},
                           "request": {"method": "PUT", "url": format!("Patient/h{i}")}}),
                    json!({"resource": {"resourceType": "Observation", "id": format!("h{i}"), "status": "final",
                            "code": {"text": "x"}}, "request": {"method": "PUT", "url": format!("Observation/h{i}")}}),
                ]
            })
            .collect(),
    );
    assert_eq!(post_bundle(&app, &bundle).await.status(), 200);
    for i in 0..4 {
        written.push(format!("Patient/h{i}/1"));
        written.push(format!("Observation/h{i}/1"));
    }
    let since = json(app.get("Patient/h3").await).await["meta"]["lastUpdated"].as_str().unwrap().to_string();
    app.put("Patient/h0", &json!({"resourceType": "Patient", "id": "h0", "active": true})).await;
    written.push("Patient/h0/2".into());

    let first = json(app.get("_history?_count=1").await).await;
    assert_eq!(first["type"], "history");
    assert_eq!(first["total"], 9);
    assert_eq!(first["entry"][0]["fullUrl"], app.url("Patient/h0"), "the newest first: {first}");
    assert_eq!(first["entry"][0]["response"]["etag"], "W/\"2\"");
    let mut url = app.url("_history?_count=3");
    let mut seen = Vec::new();
    let mut last_updated = Vec::new();
    for _ in 0..10 {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        for e in b["entry"].as_array().into_iter().flatten() {
            let r = &e["resource"];
            seen.push(format!(
                "{}/{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap(),
                r["meta"]["versionId"].as_str().unwrap()
            ));
            last_updated.push(e["response"]["lastModified"].as_str().unwrap().to_string());
        }
        match b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    written.sort();
    assert_eq!(sorted_seen, written, "every version once: {seen:?}");
    assert!(last_updated.windows(2).all(|w| w[0] >= w[1]), "newest first: {last_updated:?}");
    let recent = json(app.get(&format!("_history?_since={since}")).await).await;
    let n = recent["total"].as_u64().unwrap();
    assert!((2..9).contains(&n), "_since keeps the later versions only: {n}");
    assert_outcome(app.get("_history?_cursor=nonsense").await, 400).await;
}

/// A transaction is decided in full before anything is written: what cannot be is a 4xx
/// naming the entry; until the atomic commit exists, a valid one is a 501 and writes
/// nothing.
#[tokio::test]
async fn a_transaction_is_checked_whole_and_writes_nothing_yet() {
    let app = spawn_app().await;
    let tx = |entries: Vec<Value>| json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let patient = json!({"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"},
        "request": {"method": "POST", "url": "Patient"}});
    let o = assert_outcome(post_bundle(&app, &tx(vec![patient.clone(), patient.clone()])).await, 400).await;
    assert!(o["diagnostics"].as_str().unwrap().contains("fullUrl"), "{o}");
    assert_eq!(o["expression"][0], "Bundle.entry[1]");
    let dangling = json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "urn:uuid:2"}}, "request": {"method": "POST", "url": "Observation"}});
    let o = assert_outcome(post_bundle(&app, &tx(vec![patient.clone(), dangling])).await, 400).await;
    assert!(o["diagnostics"].as_str().unwrap().contains("urn:uuid:2"), "{o}");
    let conditional = json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient?identifier=http://x|nobody"}}, "request": {"method": "POST", "url": "Observation"}});
    assert_outcome(post_bundle(&app, &tx(vec![conditional])).await, 412).await;
    let valid = json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "urn:uuid:1"}}, "request": {"method": "POST", "url": "Observation"}});
    assert_outcome(post_bundle(&app, &tx(vec![patient, valid])).await, 501).await;
    let all = json(app.get("Patient?_total=accurate").await).await;
    assert_eq!(all["total"], 0, "nothing written: {all}");
}

/// R4 keeps dependencies between entries and conditional references to transactions; an
/// entry's `_format` does not change its answer; `_history` runs as an entry.
#[tokio::test]
async fn a_batch_entry_stands_alone() {
    let app = spawn_app().await;
    let dependent = batch(vec![
        json!({"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}),
        json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "urn:uuid:1"}}, "request": {"method": "POST", "url": "Observation"}}),
        json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient?identifier=x|1"}}, "request": {"method": "POST", "url": "Observation"}}),
        // `_format` in an entry's URL does not change the entry's answer; `_history` runs.
        json!({"request": {"method": "GET", "url": "Patient?_format=xml&_total=accurate"}}),
        json!({"request": {"method": "GET", "url": "_history"}}),
    ]);
    let b = json(post_bundle(&app, &dependent).await).await;
    let e = b["entry"].as_array().unwrap();
    assert_eq!(status(&e[0]), "201 Created", "{b}");
    assert!(e[0]["response"]["lastModified"].as_str().unwrap().contains('.'), "milliseconds: {}", e[0]);
    assert!(status(&e[1]).starts_with("400") && status(&e[2]).starts_with("400"), "{b}");
    assert!(e[1]["response"]["outcome"]["issue"][0]["diagnostics"].as_str().unwrap().contains("transaction"));
    assert_eq!((status(&e[3]), &e[3]["resource"]["total"]), ("200 OK", &json!(1)), "{}", e[3]);
    assert_eq!((status(&e[4]), &e[4]["resource"]["type"]), ("200 OK", &json!("history")), "{}", e[4]);
}
