//! What the GraphQL schema serves: its object types, and the rows they are read from.

use async_graphql::SimpleObject;

use super::rfc3339;
use crate::projection::builtin::EncounterRow;

/// A timeline row as read.
#[derive(clickhouse::Row, serde::Deserialize)]
pub(super) struct TimelineRow {
    position: u64,
    timestamp_ms: i64,
    event_type: String,
    summary: String,
    stream_id: String,
    stream_version: u64,
}

#[derive(SimpleObject)]
pub struct TypeCount {
    pub event_type: String,
    pub count: u64,
}

#[derive(SimpleObject)]
pub struct SourceCount {
    pub source: String,
    pub count: u64,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct EventStatistics {
    pub by_type: Vec<TypeCount>,
    pub by_source: Vec<SourceCount>,
    pub total: u64,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct Encounter {
    pub id: String,
    pub patient_mrn: String,
    pub class: String,
    pub location: String,
    pub admit_time: String,
    pub provider: String,
    pub active: bool,
}

impl From<EncounterRow> for Encounter {
    fn from(r: EncounterRow) -> Self {
        Encounter {
            id: r.encounter_id,
            patient_mrn: r.mrn,
            class: r.class,
            location: r.location,
            admit_time: r.admit_time,
            provider: r.provider,
            active: r.active,
        }
    }
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub state: String,
    pub position: i64,
    /// Events in the log after the checkpoint.
    pub lag: i64,
    pub events_processed: i64,
    pub error: Option<String>,
    pub failed_position: Option<i64>,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct LabResult {
    pub code: String,
    pub display: String,
    /// The value as JSON text (a number, or a string).
    pub value: Option<String>,
    pub unit: String,
    pub effective: String,
    pub observation_id: String,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct PatientState {
    pub mrn: String,
    /// The Patient resource as of then (JSON text), null before it existed.
    pub demographics: Option<String>,
    pub active_encounters: Vec<Encounter>,
    pub latest_labs: Vec<LabResult>,
    /// Stream version of the last event folded, -1 for none.
    pub version: i64,
}

#[derive(SimpleObject)]
pub struct Member {
    pub reference: String,
    /// The `Group.member` element (JSON text).
    pub member: String,
}

#[derive(SimpleObject)]
pub struct MemberEdge {
    pub cursor: String,
    pub node: Member,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "camelCase")]
pub struct MemberConnection {
    pub edges: Vec<MemberEdge>,
    pub page_info: PageInfo,
}

/// A timeline entry as served: the time as RFC 3339.
#[derive(SimpleObject)]
#[graphql(name = "TimelineEntry", rename_fields = "camelCase")]
pub struct TimelineEntryOut {
    pub position: u64,
    pub timestamp: String,
    pub event_type: String,
    pub summary: String,
    pub stream_id: String,
    pub stream_version: u64,
}

impl From<TimelineRow> for TimelineEntryOut {
    fn from(t: TimelineRow) -> Self {
        TimelineEntryOut {
            position: t.position,
            timestamp: rfc3339(t.timestamp_ms),
            event_type: t.event_type,
            summary: t.summary,
            stream_id: t.stream_id,
            stream_version: t.stream_version,
        }
    }
}
