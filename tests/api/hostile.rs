//! Hostile input: regression tests for requests built to break the server. Each sends one
//! bad or edge input over HTTP and asserts the precise answer: dates at the end of the
//! representable range (which used to panic on search, history and write paths), numbers
//! past the range of positions, cursors and FHIR integer types, malformed ETags and header
//! bytes, member PATCHes that fail or change nothing, undecodable paths and queries (answered
//! in the error format of their route: an OperationOutcome under `/4_0_0`, `{"error","field"}`
//! under `/events`), GraphQL syntax errors and fragment bombs, stalled (slowloris)
//! connections, and huge invalid bodies. Where the finding was a panic, the test also checks
//! that the server still answers the next request.

use std::time::Duration;

use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::helpers::*;

/// How long a request may take before the test calls it a hang (a guard, not a benchmark).
const HANG_GUARD: Duration = Duration::from_secs(5);

/// `9999-12-31T23:59:59` one hour west of UTC: past the last instant the stores can hold.
const FAR_FUTURE: &str = "9999-12-31T23:59:59-01:00";

// ---- shared helpers ----

/// The server still answers after whatever the test sent.
async fn still_serving(app: &TestApp) {
    assert_eq!(app.get("metadata").await.status(), 200, "the server still answers");
}

/// Asserts `response` is an OperationOutcome whose status satisfies `ok`; returns its first issue.
async fn outcome_where(response: reqwest::Response, ok: fn(u16) -> bool) -> Value {
    let status = response.status().as_u16();
    if !ok(status) {
        panic!("unexpected status {status}: {}", response.text().await.unwrap_or_default());
    }
    assert_outcome(response, status).await
}

/// Both the diagnostics and the expression of an issue, for "mentions" checks.
fn issue_text(issue: &Value) -> String {
    format!("{} {}", issue["diagnostics"], issue["expression"])
}

/// Asserts `response` is a 200 Bundle of `kind`.
async fn bundle(response: reqwest::Response, kind: &str) -> Value {
    let status = response.status().as_u16();
    let body = json(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["resourceType"].as_str(), body["type"].as_str()), (Some("Bundle"), Some(kind)), "{body}");
    body
}

/// Asserts `status`; returns the body as JSON (`Null` when there is none).
async fn assert_status(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// [`patient`] with `id`, for a PUT.
fn patient_with_id(id: &str, family: &str) -> Value {
    let mut body = patient(family);
    body["id"] = json!(id);
    body
}

fn member(reference: &str) -> Value {
    json!({ "entity": { "reference": reference } })
}

fn add_member(value: Value) -> Value {
    json!([{ "op": "add", "path": "/member/-", "value": value }])
}

/// A Group named "n" with `members`, created by PUT at `Group/{id}` (version 1).
async fn put_group(app: &TestApp, id: &str, members: &[&str]) -> String {
    let members: Vec<Value> = members.iter().map(|m| member(m)).collect();
    let body = json!({ "resourceType": "Group", "id": id, "type": "person", "actual": true, "name": "n",
                       "member": members });
    let path = format!("Group/{id}");
    assert_status(app.put(&path, &body).await, 201).await;
    path
}

/// The resource at `path` is still at version 1 with exactly `members`.
async fn assert_group_unchanged(app: &TestApp, path: &str, members: &[&str]) {
    let body = json(app.get(path).await).await;
    assert_eq!(body["meta"]["versionId"], "1", "nothing was written: {body}");
    let expected: Vec<Value> = members.iter().map(|m| member(m)).collect();
    assert_eq!(body["member"], Value::Array(expected), "{body}");
}

/// Asserts a 200 answered with version 1 (ETag and body): a write that wrote nothing.
async fn assert_still_version_1(response: reqwest::Response) {
    let tag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = assert_status(response, 200).await;
    assert_eq!(tag.as_deref(), Some("W/\"1\""), "{body}");
    assert_eq!(body["meta"]["versionId"], "1", "{body}");
}

/// The instance history at `path` holds exactly one version.
async fn assert_one_version(app: &TestApp, path: &str) {
    let history = bundle(app.get(&format!("{path}/_history")).await, "history").await;
    assert_eq!(history["total"], 1, "{history}");
    assert_eq!(history["entry"].as_array().map(Vec::len), Some(1), "{history}");
}

/// A raw FHIR JSON body POSTed to `path` (for bodies too big to build as a `Value`).
async fn post_text(app: &TestApp, path: &str, body: String) -> reqwest::Response {
    app.client.post(app.url(path)).header("content-type", FHIR_JSON).body(body).send().await.unwrap()
}

// ---- /events helpers ----

/// `path_and_query` below the server root, e.g. `/events/s1?from=1`.
async fn events_get(app: &TestApp, path_and_query: &str) -> reqwest::Response {
    app.client.get(format!("{}{path_and_query}", app.address)).send().await.unwrap()
}

/// Appends one event to the raw (already percent-encoded) stream path segment.
async fn append(app: &TestApp, stream: &str, expected: Option<&str>) -> reqwest::Response {
    let mut r = app
        .client
        .post(format!("{}/events/{stream}", app.address))
        .header("content-type", "application/json")
        .body(json!([{ "eventType": "t", "data": {} }]).to_string());
    if let Some(e) = expected {
        r = r.header("ES-Expected-Version", e);
    }
    r.send().await.unwrap()
}

async fn subscribe_from(app: &TestApp, last_event_id: HeaderValue) -> reqwest::Response {
    let url = format!("{}/events/subscribe", app.address);
    app.client.get(url).header("last-event-id", last_event_id).send().await.unwrap()
}

/// Asserts an event store 400 (`application/json`, `{"error": "...", "field"?}`); returns
/// the body.
async fn events_error(response: reqwest::Response) -> Value {
    let status = response.status().as_u16();
    let ct = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 400, "{text}");
    assert!(ct.starts_with("application/json"), "content-type {ct}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    body
}

async fn events_error_on(response: reqwest::Response, field: &str) {
    let body = events_error(response).await;
    assert_eq!(body["field"], field, "{body}");
}

// ---- GraphQL helpers ----

async fn graphql(app: &TestApp, body: String) -> reqwest::Response {
    let request = app
        .client
        .post(format!("{}/graphql", app.address))
        .header("content-type", "application/json")
        .body(body)
        .send();
    tokio::time::timeout(HANG_GUARD, request).await.expect("answered within 5 s (hang guard)").unwrap()
}

fn query(text: &str) -> String {
    json!({ "query": text }).to_string()
}

/// Asserts a GraphQL error answer with a status `ok` accepts; returns its `errors`.
async fn graphql_errors(response: reqwest::Response, ok: fn(u16) -> bool) -> Vec<Value> {
    let status = response.status().as_u16();
    let body = json(response).await;
    assert!(ok(status), "status {status}: {body}");
    let errors = body["errors"].as_array().cloned().unwrap_or_default();
    assert!(!errors.is_empty(), "{body}");
    errors
}

// ---- raw TCP helpers ----

async fn connect(app: &TestApp) -> TcpStream {
    let host_port = app.address.strip_prefix("http://").expect("http address");
    TcpStream::connect(host_port).await.expect("connect")
}

async fn write_raw(stream: &TcpStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        stream.writable().await.unwrap();
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Reads what the server sends until it closes the connection (EOF or reset) or
/// [`HANG_GUARD`] passes; returns the bytes and whether it closed.
async fn read_until_closed(stream: &TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return, // reset: closed too
            }
        }
    };
    let closed = tokio::time::timeout(HANG_GUARD, reading).await.is_ok();
    (got, closed)
}

/// POSTs `body` to `path` over a raw connection, writing all of it before reading, as
/// urllib and many clients do; asserts the server took all of it (a client that gets a
/// broken pipe while sending reports that, not the answer); returns what the server sent.
async fn send_whole(app: &TestApp, path: &str, content_type: &str, body: &str) -> String {
    let stream = connect(app).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut rest = [head.as_bytes(), body.as_bytes()].concat();
    let mut remaining = rest.as_mut_slice();
    while !remaining.is_empty() {
        if stream.writable().await.is_err() {
            break;
        }
        match stream.try_write(remaining) {
            Ok(n) => remaining = &mut remaining[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the server stopped reading the body: {e}"),
        }
    }
    let (got, _) = read_until_closed(&stream).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// POSTs the start of a 100-byte body to `path` and stops; returns what the server sent.
async fn stalled_body(app: &TestApp, path: &str, content_type: &str, start: &str) -> String {
    let stream = connect(app).await;
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 100\r\n\r\n");
    write_raw(&stream, format!("{head}{start}").as_bytes()).await;
    let (got, _) = read_until_closed(&stream).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn assert_4xx_if_any(got: &[u8]) {
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 4"), "answer: {}", String::from_utf8_lossy(got));
}

// ---- the tests ----

#[tokio::test]
async fn far_future_last_updated_searches_and_conditions_answer_instead_of_panicking() {
    let app = spawn_app().await;
    for value in ["9999-12-31", "9999-12-31T23:59:59Z", "ge9999-12-31T23:00:00-05:00"] {
        let r = app.client.get(app.url("Patient")).query(&[("_lastUpdated", value)]).send().await.unwrap();
        bundle(r, "searchset").await;
        still_serving(&app).await;
    }
    let r = app.client.get(app.url("Patient/_history")).query(&[("_since", FAR_FUTURE)]).send().await.unwrap();
    bundle(r, "history").await;
    still_serving(&app).await;
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", "_lastUpdated=9999-12-31")
        .body(patient("Future").to_string())
        .send()
        .await
        .unwrap();
    assert_status(r, 201).await;
    still_serving(&app).await;
}

#[tokio::test]
async fn far_future_date_times_are_stored_and_read_back_as_written() {
    let app = spawn_app().await;
    // PUT.
    let body = json!({ "resourceType": "Patient", "id": "p1", "deceasedDateTime": FAR_FUTURE });
    assert_status(app.put("Patient/p1", &body).await, 201).await;
    assert_eq!(json(app.get("Patient/p1").await).await["deceasedDateTime"], FAR_FUTURE);
    // JSON Patch.
    assert_status(app.put("Patient/p2", &patient_with_id("p2", "Later")).await, 201).await;
    let ops = json!([{ "op": "add", "path": "/deceasedDateTime", "value": FAR_FUTURE }]);
    assert_status(app.patch("Patient/p2", &ops).await, 200).await;
    assert_eq!(json(app.get("Patient/p2").await).await["deceasedDateTime"], FAR_FUTURE);
    still_serving(&app).await;
    // A Group member's period, by POST and by PATCH.
    let period = json!({ "start": FAR_FUTURE });
    let group = json!({ "resourceType": "Group", "type": "person", "actual": true,
                        "member": [{ "entity": { "reference": "Patient/a" }, "period": period.clone() }] });
    let created = assert_status(app.post("Group", &group).await, 201).await;
    let path = format!("Group/{}", created["id"].as_str().expect("the created Group's id"));
    let ops = add_member(json!({ "entity": { "reference": "Patient/b" }, "period": period }));
    assert_status(app.patch(&path, &ops).await, 200).await;
    let read = json(app.get(&path).await).await;
    let members: Vec<(&str, &str)> = read["member"]
        .as_array()
        .expect("members inline")
        .iter()
        .map(|m| (m["entity"]["reference"].as_str().unwrap(), m["period"]["start"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(members, [("Patient/a", FAR_FUTURE), ("Patient/b", FAR_FUTURE)], "{read}");
    still_serving(&app).await;
}

#[tokio::test]
async fn last_event_id_out_of_range_or_not_text_is_a_400() {
    let app = spawn_app().await;
    for bad in [
        HeaderValue::from_static("18446744073709551615"),
        HeaderValue::from_static("9223372036854775807"),
        HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
    ] {
        events_error_on(subscribe_from(&app, bad).await, "Last-Event-ID").await;
        still_serving(&app).await;
    }
    let r = subscribe_from(&app, HeaderValue::from_static("5")).await;
    assert_eq!(r.status(), 200);
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    drop(r);
}

#[tokio::test]
async fn out_of_range_paging_cursors_are_a_400() {
    let app = spawn_app().await;
    for path in [
        "Patient?_sort=_lastUpdated&_cursor=lu:9223372036854775807:x",
        "Patient?_sort=_lastUpdated&_cursor=lu:-9223372036854775808:x",
        "Patient/_history?_cursor=h:9223372036854775807:x",
    ] {
        assert_outcome(app.get(path).await, 400).await;
        still_serving(&app).await;
    }
}

#[tokio::test]
async fn integers_out_of_their_fhir_range_are_refused() {
    let app = spawn_app().await;
    let observation = |value: Value| json!({ "resourceType": "Observation", "status": "final", "code": { "text": "x" }, "valueInteger": value });
    let group =
        |quantity: i64| json!({ "resourceType": "Group", "type": "person", "actual": true, "quantity": quantity });
    let encounter = |rank: i64| {
        json!({ "resourceType": "Encounter", "status": "finished", "class": { "code": "AMB" },
                "diagnosis": [{ "condition": { "reference": "Condition/c" }, "rank": rank }] })
    };
    // (type, body, refused with an issue naming this element, or None: created)
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        ("Observation", observation(json!(2147483648i64)), Some("valueInteger")),
        ("Observation", observation(json!(-2147483649i64)), Some("valueInteger")),
        ("Observation", observation(json!(1.5)), Some("valueInteger")),
        ("Observation", observation(json!("1")), Some("valueInteger")),
        ("Observation", observation(json!(2147483647i64)), None),
        ("Group", group(-1), Some("quantity")),
        ("Group", group(0), None),
        ("Encounter", encounter(0), Some("rank")),
        ("Encounter", encounter(1), None),
    ];
    for (rt, body, refused) in cases {
        let r = app.post(rt, &body).await;
        match refused {
            Some(element) => {
                assert_eq!(r.status(), 400, "{body} must be refused");
                let issue = assert_outcome(r, 400).await;
                assert!(issue_text(&issue).contains(element), "{body}: {issue} should name {element}");
            }
            None => {
                assert_status(r, 201).await;
            }
        }
    }
}

#[tokio::test]
async fn malformed_if_match_is_a_400() {
    let app = spawn_app().await;
    let body = json!({ "resourceType": "Patient", "id": "im", "gender": "female" });
    assert_status(app.put("Patient/im", &body).await, 201).await;
    let ops = json!([{ "op": "replace", "path": "/gender", "value": "male" }]);
    // `"1` (an unbalanced quote) and a non-numeric weak ETag.
    for bad in ["\"1", "W/\"abc\""] {
        assert_outcome(app.put_if_match("Patient/im", &body, bad).await, 400).await;
    }
    assert_outcome(app.patch_if_match("Patient/im", &ops, "\"1").await, 400).await;
    assert_eq!(etag(&app.get("Patient/im").await), "W/\"1\"", "refused writes wrote nothing");
    assert_status(app.put_if_match("Patient/im", &body, "W/\"1\"").await, 200).await;
}

#[tokio::test]
async fn removing_a_non_member_by_reference_is_a_422_and_writes_nothing() {
    let app = spawn_app().await;
    let path = put_group(&app, "g7", &["Patient/a"]).await;
    let ops = json!([{ "op": "remove", "path": "/member", "value": member("Patient/nobody") }]);
    let issue = assert_outcome(app.patch(&path, &ops).await, 422).await;
    let d = issue["diagnostics"].as_str().unwrap();
    assert!(d.contains("Patient/nobody"), "'{d}' should name the reference");
    assert!(d.contains("operation 0"), "'{d}' should name the operation");
    assert_group_unchanged(&app, &path, &["Patient/a"]).await;
}

#[tokio::test]
async fn re_adding_an_active_member_with_a_bad_period_writes_nothing() {
    let app = spawn_app().await;
    let path = put_group(&app, "g8", &["Patient/a"]).await;
    let ops = add_member(json!({ "entity": { "reference": "Patient/a" }, "period": { "start": "nope" } }));
    outcome_where(app.patch(&path, &ops).await, |s| s == 400 || s == 422).await;
    assert_group_unchanged(&app, &path, &["Patient/a"]).await;
}

#[tokio::test]
async fn no_op_patches_return_the_current_version_without_writing() {
    let app = spawn_app().await;
    assert_status(app.put("Patient/p9", &patient_with_id("p9", "Same")).await, 201).await;
    assert_still_version_1(app.patch("Patient/p9", &json!([])).await).await;
    assert_one_version(&app, "Patient/p9").await;

    let path = put_group(&app, "g9", &["Patient/a"]).await;
    assert_still_version_1(app.patch(&path, &add_member(member("Patient/a"))).await).await;
    assert_one_version(&app, &path).await;
    assert_group_unchanged(&app, &path, &["Patient/a"]).await;
}

#[tokio::test]
async fn a_failing_test_op_after_a_member_op_names_its_own_index() {
    let app = spawn_app().await;
    let path = put_group(&app, "g10", &["Patient/a"]).await;
    let ops = json!([
        { "op": "add", "path": "/member/-", "value": member("Patient/b") },
        { "op": "test", "path": "/name", "value": "other" }
    ]);
    let issue = outcome_where(app.patch(&path, &ops).await, |s| s == 409 || s == 422).await;
    let d = issue["diagnostics"].as_str().unwrap();
    assert!(d.contains("operation 1"), "'{d}' should name operation 1, the test");
    assert_group_unchanged(&app, &path, &["Patient/a"]).await;
}

#[tokio::test]
async fn expected_versions_and_positions_past_the_stored_range_are_a_400() {
    let app = spawn_app().await;
    for expected in ["18446744073709551615", "9223372036854775808"] {
        events_error_on(append(&app, "s1", Some(expected)).await, "ES-Expected-Version").await;
    }
    events_error_on(events_get(&app, "/events/s1?from=18446744073709551616").await, "from").await;
    let version = json(events_get(&app, "/events/s1/version").await).await;
    assert_eq!(version["version"], -1, "nothing of a refused append is written");
}

#[tokio::test]
async fn undecodable_paths_and_queries_answer_in_the_route_error_format() {
    let app = spawn_app().await;
    let four_xx = |s: u16| (400..500).contains(&s);
    for url in [format!("{}/4_0_0/Patient/%FF%FE", app.address), format!("{}/4_0_0/%FF", app.address)] {
        outcome_where(app.client.get(&url).send().await.unwrap(), four_xx).await;
    }
    events_error(append(&app, "%FF%FE", None).await).await;
    events_error(events_get(&app, "/events?from=1&from=2").await).await;
    events_error_on(events_get(&app, "/events/s1?max=abc").await, "max").await;
    still_serving(&app).await;
}

#[tokio::test]
async fn graphql_errors_are_400s_and_fragment_bombs_are_refused_quickly() {
    let app = spawn_app().await;
    let bad_request = |s: u16| s == 400;
    graphql_errors(graphql(&app, query("{ nope ")).await, bad_request).await;
    graphql_errors(graphql(&app, query("{ noSuchField }")).await, bad_request).await;
    graphql_errors(graphql(&app, "not json".to_string()).await, bad_request).await;

    let r = graphql(&app, query("{ eventStatistics { total } }")).await;
    let status = r.status().as_u16();
    let body = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["eventStatistics"]["total"], 0, "{body}");

    // Each fragment selects a field and spreads the next twice: 2^31 - 1 fields once
    // expanded. Before the guard, validation doubled its work per level (55 ms at 16 levels).
    let mut bomb = String::from("query Q { ...F0 }\n");
    for i in 0..29 {
        let next = i + 1;
        bomb.push_str(&format!("fragment F{i} on Query {{ __typename ...F{next} ...F{next} }}\n"));
    }
    bomb.push_str("fragment F29 on Query { __typename }\n");
    let errors = graphql_errors(graphql(&app, query(&bomb)).await, bad_request).await;
    let message = errors[0]["message"].as_str().unwrap_or("").to_lowercase();
    assert!(message.contains("fragment"), "{message}");
    still_serving(&app).await;

    let huge = format!("{{{}__typename }}", " ".repeat(70_000));
    graphql_errors(graphql(&app, query(&huge)).await, |s| s == 400 || s == 413).await;
    // Far over the limit, sent whole before reading, as most clients do: the 413 arrives,
    // not a reset (the server drains what it will not read).
    let huger = query(&format!("{{{}__typename }}", "__typename ".repeat(200_000)));
    let answer = send_whole(&app, "/graphql", "application/json", &huger.to_string()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    still_serving(&app).await;
}

#[tokio::test]
async fn stalled_headers_and_bodies_are_cut_off() {
    let mut settings = test_settings();
    settings.http.header_timeout_ms = 500;
    settings.http.body_timeout_ms = 500;
    let app = spawn_with(settings, Default::default()).await;

    // Headers that never end: the server closes the connection.
    let stream = connect(&app).await;
    write_raw(&stream, b"GET /4_0_0/metadata HTTP/1.1\r\nHost: x\r\n").await;
    let (got, closed) = read_until_closed(&stream).await;
    assert!(closed, "the server closed a connection whose headers never ended");
    assert_4xx_if_any(&got);

    // A body that stops short of its Content-Length: a 408 in the route's error format.
    let answer = stalled_body(&app, "/4_0_0/Patient", "application/fhir+json", "{\"resourceType\"").await;
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("OperationOutcome"), "{answer}");
    let answer = stalled_body(&app, "/events/s1", "application/json", "[{\"eventType\"").await;
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("\"field\":\"body\""), "{answer}");
    still_serving(&app).await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let mut settings = test_settings();
    settings.http.max_connections = 1;
    let app = spawn_with(settings, Default::default()).await;
    // One idle connection takes the only slot (its header timeout is the default 30 s).
    let idle = connect(&app).await;
    let waiting = tokio::time::timeout(Duration::from_millis(500), app.get("metadata")).await;
    assert!(waiting.is_err(), "a second connection was served while the only slot was taken");
    drop(idle);
    let served = tokio::time::timeout(HANG_GUARD, app.get("metadata")).await.expect("served once the slot is free");
    assert_eq!(served.status(), 200);
}

#[tokio::test]
async fn huge_invalid_bodies_are_refused() {
    let app = spawn_app().await;
    let bad_or_too_large = |s: u16| s == 400 || s == 413;
    let numbers: Vec<String> = (1..=1_000_000).map(|i: u32| i.to_string()).collect();
    let body = format!("{{\"resourceType\":\"Patient\",\"name\":[{}]}}", numbers.join(","));
    outcome_where(post_text(&app, "Patient", body).await, bad_or_too_large).await;
    let names = "{\"family\":\"f\"},".repeat(200_000);
    let body = format!("{{\"resourceType\":\"Patient\",\"name\":[{names}{{\"family\":1}}]}}");
    outcome_where(post_text(&app, "Patient", body).await, bad_or_too_large).await;
    let count = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(count["total"], 0, "nothing was stored");
    still_serving(&app).await;

    // A body over the server's limit, sent whole: the 413 arrives (the rest is drained).
    let mut settings = test_settings();
    settings.body_limit_bytes = 1 << 20;
    let small = spawn_with(settings, Default::default()).await;
    let body = format!("{{\"resourceType\":\"Patient\",\"name\":[{}{{}}]}}", "{\"family\":\"f\"},".repeat(250_000));
    let answer = send_whole(&small, "/4_0_0/Patient", FHIR_JSON, &body).await;
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("1048576"), "{answer}");
    still_serving(&small).await;
}
