-- The search index (src/search/): one row per (resource type, index key, resource id).
-- A key is `param US tag payload` (see src/search/keys.rs), so one sorted column answers
-- equality, `IN` and ranges (prefixes, dates, numbers) for every parameter of every type.
--
-- Rows are written after the resource version committed in MongoDB, by the search flusher:
-- the keys a version added (deleted = 0) and those it dropped (deleted = 1), each with the
-- version (`meta.versionId`) that wrote it. The latest row per (rt, key, id) is the truth:
-- read with FINAL (or argMax(deleted, version)). Until a version's rows are here its
-- MongoDB document stays `historyPending`, and searches evaluate such documents themselves
-- (see src/search/execute.rs), so a search never misses an acknowledged write.
CREATE TABLE IF NOT EXISTS SearchIndex
(
    rt       LowCardinality(String),
    key      String,
    id       String,
    version  Int64,
    deleted  UInt8
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (rt, key, id)
-- Small granules: most reads are a few keys' rows (a point lookup read 8,192 rows per part
-- at the default; 1,024 halved the time of a first page, measured in docs/search.md).
SETTINGS index_granularity = 1024;
