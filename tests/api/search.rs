use std::collections::HashSet;

use serde_json::{json, Value};

use crate::helpers::*;

async fn put_patient(app: &TestApp, id: &str) -> Value {
    let mut p = patient(id);
    p["id"] = json!(id);
    let r = app.put(&format!("Patient/{id}"), &p).await;
    assert_eq!(r.status(), 201);
    json(r).await
}

fn ids(bundle: &Value) -> Vec<String> {
    match_ids(bundle)
}

fn next(bundle: &Value) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == "next").map(|l| l["url"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn search_by_id_and_count() {
    let app = spawn_app().await;
    for id in ["a1", "a2", "a3"] {
        put_patient(&app, id).await;
    }
    let b = json(app.get("Patient?_id=a1,a3").await).await;
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 2);
    assert_eq!(ids(&b), ["a1", "a3"]);
    assert_eq!(b["entry"][0]["fullUrl"], app.url("Patient/a1"));
    let b = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(b["total"], 3);
    assert!(b.get("entry").is_none());
    app.delete("Patient/a2").await;
    let b = json(app.get("Patient").await).await;
    assert_eq!(ids(&b), ["a1", "a3"], "deleted resources are not found");
}

#[tokio::test]
async fn last_updated_filters_and_sorts() {
    let app = spawn_app().await;
    let first = put_patient(&app, "early").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let second = put_patient(&app, "late").await;
    let t1 = first["meta"]["lastUpdated"].as_str().unwrap();
    let t2 = second["meta"]["lastUpdated"].as_str().unwrap();
    let enc = |s: &str| s.replace('+', "%2B").replace(':', "%3A");
    let b = json(app.get(&format!("Patient?_lastUpdated=gt{}", enc(t1))).await).await;
    assert_eq!(ids(&b), ["late"]);
    let b = json(app.get(&format!("Patient?_lastUpdated=lt{}", enc(t2))).await).await;
    assert_eq!(ids(&b), ["early"]);
    let b = json(app.get(&format!("Patient?_lastUpdated=ge{}&_lastUpdated=le{}", enc(t1), enc(t2))).await).await;
    assert_eq!(ids(&b).len(), 2);
    let year = &t1[..4];
    let b = json(app.get(&format!("Patient?_lastUpdated={year}")).await).await;
    assert_eq!(b["total"], 2, "a year covers its whole range");
    let b = json(app.get("Patient?_lastUpdated=lt2000-01-01").await).await;
    assert_eq!(b["total"], 0);
    let b = json(app.get("Patient?_sort=-_lastUpdated").await).await;
    assert_eq!(ids(&b), ["late", "early"]);
    let b = json(app.get("Patient?_sort=_lastUpdated").await).await;
    assert_eq!(ids(&b), ["early", "late"]);
}

#[tokio::test]
async fn cursor_paging_is_stable_under_concurrent_inserts() {
    let app = spawn_app().await;
    for i in 0..25 {
        put_patient(&app, &format!("p{i:02}")).await;
    }
    for sort in ["_id", "_lastUpdated", "-_lastUpdated"] {
        let mut url = app.url(&format!("Patient?_count=7&_sort={sort}"));
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let b = json(app.client.get(&url).send().await.unwrap()).await;
            seen.extend(ids(&b));
            pages += 1;
            // Insert between pages: ids sorting before the cursor and after it.
            if pages == 1 {
                let tag = sort.trim_start_matches(['-', '_']).to_ascii_lowercase();
                put_patient(&app, &format!("a-{tag}-{}", sort.len())).await;
                put_patient(&app, &format!("z-{tag}-{}", sort.len())).await;
            }
            match next(&b) {
                Some(n) => url = n,
                None => break,
            }
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{sort}: no resource appears twice: {seen:?}");
        for i in 0..25 {
            assert!(seen.contains(&format!("p{i:02}")), "{sort}: p{i:02} not skipped");
        }
    }
}

#[tokio::test]
async fn unknown_parameters_are_reported_or_rejected() {
    let app = spawn_app().await;
    put_patient(&app, "u1").await;
    let b = json(app.get("Patient?nonsense=x").await).await;
    let outcome = b["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome").unwrap();
    assert!(outcome["resource"]["issue"][0]["diagnostics"].as_str().unwrap().contains("nonsense"));
    assert_eq!(ids(&b), ["u1"], "an ignored parameter does not narrow the search");
    let r = app.client.get(app.url("Patient?nonsense=x")).header("prefer", "handling=strict").send().await.unwrap();
    let issue = assert_outcome(r, 400).await;
    assert!(issue["diagnostics"].as_str().unwrap().contains("nonsense"));
    assert_outcome(app.get("Patient?_cursor=garbage").await, 400).await;
    assert_outcome(app.get("Patient?_sort=nonsense").await, 400).await;
    assert_outcome(app.get("Patient?_sort=address-use:missing").await, 400).await;
    assert_outcome(app.get("Patient?family:below=x").await, 400).await;
}

#[tokio::test]
async fn type_history_pages_newest_first() {
    let app = spawn_app().await;
    for i in 0..5 {
        put_patient(&app, &format!("h{i}")).await;
    }
    let b = json(app.get("Patient/_history?_count=2").await).await;
    assert_eq!(b["type"], "history");
    assert_eq!(b["total"], 5);
    let mut url = next(&b).expect("next page");
    let mut fulls: Vec<String> =
        b["entry"].as_array().unwrap().iter().map(|e| e["fullUrl"].as_str().unwrap().to_string()).collect();
    loop {
        let page = json(app.client.get(&url).send().await.unwrap()).await;
        fulls.extend(page["entry"].as_array().unwrap().iter().map(|e| e["fullUrl"].as_str().unwrap().to_string()));
        match next(&page) {
            Some(n) => url = n,
            None => break,
        }
    }
    let expected: Vec<String> = (0..5).rev().map(|i| app.url(&format!("Patient/h{i}"))).collect();
    assert_eq!(fulls, expected);
    let since = json(app.get("Patient/_history?_since=2999-01-01T00:00:00Z").await).await;
    assert_eq!(since["total"], 0);
    assert_outcome(app.get("Patient/_history?_since=tomorrow").await, 400).await;
}
