-- General event store (src/eventstore/): one row per event, never updated.
--
-- `position` is the global order: contiguous from 0, assigned by the one appender that
-- holds the log lease (see src/eventstore/appender.rs), so whatever is in this table is
-- always a gap-free prefix of the log. Reading by stream uses the `by_stream` projection,
-- which ClickHouse writes inside each part (atomically with it; a materialized view
-- would be a second insert that can fail on its own).
-- No deduplication window: an appender never inserts a cycle twice (after an unclear
-- failure it gives the lease up instead, and the next holder continues after the last
-- position stored), and the window's bookkeeping cost ~2 ms per insert.
CREATE TABLE IF NOT EXISTS EventStore_Events
(
    position        UInt64,
    stream_id       String,
    stream_version  UInt64,
    event_id        UUID,
    event_type      LowCardinality(String),
    data            String,
    metadata        Map(String, String),
    timestamp       DateTime64(3, 'UTC'),
    PROJECTION by_stream (SELECT * ORDER BY stream_id, stream_version)
)
ENGINE = MergeTree
ORDER BY position;
