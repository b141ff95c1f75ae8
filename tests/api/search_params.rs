//! Search over the R4 search parameters, over HTTP on the real stores: each parameter
//! type, modifier and prefix, chains, `_has`, includes, sorts, read-your-writes across the
//! index flush, and a data-driven check over the HL7 R4 examples.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

fn ids(bundle: &Value) -> Vec<String> {
    let mut out = ordered(bundle);
    out.sort();
    out
}

/// The ids found, in the bundle's order.
fn ordered(bundle: &Value) -> Vec<String> {
    match_ids(bundle)
}

fn included(bundle: &Value) -> Vec<String> {
    let mut out: Vec<String> = bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["search"]["mode"] == "include")
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap(),
                        e["resource"]["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn put(app: &TestApp, resource: Value) {
    let path = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
    let r = app.put(&path, &resource).await;
    assert!(r.status().is_success(), "PUT {path}: {}", r.text().await.unwrap());
}

/// The ids a search finds (asserting a 200 searchset).
async fn find(app: &TestApp, query: &str) -> Vec<String> {
    let r = app.get(query).await;
    assert_eq!(r.status(), 200, "{query}: {}", r.text().await.unwrap());
    let b = json(r).await;
    assert_eq!(b["type"], "searchset", "{query}");
    ids(&b)
}

fn v(list: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

async fn load_clinic(app: &TestApp) {
    put(
        app,
        json!({"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "House", "given": ["Gregory"]}],
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}),
    )
    .await;
    put(
        app,
        json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
        "birthDate": "1974-12-25", "name": [{"family": "Zoë Müller", "given": ["Anna"]}],
        "identifier": [{"system": "http://hospital/mrn", "value": "MRN-1",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
        "address": [{"city": "Springfield", "postalCode": "12345"}],
        "telecom": [{"system": "email", "value": "anna@example.org"}],
        "generalPractitioner": [{"reference": "Practitioner/dr1"}]}),
    )
    .await;
    put(
        app,
        json!({"resourceType": "Patient", "id": "p2", "active": false, "gender": "male",
        "birthDate": "1980", "name": [{"family": "Smith", "given": ["Bob"]}],
        "identifier": [{"system": "http://hospital/mrn", "value": "MRN-2"}],
        "address": [{"city": "Shelbyville"}]}),
    )
    .await;
    put(
        app,
        json!({"resourceType": "Patient", "id": "p3", "gender": "female",
        "name": [{"family": "Smithers"}], "deceasedDateTime": "2020-05-01T10:00:00Z"}),
    )
    .await;
    put(app, json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T10:00:00Z"}}))
    .await;
    for (id, patient, code, value, unit, date) in [
        ("o1", "p1", "29463-7", 70.5, "kg", "2024-03-01T09:30:00Z"),
        ("o2", "p1", "29463-7", 72.0, "kg", "2024-06-01T09:30:00Z"),
        ("o3", "p2", "29463-7", 185.0, "[lb_av]", "2023-01-15"),
        ("o4", "p2", "8867-4", 64.0, "/min", "2024-02-10T08:00:00Z"),
    ] {
        put(app, json!({"resourceType": "Observation", "id": id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": if code == "8867-4" { "Heart rate" } else { "Body weight" }},
            "subject": {"reference": format!("Patient/{patient}")},
            "encounter": if id == "o1" { json!({"reference": "Encounter/e1"}) } else { Value::Null },
            "effectiveDateTime": date,
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}))
        .await;
    }
}

#[tokio::test]
async fn strings_tokens_and_identifiers() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    assert_eq!(find(&app, "Patient?family=smith").await, v(&["p2", "p3"]), "prefix, case-insensitive");
    assert_eq!(find(&app, "Patient?family=zoe").await, v(&["p1"]), "accents folded");
    assert_eq!(find(&app, "Patient?family=müll").await, v(&[]), "a prefix of the whole string, not a word");
    assert_eq!(find(&app, "Patient?family:exact=Smith").await, v(&["p2"]));
    assert_eq!(find(&app, "Patient?family:exact=smith").await, v(&[]));
    assert_eq!(find(&app, "Patient?family:contains=MITH").await, v(&["p2", "p3"]));
    assert_eq!(find(&app, "Patient?name=anna").await, v(&["p1"]), "name covers given");
    assert_eq!(find(&app, "Patient?address-city=spring").await, v(&["p1"]));
    assert_eq!(find(&app, "Patient?family=smith,zoe").await, v(&["p1", "p2", "p3"]), "comma is OR");
    assert_eq!(find(&app, "Patient?family=smith&gender=female").await, v(&["p3"]), "repeated is AND");
    assert_eq!(find(&app, "Patient?gender=female").await, v(&["p1", "p3"]));
    // A `code` element's system is implicit: its required binding's.
    let g = "http://hl7.org/fhir/administrative-gender";
    assert_eq!(find(&app, &format!("Patient?gender={g}|female")).await, v(&["p1", "p3"]));
    assert_eq!(find(&app, &format!("Patient?gender={g}|")).await, v(&["p1", "p2", "p3"]));
    assert_eq!(find(&app, "Patient?gender=http://other|female").await, v(&[]));
    assert_eq!(find(&app, "Patient?gender=|female").await, v(&[]), "|code wants no system; it has one");
    assert_eq!(find(&app, "Patient?gender:not=female").await, v(&["p2"]));
    assert_eq!(find(&app, "Patient?active=true").await, v(&["p1"]));
    assert_eq!(find(&app, "Patient?active:not=true").await, v(&["p2", "p3"]), ":not includes missing");
    assert_eq!(find(&app, "Patient?identifier=MRN-1").await, v(&["p1"]));
    assert_eq!(find(&app, "Patient?identifier=http://hospital/mrn|MRN-2").await, v(&["p2"]));
    assert_eq!(find(&app, "Patient?identifier=http://hospital/mrn|").await, v(&["p1", "p2"]));
    assert_eq!(find(&app, "Patient?identifier=|MRN-1").await, v(&[]), "|code wants no system");
    assert_eq!(
        find(&app, "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-1").await,
        v(&["p1"])
    );
    assert_eq!(find(&app, "Patient?email=anna@example.org").await, v(&["p1"]));
    assert_eq!(find(&app, "Observation?code:text=heart").await, v(&["o4"]));
    assert_eq!(find(&app, "Observation?code=http://loinc.org|29463-7").await, v(&["o1", "o2", "o3"]));
    assert_eq!(find(&app, "Observation?code=http://snomed.info/sct|29463-7").await, v(&[]));
    assert_eq!(find(&app, "Patient?death-date:missing=false").await, v(&["p3"]));
    assert_eq!(find(&app, "Patient?birthdate:missing=true").await, v(&["p3"]));
    assert_eq!(find(&app, "Practitioner?identifier=1234567893").await, v(&["dr1"]));
}

#[tokio::test]
async fn dates_numbers_and_quantities() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    for (q, expected) in [
        ("birthdate=1974", vec!["p1"]),
        ("birthdate=1974-12-25", vec!["p1"]),
        ("birthdate=eq1980-06", vec![]),
        ("birthdate=ge1980-06", vec!["p2"]),
        ("birthdate=gt1980", vec![]),
        ("birthdate=lt1980", vec!["p1"]),
        ("birthdate=le1980-01-01", vec!["p1", "p2"]),
        ("birthdate=sa1975", vec!["p2"]),
        ("birthdate=eb1980", vec!["p1"]),
        ("birthdate=ne1974", vec!["p2"]),
        ("birthdate=ge1970&birthdate=lt1990", vec!["p1", "p2"]),
        ("death-date=2020-05-01T10:00:00Z", vec!["p3"]),
    ] {
        assert_eq!(find(&app, &format!("Patient?{q}")).await, v(&expected), "{q}");
    }
    for (q, expected) in [
        ("date=2024-03-01", vec!["o1"]),
        ("date=ge2024-02-10&date=lt2024-06", vec!["o1", "o4"]),
        ("date=2023", vec!["o3"]),
        ("value-quantity=70.5", vec!["o1"]),
        ("value-quantity=70", vec![]),
        ("value-quantity=7e1", vec!["o1", "o2"]),
        ("value-quantity=gt70", vec!["o1", "o2", "o3"]),
        ("value-quantity=le64", vec!["o4"]),
        ("value-quantity=ap70", vec!["o1", "o2", "o4"]),
        ("value-quantity=72|http://unitsofmeasure.org|kg", vec!["o2"]),
        ("value-quantity=72||kg", vec!["o2"]),
        ("value-quantity=185||kg", vec![]),
        // 185 [lb_av] is 83.9 kg: found in canonical units.
        ("value-quantity=gt80|http://unitsofmeasure.org|kg", vec!["o3"]),
        ("value-quantity=lt100000|http://unitsofmeasure.org|g", vec!["o1", "o2", "o3"]),
        ("code-value-quantity=http://loinc.org|29463-7$gt71", vec!["o2", "o3"]),
        ("code-value-quantity=8867-4$64", vec!["o4"]),
        ("combo-code-value-quantity=8867-4$lt60", vec![]),
    ] {
        assert_eq!(find(&app, &format!("Observation?{q}")).await, v(&expected), "{q}");
    }
    for q in ["Patient?birthdate=1974-13", "Observation?value-quantity=abc", "Observation?code-value-quantity=1$2$3"] {
        assert_outcome(app.get(q).await, 400).await;
    }
}

#[tokio::test]
async fn references_chains_and_has() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    assert_eq!(find(&app, "Observation?subject=Patient/p1").await, v(&["o1", "o2"]));
    assert_eq!(find(&app, "Observation?subject=p1").await, v(&["o1", "o2"]));
    assert_eq!(find(&app, "Observation?subject:Patient=p2").await, v(&["o3", "o4"]));
    assert_eq!(find(&app, "Observation?patient=p2").await, v(&["o3", "o4"]));
    assert_eq!(find(&app, &format!("Observation?subject={}", app.url("Patient/p1"))).await, v(&["o1", "o2"]));
    assert_eq!(find(&app, "Observation?subject:Group=p1").await, v(&[]));
    assert_eq!(find(&app, "Observation?subject=Patient/p1&code=8867-4").await, v(&[]));
    chains_and_has(&app, "just written").await;
    assert_outcome(app.get("Observation?code.family=x").await, 400).await;
    assert_outcome(app.get("Observation?subject:Medication=1").await, 400).await;
}

/// The chains and `_has` of the clinic, each with its answer.
async fn chains_and_has(app: &TestApp, state: &str) {
    for (q, expected) in [
        ("Observation?subject:Patient.family=smith", vec!["o3", "o4"]),
        ("Observation?subject.family=zoe", vec!["o1", "o2"]),
        ("Observation?subject.family=nobody", vec![]),
        ("Observation?encounter.subject.family=zoe", vec!["o1"]),
        ("Observation?patient.general-practitioner.family=house", vec!["o1", "o2"]),
        ("Observation?subject:Patient.family=smith&code=8867-4", vec!["o4"]),
        ("Observation?subject:Patient.gender=female,male&date=lt2024-03-02", vec!["o1", "o3", "o4"]),
        ("Patient?_has:Observation:patient:code=8867-4", vec!["p2"]),
        ("Patient?_has:Observation:subject:value-quantity=gt71", vec!["p1", "p2"]),
        ("Patient?_has:Observation:subject:code=29463-7&gender=female", vec!["p1"]),
        ("Patient?_has:Observation:subject:code=1-1", vec![]),
        ("Practitioner?_has:Patient:general-practitioner:_has:Observation:patient:code=29463-7", vec!["dr1"]),
        ("Patient?general-practitioner:Practitioner.identifier=1234567893", vec!["p1"]),
        ("Observation?subject._has:Observation:subject:code=8867-4", vec!["o3", "o4"]),
    ] {
        assert_eq!(find(app, q).await, v(&expected), "{q} ({state})");
    }
}

/// An inner search that matches more resources than `fhir.search_listed_ids` stays a
/// subquery of the outer search: the same answers while the documents are pending, once
/// indexed, and when an inner or an outer document changes after that (0 here: every
/// inner search that finds anything is one).
#[tokio::test]
async fn chains_and_has_beyond_a_list_answer_the_same() {
    let mut settings = test_settings();
    settings.fhir.search_listed_ids = Some(0);
    let app = spawn_with(settings, Default::default()).await;
    load_clinic(&app).await;
    chains_and_has(&app, "just written").await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await; // in ClickHouse
    chains_and_has(&app, "indexed").await;
    // An inner document changes (p2 is no longer a Smith), then an outer one (o3 moves to p1).
    put(&app, json!({"resourceType": "Patient", "id": "p2", "gender": "male", "name": [{"family": "Jones"}]})).await;
    assert_eq!(find(&app, "Observation?subject:Patient.family=smith").await, v(&[]));
    assert_eq!(find(&app, "Observation?subject:Patient.family=jones").await, v(&["o3", "o4"]));
    let mut o3 = json(app.get("Observation/o3").await).await;
    o3["subject"]["reference"] = json!("Patient/p1");
    put(&app, o3).await;
    assert_eq!(find(&app, "Observation?subject:Patient.family=jones").await, v(&["o4"]), "pending outer");
    assert_eq!(find(&app, "Observation?subject.family=zoe").await, v(&["o1", "o2", "o3"]), "pending outer");
    assert_eq!(find(&app, "Patient?_has:Observation:subject:value-quantity=gt100").await, v(&["p1"]), "pending source");
    assert_eq!(find(&app, "Patient?_has:Observation:subject:value-quantity=lt100").await, v(&["p1", "p2"]));
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(find(&app, "Observation?subject:Patient.family=jones").await, v(&["o4"]), "indexed outer");
    assert_eq!(find(&app, "Patient?_has:Observation:subject:value-quantity=gt100").await, v(&["p1"]), "indexed source");
    // The total of a first page counts through the subquery too.
    let b = json(app.get("Observation?subject.family=zoe&_count=1&_total=accurate").await).await;
    assert_eq!(b["total"], 3);
}

#[tokio::test]
async fn includes_sorts_and_paging() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    let b = json(app.get("Observation?code=29463-7&_include=Observation:subject").await).await;
    assert_eq!(ids(&b), v(&["o1", "o2", "o3"]));
    assert_eq!(included(&b), v(&["Patient/p1", "Patient/p2"]));
    let b = json(app.get("Patient?_id=p1&_revinclude=Observation:subject").await).await;
    assert_eq!(included(&b), v(&["Observation/o1", "Observation/o2"]));
    let b = json(
        app.get("Observation?_id=o1&_include=Observation:subject&_include:iterate=Patient:general-practitioner").await,
    )
    .await;
    assert_eq!(included(&b), v(&["Patient/p1", "Practitioner/dr1"]));
    let b = json(app.get("Observation?_id=o1&_include=Observation:*").await).await;
    assert_eq!(included(&b), v(&["Encounter/e1", "Patient/p1"]));
    let b = json(app.get("Observation?_sort=-date").await).await;
    assert_eq!(ordered(&b), ["o2", "o1", "o4", "o3"]);
    let b = json(app.get("Observation?_sort=patient,-value-quantity").await).await;
    assert_eq!(ordered(&b), ["o2", "o1", "o3", "o4"]);
    let b = json(app.get("Patient?_sort=birthdate").await).await;
    assert_eq!(ordered(&b), ["p1", "p2", "p3"], "missing values last");
    // Pages of one, following `next`, in the sorted order.
    let mut url = app.url("Observation?_sort=-value-quantity&_count=1&_total=accurate");
    let mut seen = Vec::new();
    loop {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        assert_eq!(b["total"], 4);
        seen.extend(ordered(&b));
        match b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["o3", "o2", "o1", "o4"]);
    // Without _total, a page read in one key's order does not count (that would read every
    // match); a page that holds every match is its own total.
    let b = json(app.get("Observation?_sort=-value-quantity&_count=1").await).await;
    assert_eq!((ordered(&b), b.get("total")), (vec!["o3".to_string()], None));
    let b = json(app.get("Observation?_sort=-value-quantity").await).await;
    assert_eq!(b["total"], 4);
    let b = json(app.get("Observation?_total=none&code=29463-7").await).await;
    assert!(b.get("total").is_none());
    let b = json(app.get("Observation?_summary=count&code=29463-7").await).await;
    assert_eq!((b["total"].as_u64(), b.get("entry").is_none()), (Some(3), true));
    let b = json(app.get("Patient?_id=p1&_elements=gender").await).await;
    let p = &b["entry"][0]["resource"];
    assert_eq!(p["gender"], "female");
    assert!(p.get("name").is_none() && p["meta"]["tag"][0]["code"] == "SUBSETTED", "{p}");
    // _summary=true: the type's summary elements (choice elements by their stem), no more.
    let b = json(app.get("Observation?_id=o1&_summary=true").await).await;
    let o = &b["entry"][0]["resource"];
    assert!(o["code"].is_object() && o["status"].is_string() && o.get("valueQuantity").is_some(), "{o}");
    assert!(o.get("category").is_none() && o["encounter"].is_object(), "{o}");
    assert_eq!(o["meta"]["tag"][0]["code"], "SUBSETTED");
    // POST _search with a form body.
    let r = app
        .client
        .post(app.url("Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=smith&gender=male")
        .send()
        .await
        .unwrap();
    assert_eq!(ids(&json(r).await), v(&["p2"]));
}

/// A page sorted by one parameter: each resource appears once, at its largest
/// (descending) or smallest (ascending) value, and at its current one after a change has
/// reached the index, on every page.
#[tokio::test]
async fn a_sort_places_each_resource_once_at_its_current_value() {
    let app = spawn_app().await;
    for (id, given) in [("a", vec!["Mia"]), ("b", vec!["Zed", "Amy"]), ("c", vec!["Kai"])] {
        put(&app, json!({"resourceType": "Patient", "id": id, "name": [{"family": "S", "given": given}]})).await;
    }
    let sorted = |q: &'static str| {
        let app = &app;
        async move { ordered(&json(app.get(q).await).await) }
    };
    assert_eq!(sorted("Patient?_sort=-given").await, ["b", "a", "c"]);
    assert_eq!(sorted("Patient?_sort=given").await, ["b", "c", "a"]);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await; // in ClickHouse
    put(&app, json!({"resourceType": "Patient", "id": "b", "name": [{"family": "S", "given": ["Bea"]}]})).await;
    assert_eq!(sorted("Patient?_sort=-given").await, ["a", "c", "b"], "pending");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(sorted("Patient?_sort=-given").await, ["a", "c", "b"], "flushed");
    let mut url = app.url("Patient?_sort=-given&_count=1");
    let mut seen = Vec::new();
    for _ in 0..5 {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        seen.extend(ordered(&b));
        match b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(next) => url = next["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "c", "b"]);
}

/// A search sees every acknowledged write at once, while its keys are on their way to
/// ClickHouse and after: values added, changed and removed, and deletes.
#[tokio::test]
async fn searches_read_their_writes_across_the_index_flush() {
    let app = spawn_app().await;
    for round in 0..2 {
        let id = format!("rw{round}");
        put(&app, json!({"resourceType": "Patient", "id": id, "name": [{"family": "Before"}]})).await;
        assert_eq!(find(&app, &format!("Patient?family=before&_id={id}")).await, v(&[&id]));
        if round == 1 {
            tokio::time::sleep(std::time::Duration::from_millis(600)).await; // flushed
        }
        put(&app, json!({"resourceType": "Patient", "id": id, "name": [{"family": "After"}]})).await;
        assert_eq!(find(&app, &format!("Patient?family=before&_id={id}")).await, v(&[]), "round {round}");
        assert_eq!(find(&app, &format!("Patient?family=after&_id={id}")).await, v(&[&id]), "round {round}");
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(find(&app, &format!("Patient?family=before&_id={id}")).await, v(&[]), "round {round}, flushed");
        assert!(find(&app, "Patient?family=after").await.contains(&id));
        app.delete(&format!("Patient/{id}")).await;
        assert_eq!(find(&app, &format!("Patient?family=after&_id={id}")).await, v(&[]));
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(find(&app, &format!("Patient?family=after&_id={id}")).await, v(&[]), "deleted, flushed");
    }
}

/// Every HL7 R4 example is stored; for every search parameter that yields a value on one,
/// a search for that value finds it (and, for strings and tokens, a search for another
/// value does not).
#[tokio::test]
async fn every_parameter_of_the_hl7_examples_finds_its_resource() {
    use roster::search::extract::{values_of, IndexValue};
    let app = spawn_app().await;
    let dir = shared_dir().join("fhir-r4-examples");
    let mut stored = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") || name == "search-parameters.json" {
            continue;
        }
        let resource: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let (Some(rt), Some(id)) = (resource["resourceType"].as_str(), resource["id"].as_str()) else { continue };
        let r = app.put(&format!("{rt}/{id}"), &resource).await;
        if r.status().is_success() {
            stored.push(json(r).await);
        }
    }
    assert!(stored.len() >= 700, "{} examples stored", stored.len());
    // A few examples share a type and id: the last one stored is the one to find.
    let mut last = std::collections::HashMap::new();
    for (i, r) in stored.iter().enumerate() {
        last.insert(format!("{}/{}", r["resourceType"], r["id"]), i);
    }
    let stored: Vec<Value> = stored
        .iter()
        .enumerate()
        .filter(|(i, r)| last[&format!("{}/{}", r["resourceType"], r["id"])] == *i)
        .map(|(_, r)| r.clone())
        .collect();
    let base = app.url("");
    let base = base.trim_end_matches('/');
    let escape = |s: &str| s.replace('\\', "\\\\").replace(',', "\\,").replace('|', "\\|").replace('$', "\\$");
    // (query, expected to find the resource) per parameter with a value.
    let mut checks: Vec<(String, String, bool)> = Vec::new();
    for resource in &stored {
        let rt = resource["resourceType"].as_str().unwrap();
        let id = resource["id"].as_str().unwrap();
        for def in roster::search::definitions::registry().of_type(rt) {
            if def.code == "_id" {
                continue;
            }
            let values = values_of(def, resource, base);
            // A canonical UCUM form is found by a unit-qualified search only.
            let Some(value) = values.iter().find(|v| !matches!(v, IndexValue::Quantity { canonical: true, .. })) else {
                continue;
            };
            let (query, other) = match value {
                IndexValue::Token { system: Some(s), code: Some(c), .. } => {
                    (format!("{}|{}", escape(s), escape(c)), Some(format!("{}|{}-not", escape(s), escape(c))))
                }
                IndexValue::Token { system: None, code: Some(c), .. } => {
                    (escape(c), Some(format!("{}-not", escape(c))))
                }
                IndexValue::String(s) if !s.trim().is_empty() => (escape(s), Some(format!("{}-not", escape(s)))),
                IndexValue::Reference(r) => match (&r.target, &r.target_type) {
                    (Some(t), Some(_)) if !t.starts_with('#') && !t.contains(':') => (t.clone(), None),
                    _ => continue,
                },
                IndexValue::Uri(u) => (escape(u), Some(format!("{}-not", escape(u)))),
                IndexValue::Date { low, .. } => (format!("ge{}", ms_to_instant(*low)), None),
                IndexValue::Number(n) => (format!("{}", n.value), None),
                IndexValue::Quantity { number, .. } => (format!("{}", number.value), None),
                _ => continue,
            };
            let modifier = if matches!(value, IndexValue::String(_)) { ":exact" } else { "" };
            let q = |v: &str| {
                let mut s = form_urlencoded::Serializer::new(String::new());
                s.append_pair(&format!("{}{modifier}", def.code), v).append_pair("_id", id);
                format!("{rt}?{}", s.finish())
            };
            checks.push((q(&query), id.to_string(), true));
            if let (Some(other), 1) = (other, values.len()) {
                checks.push((q(&other), id.to_string(), false));
            }
        }
    }
    let searches = checks.iter().filter(|c| c.2).count();
    let app = &app;
    let failures: Vec<String> = futures_util::stream::iter(checks)
        .map(|(q, id, expected)| async move {
            let found = find(app, &q).await;
            let ok = match expected {
                true => found == [id],
                false => found.is_empty(),
            };
            (!ok).then(|| format!("{q} found {found:?}"))
        })
        .buffer_unordered(8)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    eprintln!("{searches} parameter searches over {} examples", stored.len());
    assert!(searches > 2000, "{searches} searches");
    assert!(failures.is_empty(), "{} of {searches} failed:\n{}", failures.len(), failures.join("\n"));
}

fn ms_to_instant(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Twenty concurrent identical conditional creates, split over two server processes on
/// the same stores, make one resource; the others answer it with 200.
#[tokio::test]
async fn concurrent_conditional_creates_make_one_resource() {
    let settings = test_settings();
    let (a, b) =
        (spawn_with(settings.clone(), Default::default()).await, spawn_with(settings, Default::default()).await);
    let body = json!({"resourceType": "Patient", "identifier": [{"system": "http://x/mrn", "value": "race-1"}]});
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            let request = app
                .client
                .post(app.url("Patient"))
                .header("content-type", FHIR_JSON)
                .header("if-none-exist", "identifier=http://x/mrn|race-1")
                .body(body.to_string());
            tokio::spawn(async move {
                let r = request.send().await.unwrap();
                (r.status().as_u16(), r.headers().get("location").map(|l| l.to_str().unwrap().to_string()))
            })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (status, location) = t.await.unwrap();
        statuses.push(status);
        let location = location.expect("a Location");
        ids.insert(location.split("/Patient/").nth(1).unwrap().split('/').next().unwrap().to_string());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 19, "{statuses:?}");
    assert_eq!(ids.len(), 1, "every answer names the one resource: {ids:?}");
    assert_eq!(find(&a, "Patient?identifier=http://x/mrn|race-1").await.len(), 1);
}

#[tokio::test]
async fn conditional_update_and_delete() {
    let app = spawn_app().await;
    let body = |family: &str| {
        json!({"resourceType": "Patient", "name": [{"family": family}],
            "identifier": [{"system": "http://x/mrn", "value": "cu-1"}]})
    };
    let r = app.put("Patient?identifier=http://x/mrn|cu-1", &body("One")).await;
    assert_eq!(r.status(), 201, "no match creates");
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let r = app.put("Patient?identifier=http://x/mrn|cu-1", &body("Two")).await;
    assert_eq!(r.status(), 200, "one match updates it");
    let p = json(r).await;
    assert_eq!((p["id"].as_str(), p["meta"]["versionId"].as_str()), (Some(id.as_str()), Some("2")));
    let mut wrong = body("Three");
    wrong["id"] = json!("someone-else");
    assert_outcome(app.put("Patient?identifier=http://x/mrn|cu-1", &wrong).await, 400).await;
    put(
        &app,
        json!({"resourceType": "Patient", "id": "dup", "identifier": [{"system": "http://x/mrn", "value": "cu-1"}]}),
    )
    .await;
    assert_outcome(app.put("Patient?identifier=http://x/mrn|cu-1", &body("Four")).await, 412).await;
    assert_outcome(app.delete("Patient?identifier=http://x/mrn|cu-1").await, 412).await;
    assert_eq!(find(&app, "Patient?identifier=http://x/mrn|cu-1").await.len(), 2, "a refused delete deletes nothing");
    let r = app.delete("Patient?identifier=http://x/mrn|cu-1&_id=dup").await;
    assert_eq!(r.status(), 204);
    assert_eq!(find(&app, "Patient?identifier=http://x/mrn|cu-1").await, [id]);
    let r = app.delete("Patient?identifier=http://x/mrn|nothing").await;
    assert!(r.status().is_success(), "no match deletes nothing");
    assert_outcome(app.put("Patient?nonsense=1", &body("x")).await, 400).await;
}

#[tokio::test]
async fn patient_compartment_and_everything() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    assert_eq!(find(&app, "Patient/p1/Observation").await, v(&["o1", "o2"]));
    assert_eq!(find(&app, "Patient/p1/Observation?date=ge2024-05").await, v(&["o2"]));
    assert_eq!(find(&app, "Patient/p2/Encounter").await, v(&[]));
    assert_eq!(find(&app, "Patient/p1/Encounter").await, v(&["e1"]));
    assert_outcome(app.get("Patient/p1/Practitioner").await, 400).await;
    // Every type, paged two at a time.
    let mut url = app.url("Patient/p1/$everything?_count=2");
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = app.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b = json(r).await;
        for e in b["entry"].as_array().into_iter().flatten() {
            seen.push(format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            ));
        }
        match b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["Patient/p1", "Encounter/e1", "Observation/o1", "Observation/o2"]);
    let b = json(app.get("Patient/p1/$everything?_type=Observation&_since=2024-05-01").await).await;
    // `_since` is by lastUpdated: everything was written just now.
    assert_eq!(ids(&b), v(&["o1", "o2"]));
    let b = json(app.get("Patient/p1/*").await).await;
    assert_eq!(ids(&b), v(&["e1", "o1", "o2"]));
    assert_outcome(app.get("Patient/nobody/$everything").await, 404).await;
    assert_outcome(app.get("Patient/p1/$everything?_type=Practitioner").await, 400).await;
}

/// Resources stored before search keys existed (documents without `_s`, nothing in the
/// index) are found once `roster reindex` ran; a later write of one drops its old keys.
#[tokio::test]
async fn reindex_indexes_data_written_before_the_index() {
    use bson::doc;
    let app = spawn_app().await;
    // The start-up step found nothing to index and finished: what follows is "old" data.
    let marks = app.mongo.collection::<bson::Document>("_search_reindex");
    for _ in 0..200 {
        if marks.find_one(doc! { "_id": "*" }).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let coll = app.mongo.collection::<bson::Document>("Patient_4_0_0");
    let now = bson::DateTime::now();
    let old: Vec<bson::Document> = (0..2500)
        .map(|i| {
            doc! {
                "_id": format!("old{i:05}"), "versionId": 1_i64, "lastUpdated": now, "deleted": false, "method": "PUT",
                "resource": { "resourceType": "Patient", "id": format!("old{i:05}"),
                    "meta": { "versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z" },
                    "name": [{ "family": if i == 7 { "Legacy" } else { "Older" } }], "gender": "other" },
            }
        })
        .collect();
    coll.insert_many(old).await.unwrap();
    assert_eq!(find(&app, "Patient?family=legacy").await, v(&[]), "not indexed yet");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .arg("reindex")
        .arg("--type")
        .arg("Patient")
        .env("ROSTER_MONGO_DATABASE", &app.settings.mongo.database)
        .env("ROSTER_CLICKHOUSE_DATABASE", &app.settings.clickhouse.database)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("scanned 2500 resources, indexed 2500"), "{text}");
    assert_eq!(find(&app, "Patient?family=legacy").await, v(&["old00007"]));
    let b = json(app.get("Patient?gender=other&_summary=count").await).await;
    assert_eq!(b["total"], 2500);
    // A write of a reindexed resource removes the keys its stored content had.
    put(&app, json!({"resourceType": "Patient", "id": "old00007", "name": [{"family": "Renamed"}]})).await;
    assert_eq!(find(&app, "Patient?family=legacy").await, v(&[]));
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(find(&app, "Patient?family=legacy").await, v(&[]), "after the flush too");
    let b = json(app.get("Patient?gender=other&_summary=count").await).await;
    assert_eq!(b["total"], 2499);
    // A second run scans again and finds nothing left to index.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["reindex", "--type", "Patient"])
        .env("ROSTER_MONGO_DATABASE", &app.settings.mongo.database)
        .env("ROSTER_CLICKHOUSE_DATABASE", &app.settings.clickhouse.database)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("scanned 2500 resources, indexed 0"), "{text}");
}

/// A stream of member-only PATCHes (each changes the Group's `_lastUpdated`, none pauses
/// for its keys to reach the index) keeps what each commit carries as pending keys bounded,
/// and afterwards the index holds the Group at its last `_lastUpdated` only.
#[tokio::test]
async fn a_member_patch_stream_keeps_its_pending_keys_bounded() {
    let app = spawn_app().await;
    put(&app, json!({"resourceType": "Group", "id": "stream", "type": "person", "actual": true})).await;
    let first = json(app.get("Group/stream").await).await["meta"]["lastUpdated"].as_str().unwrap().to_string();
    let mut longest = 0;
    let groups = app.mongo.collection::<bson::Document>("Group_4_0_0");
    for i in 0..300 {
        let ops =
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": format!("Patient/s{i}")}}}]);
        assert_eq!(app.patch("Group/stream", &ops).await.status(), 200);
        if i % 25 == 24 {
            let doc = groups.find_one(bson::doc! {"_id": "stream"}).await.unwrap().unwrap();
            let removed = doc.get_array("searchRemoved").map_or(0, |a| a.len());
            longest = longest.max(removed);
        }
    }
    // Two `_lastUpdated` keys leave with every version: without the bound, 598 by now.
    assert!(longest < 300, "a commit carried {longest} pending removals");
    tokio::time::sleep(std::time::Duration::from_millis(800)).await; // quiet: flushed
    let doc = groups.find_one(bson::doc! {"_id": "stream"}).await.unwrap().unwrap();
    assert!(!doc.contains_key("historyPending"), "the last version reached the index");
    let last = json(app.get("Group/stream").await).await["meta"]["lastUpdated"].as_str().unwrap().to_string();
    let q = |p: &str, t: &str| format!("Group?_lastUpdated={p}{}", t.replace('+', "%2B"));
    assert_eq!(find(&app, &q("eq", &last)).await, v(&["stream"]));
    assert_eq!(find(&app, &q("le", &first)).await, v(&[]), "no earlier version's key is left");
    assert_eq!(find(&app, &q("lt", &last)).await, v(&[]));
}

/// A page sorted by one parameter is read in the index's order without merging, so every
/// value an older version had is a row until ClickHouse merges them away. With merges
/// stopped and a resource written many times, paging by `_count=1` still finds each
/// resource once, with no empty page and a `next` link up to the last one (an empty page
/// ends fhirpy's paging: seen under load, when merges lag).
#[tokio::test]
async fn paging_a_sort_steps_over_the_values_of_older_versions() {
    let app = spawn_app().await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    put(&app, json!({"resourceType": "Patient", "id": "a", "gender": "male"})).await;
    let first = json(app.get("Patient/a").await).await["meta"]["lastUpdated"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await; // in the index
    ch.query("SYSTEM STOP MERGES SearchIndex").execute().await.unwrap();
    for n in 0..14 {
        let gender = if n % 2 == 0 { "female" } else { "male" };
        put(&app, json!({"resourceType": "Patient", "id": "a", "gender": gender})).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await; // each version flushed
    }
    put(&app, json!({"resourceType": "Patient", "id": "b", "gender": "male"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let stale: u64 = ch
        .query("SELECT count() FROM SearchIndex WHERE id = 'a' AND deleted = 0 AND startsWith(key, '_lastUpdated')")
        .fetch_one()
        .await
        .unwrap();
    assert!(stale > 20, "the older versions' rows are unmerged: {stale}");
    for (sort, expected) in [("_lastUpdated", ["a", "b"]), ("-_lastUpdated", ["b", "a"])] {
        let query = format!("Patient?_lastUpdated=ge{}&_sort={sort}", first.replace('+', "%2B"));
        assert_eq!(paged(&app, &query, 1).await, expected, "{sort}");
    }
    ch.query("SYSTEM START MERGES SearchIndex").execute().await.unwrap();
}

/// Every id of a sorted search, following `next` links with pages of `count`.
async fn paged(app: &TestApp, query: &str, count: usize) -> Vec<String> {
    let mut url = app.url(&format!("{query}&_count={count}"));
    let mut seen = Vec::new();
    for _ in 0..20 {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        let page = ordered(&b);
        let next = b["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").cloned();
        assert!(!page.is_empty() || next.is_none(), "{query}: an empty page with a next link after {seen:?}");
        seen.extend(page);
        match next {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => return seen,
        }
    }
    panic!("{query}: more than 20 pages: {seen:?}")
}

/// Equal values come in id order, ids running the first sort parameter's way (a
/// descending sort reads the index backwards) unless `_id` is named last, each resource
/// once whatever the page size (a value's ids span page and read boundaries), both while
/// the documents are still pending (read from MongoDB) and once they are in the index.
#[tokio::test]
async fn equal_sort_values_keep_an_id_order_across_pages() {
    let app = spawn_app().await;
    let dates = [
        ("t3", "2024-01-01"),
        ("t1", "2024-01-01"),
        ("t5", "2024-01-01"),
        ("t2", "2024-01-01"),
        ("t4", "2024-01-01"),
        ("u2", "2024-02-01"),
        ("u1", "2024-03-01"),
        ("v1", "2023-05-01"),
    ];
    for (id, date) in dates {
        let o = json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"text": "tie"}, "effectiveDateTime": date});
        put(&app, o).await;
    }
    let orders = [
        ("-date", ["u1", "u2", "t5", "t4", "t3", "t2", "t1", "v1"]),
        ("date", ["v1", "t1", "t2", "t3", "t4", "t5", "u2", "u1"]),
        // A named `_id` orders the ids its own way.
        ("-date,_id", ["u1", "u2", "t1", "t2", "t3", "t4", "t5", "v1"]),
        ("date,-_id", ["v1", "t5", "t4", "t3", "t2", "t1", "u2", "u1"]),
    ];
    let check = |when: &'static str| {
        let app = &app;
        async move {
            for count in [1, 2, 3, 10] {
                for (sort, expected) in orders {
                    let found = paged(app, &format!("Observation?_sort={sort}"), count).await;
                    assert_eq!(found, expected, "{when}, _sort={sort}, _count={count}");
                }
            }
        }
    };
    check("just written").await;
    let ch = roster::migrate::clickhouse_client(&app.settings.clickhouse);
    for _ in 0..100 {
        let indexed: u64 = ch
            .query("SELECT count(DISTINCT id) FROM SearchIndex WHERE rt = 'Observation' AND startsWith(key, 'date')")
            .fetch_one()
            .await
            .unwrap();
        if indexed == dates.len() as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // the flags cleared after the insert
    check("indexed").await;
}

/// `_list`: the resources of the searched type that are entries of the List (by relative
/// or absolute reference, with or without a version; entries flagged `deleted` left out).
#[tokio::test]
async fn list_finds_the_entries_of_a_list() {
    let app = spawn_app().await;
    load_clinic(&app).await;
    put(
        &app,
        json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working", "entry": [
            {"item": {"reference": "Patient/p1"}},
            {"item": {"reference": format!("{}/Patient/p2/_history/1", app.fhir)}},
            {"item": {"reference": "Patient/p3"}, "deleted": true},
            {"item": {"reference": "Observation/o1"}},
            {"item": {"display": "no reference"}}]}),
    )
    .await;
    put(
        &app,
        json!({"resourceType": "List", "id": "l2", "status": "current", "mode": "working",
        "entry": [{"item": {"reference": "Patient/p3"}}]}),
    )
    .await;
    assert_eq!(find(&app, "Patient?_list=l1").await, v(&["p1", "p2"]));
    assert_eq!(find(&app, "Patient?_list=l1&gender=male").await, v(&["p2"]));
    assert_eq!(find(&app, "Patient?_list=l1,l2").await, v(&["p1", "p2", "p3"]));
    assert_eq!(find(&app, "Observation?_list=l1").await, v(&["o1"]));
    assert_eq!(find(&app, "Patient?_list=nowhere").await, v(&[]));
    let b = json(app.get("Patient?_list=l1&_count=1").await).await;
    assert_eq!(b["total"], 2);
    for (query, says) in [("Patient?_list=$current-problems", "functional lists"), ("Patient?_list:not=l1", "modifier")]
    {
        let r = app.get(query).await;
        assert_eq!(r.status(), 400, "{query}");
        let body = json(r).await;
        assert!(body["issue"][0]["diagnostics"].as_str().unwrap().contains(says), "{query}: {body}");
    }
}

/// A count of many given ids (more than a count reads documents for) comes from the index
/// and the pending documents: deleted and missing ids are not counted, pending or indexed.
#[tokio::test]
async fn many_given_ids_are_counted_without_reading_each() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..60).map(|i| format!("n{i:02}")).collect();
    for id in &ids {
        put(&app, json!({"resourceType": "Patient", "id": id, "active": true})).await;
    }
    for id in &ids[..5] {
        assert!(app.delete(&format!("Patient/{id}")).await.status().is_success());
    }
    let mut asked = ids.clone();
    asked.extend(["missing1".to_string(), "missing2".to_string()]);
    let query = format!("Patient?_id={}&_count=10", asked.join(","));
    for state in ["just written", "indexed"] {
        let b = json(app.get(&query).await).await;
        assert_eq!(b["total"], 55, "{state}");
        assert_eq!(match_ids(&b).len(), 10, "{state}");
        let b = json(app.get(&format!("{query}&active=true")).await).await;
        assert_eq!(b["total"], 55, "{state}: with another clause the documents are read");
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    // A change after indexing is counted at once.
    assert!(app.delete("Patient/n10").await.status().is_success());
    assert_eq!(json(app.get(&query).await).await["total"], 54);
}
