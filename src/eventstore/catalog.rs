//! What the command line asks of the event log beyond reading it: stream listings,
//! totals, and which event ids a stream already holds (a replay skips them). Each waits
//! for journaled events first, so an acknowledged append is counted.

use std::collections::HashSet;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::log::ClickHouseEventStore;
use super::EventStoreError;

impl ClickHouseEventStore {
    /// Streams whose id starts with `prefix`: id, last version, event count, last event
    /// time (ms), in id order.
    pub async fn streams(&self, prefix: &str, max: usize) -> Result<Vec<StreamSummary>, EventStoreError> {
        self.await_journaled().await?;
        Ok(self
            .ch
            .query(
                "SELECT stream_id, max(stream_version) AS version, count() AS events, max(timestamp) AS last_event \
                 FROM EventStore_Events WHERE startsWith(stream_id, {p:String}) GROUP BY stream_id \
                 ORDER BY stream_id LIMIT {m:UInt64}",
            )
            .param("p", prefix)
            .param("m", max as u64)
            .fetch_all()
            .await?)
    }

    /// Which of `ids` `stream` already holds (a replay skips them).
    pub async fn existing_ids(&self, stream: &str, ids: &[Uuid]) -> Result<HashSet<Uuid>, EventStoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        self.await_journaled().await?;
        let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let found: Vec<String> = self
            .ch
            .query(
                "SELECT toString(event_id) FROM EventStore_Events \
                 WHERE stream_id = {s:String} AND has({ids:Array(UUID)}, event_id)",
            )
            .param("s", stream)
            .param("ids", texts)
            .fetch_all()
            .await?;
        Ok(found.iter().filter_map(|t| t.parse().ok()).collect())
    }

    /// Totals for `roster eventstore stats`.
    pub async fn stats(&self) -> Result<Stats, EventStoreError> {
        self.await_journaled().await?;
        let (events, streams, last, first_time, last_time): (u64, u64, i64, i64, i64) = self
            .ch
            .query(
                "SELECT count(), uniqExact(stream_id), if(count() = 0, -1, toInt64(max(position))), \
                 toUnixTimestamp64Milli(min(timestamp)), toUnixTimestamp64Milli(max(timestamp)) FROM EventStore_Events",
            )
            .fetch_one()
            .await?;
        let by_type: Vec<(String, u64)> = self
            .ch
            .query(
                "SELECT event_type, count() AS n FROM EventStore_Events GROUP BY event_type ORDER BY n DESC, event_type LIMIT 20",
            )
            .fetch_all()
            .await?;
        Ok(Stats { events, streams, last_position: last, first_time, last_time, by_type })
    }
}

#[derive(Debug, Clone, Row, Deserialize, Serialize)]
pub struct StreamSummary {
    pub stream_id: String,
    pub version: u64,
    pub events: u64,
    pub last_event: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub events: u64,
    pub streams: u64,
    pub last_position: i64,
    pub first_time: i64,
    pub last_time: i64,
    pub by_type: Vec<(String, u64)>,
}
