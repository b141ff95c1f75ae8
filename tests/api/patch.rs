use serde_json::{json, Value};

use crate::helpers::*;
use roster::model::patch;

/// Runs one file of the RFC 6902 suite against the server's patch engine.
/// Returns (passed, skipped-as-disabled, failures).
fn run_suite(file: &str) -> (usize, usize, Vec<String>) {
    let path = shared_dir().join("conformance/json-patch-tests").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let records: Vec<Value> = serde_json::from_str(&text).unwrap();
    let (mut passed, mut disabled, mut failures) = (0, 0, Vec::new());
    for (i, record) in records.iter().enumerate() {
        if record.get("doc").is_none() {
            continue; // comment-only record
        }
        if record["disabled"] == json!(true) {
            disabled += 1;
            continue;
        }
        let name = record["comment"].as_str().unwrap_or("").to_string();
        let mut doc = record["doc"].clone();
        let result = patch::parse(&record["patch"]).and_then(|ops| patch::apply(&mut doc, &ops));
        let ok = match (record.get("expected"), record.get("error"), &result) {
            (Some(expected), _, Ok(())) => patch::json_equal(&doc, expected) && doc == *expected,
            (None, Some(_), Err(_)) => true,
            (None, None, Ok(())) => true,
            _ => false,
        };
        if ok {
            passed += 1;
        } else {
            failures.push(format!("{file}[{i}] {name}: got {result:?} / {doc}"));
        }
    }
    (passed, disabled, failures)
}

#[test]
fn rfc6902_conformance_suite() {
    let mut total_passed = 0;
    let mut all_failures = Vec::new();
    for file in ["tests.json", "spec_tests.json"] {
        let (passed, disabled, failures) = run_suite(file);
        println!(
            "json-patch-tests {file}: {passed} passed, {} failed, {disabled} skipped (disabled by the suite)",
            failures.len()
        );
        total_passed += passed;
        all_failures.extend(failures);
    }
    assert!(all_failures.is_empty(), "failures:\n{}", all_failures.join("\n"));
    assert_eq!(total_passed, 108, "every enabled case ran");
}

async fn new_patient(app: &TestApp) -> String {
    let body = json(app.post("Patient", &patient("Patch")).await).await;
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn patch_operations_on_a_real_resource() {
    let app = spawn_app().await;
    let id = new_patient(&app).await;
    let path = format!("Patient/{id}");
    // Parsed from text: the `json!` macro would turn 70.50 into the f64 70.5.
    let ops: Value = serde_json::from_str(
        &json!([
            { "op": "test", "path": "/name/0/family", "value": "Patch" },
            { "op": "replace", "path": "/name/0/family", "value": "Patched" },
            { "op": "add", "path": "/name/0/given/-", "value": "Second" },
            { "op": "add", "path": "/telecom", "value": [{ "system": "phone", "value": "555" }] },
            { "op": "copy", "from": "/name/0", "path": "/name/1" },
            { "op": "move", "from": "/name/1/family", "path": "/name/1/text" },
            { "op": "remove", "path": "/birthDate" },
            { "op": "add", "path": "/extension", "value": [{ "url": "http://x.org/w", "valueDecimal": "DECIMAL" }] }
        ])
        .to_string()
        .replace("\"DECIMAL\"", "70.50"),
    )
    .unwrap();
    let r = app.patch(&path, &ops).await;
    assert_eq!(r.status(), 200);
    assert_eq!(etag(&r), "W/\"2\"");
    let body = json(app.get(&path).await).await;
    assert_eq!(body["name"][0]["family"], "Patched");
    assert_eq!(body["name"][0]["given"], json!(["Ada", "Second"]));
    assert_eq!(body["name"][1]["text"], "Patched");
    assert!(body.get("birthDate").is_none());
    assert_eq!(body["extension"][0]["valueDecimal"].to_string(), "70.50", "decimal precision survives");
    assert_eq!(body["meta"]["versionId"], "2");
}

#[tokio::test]
async fn a_failing_or_invalidating_patch_stores_nothing() {
    let app = spawn_app().await;
    let id = new_patient(&app).await;
    let path = format!("Patient/{id}");
    // `test` fails: 422, atomic.
    let issue = assert_outcome(
        app.patch(
            &path,
            &json!([
                { "op": "replace", "path": "/gender", "value": "male" },
                { "op": "test", "path": "/name/0/family", "value": "Nope" }
            ]),
        )
        .await,
        422,
    )
    .await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("operation 1"), "{issue}");
    // The result is not a valid Patient: 422 naming the element.
    let issue =
        assert_outcome(app.patch(&path, &json!([{ "op": "add", "path": "/colour", "value": "blue" }])).await, 422)
            .await;
    assert_eq!(issue["expression"][0], "Patient.colour");
    let issue = assert_outcome(
        app.patch(&path, &json!([{ "op": "replace", "path": "/gender", "value": "banana" }])).await,
        422,
    )
    .await;
    assert_eq!(issue["expression"][0], "Patient.gender");
    assert_outcome(app.patch(&path, &json!([{ "op": "remove", "path": "/id" }])).await, 422).await;
    // A Group patch removing a required element.
    let group = json(app.post("Group", &json!({"resourceType":"Group","type":"person","actual":true})).await).await;
    let gpath = format!("Group/{}", group["id"].as_str().unwrap());
    let issue = assert_outcome(app.patch(&gpath, &json!([{ "op": "remove", "path": "/actual" }])).await, 422).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("actual"));
    // Malformed patch documents: 400.
    assert_outcome(app.patch(&path, &json!({ "op": "add" })).await, 400).await;
    assert_outcome(app.patch(&path, &json!([{ "op": "jump", "path": "/a" }])).await, 400).await;
    assert_outcome(app.patch(&path, &json!([{ "op": "add", "path": "a", "value": 1 }])).await, 400).await;

    let current = app.get(&path).await;
    assert_eq!(etag(&current), "W/\"1\"", "no failed patch wrote a version");
    assert_eq!(json(current).await["gender"], "female");
}

#[tokio::test]
async fn patch_honours_if_match() {
    let app = spawn_app().await;
    let id = new_patient(&app).await;
    let path = format!("Patient/{id}");
    let ops = json!([{ "op": "replace", "path": "/gender", "value": "other" }]);
    assert_outcome(app.patch_if_match(&path, &ops, "W/\"9\"").await, 412).await;
    assert_eq!(app.patch_if_match(&path, &ops, "W/\"1\"").await.status(), 200);
}

#[tokio::test]
async fn concurrent_patches_without_if_match_all_apply() {
    let app = spawn_app().await;
    let id = new_patient(&app).await;
    let patches =
        (0..10).map(|i| json!([{ "op": "add", "path": "/name/0/given/-", "value": format!("G{i}") }])).collect();
    assert_eq!(app.concurrent_patches(&format!("Patient/{id}"), patches).await, vec![200; 10]);
    let body = json(app.get(&format!("Patient/{id}")).await).await;
    assert_eq!(body["name"][0]["given"].as_array().unwrap().len(), 11, "no patch was lost: {body}");
    assert_eq!(body["meta"]["versionId"], "11");
}
