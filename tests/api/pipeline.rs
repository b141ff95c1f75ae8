//! The write path called directly with several resources (what transactions will use):
//! each write is its own, with its own outcome and its own request context.

use roster::pipeline::{Change, Flag, RequestContext, SaveRequest};
use serde_json::json;

use crate::helpers::{recording_hooks, spawn_with, test_settings};

#[tokio::test]
async fn several_resources_in_one_call_each_with_its_outcome_and_context() {
    let (hooks, seen) = recording_hooks();
    let app = spawn_with(test_settings(), hooks).await;
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true});
    assert_eq!(app.put("Group/g1", &group).await.status(), 201);
    let patch = roster::model::patching::Patch::Json(
        roster::model::patch::parse(
            &json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/p1"}}}]),
        )
        .unwrap(),
    );
    let requests = vec![
        SaveRequest {
            resource_type: "Patient",
            id: "p1",
            change: Change::Update(json!({"resourceType": "Patient", "id": "p1", "active": true})),
            if_match: None,
            detached: None,
        },
        SaveRequest { resource_type: "Group", id: "g1", change: Change::Patch(patch), if_match: None, detached: None },
        SaveRequest { resource_type: "Patient", id: "nobody", change: Change::Delete, if_match: None, detached: None },
        SaveRequest {
            resource_type: "Patient",
            id: "p1",
            change: Change::Update(json!({"resourceType": "Patient", "id": "p1", "active": false})),
            if_match: Some(1),
            detached: None,
        },
    ];
    let ctx = RequestContext::new("req-many", Some("tester".into()));
    let outcomes = app.state.writer.save_all(&ctx, requests).await;
    assert_eq!(outcomes.len(), 4);
    let created = outcomes[0].as_ref().expect("the PUT creates");
    assert!(created.created && created.changed);
    assert_eq!(created.version.version, 1);
    let patched = outcomes[1].as_ref().expect("the member PATCH commits");
    assert_eq!(patched.version.version, 2);
    assert_eq!(patched.version.member_count.active(), Some(1));
    let missing = outcomes[2].as_ref().expect_err("deleting what never existed is an error");
    assert_eq!(missing.status.as_u16(), 404);
    let updated = outcomes[3].as_ref().expect("the second write sees the first (If-Match 1)");
    assert_eq!(updated.version.version, 2);
    assert!(!ctx.has(Flag::MemberEventsWritten), "the caller's context is not changed by a write");

    // Each committed write ran the hooks once, with its own flags.
    let seen = seen.seen.lock().unwrap().clone();
    let flags: Vec<(String, i64, bool)> = seen
        .iter()
        .filter(|s| s.request_id == "req-many")
        .map(|s| (s.id.clone(), s.version, s.member_events_written))
        .collect();
    assert_eq!(flags, [("p1".into(), 1, false), ("g1".into(), 2, true), ("p1".into(), 2, false)]);

    // And they are what a reader sees.
    let p1 = crate::helpers::json(app.get("Patient/p1").await).await;
    assert_eq!(p1["active"], false);
    let g1 = crate::helpers::json(app.get("Group/g1").await).await;
    assert_eq!(g1["member"][0]["entity"]["reference"], "Patient/p1");
}

#[tokio::test]
async fn one_resource_twice_in_a_call_is_written_twice_in_order() {
    let app = crate::helpers::spawn_app().await;
    let put = |active: bool| SaveRequest {
        resource_type: "Patient",
        id: "twice",
        change: Change::Update(json!({"resourceType": "Patient", "id": "twice", "active": active})),
        if_match: None,
        detached: None,
    };
    let ctx = RequestContext::new("req-twice", None);
    // The same key is queued once: a second lock on it would wait forever.
    let outcomes = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        app.state.writer.save_all(&ctx, vec![put(true), put(false)]),
    )
    .await
    .expect("no deadlock on a key named twice");
    let versions: Vec<i64> = outcomes.iter().map(|o| o.as_ref().unwrap().version.version).collect();
    assert_eq!(versions, [1, 2]);
}
