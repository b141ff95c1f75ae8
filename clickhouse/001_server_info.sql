-- Facts about this roster database, readable by analysts and checked by the server.
-- Later migrations add the Group member events and the event store.
CREATE TABLE IF NOT EXISTS roster_info
(
    key        String,
    value      String,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY key;

INSERT INTO roster_info (key, value) VALUES ('fhir_version', '4.0.1'), ('schema_owner', 'roster');
