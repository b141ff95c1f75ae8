-- Read models of the built-in projections (src/projection/). Each row is keyed by the
-- position of the event that wrote it (ReplacingMergeTree on the event's position), so a
-- projection that replays events after a crash rewrites the same rows: at-least-once
-- delivery, exactly-once effect. Read with FINAL (or argMax by position) for exact answers.

-- patient_timeline: one row per event of a `patient:{MRN}` stream.
CREATE TABLE IF NOT EXISTS Projection_PatientTimeline
(
    mrn             String,
    position        UInt64,
    timestamp       DateTime64(3, 'UTC'),
    event_type      LowCardinality(String),
    summary         String,
    stream_id       String,
    stream_version  UInt64,
    event_id        UUID
)
ENGINE = ReplacingMergeTree
ORDER BY (mrn, position);

-- event_statistics: one narrow row per event; counts are taken at query time
-- (by type, by source, by hour), which keeps replays from counting twice.
CREATE TABLE IF NOT EXISTS Projection_EventStatistics
(
    position    UInt64,
    hour        DateTime('UTC'),
    event_type  LowCardinality(String),
    source      LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY position;

-- active_encounters: the latest state of each encounter; `active` turns false at
-- discharge. `version` is the position of the event that wrote the row.
CREATE TABLE IF NOT EXISTS Projection_ActiveEncounters
(
    encounter_id  String,
    mrn           String,
    class         String,
    location      String,
    admit_time    String,
    provider      String,
    active        Bool,
    version       UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY encounter_id;
