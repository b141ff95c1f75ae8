-- Each Group version records its active member count in MongoDB (`memberCount`), so the
-- count view is not read any more; each view costs every member-event insert a part write.
-- Analysts get the count from the events: argMax(active_count, ver) per group_id.
DROP VIEW IF EXISTS Group_4_0_0_MemberCounts_mv;

DROP TABLE IF EXISTS Group_4_0_0_MemberCounts;
