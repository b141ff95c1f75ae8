use serde_json::json;

use crate::helpers::*;
use roster::pipeline::Interaction;

#[tokio::test]
async fn post_save_hooks_see_every_write_with_its_request_context() {
    let (hooks, recorder) = recording_hooks();
    let app = spawn_with(test_settings(), hooks).await;

    let created = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("x-actor", "nurse-7")
        .header("x-request-id", "req-create-1")
        .body(patient("Hook").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.headers()["x-request-id"], "req-create-1", "the request id is echoed");
    let mut body = json(created).await;
    let id = body["id"].as_str().unwrap().to_string();
    body["active"] = json!(true);
    let updated = app.put(&format!("Patient/{id}"), &body).await;
    let generated = updated.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a request id is generated when absent");
    app.patch(&format!("Patient/{id}"), &json!([{ "op": "replace", "path": "/gender", "value": "other" }])).await;
    app.delete(&format!("Patient/{id}")).await;
    // Failed writes run no hook.
    app.post("Patient", &json!({"resourceType":"Patient","bad":1})).await;
    app.get(&format!("Patient/{id}/_history")).await;

    let seen = recorder.seen.lock().unwrap().clone();
    let kinds: Vec<Interaction> = seen.iter().map(|s| s.interaction).collect();
    assert_eq!(kinds, [Interaction::Create, Interaction::Update, Interaction::Patch, Interaction::Delete]);
    assert_eq!(seen.iter().map(|s| s.version).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(seen.iter().all(|s| s.id == id && s.resource_type == "Patient"));
    assert_eq!(seen[0].request_id, "req-create-1");
    assert_eq!(seen[0].actor.as_deref(), Some("nurse-7"));
    assert_eq!(seen[1].request_id, generated);
    assert_eq!(seen[1].actor, None);
    assert!(seen[..3].iter().all(|s| s.had_resource) && !seen[3].had_resource);
}

#[test]
fn context_flags_are_set_and_read() {
    use roster::pipeline::{Flag, RequestContext};
    let mut ctx = RequestContext::new("r1", None);
    assert!(!ctx.has(Flag::MemberEventsWritten));
    ctx.set(Flag::MemberEventsWritten);
    assert!(ctx.has(Flag::MemberEventsWritten));
}
