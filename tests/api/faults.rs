//! Faults between the two stores, made real with a TCP proxy in front of ClickHouse or
//! MongoDB that the test cuts: the server sees refused and dropped connections, exactly as
//! when a store dies. After every fault the membership must be exactly what the
//! acknowledged writes say: nothing lost, duplicated or phantom.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

const PASS: u8 = 0;
/// Refuse new connections and drop open ones.
const DOWN: u8 = 1;
/// Drop any connection that sends an `INSERT` (ClickHouse dies mid-write).
const NO_INSERTS: u8 = 2;

struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                if m.load(Ordering::SeqCst) == DOWN {
                    drop(client);
                    continue;
                }
                let (m, target) = (m.clone(), target.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        pipe(client, server, m).await;
                    }
                });
            }
        });
        Proxy { port, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let m = mode.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mode = m.load(Ordering::SeqCst);
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf[..n]);
            if mode == DOWN || (mode == NO_INSERTS && window.windows(6).any(|w| w == b"INSERT")) {
                return;
            }
            tail = window[window.len().saturating_sub(5)..].to_vec();
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let m = mode.clone();
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if m.load(Ordering::SeqCst) == DOWN || cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending closes both: the peer sees the connection drop.
    tokio::select! { _ = upstream => {}, _ = downstream => {} }
}

/// Sends the settings' ClickHouse traffic through a proxy the test controls.
async fn clickhouse_behind_proxy(settings: &mut roster::config::Settings) -> Proxy {
    let proxy = Proxy::start(host_port(&settings.clickhouse.url)).await;
    settings.clickhouse.url = format!("http://127.0.0.1:{}", proxy.port);
    proxy
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.split(['/', '?']).next().unwrap();
    rest.rsplit('@').next().unwrap().to_string()
}

fn member(reference: &str) -> Value {
    json!({ "entity": { "reference": reference } })
}

/// A JSON Patch adding these members.
fn adds<S: AsRef<str>>(references: impl IntoIterator<Item = S>) -> Value {
    references.into_iter().map(|r| json!({ "op": "add", "path": "/member/-", "value": member(r.as_ref()) })).collect()
}

async fn members(app: &TestApp, id: &str) -> (u16, Vec<String>) {
    let r = app.get(&format!("Group/{id}")).await;
    let status = r.status().as_u16();
    let body = json(r).await;
    let refs = body["member"]
        .as_array()
        .map(|m| m.iter().map(|x| x["entity"]["reference"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (status, refs)
}

async fn event_rows(app: &TestApp, id: &str) -> u64 {
    let ch = roster::migrate::clickhouse_client(&test_settings_for(app).clickhouse);
    ch.query("SELECT count() FROM Group_4_0_0_MemberEvents WHERE group_id = ?").bind(id).fetch_one().await.unwrap()
}

/// Member batches committed but not yet in ClickHouse.
async fn pending_batches(app: &TestApp, id: &str) -> usize {
    roster::group::outbox::pending_in(&group_doc(app, id).await).unwrap().len()
}

/// The Group's current-version document in MongoDB.
async fn group_doc(app: &TestApp, id: &str) -> bson::Document {
    app.mongo.collection::<bson::Document>("Group_4_0_0").find_one(bson::doc! { "_id": id }).await.unwrap().unwrap()
}

/// The app's settings, but pointing straight at ClickHouse (not through the proxy).
fn test_settings_for(app: &TestApp) -> roster::config::Settings {
    let mut s = app.settings.clone();
    s.clickhouse.url = std::env::var("ROSTER_CLICKHOUSE_URL").unwrap();
    s
}

#[tokio::test]
async fn clickhouse_dies_between_the_mongo_commit_and_the_event_insert() {
    let mut settings = test_settings();
    let proxy = clickhouse_behind_proxy(&mut settings).await;
    let app = spawn_with(settings, Default::default()).await;
    let group = json!({ "resourceType": "Group", "id": "f1", "type": "person", "actual": true,
                        "member": [member("Patient/a"), member("Patient/b")] });
    assert_eq!(app.put("Group/f1", &group).await.status(), 201);

    // ClickHouse answers the planning reads but dies on the insert: the version is
    // committed with its events in the outbox, so the client is told the truth (200).
    proxy.set(NO_INSERTS);
    let r = app.patch("Group/f1", &adds(["Patient/c"])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(etag(&r), "W/\"2\"");
    // While the events cannot be inserted, no reader sees version 2 without them.
    let (status, _) = members(&app, "f1").await;
    assert_eq!(status, 503);
    let r = app.get("Group?member=Patient/c").await;
    assert_eq!(r.status(), 503, "the reverse index is not answered without the pending events");
    // A PATCH naming its member by reference is planned over the pending events: accepted.
    let r = app.patch("Group/f1", &adds(["Patient/d"])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(etag(&r), "W/\"3\"");
    // One that needs positions must see every event in the views: refused, nothing written.
    let r = app.patch("Group/f1", &json!([{ "op": "remove", "path": "/member/0" }])).await;
    assert_eq!(r.status(), 503, "no positional write builds on a version whose events are missing");
    assert_eq!(pending_batches(&app, "f1").await, 2);

    // ClickHouse is back: the next read finishes both batches; exactly a, b, c, d.
    proxy.set(PASS);
    let (status, refs) = members(&app, "f1").await;
    assert_eq!(status, 200);
    assert_eq!(refs, ["Patient/a", "Patient/b", "Patient/c", "Patient/d"]);
    assert_eq!(event_rows(&app, "f1").await, 4, "no event written twice");
    assert_eq!(pending_batches(&app, "f1").await, 0);
    let current = app.get("Group/f1").await;
    assert_eq!(etag(&current), "W/\"3\"", "the refused PATCH wrote nothing");
    assert_eq!(json(current).await["quantity"], 4);
}

#[tokio::test]
async fn clickhouse_down_before_the_write_changes_nothing_it_cannot_finish() {
    let mut settings = test_settings();
    let proxy = clickhouse_behind_proxy(&mut settings).await;
    let app = spawn_with(settings, Default::default()).await;
    let group = json!({ "resourceType": "Group", "id": "f2", "type": "person", "actual": true, "member": [member("Patient/a")] });
    app.put("Group/f2", &group).await;
    proxy.set(DOWN);
    // Positional: needs the views, which are unreachable → 503, nothing written.
    let r = app.patch("Group/f2", &json!([{ "op": "remove", "path": "/member/0" }])).await;
    let issue = assert_outcome(r, 503).await;
    // The body names the store, not the driver's message (which is logged).
    let shown = issue["diagnostics"].as_str().unwrap();
    assert!(shown.contains("member store is unavailable"), "{shown}");
    for internal in ["error", "Connect", "127.0.0.1", "http"] {
        assert!(!shown.contains(internal), "driver text in a 503 body: {shown}");
    }
    // A member that could be active needs its row: Patient/a is, so this asks ClickHouse.
    let r = app.patch("Group/f2", &json!([{ "op": "remove", "path": "/member", "value": member("Patient/a") }])).await;
    assert_outcome(r, 503).await;
    assert_eq!(etag(&app.get("Group/f2").await), "W/\"1\"", "refused writes changed nothing");
    // A new member is known not to be active without ClickHouse: the write is durable in
    // MongoDB and acknowledged; its events wait there.
    let r = app.patch("Group/f2", &adds(["Patient/b"])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(members(&app, "f2").await.0, 503, "but nobody reads members without them");
    proxy.set(PASS);
    let (_, refs) = members(&app, "f2").await;
    assert_eq!(refs, ["Patient/a", "Patient/b"]);
    assert_eq!(etag(&app.get("Group/f2").await), "W/\"2\"");
    assert_eq!(event_rows(&app, "f2").await, 2);
}

#[tokio::test]
async fn a_pending_batch_is_finished_by_the_start_up_sweep_and_never_duplicated() {
    let mut settings = test_settings();
    let direct = settings.clickhouse.url.clone();
    let proxy = clickhouse_behind_proxy(&mut settings).await;
    let app = spawn_with(settings.clone(), Default::default()).await;
    app.put("Group/f3", &json!({ "resourceType": "Group", "id": "f3", "type": "person", "actual": true })).await;
    proxy.set(NO_INSERTS);
    let ops = adds((0..100).map(|i| format!("Patient/{i}")));
    assert_eq!(app.patch("Group/f3", &ops).await.status(), 200);
    let pending = roster::group::outbox::pending_in(&group_doc(&app, "f3").await).unwrap();
    assert_eq!(pending.len(), 1, "batch pending in MongoDB");

    // Half of a flush happened before a crash: some rows are in ClickHouse, the marker is
    // still in MongoDB (as when MongoDB dies before the marker is cleared).
    let ch = roster::migrate::clickhouse_client(&test_settings_for(&app).clickhouse);
    let events = roster::group::outbox::inline_events("f3", &pending[0]).unwrap();
    roster::group::events::insert(&ch, &events[..40]).await.unwrap();

    // A new server process starts on the same databases: its sweep finishes the batch.
    settings.clickhouse.url = direct;
    let restarted = spawn_with(settings, Default::default()).await;
    let mut done = false;
    for _ in 0..100 {
        if pending_batches(&restarted, "f3").await == 0 {
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(done, "the start-up sweep cleared the batch");
    assert_eq!(event_rows(&restarted, "f3").await, 100, "the 40 rows already there were not inserted again");
    let (_, refs) = members(&restarted, "f3").await;
    assert_eq!(refs.len(), 100);
    assert_eq!(json(restarted.get("Group/f3").await).await["quantity"], 100);
}

#[tokio::test]
async fn mongo_down_at_the_commit_writes_no_events() {
    let mut settings = test_settings();
    let proxy = Proxy::start(host_port(&settings.mongo.uri)).await;
    settings.mongo.uri =
        format!("mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=1500", proxy.port);
    let app = spawn_with(settings, Default::default()).await;
    app.put("Group/f4", &json!({ "resourceType": "Group", "id": "f4", "type": "person", "actual": true, "member": [member("Patient/a")] })).await;
    proxy.set(DOWN);
    let r = app.patch("Group/f4", &adds(["Patient/b"])).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(event_rows(&app, "f4").await, 1, "no event of an uncommitted write");
    proxy.set(PASS);
    let mut refs = Vec::new();
    for _ in 0..50 {
        let (status, r) = members(&app, "f4").await;
        if status == 200 {
            refs = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(refs, ["Patient/a"]);
}

#[tokio::test]
async fn flushers_racing_in_two_processes_insert_every_event_once() {
    let mut settings = test_settings();
    let direct = settings.clickhouse.url.clone();
    let proxy = clickhouse_behind_proxy(&mut settings).await;
    let app = spawn_with(settings.clone(), Default::default()).await;
    app.put("Group/f5", &json!({ "resourceType": "Group", "id": "f5", "type": "person", "actual": true })).await;
    // 20 acknowledged PATCHes whose events all wait in MongoDB.
    proxy.set(NO_INSERTS);
    for b in 0..20 {
        let ops = adds((0..50).map(|i| format!("Patient/{b}-{i}")));
        assert_eq!(app.patch("Group/f5", &ops).await.status(), 200);
    }
    assert_eq!(pending_batches(&app, "f5").await, 20);
    // ClickHouse is back; a second server process starts on the same databases (its
    // start-up sweep flushes), and readers of both processes flush at the same moment.
    proxy.set(PASS);
    settings.clickhouse.url = direct;
    let other = spawn_with(settings, Default::default()).await;
    let reads = (0..6).map(|i| {
        let (app, other) = (&app, &other);
        async move {
            let target = if i % 2 == 0 { app } else { other };
            if i < 4 {
                members(target, "f5").await
            } else {
                (target.get("Group?member=Patient/19-49").await.status().as_u16(), Vec::new())
            }
        }
    });
    let results = futures_util::future::join_all(reads).await;
    for (i, (status, refs)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "read {i}");
        if i < 4 {
            assert_eq!(refs.len(), 1000, "read {i} saw every acknowledged member");
        }
    }
    assert_eq!(event_rows(&app, "f5").await, 1000, "each event inserted exactly once");
    assert_eq!(pending_batches(&app, "f5").await, 0);
    assert!(!group_doc(&app, "f5").await.contains_key("flushLease"), "the lease was released");
}

#[tokio::test]
async fn a_batch_pending_in_the_old_format_stops_the_start() {
    let app = spawn_app().await;
    app.mongo
        .collection::<bson::Document>("Group_4_0_0")
        .insert_one(bson::doc! { "_id": "old", "versionId": 1i64, "outbox": { "batchId": "b", "events": "[]" } })
        .await
        .unwrap();
    let refused = roster::startup::Application::build(app.settings.clone(), Default::default()).await;
    let message = refused.err().expect("a server that cannot flush the batch does not start").to_string();
    assert!(message.contains("Group/old"), "{message}");
}

#[tokio::test]
async fn two_processes_writing_one_group_see_each_others_members() {
    // Each process keeps a member index and the document it committed last; a write by
    // the other process must make both be rebuilt, not trusted.
    let settings = test_settings();
    let a = spawn_with(settings.clone(), Default::default()).await;
    let b = spawn_with(settings, Default::default()).await;
    let add = |r: &str| adds([r]);
    let group = json!({ "resourceType": "Group", "id": "f6", "type": "person", "actual": true, "member": [member("Patient/1")] });
    assert_eq!(a.put("Group/f6", &group).await.status(), 201);
    assert_eq!(a.patch("Group/f6", &add("Patient/2")).await.status(), 200);
    assert_eq!(b.patch("Group/f6", &add("Patient/3")).await.status(), 200);
    // A's index says Patient/3 is not a member and its remembered document is stale.
    assert_eq!(a.patch("Group/f6", &add("Patient/3")).await.status(), 200);
    let remove = json!([{ "op": "remove", "path": "/member", "value": member("Patient/3") }]);
    assert_eq!(a.patch("Group/f6", &remove).await.status(), 200);
    assert_eq!(b.patch("Group/f6", &add("Patient/4")).await.status(), 200);
    assert_eq!(a.patch("Group/f6", &add("Patient/2")).await.status(), 200);
    let (status, refs) = members(&b, "f6").await;
    assert_eq!(status, 200);
    assert_eq!(refs, ["Patient/1", "Patient/2", "Patient/4"]);
    assert_eq!(json(a.get("Group/f6").await).await["quantity"], 3);
    assert_eq!(event_rows(&a, "f6").await, 5, "adds of 1, 2, 3 and 4, one remove of 3: re-adds wrote nothing");
}

/// 16 writers, each adding members one PATCH at a time to its own Group (and every fourth
/// PATCH to a Group another writer also uses), while ClickHouse goes down for a while and
/// comes back: every acknowledged member is there, no other, and each event is stored once
/// — the gathering of many groups into one insert loses and doubles nothing.
#[tokio::test]
async fn sixteen_writers_over_sixteen_groups_lose_and_double_nothing_while_clickhouse_is_down() {
    let mut settings = test_settings();
    let proxy = clickhouse_behind_proxy(&mut settings).await;
    let app = spawn_with(settings, Default::default()).await;
    for g in 0..16 {
        let group = json!({ "resourceType": "Group", "id": format!("w{g}"), "type": "person", "actual": true });
        assert_eq!(app.put(&format!("Group/w{g}"), &group).await.status(), 201);
    }
    const PER_WRITER: usize = 40;
    let writers = (0..16).map(|w| {
        let app = &app;
        async move {
            let mut acknowledged: Vec<(usize, String)> = Vec::new();
            let mut attempted: Vec<(usize, String)> = Vec::new();
            for i in 0..PER_WRITER {
                let group = if i % 4 == 3 { (w + 1) % 16 } else { w };
                let reference = format!("Patient/w{w}-{i}");
                attempted.push((group, reference.clone()));
                let status = app.patch(&format!("Group/w{group}"), &adds([&reference])).await.status();
                match status.as_u16() {
                    200 => acknowledged.push((group, reference)),
                    503 => {}
                    other => panic!("writer {w}: PATCH {i} answered {other}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            (acknowledged, attempted)
        }
    });
    let outage = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        proxy.set(DOWN);
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        proxy.set(PASS);
    };
    let (results, ()) = tokio::join!(futures_util::future::join_all(writers), outage);
    let mut acknowledged: Vec<Vec<String>> = vec![Vec::new(); 16];
    let mut attempted: Vec<Vec<String>> = vec![Vec::new(); 16];
    for (acked, tried) in results {
        for (g, r) in acked {
            acknowledged[g].push(r);
        }
        for (g, r) in tried {
            attempted[g].push(r);
        }
    }
    let total: usize = acknowledged.iter().map(Vec::len).sum();
    assert!(total > 16 * PER_WRITER / 2, "most PATCHes were acknowledged ({total})");
    for g in 0..16 {
        let id = format!("w{g}");
        let (status, mut refs) = members(&app, &id).await;
        assert_eq!(status, 200, "Group/{id} is readable once ClickHouse is back");
        refs.sort();
        let mut acked = acknowledged[g].clone();
        acked.sort();
        // A 503 never committed (ClickHouse was needed before the commit), so the members
        // are exactly the acknowledged adds.
        assert_eq!(refs, acked, "Group/{id}: the acknowledged members, no other");
        assert!(refs.iter().all(|r| attempted[g].contains(r)));
        assert_eq!(event_rows(&app, &id).await, acked.len() as u64, "Group/{id}: each event stored once");
        assert_eq!(pending_batches(&app, &id).await, 0);
    }
}
