//! The `roster` binary itself: help, migrate, and serve with a graceful SIGTERM stop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::test_settings;

fn roster() -> Command {
    Command::new(env!("CARGO_BIN_EXE_roster"))
}

fn with_test_env(cmd: &mut Command) -> (String, String) {
    let s = test_settings();
    cmd.env("ROSTER_MONGO_DATABASE", &s.mongo.database).env("ROSTER_CLICKHOUSE_DATABASE", &s.clickhouse.database);
    (s.mongo.database, s.clickhouse.database)
}

#[test]
fn help_documents_subcommands_and_environment() {
    let out = roster().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in ["serve", "migrate", "config", "ROSTER_MONGO_URI", "ROSTER_CLICKHOUSE_URL", "ROSTER_BODY_LIMIT_BYTES"]
    {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn migrate_applies_once() {
    let mut first = roster();
    first.arg("migrate");
    let (mongo_db, clickhouse_db) = with_test_env(&mut first);
    let out = first.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("001_server_info") && text.contains("001_resource_indexes"), "{text}");

    let second = roster()
        .arg("migrate")
        .env("ROSTER_MONGO_DATABASE", &mongo_db)
        .env("ROSTER_CLICKHOUSE_DATABASE", &clickhouse_db)
        .output()
        .unwrap();
    assert!(second.status.success());
    let text = String::from_utf8(second.stdout).unwrap();
    assert!(text.contains("applied []"), "nothing left to apply: {text}");
}

#[test]
fn bad_configuration_is_reported_and_exits_non_zero() {
    let out = roster().arg("config").env("ROSTER_LISTEN", "not-an-address").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ROSTER_LISTEN"));
}

#[test]
fn serve_answers_and_stops_gracefully_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = roster();
    cmd.arg("serve")
        .env("ROSTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("ROSTER_LOG_FORMAT", "json")
        .env("ROSTER_LOG", "info");
    with_test_env(&mut cmd);
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let health = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            s.write_all(b"GET /4_0_0/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).unwrap();
            break response;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("CapabilityStatement"));
    assert!(health.to_ascii_lowercase().contains("x-request-id"));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let mut logs = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    let request_line =
        logs.lines().find(|l| l.contains("/4_0_0/metadata")).unwrap_or_else(|| panic!("no request log line:\n{logs}"));
    let parsed: serde_json::Value = serde_json::from_str(request_line).expect("JSON log line");
    assert!(parsed["span"]["request_id"].as_str().is_some_and(|id| id.len() == 36), "{request_line}");
}

/// `roster <command> <args>` on the given databases: (success, stdout, stderr).
fn run_on(mongo_db: &str, clickhouse_db: &str, command: &str, args: &[&str]) -> (bool, String, String) {
    let out = roster()
        .arg(command)
        .args(args)
        .env("ROSTER_MONGO_DATABASE", mongo_db)
        .env("ROSTER_CLICKHOUSE_DATABASE", clickhouse_db)
        .env("ROSTER_LOG", "warn")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn eventstore_commands_append_read_and_summarize() {
    let mut init = roster();
    init.args(["eventstore", "init"]);
    let (mongo_db, clickhouse_db) = with_test_env(&mut init);
    let out = init.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = |args: &[&str]| run_on(&mongo_db, &clickhouse_db, "eventstore", args);
    let (ok, text, err) =
        run(&["append", "patient:M1", "--type", "noted", "--data", r#"{"n":1}"#, "--expected-version", "no-stream"]);
    assert!(ok, "{err}");
    assert_eq!(text.trim(), "appended to patient:M1: version 0, position 0");
    let (ok, text, _) =
        run(&["--json", "append", "patient:M1", "--type", "noted", "--data", "[2]", "--expected-version", "0"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["nextExpectedVersion"], 1);
    let (ok, _, err) = run(&["append", "patient:M1", "--type", "x", "--data", "1", "--expected-version", "0"]);
    assert!(!ok && err.contains("at version 1, not 0"), "a conflict fails the command: {err}");
    let (ok, _, err) = run(&["append", "patient:M1", "--type", "x", "--data", "{oops"]);
    assert!(!ok && err.contains("--data is not JSON"), "{err}");
    let (_, text, _) = run(&["read", "patient:M1"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("version") && lines.len() == 4, "header, rule, two events:\n{text}");
    assert!(lines[3].contains("noted") && lines[3].contains("[2]"), "{text}");
    let (_, text, _) = run(&["read", "patient:M1", "--from", "1", "--json"]);
    let event: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!((event["streamVersion"].clone(), event["data"].clone()), (serde_json::json!(1), serde_json::json!([2])));
    run(&["append", "claim:C1", "--type", "claim_submitted", "--data", "{}"]);
    let (_, text, _) = run(&["--json", "streams", "--prefix", "patient:"]);
    let streams: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(streams.as_array().unwrap().len(), 1);
    assert_eq!(
        (streams[0]["stream_id"].clone(), streams[0]["events"].clone()),
        (serde_json::json!("patient:M1"), serde_json::json!(2))
    );
    let (_, text, _) = run(&["stats"]);
    assert!(
        text.contains("events") && text.lines().any(|l| l.starts_with("streams") && l.trim_end().ends_with('2')),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("noted") && l.trim_end().ends_with('2')), "{text}");
}

#[test]
fn projection_commands_list_status_rebuild_and_reset() {
    let mut first = roster();
    first.args([
        "eventstore",
        "append",
        "patient:M1",
        "--type",
        "patient_admit",
        "--data",
        r#"{"encounterId":"e1","location":"Location/a"}"#,
    ]);
    let (mongo_db, clickhouse_db) = with_test_env(&mut first);
    let out = first.env("ROSTER_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = |args: &[&str]| run_on(&mongo_db, &clickhouse_db, "projection", args);
    let (ok, text, _) = run(&["list"]);
    assert!(
        ok && text.lines().count() == 3 && text.contains("active_encounters") && text.contains("(snapshots)"),
        "{text}"
    );
    let (_, text, _) = run(&["status", "--json"]);
    let statuses: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(statuses.iter().all(|s| s["state"] == "idle" && s["lag"] == 1), "never fed, one event behind: {text}");
    let (ok, text, err) = run(&["rebuild", "active_encounters", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("1 events") && text.contains("Projection_ActiveEncounters: 1 rows") && text.contains("dry run"),
        "{text}"
    );
    assert!(err.contains("active_encounters [") && err.contains("ETA"), "a progress bar on stderr: {err}");
    let (ok, text, _) = run(&["rebuild", "active_encounters", "--json"]);
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(ok && report["swapped"] == true && report["position"] == 0, "{text}");
    let (_, text, _) = run(&["status"]);
    assert!(
        text.lines().any(|l| l.starts_with("active_encounters") && l.contains("running") && l.contains("lag        0")),
        "{text}"
    );
    let (ok, _, err) = run(&["rebuild", "nope"]);
    assert!(!ok && err.contains("no projection 'nope'") && err.contains("patient_timeline"), "{err}");
    let (ok, text, _) = run(&["reset", "event_statistics"]);
    assert!(ok && text.contains("fed again from position 0"), "{text}");
}
