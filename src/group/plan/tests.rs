//! The planner over committed members in memory: given the group's members (and pending
//! batches), when a patch's member operations are applied, then these events.
use super::*;
use crate::group::source::memory::Memory;
use crate::group::split::split;
use crate::model::patching::Patch;
use serde_json::json;

fn row(reference: &str, position: u64) -> MemberRow {
    MemberRow {
        member_reference: reference.into(),
        position,
        active: true,
        member_json: json!({ "entity": { "reference": reference } }).to_string(),
    }
}

/// Group `g` with members a, b, c (positions 10, 20, 30) committed.
fn abc() -> Memory {
    let rows = vec![row("Patient/a", 10), row("Patient/b", 20), row("Patient/c", 30)];
    Memory { groups: [("g".to_string(), rows)].into() }
}

fn origin() -> Origin {
    Origin {
        group_id: "g".into(),
        version: 2,
        actor: String::new(),
        request_id: String::new(),
        source: "patch",
        event_time: 0,
    }
}

/// Plans `patch` (JSON Patch) over `source` with `pending` batches; the events as
/// (type, reference) and the count after, or the error.
async fn plan(
    source: &Memory,
    pending: Vec<crate::store::OutboxBatch>,
    patch: serde_json::Value,
) -> Result<(Vec<(EventType, String)>, Option<u64>), FhirError> {
    let ops = crate::model::patch::parse(&patch).expect("a JSON Patch");
    let member = split(Patch::Json(ops)).expect("splits").member;
    let known = Known { index: None, pending };
    let mut planner = Planner::new(source, origin(), MemberCount::Unrecorded, known).await?;
    planner.prefetch_ops(&member).await?;
    for (index, op) in &member {
        planner.apply_member(*index, op).await?;
    }
    let planned = planner.finish()?;
    let events = planned.changes().map(|(t, r)| (t, r.to_string())).collect();
    Ok((events, planned.count))
}

fn add(reference: &str) -> serde_json::Value {
    json!({ "op": "add", "path": "/member/-", "value": { "entity": { "reference": reference } } })
}

#[tokio::test]
async fn remove_by_index_counts_in_the_list_as_earlier_operations_left_it() {
    let patch = json!([{ "op": "remove", "path": "/member/0" }, { "op": "remove", "path": "/member/0" }]);
    let (events, count) = plan(&abc(), vec![], patch).await.unwrap();
    let removed = [(EventType::Removed, "Patient/a".to_string()), (EventType::Removed, "Patient/b".to_string())];
    assert_eq!(events, removed);
    assert_eq!(count, Some(1));
}

#[tokio::test]
async fn members_added_by_the_patch_follow_the_committed_ones() {
    // a, b, c, then d and e: index 3 is d, which this patch added.
    let patch = json!([add("Patient/d"), add("Patient/e"), { "op": "remove", "path": "/member/3" }]);
    let (events, count) = plan(&abc(), vec![], patch).await.unwrap();
    assert_eq!(
        events,
        [
            (EventType::Added, "Patient/d".to_string()),
            (EventType::Added, "Patient/e".to_string()),
            (EventType::Removed, "Patient/d".to_string()),
        ]
    );
    assert_eq!(count, Some(4), "a, b, c and e");
}

#[tokio::test]
async fn re_adding_an_active_member_plans_nothing_and_removing_a_stranger_is_refused() {
    let (events, count) = plan(&abc(), vec![], json!([add("Patient/b")])).await.unwrap();
    assert!(events.is_empty());
    assert_eq!(count, Some(3));
    let stranger = json!([{ "op": "remove", "path": "/member", "value": { "entity": { "reference": "Patient/z" } } }]);
    let e = plan(&abc(), vec![], stranger).await.unwrap_err();
    assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e.diagnostics.contains("operation 0") && e.diagnostics.contains("Patient/z"), "{}", e.diagnostics);
}

#[tokio::test]
async fn test_ops_compare_with_the_member_at_that_index() {
    let holds = json!([{ "op": "test", "path": "/member/1", "value": { "entity": { "reference": "Patient/b" } } }]);
    assert!(plan(&abc(), vec![], holds).await.unwrap().0.is_empty());
    let fails = json!([add("Patient/d"), { "op": "test", "path": "/member/1", "value": { "entity": { "reference": "Patient/c" } } }]);
    let e = plan(&abc(), vec![], fails).await.unwrap_err();
    assert!(e.diagnostics.contains("operation 1") && e.diagnostics.contains("test failed"), "{}", e.diagnostics);
    let past = json!([{ "op": "remove", "path": "/member/3" }]);
    let e = plan(&abc(), vec![], past).await.unwrap_err();
    assert!(e.diagnostics.contains("out of bounds"), "{}", e.diagnostics);
}

#[tokio::test]
async fn keyed_operations_see_batches_still_pending() {
    // Committed in MongoDB, not yet in ClickHouse: x added, a removed.
    let pending = vec![crate::group::outbox::tests::batch(
        r#"[[1,40,"{\"entity\":{\"reference\":\"Patient/x\"}}"],[2,10,"Patient/a"]]"#,
    )];
    let patch = json!([
        { "op": "remove", "path": "/member", "value": { "entity": { "reference": "Patient/x" } } },
        add("Patient/a"),
    ]);
    let (events, _) = plan(&abc(), pending.clone(), patch).await.unwrap();
    assert_eq!(
        events,
        [(EventType::Removed, "Patient/x".to_string()), (EventType::Added, "Patient/a".to_string())],
        "x is active and a is not, as the pending batch says"
    );
    // Positional operations need the views complete: the caller finishes pending first.
    let positional = json!([{ "op": "remove", "path": "/member/0" }]);
    assert!(plan(&abc(), pending, positional).await.is_err());
}

#[tokio::test]
async fn a_group_without_member_events_starts_from_nobody() {
    let empty = Memory::default();
    let (events, count) = plan(&empty, vec![], json!([add("Patient/a")])).await.unwrap();
    assert_eq!(events, [(EventType::Added, "Patient/a".to_string())]);
    assert_eq!(count, Some(1));
    let e = plan(&empty, vec![], json!([{ "op": "remove", "path": "/member/0" }])).await.unwrap_err();
    assert!(e.diagnostics.contains("out of bounds"), "{}", e.diagnostics);
}
