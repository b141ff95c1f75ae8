//! The built-in projections: patient timeline, event statistics, active encounters.
//! Their tables are in `clickhouse/006_projections.sql` (and `clickhouse/README.md`).

use std::collections::HashMap;
use std::sync::Arc;

use clickhouse::Row;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Projection, ProjectionError, Snapshotting, Target};
use crate::eventstore::StoredEvent;

pub const TIMELINE: &str = "Projection_PatientTimeline";
pub const STATISTICS: &str = "Projection_EventStatistics";
pub const ENCOUNTERS: &str = "Projection_ActiveEncounters";

/// Every built-in projection.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(PatientTimeline), Arc::new(EventStatistics), Arc::new(ActiveEncounters)]
}

/// The MRN of a `patient:{MRN}` stream.
fn mrn_of(e: &StoredEvent) -> Option<&str> {
    e.stream_id.strip_prefix("patient:").filter(|m| !m.is_empty())
}

async fn insert<T>(ch: &clickhouse::Client, table: &str, rows: &[T]) -> Result<(), ProjectionError>
where
    T: clickhouse::RowOwned + clickhouse::RowWrite + Send + Sync,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = ch.insert::<T>(table).await?.with_setting("async_insert", "0");
    for row in rows {
        insert.write(row).await?;
    }
    Ok(insert.end().await?)
}

fn text<'a>(data: &'a Value, key: &str) -> &'a str {
    data.get(key).and_then(Value::as_str).unwrap_or("")
}

fn data(e: &StoredEvent) -> Result<Value, ProjectionError> {
    serde_json::from_str(&e.data)
        .map_err(|err| ProjectionError::Poison { position: e.position, message: err.to_string() })
}

// ---- patient timeline ----

pub struct PatientTimeline;

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct TimelineRow {
    pub mrn: String,
    pub position: u64,
    pub timestamp: i64,
    pub event_type: String,
    pub summary: String,
    pub stream_id: String,
    pub stream_version: u64,
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
}

/// One line saying what an event means to a reader of the timeline.
pub fn summary(event_type: &str, d: &Value) -> String {
    let resource = || format!("{}/{}", text(d, "resourceType"), text(d, "id"));
    match event_type {
        "resource_created" => format!("{} created", resource()),
        "resource_updated" => format!("{} updated (version {})", resource(), text(d, "versionId")),
        "resource_deleted" => format!("{} deleted", resource()),
        "patient_admit" => format!("admitted ({}) to {}", text(d, "class"), text(d, "location")),
        "patient_transfer" => format!("transferred from {} to {}", text(d, "fromLocation"), text(d, "location")),
        "patient_discharge" => format!("discharged from {}", text(d, "location")),
        "lab_result" => {
            let name = Some(text(d, "display")).filter(|s| !s.is_empty()).unwrap_or(text(d, "code"));
            let value = d.get("value").map(|v| v.to_string().trim_matches('"').to_string()).unwrap_or_default();
            format!("lab {name}: {value} {}", text(d, "unit")).trim_end().to_string()
        }
        "claim_submitted" => format!("claim {} submitted ({})", text(d, "claimId"), text(d, "status")),
        "claim_updated" => format!("claim {} updated ({})", text(d, "claimId"), text(d, "status")),
        other => other.to_string(),
    }
}

impl Projection for PatientTimeline {
    fn name(&self) -> &'static str {
        "patient_timeline"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TIMELINE]
    }

    fn handle<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let mut rows = Vec::new();
            for e in events {
                let Some(mrn) = mrn_of(e) else { continue };
                rows.push(TimelineRow {
                    mrn: mrn.to_string(),
                    position: e.position,
                    timestamp: e.timestamp,
                    event_type: e.event_type.clone(),
                    summary: summary(&e.event_type, &data(e)?),
                    stream_id: e.stream_id.clone(),
                    stream_version: e.stream_version,
                    event_id: e.event_id,
                });
            }
            insert(ch, &target.table(TIMELINE), &rows).await
        })
    }
}

// ---- event statistics ----

pub struct EventStatistics;

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct StatisticsRow {
    position: u64,
    /// Seconds since the epoch, at the start of the event's hour.
    hour: u32,
    event_type: String,
    source: String,
}

impl Projection for EventStatistics {
    fn name(&self) -> &'static str {
        "event_statistics"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[STATISTICS]
    }

    fn handle<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let rows: Vec<StatisticsRow> = events
                .iter()
                .map(|e| StatisticsRow {
                    position: e.position,
                    hour: ((e.timestamp / 1000) / 3600 * 3600).max(0) as u32,
                    event_type: e.event_type.clone(),
                    source: e.metadata.get("source").cloned().unwrap_or_else(|| "unknown".into()),
                })
                .collect();
            insert(ch, &target.table(STATISTICS), &rows).await
        })
    }
}

// ---- active encounters ----

pub struct ActiveEncounters;

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct EncounterRow {
    pub encounter_id: String,
    pub mrn: String,
    pub class: String,
    pub location: String,
    pub admit_time: String,
    pub provider: String,
    pub active: bool,
    /// Position of the event that wrote this state.
    pub version: u64,
}

impl ActiveEncounters {
    /// The latest stored state of `ids` (rows of a later position may be there after a
    /// replay; the fields taken from them never change over an encounter's life).
    async fn stored(
        ch: &clickhouse::Client,
        target: &Target,
        ids: &[String],
    ) -> Result<HashMap<String, EncounterRow>, ProjectionError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<EncounterRow> = ch
            .query(&format!(
                "SELECT ?fields FROM {} FINAL WHERE encounter_id IN {{ids:Array(String)}}",
                target.table(ENCOUNTERS)
            ))
            .param("ids", ids)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(|r| (r.encounter_id.clone(), r)).collect())
    }
}

impl Projection for ActiveEncounters {
    fn name(&self) -> &'static str {
        "active_encounters"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ENCOUNTERS]
    }

    fn handle<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let relevant: Vec<(&StoredEvent, &str, Value)> = events
                .iter()
                .filter(|e| matches!(e.event_type.as_str(), "patient_admit" | "patient_transfer" | "patient_discharge"))
                .filter_map(|e| mrn_of(e).map(|m| (e, m)))
                .map(|(e, m)| data(e).map(|d| (e, m, d)))
                .collect::<Result<_, _>>()?;
            let mut ids = Vec::new();
            for (e, _, d) in &relevant {
                match d.get("encounterId").and_then(Value::as_str) {
                    Some(id) if !id.is_empty() => ids.push(id.to_string()),
                    _ => {
                        return Err(ProjectionError::Poison {
                            position: e.position,
                            message: format!("{} without an encounterId", e.event_type),
                        })
                    }
                }
            }
            ids.sort();
            ids.dedup();
            let mut state = Self::stored(ch, target, &ids).await?;
            let mut rows = Vec::new();
            for (e, mrn, d) in relevant {
                let id = text(&d, "encounterId").to_string();
                let before = state.get(&id);
                let keep = |field: &str, old: Option<&String>| match text(&d, field) {
                    "" => old.cloned().unwrap_or_default(),
                    new => new.to_string(),
                };
                let row = EncounterRow {
                    encounter_id: id.clone(),
                    mrn: mrn.to_string(),
                    class: keep("class", before.map(|b| &b.class)),
                    location: keep("location", before.map(|b| &b.location)),
                    admit_time: keep("admitTime", before.map(|b| &b.admit_time)),
                    provider: keep("provider", before.map(|b| &b.provider)),
                    active: e.event_type != "patient_discharge",
                    version: e.position,
                };
                state.insert(id, row.clone());
                rows.push(row);
            }
            insert(ch, &target.table(ENCOUNTERS), &rows).await
        })
    }

    fn snapshots(&self) -> Option<&dyn Snapshotting> {
        Some(self)
    }
}

/// Events between snapshots of the active encounters.
pub const ENCOUNTER_SNAPSHOT_EVERY: u64 = 100_000;

impl Snapshotting for ActiveEncounters {
    fn should_snapshot(&self, _position: u64, since: u64) -> bool {
        since >= ENCOUNTER_SNAPSHOT_EVERY
    }

    fn serialize<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<String, ProjectionError>> {
        Box::pin(async move {
            let rows: Vec<EncounterRow> = ch
                .query(&format!("SELECT ?fields FROM {} FINAL ORDER BY encounter_id", target.table(ENCOUNTERS)))
                .fetch_all()
                .await?;
            serde_json::to_string(&rows).map_err(|e| ProjectionError::Unavailable(e.to_string()))
        })
    }

    fn restore<'a>(
        &'a self,
        ch: &'a clickhouse::Client,
        target: &'a Target,
        state: &'a str,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let rows: Vec<EncounterRow> = serde_json::from_str(state)
                .map_err(|e| ProjectionError::Unavailable(format!("snapshot is not readable: {e}")))?;
            insert(ch, &target.table(ENCOUNTERS), &rows).await
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn summaries_say_what_happened() {
        assert_eq!(
            summary("patient_admit", &json!({ "class": "IMP", "location": "Location/ward-1" })),
            "admitted (IMP) to Location/ward-1"
        );
        assert_eq!(
            summary("lab_result", &json!({ "code": "2345-7", "display": "Glucose", "value": 5.4, "unit": "mmol/L" })),
            "lab Glucose: 5.4 mmol/L"
        );
        assert_eq!(
            summary("resource_updated", &json!({ "resourceType": "Patient", "id": "p1", "versionId": "2" })),
            "Patient/p1 updated (version 2)"
        );
        assert_eq!(summary("custom_thing", &json!({})), "custom_thing");
    }
}
