-- Group membership, event-sourced. One row per member event; the materialized views below
-- keep current state. Written only by roster (see src/group/), after the Group version
-- that produced the events has committed in MongoDB.
--
-- Ordering: a group's events are totally ordered by (group_version, seq); `ver` packs the
-- pair into one number (group_version * 2^32 + seq) so ReplacingMergeTree keeps the latest.
-- Every row also carries the member's activation `position` (the `ver` of the add that made
-- it active: the stable member order) and the group's active member count after the event,
-- so replaying a row twice can never change the derived state.
CREATE TABLE IF NOT EXISTS Group_4_0_0_MemberEvents
(
    group_id          String,
    group_version     UInt32,
    seq               UInt32,
    ver               UInt64,
    event_id          String COMMENT '{group_id}/{group_version}/{seq}: a retried write has the same ids',
    event_type        Enum8('added' = 1, 'removed' = 2, 'updated' = 3),
    member_reference  String,
    member_type       LowCardinality(String),
    position          UInt64,
    period_start      String COMMENT 'FHIR dateTime as sent (may be partial); empty when absent',
    period_end        String,
    inactive          Bool,
    member_json       String COMMENT 'the Group.member element after the event; empty for removed',
    active_count      UInt64 COMMENT 'active members of the group after this event',
    actor             String,
    request_id        String,
    source            LowCardinality(String) COMMENT 'interaction that wrote it: create, update, patch, delete',
    event_time        DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (group_id, group_version, seq)
SETTINGS non_replicated_deduplication_window = 10000;

-- Current members by group, in stable order (ORDER BY position at read time).
CREATE TABLE IF NOT EXISTS Group_4_0_0_MemberState
(
    group_id          String,
    member_reference  String,
    member_type       LowCardinality(String),
    ver               UInt64,
    position          UInt64,
    active            Bool,
    inactive          Bool,
    period_start      String,
    period_end        String,
    member_json       String,
    group_version     UInt32
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY (group_id, member_reference);

CREATE MATERIALIZED VIEW IF NOT EXISTS Group_4_0_0_MemberState_mv TO Group_4_0_0_MemberState AS
SELECT group_id, member_reference, member_type, ver, position, event_type != 'removed' AS active, inactive,
       period_start, period_end, member_json, group_version
FROM Group_4_0_0_MemberEvents;

-- Reverse index: groups by member, for Group?member=.
CREATE TABLE IF NOT EXISTS Group_4_0_0_MemberGroups
(
    member_reference  String,
    group_id          String,
    ver               UInt64,
    active            Bool,
    inactive          Bool,
    period_start      String,
    period_end        String
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY (member_reference, group_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS Group_4_0_0_MemberGroups_mv TO Group_4_0_0_MemberGroups AS
SELECT member_reference, group_id, ver, event_type != 'removed' AS active, inactive, period_start, period_end
FROM Group_4_0_0_MemberEvents;

-- Active member count per group (Group.quantity): the count after the group's latest event.
CREATE TABLE IF NOT EXISTS Group_4_0_0_MemberCounts
(
    group_id       String,
    ver            UInt64,
    group_version  UInt32,
    active_count   UInt64
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY group_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS Group_4_0_0_MemberCounts_mv TO Group_4_0_0_MemberCounts AS
SELECT group_id, last_ver AS ver, last_version AS group_version, last_count AS active_count
FROM
(
    SELECT group_id, max(ver) AS last_ver, max(group_version) AS last_version,
           argMax(active_count, ver) AS last_count
    FROM Group_4_0_0_MemberEvents
    GROUP BY group_id
);
