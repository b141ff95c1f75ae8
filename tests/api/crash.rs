//! SIGKILL: a real `roster serve` process killed while it writes, then started again on the
//! same databases. Acknowledged writes must all be readable, and reads must not wait for a
//! lease the dead process can never release: recovery starts by itself, without any new
//! write to trigger it.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::test_settings;

/// How soon after a restart a read that needs the dead process's work must answer: far
/// less than [`DEAD_LEASE`], so a read that waited for the lease to run out fails, and
/// loose enough for a loaded machine (a flush of the journal under eight busy test threads
/// has taken over 2 s).
const RECOVERED_WITHIN: Duration = Duration::from_secs(10);
/// How long the dead process's lease is made to last from the kill: the tests put in place
/// the state a kill in the middle of the work leaves, with a lease no read may wait out.
const DEAD_LEASE: Duration = Duration::from_secs(60);

/// A `roster serve` child on its own port, on the databases `names`.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    async fn start(names: &(String, String)) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_roster"))
            .arg("serve")
            .env("ROSTER_LISTEN", format!("127.0.0.1:{port}"))
            .env("ROSTER_MONGO_DATABASE", &names.0)
            .env("ROSTER_CLICKHOUSE_DATABASE", &names.1)
            .env("ROSTER_EVENT_ROUTES", "off")
            .env("ROSTER_PROJECTIONS", "off")
            .env("ROSTER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child, base: format!("http://127.0.0.1:{port}") };
        let client = reqwest::Client::new();
        let started = Instant::now();
        while client.get(format!("{}/health", server.base)).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "the server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fresh_names() -> (String, String) {
    let s = test_settings();
    (s.mongo.database, s.clickhouse.database)
}

/// Retries `read` until it answers 200 (or `RECOVERED_WITHIN` passes); returns the body and
/// how long it took.
async fn read_until_ok(client: &reqwest::Client, url: &str) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let r = client.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        if status == 200 {
            return (serde_json::from_str(&text).unwrap(), started.elapsed());
        }
        assert_eq!(status, 503, "{text}");
        assert!(started.elapsed() < RECOVERED_WITHIN * 2, "still {status} after {:?}: {text}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn event_reads_after_a_kill_during_appends_recover_without_a_new_append() {
    let names = fresh_names();
    let server = Server::start(&names).await;
    let client = reqwest::Client::new();
    // Eight writers append one event at a time; the acknowledged ones are recorded.
    let acknowledged: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, base, acknowledged) = (client.clone(), server.base.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let body = json!([{ "eventType": "tick", "data": { "writer": w, "i": i } }]).to_string();
                    let url = format!("{base}/events/writer-{w}");
                    let Ok(r) = client.post(url).header("content-type", "application/json").body(body).send().await
                    else {
                        return;
                    };
                    if r.status() == 201 {
                        let Ok(text) = r.text().await else { return };
                        let v: Value = serde_json::from_str(&text).unwrap();
                        let position = v["position"].as_u64().unwrap();
                        acknowledged.lock().unwrap().push((format!("writer-{w}"), position));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = server.child.id();
    let start_time = process_start_time(pid);
    server.kill();
    for w in writers {
        let _ = w.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 20, "the writers got going: {}", acknowledged.len());
    let last = acknowledged.iter().map(|(_, p)| *p).max().unwrap();

    // Whether the kill found the appender holding the log's lease is chance (it lets go
    // when idle): make it the dead process's, for longer than any read may wait.
    let Some(holder) = dead_holder(pid, start_time) else {
        return; // no /proc: a dead holder cannot be told from a live one here
    };
    let mongo = mongodb::Client::with_uri_str(test_settings().mongo.uri).await.unwrap().database(&names.0);
    let log = mongo.collection::<bson::Document>("EventStore_Log");
    let leased = log
        .update_one(bson::doc! { "_id": "log" }, bson::doc! { "$set": { "lease": dead_lease(holder) } })
        .await
        .unwrap();
    assert_eq!(leased.matched_count, 1, "the log's document exists after appends");

    let restarted = Server::start(&names).await;
    // No append from here on: the reads alone must bring the journal into ClickHouse.
    let (stream, took) = read_until_ok(&client, &format!("{}/events/writer-0?max=10000", restarted.base)).await;
    assert!(took < RECOVERED_WITHIN, "the stream read took {took:?}");
    let positions: Vec<u64> =
        stream["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
    for (_, p) in acknowledged.iter().filter(|(s, _)| s == "writer-0") {
        assert!(positions.contains(p), "acknowledged position {p} of writer-0 is readable");
    }
    let (version, _) = read_until_ok(&client, &format!("{}/events/writer-1/version", restarted.base)).await;
    let writer_1 = acknowledged.iter().filter(|(s, _)| s == "writer-1").count() as i64;
    assert!(version["version"].as_i64().unwrap() >= writer_1 - 1, "{version}");
    // The whole log holds every acknowledged position, and no page ends short of them.
    let (all, _) = read_until_ok(&client, &format!("{}/events?from=0&max=10000", restarted.base)).await;
    let all: Vec<u64> = all["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert!(all.len() as u64 > last, "positions 0..={last} are all there: {} events", all.len());
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "gap-free");
}

#[tokio::test]
async fn a_group_read_after_a_kill_mid_flush_does_not_wait_for_the_dead_lease() {
    let names = fresh_names();
    let server = Server::start(&names).await;
    let client = reqwest::Client::new();
    let group = json!({ "resourceType": "Group", "id": "g", "type": "person", "actual": true });
    let url = format!("{}/4_0_0/Group/g", server.base);
    let r = client.put(&url).header("content-type", "application/fhir+json").body(group.to_string()).send().await;
    assert_eq!(r.unwrap().status(), 201);
    // Single-member PATCHes until the kill; the acknowledged members are recorded.
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, url, acknowledged) = (client.clone(), url.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let member = format!("Patient/w{w}-{i}");
                    let ops =
                        json!([{ "op": "add", "path": "/member/-", "value": { "entity": { "reference": member } } }]);
                    let sent = client
                        .patch(&url)
                        .header("content-type", "application/json-patch+json")
                        .body(ops.to_string())
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => acknowledged.lock().unwrap().push(member),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = server.child.id();
    let start_time = process_start_time(pid);
    server.kill();
    for w in writers {
        let _ = w.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 10, "the writers got going: {}", acknowledged.len());

    // Whether the kill landed inside a flush is chance; make the state the one a kill
    // mid-flush leaves: the batches pending at the kill, under the dead process's lease.
    let mongo = mongodb::Client::with_uri_str(test_settings().mongo.uri).await.unwrap().database(&names.0);
    let groups = mongo.collection::<bson::Document>("Group_4_0_0");
    let Some(holder) = dead_holder(pid, start_time) else {
        return; // no /proc: a dead holder cannot be told from a live one here
    };
    let leased = groups
        .update_one(
            bson::doc! { "_id": "g", "outbox.batchId": { "$exists": true } },
            bson::doc! { "$set": { "flushLease": dead_lease(holder) } },
        )
        .await
        .unwrap();
    assert_eq!(leased.matched_count, 1, "member batches were pending at the kill (4 writers, 100 ms gathering)");

    let restarted = Server::start(&names).await;
    let (body, took) = read_until_ok(&client, &format!("{}/4_0_0/Group/g", restarted.base)).await;
    assert!(took < RECOVERED_WITHIN, "the Group read took {took:?}");
    let members: Vec<&str> =
        body["member"].as_array().unwrap().iter().map(|m| m["entity"]["reference"].as_str().unwrap()).collect();
    for m in &acknowledged {
        assert!(members.contains(&m.as_str()), "acknowledged member {m} is in the group");
    }
}

/// The lease holder record of the killed process `pid` (as `store::holder` writes it), or
/// `None` where this machine has no `/proc` to tell the dead from the living.
fn dead_holder(pid: u32, start_time: i64) -> Option<bson::Document> {
    let mut holder = roster::store::holder::this_process();
    if holder.is_empty() {
        return None;
    }
    holder.insert("pid", pid as i64);
    holder.insert("start", start_time);
    Some(holder)
}

/// A lease of the dead `holder`, lasting [`DEAD_LEASE`] from now.
fn dead_lease(holder: bson::Document) -> bson::Document {
    let until = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + DEAD_LEASE.as_millis() as i64);
    bson::doc! { "by": "dead", "until": until, "holder": holder }
}

/// A process's start time (`/proc/<pid>/stat` field 22), as a lease records it.
pub(crate) fn process_start_time(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    rest.split_whitespace().nth(19).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn every_write_waits_for_the_journal_unless_the_uri_says_otherwise() {
    let app = crate::helpers::spawn_app().await;
    let concern = app.mongo.write_concern().cloned().unwrap_or_default();
    assert_eq!(concern.journal, Some(true), "{concern:?}");
    assert_eq!(concern.w, None, "a standalone server has no majority to wait for");
    let majority = roster::startup::durable_writes(true);
    assert_eq!(majority.w, Some(mongodb::options::Acknowledgment::Majority));

    let mut settings = test_settings();
    let sep = if settings.mongo.uri.contains('?') { '&' } else { '?' };
    settings.mongo.uri = format!("{}{sep}journal=false", settings.mongo.uri);
    let db = roster::startup::mongo_database(&settings).await.unwrap();
    assert_eq!(db.write_concern().and_then(|c| c.journal), Some(false), "the operator's choice stands");
}
