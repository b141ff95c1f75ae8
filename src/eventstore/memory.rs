//! An [`EventStore`] in one process's memory, for unit tests of code built on the store
//! (projections, HTTP handlers). Same contract as the ClickHouse store, minus durability.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::{validate_append, AppendResult, EventStore, EventStoreError, ExpectedVersion, NewEvent, StoredEvent};

pub struct MemoryEventStore {
    inner: Mutex<Inner>,
    last: watch::Sender<i64>,
}

#[derive(Default)]
struct Inner {
    log: Vec<StoredEvent>,
    /// Positions of each stream's events, in version order.
    streams: HashMap<String, Vec<usize>>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        MemoryEventStore { inner: Mutex::default(), last: watch::channel(-1).0 }
    }
}

impl EventStore for MemoryEventStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult, EventStoreError> {
        validate_append(stream, &mut events)?;
        let mut inner = self.inner.lock().unwrap();
        let Inner { log, streams } = &mut *inner;
        let positions = streams.entry(stream.to_string()).or_default();
        // A retry of the stream's last append returns its result.
        if positions.len() >= events.len() {
            let tail = &positions[positions.len() - events.len()..];
            if tail.iter().zip(&events).all(|(&p, e)| Some(log[p].event_id) == e.event_id) {
                return Ok(AppendResult {
                    next_expected_version: positions.len() as u64 - 1,
                    first_position: tail[0] as u64,
                    position: *tail.last().unwrap() as u64,
                });
            }
        }
        let current = positions.len() as i64 - 1;
        if !expected.admits(current) {
            return Err(EventStoreError::WrongExpectedVersion { stream: stream.into(), expected, actual: current });
        }
        let now = bson::DateTime::now().timestamp_millis();
        let first = log.len() as u64;
        for e in events {
            positions.push(log.len());
            log.push(StoredEvent {
                position: log.len() as u64,
                stream_id: stream.into(),
                stream_version: positions.len() as u64 - 1,
                event_id: e.event_id.expect("validated"),
                event_type: e.event_type,
                data: e.data,
                metadata: e.metadata,
                timestamp: now,
            });
        }
        let result = AppendResult {
            next_expected_version: positions.len() as u64 - 1,
            first_position: first,
            position: log.len() as u64 - 1,
        };
        self.last.send_replace(log.len() as i64 - 1);
        Ok(result)
    }

    async fn read_stream(&self, stream: &str, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        let inner = self.inner.lock().unwrap();
        let positions = inner.streams.get(stream).map(Vec::as_slice).unwrap_or_default();
        Ok(positions.iter().skip(from as usize).take(max).map(|&p| inner.log[p].clone()).collect())
    }

    async fn read_all(&self, from: u64, max: usize) -> Result<Vec<StoredEvent>, EventStoreError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.log.iter().skip(from as usize).take(max).cloned().collect())
    }

    async fn stream_version(&self, stream: &str) -> Result<i64, EventStoreError> {
        Ok(self.inner.lock().unwrap().streams.get(stream).map_or(-1, |p| p.len() as i64 - 1))
    }

    async fn last_position(&self) -> Result<i64, EventStoreError> {
        Ok(self.inner.lock().unwrap().log.len() as i64 - 1)
    }

    async fn wait_for_more(&self, position: i64) {
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|&last| last > position)).await;
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use serde_json::json;

    use super::*;
    use crate::eventstore::subscribe::subscribe;

    fn events(n: usize) -> Vec<NewEvent> {
        (0..n).map(|i| NewEvent::new("t", &json!({ "i": i }))).collect()
    }

    #[tokio::test]
    async fn expected_versions_positions_and_idempotent_retry() {
        let store = MemoryEventStore::default();
        let wrong = store.append("a", ExpectedVersion::Exists, events(1)).await.unwrap_err();
        assert!(matches!(wrong, EventStoreError::WrongExpectedVersion { actual: -1, .. }));
        let first = store.append("a", ExpectedVersion::NoStream, events(2)).await.unwrap();
        assert_eq!(first, AppendResult { next_expected_version: 1, first_position: 0, position: 1 });
        let b = store.append("b", ExpectedVersion::Any, events(1)).await.unwrap();
        assert_eq!(b.position, 2);
        let mut retry = events(2);
        retry
            .iter_mut()
            .zip(store.read_stream("a", 0, 10).await.unwrap())
            .for_each(|(e, s)| e.event_id = Some(s.event_id));
        assert_eq!(
            store.append("a", ExpectedVersion::NoStream, retry).await.unwrap(),
            first,
            "a retry is not a conflict"
        );
        assert!(store.append("a", ExpectedVersion::Exact(0), events(1)).await.is_err());
        store.append("a", ExpectedVersion::Exact(1), events(1)).await.unwrap();
        assert_eq!(store.stream_version("a").await.unwrap(), 2);
        assert_eq!(store.last_position().await.unwrap(), 3);
        let page = store.read_all(1, 2).await.unwrap();
        assert_eq!(page.iter().map(|e| (e.position, e.stream_id.as_str())).collect::<Vec<_>>(), [(1, "a"), (2, "b")]);
    }

    #[tokio::test]
    async fn a_subscription_catches_up_then_follows() {
        let store = std::sync::Arc::new(MemoryEventStore::default());
        store.append("s", ExpectedVersion::Any, events(3)).await.unwrap();
        let mut sub = Box::pin(subscribe(store.clone(), 1, 2));
        assert_eq!(sub.next().await.unwrap().unwrap().position, 1);
        assert_eq!(sub.next().await.unwrap().unwrap().position, 2);
        let writer = store.clone();
        tokio::spawn(async move { writer.append("t", ExpectedVersion::Any, events(1)).await.unwrap() });
        let live = tokio::time::timeout(Duration::from_secs(2), sub.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((live.position, live.stream_id.as_str()), (3, "t"));
    }

    #[test]
    fn json_output_embeds_data_as_json() {
        let e = StoredEvent {
            position: 4,
            stream_id: "p\"1".into(),
            stream_version: 0,
            event_id: uuid::Uuid::nil(),
            event_type: "t".into(),
            data: r#"{"a":[1,2]}"#.into(),
            metadata: [("actor".to_string(), "me".to_string())].into(),
            timestamp: 5,
        };
        let mut out = String::new();
        e.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["data"]["a"][1], 2);
        assert_eq!(v["streamId"], "p\"1");
        assert_eq!(v["metadata"]["actor"], "me");
    }
}
