-- `group:{id}` streams: a Group's member events read as event-store events, served by this
-- parameterized view over Group_4_0_0_MemberEvents rather than written twice.
--   SELECT * FROM EventStore_GroupEvents(group = 'cohort-1') ORDER BY stream_version
-- They are views, not log entries: `position` is the member event's `ver` (group version
-- * 2^32 + sequence), and `read_all` / subscriptions do not include them.
CREATE VIEW IF NOT EXISTS EventStore_GroupEvents AS
SELECT
    ver AS position,
    concat('group:', group_id) AS stream_id,
    toUInt64(row_number() OVER (ORDER BY group_version, seq) - 1) AS stream_version,
    reinterpretAsUUID(MD5(event_id)) AS event_id,
    concat('member_', toString(event_type)) AS event_type,
    if(member_json = '', concat('{"entity":{"reference":', toJSONString(member_reference), '}}'), member_json) AS data,
    map('correlationId', request_id, 'actor', actor, 'source', toString(source),
        'groupVersion', toString(group_version)) AS metadata,
    event_time AS timestamp
FROM
(
    SELECT * FROM Group_4_0_0_MemberEvents
    WHERE group_id = {group:String}
    ORDER BY group_version, seq
    LIMIT 1 BY group_version, seq
);
