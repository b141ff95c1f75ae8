use super::*;
use serde_json::json;

fn op(kind: &str, path: &str, extra: Value) -> Value {
    let mut parts = vec![json!({"name":"type","valueCode":kind}), json!({"name":"path","valueString":path})];
    if let Value::Array(more) = extra {
        parts.extend(more);
    }
    json!({"name":"operation","part":parts})
}

fn run(doc: Value, ops: Vec<Value>) -> Result<Value, PatchError> {
    let parsed = parse(&json!({"resourceType":"Parameters","parameter":ops}), "Patient")?;
    let mut doc = doc;
    apply(&mut doc, &parsed)?;
    Ok(doc)
}

#[test]
fn paths_parse() {
    assert_eq!(parse_path("Patient.identifier.where(system='http://x' and value.exists()).value").unwrap().len(), 4);
    assert_eq!(parse_path("Patient.name[0].given.last()").unwrap()[2], Step::Index(0));
    assert!(parse_path("Patient.name.select(given)").unwrap_err().contains("select"));
    assert!(parse_path("Patient.name.where(").is_err());
    assert!(parse_path(&format!("Patient{}", ".where(a=1)".repeat(2))).is_ok());
    let deep = format!("Patient.a.where({}b=1{})", "(".repeat(40), ")".repeat(40));
    assert!(parse_path(&deep).unwrap_err().contains("deeper"));
}

#[test]
fn every_operation_type() {
    let p =
        json!({"resourceType":"Patient","id":"1","identifier":[{"system":"a","value":"1"},{"system":"b","value":"2"}]});
    let exists = run(
        p.clone(),
        vec![op("add", "Patient", json!([{"name":"name","valueString":"id"}, {"name":"value","valueString":"2"}]))],
    );
    assert!(exists.unwrap_err().reason.contains("already has a value"));
    let out = run(
        p.clone(),
        vec![
            op(
                "add",
                "Patient",
                json!([{"name":"name","valueString":"birthDate"},{"name":"value","valueDate":"2000-01-01"}]),
            ),
            op("replace", "Patient.birthDate", json!([{"name":"value","valueDate":"2001-01-01"}])),
            op(
                "insert",
                "Patient.identifier",
                json!([{"name":"index","valueInteger":0},{"name":"value","valueIdentifier":{"value":"0"}}]),
            ),
            op(
                "move",
                "Patient.identifier",
                json!([{"name":"source","valueInteger":2},{"name":"destination","valueInteger":0}]),
            ),
            op("delete", "Patient.identifier.where(system='a')", json!([])),
            op("delete", "Patient.telecom", json!([])),
        ],
    )
    .unwrap();
    assert_eq!(out["birthDate"], "2001-01-01");
    assert_eq!(out["identifier"], json!([{"system":"b","value":"2"},{"value":"0"}]));
    let err = run(p, vec![op("delete", "Patient.identifier", json!([]))]).unwrap_err();
    assert_eq!((err.index, err.kind.as_str()), (0, "delete"));
    assert!(err.reason.contains("selects 2"), "{err}");
}

#[test]
fn values_from_parts_and_choice_names() {
    let p = json!({"resourceType":"Observation","valueQuantity":{"value":1}});
    let parsed = parse(
        &json!({"resourceType":"Parameters","parameter":[
            op("replace", "Observation.value.value", json!([{"name":"value","valueDecimal":2}])),
            op("add", "Observation", json!([{"name":"name","valueString":"code"},{"name":"value","part":[
                {"name":"text","valueString":"t"},{"name":"coding","valueCoding":{"code":"a"}},{"name":"coding","valueCoding":{"code":"b"}}]}]))
        ]}),
        "Observation",
    )
    .unwrap();
    let mut doc = p;
    apply(&mut doc, &parsed).unwrap();
    assert_eq!(doc["valueQuantity"]["value"], 2);
    assert_eq!(doc["code"], json!({"text":"t","coding":[{"code":"a"},{"code":"b"}]}));
}

#[test]
fn errors_name_the_operation_and_leave_the_document() {
    let parsed =
        parse(&json!({"resourceType":"Parameters","parameter":[op("explode", "Patient", json!([]))]}), "Patient");
    assert!(parsed.unwrap_err().reason.contains("unknown operation type"));
    let parsed =
        parse(&json!({"resourceType":"Parameters","parameter":[op("insert", "Patient.name", json!([]))]}), "Patient");
    assert!(parsed.unwrap_err().reason.contains("'value'"));
}
