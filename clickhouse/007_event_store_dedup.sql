-- The journal's flusher (src/eventstore/journal.rs) inserts each block with the token
-- `es-{from}-{to}`; a holder that takes the log lease over re-inserts the block its
-- predecessor had in flight with the same token. The window makes ClickHouse keep one
-- copy whichever insert lands first. It costs ~2 ms per insert, off the append's path
-- (appends are acknowledged once journaled in MongoDB).
ALTER TABLE EventStore_Events MODIFY SETTING non_replicated_deduplication_window = 10000;
