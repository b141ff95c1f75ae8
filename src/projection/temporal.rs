//! "What was true at time T": a patient's state folded from its stream, and a Group's
//! members from its member events.
//!
//! A patient's state at T folds the events of `patient:{MRN}` in stream order up to the
//! first one stamped after T. Snapshots of the fold (every [`SNAPSHOT_EVERY`] events) let
//! a later query start from the latest one not after T instead of the stream's start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::snapshot::{Snapshot, SnapshotStore};
use super::ProjectionError;
use crate::eventstore::log::ClickHouseEventStore;
use crate::eventstore::{EventStore, StoredEvent};

/// Events folded past the latest snapshot before a query saves a new one.
pub const SNAPSHOT_EVERY: u64 = 1_000;
const PAGE: usize = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatientState {
    pub mrn: String,
    /// The latest Patient resource (None before it was created, or after a delete).
    pub demographics: Option<Value>,
    /// Encounters admitted and not discharged, by id.
    pub active_encounters: BTreeMap<String, EncounterState>,
    /// The latest result per lab code.
    pub latest_labs: BTreeMap<String, LabState>,
    /// Stream version of the last event folded (-1: none).
    pub version: i64,
    /// Position and time (ms) of that event.
    pub position: Option<u64>,
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncounterState {
    pub class: String,
    pub location: String,
    pub admit_time: String,
    pub provider: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub observation_id: String,
    pub display: String,
    pub value: Option<Value>,
    pub unit: String,
    pub effective: String,
}

fn text(d: &Value, k: &str) -> String {
    d.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

impl PatientState {
    fn new(mrn: &str) -> PatientState {
        PatientState { mrn: mrn.to_string(), version: -1, ..PatientState::default() }
    }

    /// Folds one event of the patient's stream.
    pub fn apply(&mut self, e: &StoredEvent) {
        self.version = e.stream_version as i64;
        self.position = Some(e.position);
        self.timestamp = Some(e.timestamp);
        let Ok(d) = serde_json::from_str::<Value>(&e.data) else { return };
        match e.event_type.as_str() {
            "resource_created" | "resource_updated" if text(&d, "resourceType") == "Patient" => {
                self.demographics = d.get("resource").cloned().filter(|r| !r.is_null());
            }
            "resource_deleted" if text(&d, "resourceType") == "Patient" => self.demographics = None,
            "patient_admit" | "patient_transfer" => {
                let entry = self.active_encounters.entry(text(&d, "encounterId")).or_default();
                let set = |field: &mut String, v: String| {
                    if !v.is_empty() {
                        *field = v;
                    }
                };
                set(&mut entry.class, text(&d, "class"));
                set(&mut entry.location, text(&d, "location"));
                set(&mut entry.admit_time, text(&d, "admitTime"));
                set(&mut entry.provider, text(&d, "provider"));
            }
            "patient_discharge" => {
                self.active_encounters.remove(&text(&d, "encounterId"));
            }
            "lab_result" => {
                let code = text(&d, "code");
                self.latest_labs.insert(
                    code,
                    LabState {
                        observation_id: text(&d, "observationId"),
                        display: text(&d, "display"),
                        value: d.get("value").cloned().filter(|v| !v.is_null()),
                        unit: text(&d, "unit"),
                        effective: text(&d, "effective"),
                    },
                );
            }
            _ => {}
        }
    }
}

/// The state of patient `mrn` as of `at` (ms since the epoch).
pub async fn patient_state_at(
    store: &ClickHouseEventStore,
    snapshots: &SnapshotStore,
    mrn: &str,
    at: i64,
) -> Result<PatientState, ProjectionError> {
    let name = format!("patient_state:{mrn}");
    let mut state = match snapshots.latest_at(&name, at).await? {
        Some(s) => serde_json::from_str(&s.state).unwrap_or_else(|_| PatientState::new(mrn)),
        None => PatientState::new(mrn),
    };
    let stream = format!("patient:{mrn}");
    let mut folded = 0u64;
    'pages: loop {
        let events = store.read_stream(&stream, (state.version + 1) as u64, PAGE).await?;
        if events.is_empty() {
            break;
        }
        for e in &events {
            if e.timestamp > at {
                break 'pages;
            }
            state.apply(e);
            folded += 1;
        }
        if events.len() < PAGE {
            break;
        }
    }
    if folded >= SNAPSHOT_EVERY {
        if let (Some(position), Some(timestamp)) = (state.position, state.timestamp) {
            let text = serde_json::to_string(&state).map_err(|e| ProjectionError::Unavailable(e.to_string()))?;
            snapshots.save(&Snapshot { name, position, timestamp, state: text }).await?;
        }
    }
    Ok(state)
}

/// A Group member as of a time.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize, Serialize)]
pub struct MemberAt {
    pub reference: String,
    /// The member's stable order (its activation): the paging cursor.
    pub position: u64,
    /// The `Group.member` element (JSON).
    pub member: String,
}

/// Up to `first` members of `group` as of `at` (ms), after cursor `after`, in stable
/// order; the flag says whether more follow.
pub async fn group_members_at(
    ch: &clickhouse::Client,
    group: &str,
    at: i64,
    first: usize,
    after: u64,
) -> Result<(Vec<MemberAt>, bool), ProjectionError> {
    let mut rows: Vec<MemberAt> = ch
        .query(
            "SELECT member_reference AS reference, argMax(position, ver) AS position, argMax(member_json, ver) AS member \
             FROM Group_4_0_0_MemberEvents \
             WHERE group_id = {g:String} AND event_time <= fromUnixTimestamp64Milli({t:Int64}) \
             GROUP BY member_reference \
             HAVING argMax(event_type, ver) != 'removed' AND position > {after:UInt64} \
             ORDER BY position LIMIT {n:UInt64}",
        )
        .param("g", group)
        .param("t", at)
        .param("after", after)
        .param("n", first as u64 + 1)
        .fetch_all()
        .await?;
    let more = rows.len() > first;
    rows.truncate(first);
    Ok((rows, more))
}
