//! Concurrent writes that MongoDB receives gathered into one command (see
//! `store::mongo::coalesce`): each write keeps its own outcome, from one process and from
//! two racing on the same resources.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::helpers::*;

/// The version a write response names in its ETag (`W/"3"` → 3).
fn version_of(r: &reqwest::Response) -> i64 {
    etag(r).trim_start_matches("W/\"").trim_end_matches('"').parse().expect("numeric version")
}

fn patient_with(id: &str, marker: &str) -> Value {
    let mut p = patient(marker);
    p["id"] = json!(id);
    p
}

/// Two processes, sixteen writers, eight Patients: every PUT (with and without If-Match)
/// that was acknowledged got its own version, the versions of a resource run 1..=n without
/// a gap, history holds each exactly once with what its writer wrote, and the If-Match
/// losers (412) left nothing behind.
#[tokio::test]
async fn racing_puts_from_two_processes_each_get_their_own_version() {
    let settings = test_settings();
    let a = spawn_with(settings.clone(), Default::default()).await;
    let b = spawn_with(settings, Default::default()).await;
    const RESOURCES: usize = 8;
    const PER_WRITER: usize = 12;
    for r in 0..RESOURCES {
        let id = format!("race{r}");
        assert_eq!(a.put(&format!("Patient/{id}"), &patient_with(&id, "initial")).await.status(), 201);
    }
    let writers = (0..16).map(|w| {
        let app = if w % 2 == 0 { &a } else { &b };
        async move {
            // (resource, version acknowledged, family written)
            let mut acknowledged: Vec<(usize, i64, String)> = Vec::new();
            for i in 0..PER_WRITER {
                let r = (w + i) % RESOURCES;
                let id = format!("race{r}");
                let family = format!("w{w}-{i}");
                let path = format!("Patient/{id}");
                let response = if i % 3 == 0 {
                    // Conditional on the version just read: may lose to another writer.
                    let current = app.get(&path).await;
                    let tag = etag(&current);
                    app.put_if_match(&path, &patient_with(&id, &family), &tag).await
                } else {
                    app.put(&path, &patient_with(&id, &family)).await
                };
                match response.status().as_u16() {
                    200 => acknowledged.push((r, version_of(&response), family)),
                    412 if i % 3 == 0 => {}
                    other => panic!("writer {w}: PUT {i} answered {other}: {}", response.text().await.unwrap()),
                }
            }
            acknowledged
        }
    });
    let results = futures_util::future::join_all(writers).await;
    let mut by_resource: BTreeMap<usize, HashMap<i64, String>> = BTreeMap::new();
    for (r, version, family) in results.into_iter().flatten() {
        let versions = by_resource.entry(r).or_default();
        assert!(versions.insert(version, family.clone()).is_none(), "race{r}: version {version} acknowledged twice");
    }
    for r in 0..RESOURCES {
        let id = format!("race{r}");
        let acked = by_resource.remove(&r).unwrap_or_default();
        let current = json(a.get(&format!("Patient/{id}")).await).await;
        let last: i64 = current["meta"]["versionId"].as_str().unwrap().parse().unwrap();
        assert_eq!(last as usize, acked.len() + 1, "race{r}: every version but the first is an acknowledged PUT");
        let history = json(b.get(&format!("Patient/{id}/_history?_count=500")).await).await;
        let mut seen: Vec<i64> = history["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let resource = &e["resource"];
                let v: i64 = resource["meta"]["versionId"].as_str().unwrap().parse().unwrap();
                let family = resource["name"][0]["family"].as_str().unwrap();
                match acked.get(&v) {
                    Some(written) => assert_eq!(family, written, "race{r} version {v} holds its writer's content"),
                    None => assert_eq!((v, family), (1, "initial"), "race{r}: unacknowledged version {v} in history"),
                }
                v
            })
            .collect();
        seen.sort();
        assert_eq!(seen, (1..=last).collect::<Vec<_>>(), "race{r}: history holds each version once");
    }
}

/// Thirty-two concurrent creates of one type: each answered 201 with its own id, all
/// readable; then sixteen PUTs creating one new id at once from two processes: one
/// creates it, the others (their insert a duplicate) update it in turn.
#[tokio::test]
async fn concurrent_creates_each_land_once() {
    let settings = test_settings();
    let app = spawn_with(settings.clone(), Default::default()).await;
    let other = spawn_with(settings, Default::default()).await;
    let creates = (0..32).map(|i| {
        let app = &app;
        async move {
            let response = app.post("Patient", &patient(&format!("c{i}"))).await;
            assert_eq!(response.status(), 201);
            let body = json(response).await;
            (body["id"].as_str().unwrap().to_string(), format!("c{i}"))
        }
    });
    let created = futures_util::future::join_all(creates).await;
    let ids: std::collections::HashSet<&String> = created.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 32, "each create got its own id");
    for (id, family) in &created {
        let body = json(app.get(&format!("Patient/{id}")).await).await;
        assert_eq!(body["name"][0]["family"], family.as_str());
        assert_eq!(body["meta"]["versionId"], "1");
    }
    let puts = (0..16).map(|i| {
        let app = if i % 2 == 0 { &app } else { &other };
        async move {
            let response = app.put("Patient/same", &patient_with("same", &format!("p{i}"))).await;
            (response.status().as_u16(), version_of(&response))
        }
    });
    let mut outcomes = futures_util::future::join_all(puts).await;
    outcomes.sort_by_key(|(_, v)| *v);
    assert_eq!(outcomes.iter().filter(|(s, _)| *s == 201).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().map(|(_, v)| *v).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
}
