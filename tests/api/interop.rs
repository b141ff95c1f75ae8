//! Real FHIR clients, unmodified: any property order, empty elements, the three PATCH
//! formats, XML, no writing back of subsetted resources, events on by default, and a real
//! client from PyPI (fhirpy) driving the server.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const MERGE_PATCH: &str = "application/merge-patch+json";
const FHIR_XML: &str = "application/fhir+xml";

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: String,
) -> reqwest::Response {
    app.client.request(method, app.url(path)).header("content-type", content_type).body(body).send().await.unwrap()
}

async fn created_id(r: reqwest::Response) -> String {
    let status = r.status().as_u16();
    let body = json(r).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn without_meta(mut v: Value) -> Value {
    v.as_object_mut().unwrap().shift_remove("meta");
    v
}

fn member(reference: &str) -> Value {
    json!({ "entity": { "reference": reference } })
}

async fn members_of(app: &TestApp, id: &str) -> Vec<Value> {
    let g = json(app.get(&format!("Group/{id}")).await).await;
    g["member"].as_array().cloned().unwrap_or_default()
}

fn references(members: &[Value]) -> Vec<String> {
    members.iter().map(|m| m["entity"]["reference"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_patient_with_resource_type_last_is_created_and_read_back() {
    let app = spawn_app().await;
    let body = r##"{"name":[{"family":"Lovelace","given":["Ada"]}],"gender":"female",
        "contained":[{"name":"Analytical","id":"org","resourceType":"Organization"}],
        "managingOrganization":{"reference":"#org"},"resourceType":"Patient"}"##;
    let id = created_id(send(&app, reqwest::Method::POST, "Patient", FHIR_JSON, body.into()).await).await;
    let back = json(app.get(&format!("Patient/{id}")).await).await;
    assert_eq!(back["name"][0]["family"], "Lovelace");
    assert_eq!(back["contained"][0]["name"], "Analytical");
    // A PUT and a JSON Patch result are parsed the same way.
    let put = r#"{"id":"ID","gender":"male","resourceType":"Patient"}"#.replace("ID", &id);
    assert_eq!(send(&app, reqwest::Method::PUT, &format!("Patient/{id}"), FHIR_JSON, put).await.status(), 200);
    let ops = json!([{"op":"add","path":"/contained","value":[{"id":"o2","resourceType":"Organization","name":"x"}]}]);
    assert_eq!(app.patch(&format!("Patient/{id}"), &ops).await.status(), 200);
    let back = json(app.get(&format!("Patient/{id}")).await).await;
    assert_eq!((back["gender"].as_str(), back["contained"][0]["id"].as_str()), (Some("male"), Some("o2")));
}

async fn post_strict(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    let request = app.client.post(app.url(path)).header("content-type", FHIR_JSON);
    request.header("prefer", "handling=strict").body(body.to_string()).send().await.unwrap()
}

#[tokio::test]
async fn empty_arrays_objects_and_nulls_are_dropped_unless_strict() {
    let app = spawn_app().await;
    let body = json!({"resourceType":"Patient","name":[{"family":"X","given":[]}],"telecom":[],
                      "address":null,"maritalStatus":{},"identifier":[{"system":null,"value":"1"}]});
    let r = app.post("Patient", &body).await;
    assert_eq!(r.status(), 201);
    let created = json(r).await;
    assert_eq!(
        without_meta(created.clone()),
        json!({"resourceType":"Patient","id":created["id"],
        "name":[{"family":"X"}],"identifier":[{"value":"1"}]})
    );
    let read = json(app.get(&format!("Patient/{}", created["id"].as_str().unwrap())).await).await;
    assert_eq!(without_meta(read), without_meta(created));

    let issue = assert_outcome(post_strict(&app, "Patient", &body).await, 400).await;
    assert_eq!(issue["expression"][0], "Patient.name[0].given", "{issue}");

    // A Group with `"member": []` is a Group without members.
    let group = json!({"resourceType":"Group","type":"person","actual":true,"member":[],"characteristic":null});
    let r = app.post("Group", &group).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let strict = post_strict(&app, "Group", &group).await;
    assert_eq!(assert_outcome(strict, 400).await["expression"][0], "Group.member");
}

#[tokio::test]
async fn merge_patch_sets_and_removes_on_a_patient() {
    let app = spawn_app().await;
    let id = created_id(app.post("Patient", &patient("Merge")).await).await;
    // fhirpy's form: a plain object as application/json.
    let r =
        send(&app, reqwest::Method::PATCH, &format!("Patient/{id}"), "application/json", r#"{"gender":"male"}"#.into())
            .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!((body["gender"].as_str(), body["meta"]["versionId"].as_str()), (Some("male"), Some("2")));
    let r = send(
        &app,
        reqwest::Method::PATCH,
        &format!("Patient/{id}"),
        MERGE_PATCH,
        r#"{"birthDate":null,"name":[{"family":"Merged"}],"maritalStatus":{"text":"single"}}"#.into(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let back = json(app.get(&format!("Patient/{id}")).await).await;
    assert!(back.get("birthDate").is_none(), "{back}");
    assert_eq!(back["name"], json!([{"family":"Merged"}]));
    assert_eq!(back["maritalStatus"]["text"], "single");
    assert_eq!(back["meta"]["versionId"], "3");
    // The result is validated like any write.
    let path = format!("Patient/{id}");
    let bad = send(&app, reqwest::Method::PATCH, &path, MERGE_PATCH, r#"{"gender":"robot"}"#.into()).await;
    assert_outcome(bad, 422).await;
    let bad = send(&app, reqwest::Method::PATCH, &path, MERGE_PATCH, r#"{"id":null}"#.into()).await;
    assert_outcome(bad, 422).await;
    // A JSON array must be sent as JSON Patch.
    let array = send(&app, reqwest::Method::PATCH, &path, "application/json", "[]".into()).await;
    assert_outcome(array, 415).await;
    assert_eq!(json(app.get(&format!("Patient/{id}")).await).await["meta"]["versionId"], "3");
}

#[tokio::test]
async fn merge_patch_on_a_group_keeps_members_out_of_the_document() {
    let app = spawn_app().await;
    let group = json!({"resourceType":"Group","type":"person","actual":true,"name":"cohort",
                       "member":[member("Patient/1"), member("Patient/2")]});
    let id = created_id(app.post("Group", &group).await).await;
    let r =
        send(&app, reqwest::Method::PATCH, &format!("Group/{id}"), "application/json", r#"{"name":"renamed"}"#.into())
            .await;
    assert_eq!(r.status(), 200);
    let read = json(app.get(&format!("Group/{id}")).await).await;
    assert_eq!(read["name"], "renamed");
    assert_eq!(references(read["member"].as_array().unwrap()), ["Patient/1", "Patient/2"]);
    // Members sent in a merge patch are member events: the array replaces the membership.
    let body = json!({"member":[member("Patient/2"), member("Patient/3")], "name": null});
    let r = send(&app, reqwest::Method::PATCH, &format!("Group/{id}"), MERGE_PATCH, body.to_string()).await;
    assert_eq!(r.status(), 200);
    let stored =
        app.mongo.collection::<bson::Document>("Group_4_0_0").find_one(bson::doc! {"_id": &id}).await.unwrap().unwrap();
    assert!(!stored.get_document("resource").unwrap().contains_key("member"), "members never go to MongoDB");
    let read = json(app.get(&format!("Group/{id}")).await).await;
    assert!(read.get("name").is_none());
    assert_eq!(references(read["member"].as_array().unwrap()), ["Patient/2", "Patient/3"]);
    assert_eq!(read["quantity"], 2);
    let r = send(&app, reqwest::Method::PATCH, &format!("Group/{id}"), MERGE_PATCH, r#"{"member":null}"#.into()).await;
    assert_eq!(r.status(), 200);
    assert!(members_of(&app, &id).await.is_empty());
}

/// The FHIRPath Patch cases in `tests/data/fhirpath-patch-cases.json`, written from the
/// R4 specification's page and its published test cases, each on a fresh resource.
#[tokio::test]
async fn fhirpath_patch_cases_from_the_specification() {
    let app = spawn_app().await;
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string("tests/data/fhirpath-patch-cases.json").unwrap()).unwrap();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let mut resource = case["resource"].clone();
        let rt = resource["resourceType"].as_str().unwrap().to_string();
        let id = format!("fp-{n}");
        resource["id"] = json!(id);
        let put = app.put(&format!("{rt}/{id}"), &resource).await;
        assert!(put.status().is_success(), "{name}: setup {}", put.text().await.unwrap());
        let r = send(&app, reqwest::Method::PATCH, &format!("{rt}/{id}"), FHIR_JSON, case["patch"].to_string()).await;
        let status = r.status().as_u16();
        let body = json(r).await;
        let after = json(app.get(&format!("{rt}/{id}")).await).await;
        if case["error"] == json!(true) {
            if !(400..500).contains(&status) || after["meta"]["versionId"] != "1" {
                failures.push(format!("{name}: expected a 4xx and no write, got {status} {body}"));
            } else if body["issue"][0]["diagnostics"].as_str().is_none_or(|d| !d.contains("operation"))
                && body["issue"][0]["expression"][0].as_str().is_none()
            {
                failures.push(format!("{name}: the error names neither the operation nor the element: {body}"));
            }
            continue;
        }
        let mut expected = case["expected"].clone();
        expected["id"] = json!(id);
        if status != 200 || without_meta(after.clone()) != expected {
            failures.push(format!("{name}: {status}\n  got      {}\n  expected {expected}", without_meta(after)));
        }
    }
    println!("FHIRPath Patch: {} of {} cases pass", cases.len() - failures.len(), cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn operation(kind: &str, path: &str, more: Vec<Value>) -> Value {
    let mut parts = vec![json!({"name":"type","valueCode":kind}), json!({"name":"path","valueString":path})];
    parts.extend(more);
    json!({"name":"operation","part":parts})
}

fn parameters(ops: Vec<Value>) -> String {
    json!({"resourceType":"Parameters","parameter":ops}).to_string()
}

#[tokio::test]
async fn fhirpath_patch_changes_group_members_through_member_events() {
    let app = spawn_app().await;
    let group = json!({"resourceType":"Group","type":"person","actual":true,
                       "member":[member("Patient/1"), member("Patient/2"), member("Patient/3")]});
    let id = created_id(app.post("Group", &group).await).await;
    let path = format!("Group/{id}");
    let new_member = json!({"name":"value","part":[
        {"name":"entity","valueReference":{"reference":"Patient/4"}},
        {"name":"period","valuePeriod":{"start":"2024-01-01"}}]});
    let body = parameters(vec![
        operation("add", "Group", vec![json!({"name":"name","valueString":"member"}), new_member]),
        operation("delete", "Group.member.where(entity.reference='Patient/2')", vec![]),
        operation(
            "add",
            "Group.member[0]",
            vec![json!({"name":"name","valueString":"inactive"}), json!({"name":"value","valueBoolean":true})],
        ),
        operation(
            "replace",
            "Group.member.last().period.start",
            vec![json!({"name":"value","valueDateTime":"2024-02-01"})],
        ),
        operation(
            "add",
            "Group",
            vec![json!({"name":"name","valueString":"name"}), json!({"name":"value","valueString":"fp"})],
        ),
    ]);
    let r = send(&app, reqwest::Method::PATCH, &path, FHIR_JSON, body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let members = members_of(&app, &id).await;
    assert_eq!(references(&members), ["Patient/1", "Patient/3", "Patient/4"]);
    assert_eq!(members[0]["inactive"], true);
    assert_eq!(members[2]["period"]["start"], "2024-02-01");
    let stored =
        app.mongo.collection::<bson::Document>("Group_4_0_0").find_one(bson::doc! {"_id": &id}).await.unwrap().unwrap();
    let resource = stored.get_document("resource").unwrap();
    assert_eq!(resource.get_str("name").unwrap(), "fp");
    assert!(!resource.contains_key("member"));

    // Deleting a member that is not there is a no-op; first() and [n] select by position.
    let body = parameters(vec![
        operation("delete", "Group.member.where(entity.reference='Patient/99')", vec![]),
        operation("delete", "Group.member.first()", vec![]),
    ]);
    assert_eq!(send(&app, reqwest::Method::PATCH, &path, FHIR_JSON, body).await.status(), 200);
    assert_eq!(references(&members_of(&app, &id).await), ["Patient/3", "Patient/4"]);

    // Refused, naming the operation; nothing written.
    for (bad, status) in [
        (operation("delete", "Group.member.where(inactive=true)", vec![]), 422),
        (operation("replace", "Group.member[5].inactive", vec![json!({"name":"value","valueBoolean":true})]), 422),
        (
            operation(
                "move",
                "Group.member",
                vec![json!({"name":"source","valueInteger":0}), json!({"name":"destination","valueInteger":1})],
            ),
            422,
        ),
        (
            operation(
                "replace",
                "Group.member[0].entity.reference",
                vec![json!({"name":"value","valueString":"Patient/9"})],
            ),
            422,
        ),
    ] {
        let body = parameters(vec![operation("delete", "Group.member.first()", vec![]), bad]);
        let issue = assert_outcome(send(&app, reqwest::Method::PATCH, &path, FHIR_JSON, body).await, status).await;
        assert!(issue["diagnostics"].as_str().unwrap().contains("operation 1"), "{issue}");
    }
    assert_eq!(references(&members_of(&app, &id).await), ["Patient/3", "Patient/4"]);
}

#[tokio::test]
async fn fhirpath_patch_in_xml() {
    let app = spawn_app().await;
    let id = created_id(app.post("Patient", &patient("Xml")).await).await;
    let body = r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="operation"/>
        <part><name value="type"/><valueCode value="replace"/></part>
        <part><name value="path"/><valueString value="Patient.birthDate"/></part>
        <part><name value="value"/><valueDate value="1815-12-10"/></part></parameter></Parameters>"#;
    let r = send(&app, reqwest::Method::PATCH, &format!("Patient/{id}"), FHIR_XML, body.into()).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(json(app.get(&format!("Patient/{id}")).await).await["birthDate"], "1815-12-10");
}

async fn get_xml(app: &TestApp, path: &str) -> (u16, String, String) {
    let r = app.client.get(app.url(path)).header("accept", FHIR_XML).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

#[tokio::test]
async fn xml_in_and_out() {
    let app = spawn_app().await;
    // XML create → JSON read equal to what was sent.
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
        <Patient xmlns="http://hl7.org/fhir"><active value="true"/>
        <name><family value="Hopper"/><given value="Grace"/><given value="B."/></name>
        <gender value="female"/><birthDate value="1906-12-09"/></Patient>"#;
    let r = send(&app, reqwest::Method::POST, "Patient", FHIR_XML, xml.into()).await;
    assert_eq!(r.status(), 201);
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let read = json(app.get(&format!("Patient/{id}")).await).await;
    assert_eq!(
        without_meta(read),
        json!({"resourceType":"Patient","id":id,"active":true,"name":[{"family":"Hopper","given":["Grace","B."]}],
               "gender":"female","birthDate":"1906-12-09"})
    );

    // JSON create → XML read, parseable as R4, by Accept and by _format.
    let (status, ct, body) = get_xml(&app, &format!("Patient/{id}")).await;
    assert_eq!((status, ct.starts_with(FHIR_XML)), (200, true), "{ct}");
    let parsed = fhir_model::from_xml(&body).unwrap();
    assert_eq!(parsed["name"][0]["given"][1], "B.");
    let r = app.get(&format!("Patient/{id}?_format=xml&_pretty=true")).await;
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with(FHIR_XML));
    let pretty = r.text().await.unwrap();
    assert!(pretty.contains("\n  <"), "{pretty}");
    assert_eq!(fhir_model::from_xml(&pretty).unwrap()["birthDate"], "1906-12-09");
    let r = app.get(&format!("Patient/{id}?_pretty=true")).await;
    assert!(r.text().await.unwrap().contains("\n  \"resourceType\""));

    // Search and history Bundles, errors.
    let (status, _, body) = get_xml(&app, &format!("Patient?_id={id}")).await;
    assert_eq!(status, 200);
    let bundle = fhir_model::from_xml(&body).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["entry"][0]["resource"]["id"], id.as_str());
    let (status, _, body) = get_xml(&app, &format!("Patient/{id}/_history")).await;
    assert_eq!((status, fhir_model::from_xml(&body).unwrap()["type"].as_str()), (200, Some("history")));
    let (status, ct, body) = get_xml(&app, "Patient/no-such-patient").await;
    assert_eq!(status, 404);
    assert!(ct.starts_with(FHIR_XML));
    assert_eq!(fhir_model::from_xml(&body).unwrap()["resourceType"], "OperationOutcome");
    let r =
        send(&app, reqwest::Method::POST, "Patient", FHIR_XML, "<Patient xmlns=\"http://hl7.org/fhir\"><x/>".into());
    assert_outcome(r.await, 400).await;

    // Neither format acceptable: 406.
    let r = app.client.get(app.url(&format!("Patient/{id}"))).header("accept", "text/html").send().await.unwrap();
    assert_outcome(r, 406).await;
    let (status, _, body) = get_xml(&app, "metadata").await;
    assert_eq!(
        (status, fhir_model::from_xml(&body).unwrap()["resourceType"].as_str()),
        (200, Some("CapabilityStatement"))
    );
}

#[tokio::test]
async fn a_large_group_streams_in_xml() {
    let app = spawn_app().await;
    let members: Vec<Value> = (0..3000)
        .map(|i| json!({"entity":{"reference":format!("Patient/{i}")},"period":{"start":"2024-01-01"}}))
        .collect();
    let group = json!({"resourceType":"Group","type":"person","actual":true,"name":"big","member":members});
    let id = created_id(app.post("Group", &group).await).await;
    let (status, ct, body) = get_xml(&app, &format!("Group/{id}")).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with(FHIR_XML), "{ct}");
    let parsed = fhir_model::from_xml(&body).unwrap();
    assert_eq!(parsed["member"].as_array().unwrap().len(), 3000);
    assert_eq!(parsed["member"][2999]["entity"]["reference"], "Patient/2999");
    assert_eq!(parsed["quantity"], 3000);
    assert_eq!(parsed["name"], "big");
    // And a Group without members.
    let empty =
        created_id(app.post("Group", &json!({"resourceType":"Group","type":"person","actual":true})).await).await;
    let (status, _, body) = get_xml(&app, &format!("Group/{empty}")).await;
    assert_eq!((status, fhir_model::from_xml(&body).unwrap()["actual"].as_bool()), (200, Some(true)));
}

#[tokio::test]
async fn a_subsetted_resource_is_never_written_back() {
    let app = spawn_app().await;
    let group = json!({"resourceType":"Group","type":"person","actual":true,"member":[member("Patient/1"), member("Patient/2")]});
    let r = app.post("Group", &group).await;
    assert_eq!(r.status(), 201);
    // The write response is a Group without its members, tagged SUBSETTED: PUT it back.
    let shown = json(r).await;
    let id = shown["id"].as_str().unwrap().to_string();
    assert!(shown["meta"]["tag"].as_array().unwrap().iter().any(|t| t["code"] == "SUBSETTED"));
    let issue = assert_outcome(app.put(&format!("Group/{id}"), &shown).await, 400).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("SUBSETTED"), "{issue}");
    assert_eq!(issue["expression"][0], "Group.meta.tag[0]");
    // A summary read, too.
    let summary = json(app.get(&format!("Group/{id}?_summary=true")).await).await;
    assert_outcome(app.put(&format!("Group/{id}"), &summary).await, 400).await;
    // A patch whose result would carry the tag.
    let tag = json!([{"op":"add","path":"/meta/tag","value":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}]}]);
    assert_outcome(app.patch(&format!("Group/{id}"), &tag).await, 422).await;
    let read = json(app.get(&format!("Group/{id}")).await).await;
    assert_eq!(references(read["member"].as_array().unwrap()), ["Patient/1", "Patient/2"]);
    assert_eq!(read["meta"]["versionId"], "1");
}

/// With the settings a new user gets (`make run`: no routing configured), an Encounter
/// becomes events, the projection, and a GraphQL answer, also when its location is only
/// a display.
#[tokio::test]
async fn an_encounter_written_under_the_defaults_shows_up_in_graphql() {
    let mut settings = test_settings();
    settings.events.routes = roster::config::Settings::load_from(None, |_| None).unwrap().events.routes;
    assert_eq!(settings.events.routes, roster::config::EventRoutes::Builtin);
    settings.projections.run = true;
    let app = spawn_with(settings, roster::pipeline::Hooks::default()).await;
    let patient = json!({"resourceType":"Patient","id":"p1","identifier":[{"type":{"coding":[
        {"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR"}]},"value":"MRN-1"}]});
    assert_eq!(app.put("Patient/p1", &patient).await.status(), 201);
    let encounter = json!({"resourceType":"Encounter","id":"e1","status":"in-progress",
        "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"IMP"},
        "subject":{"reference":"Patient/p1"},"period":{"start":"2024-01-15T08:00:00Z"},
        "location":[{"location":{"display":"Ward 7"}}]});
    assert_eq!(app.put("Encounter/e1", &encounter).await.status(), 201);
    let query = json!({"query": "{ activeEncounters(location: \"Ward 7\") { id patientMrn location } }"}).to_string();
    for _ in 0..200 {
        let r = app.client.post(format!("{}/graphql", app.address)).body(query.clone()).send().await.unwrap();
        let body = json(r).await;
        if body["data"]["activeEncounters"].as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(
                body["data"]["activeEncounters"][0],
                json!({"id":"e1","patientMrn":"MRN-1","location":"Ward 7"})
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the encounter never reached activeEncounters");
}

/// fhirpy (PyPI), unmodified, doing create/read/update/patch/search/delete; installed into
/// `.local/venv/clients` by `tests/clients/run.sh`.
#[tokio::test]
async fn fhirpy_drives_the_server_unmodified() {
    let app = spawn_app().await;
    let fhir = app.fhir.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash").arg("tests/clients/run.sh").arg(&fhir).output().expect("bash runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "fhirpy failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
}
