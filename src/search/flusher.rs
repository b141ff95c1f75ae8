//! Moves committed versions' search keys into ClickHouse's `SearchIndex`, one insert for
//! every type and resource at a time.
//!
//! Why batched: a small ClickHouse insert costs 15–25 ms of its CPU whatever its size (see
//! `group::flusher`), so one per write would cap writes at a few dozen per second. An
//! insert goes out at once when the flusher was idle for [`GATHER`], else when [`GATHER`]
//! has passed since the last one began: under load, one insert per interval carries every
//! write that came meanwhile; a lone write waits for nothing.
//!
//! Failure: the waiters of a failed insert get the error, so their documents keep
//! `historyPending` (with `searchAdded`/`searchRemoved`) and searches keep reading them
//! from MongoDB; the next write of the resource, a read, or the sweep sends them again.
//! A retried insert repeats rows with the same version: `ReplacingMergeTree(version)` keeps
//! one. Several server processes each insert their own writes' rows; rows of one resource
//! from two processes are ordered by their version, whichever insert lands first.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clickhouse::Row;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::store::{PendingKeys, SearchSink};

/// The table (see `clickhouse/008_search_index.sql`).
pub const TABLE: &str = "SearchIndex";

/// The least time between two inserts' starts.
const GATHER: Duration = Duration::from_millis(100);

/// Most rows in one insert (a reindex sends many).
const BLOCK_ROWS: usize = 200_000;

#[derive(Debug, Clone, Row, Serialize)]
pub struct IndexRow {
    pub rt: String,
    pub key: String,
    pub id: String,
    pub version: i64,
    pub deleted: u8,
}

/// Rows of pending keys: additions, then removals.
pub fn rows(rt: &str, pending: &[PendingKeys]) -> Vec<IndexRow> {
    let mut out = Vec::new();
    for p in pending {
        for (keys, deleted) in [(&p.added, 0), (&p.removed, 1)] {
            out.extend(keys.iter().map(|key| IndexRow {
                rt: rt.to_string(),
                key: key.clone(),
                id: p.id.clone(),
                version: p.version,
                deleted,
            }));
        }
    }
    out
}

/// Inserts rows now, in blocks of at most [`BLOCK_ROWS`].
pub async fn insert(ch: &clickhouse::Client, rows: &[IndexRow]) -> Result<(), clickhouse::error::Error> {
    for block in rows.chunks(BLOCK_ROWS) {
        let mut insert = ch.insert::<IndexRow>(TABLE).await?.with_setting("async_insert", "0");
        for row in block {
            insert.write(row).await?;
        }
        insert.end().await?;
    }
    Ok(())
}

#[derive(Default)]
struct Queue {
    rows: Vec<IndexRow>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    running: bool,
}

/// The process's search key flusher (a [`SearchSink`]).
pub struct SearchFlusher {
    ch: clickhouse::Client,
    queue: Mutex<Queue>,
}

impl SearchFlusher {
    pub fn new(ch: clickhouse::Client) -> Arc<SearchFlusher> {
        Arc::new(SearchFlusher { ch, queue: Mutex::default() })
    }

    async fn submit(self: &Arc<Self>, rows: Vec<IndexRow>) -> Result<(), String> {
        if rows.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.rows.extend(rows);
            q.waiters.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.run().await });
        }
        rx.await.unwrap_or_else(|_| Err("the search flusher stopped".into()))
    }

    /// Inserts while there is work, at most one insert per [`GATHER`]; ends when idle
    /// (the next submit starts it again).
    async fn run(self: Arc<Self>) {
        let mut last: Option<Instant> = None;
        loop {
            if let Some(wait) = last.map(|l| GATHER.saturating_sub(l.elapsed())) {
                tokio::time::sleep(wait).await;
            }
            let (rows, waiters) = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.waiters.is_empty() {
                    q.running = false;
                    return;
                }
                (std::mem::take(&mut q.rows), std::mem::take(&mut q.waiters))
            };
            last = Some(Instant::now());
            let outcome = insert(&self.ch, &rows).await.map_err(|e| e.to_string());
            if let Err(e) = &outcome {
                tracing::warn!(rows = rows.len(), error = %e, "search keys stay pending in MongoDB");
            }
            for w in waiters {
                let _ = w.send(outcome.clone());
            }
        }
    }
}

/// The flusher behind an `Arc`, as the store's sink.
pub struct Sink(pub Arc<SearchFlusher>);

impl SearchSink for Sink {
    fn index<'a>(&'a self, rt: &'a str, pending: Vec<PendingKeys>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.submit(rows(rt, &pending)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_additions_then_removals_with_the_version() {
        let p =
            PendingKeys { id: "1".into(), version: 3, added: vec!["a".into(), "b".into()], removed: vec!["c".into()] };
        let r = rows("Patient", &[p]);
        let got: Vec<(&str, u8, i64)> = r.iter().map(|r| (r.key.as_str(), r.deleted, r.version)).collect();
        assert_eq!(got, vec![("a", 0, 3), ("b", 0, 3), ("c", 1, 3)]);
    }
}
