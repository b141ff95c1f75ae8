//! FHIR writes become events: the `event_store` action of the routing file, as a post-save
//! hook.
//!
//! # Nothing acknowledged is lost
//! The hook runs after the commit, so a crash could lose its events. The save path
//! therefore marks every write of a routed type in the same version-guarded update that
//! commits it (`eventsPending: true`, the version pushed onto `eventsVersions`; see
//! [`PostSaveHook::durable_for`]). The hook appends the events; the write path then removes
//! the mark (with the history flag, one update). A
//! sweep finds marks older than [`STALE`] and records those versions again from history:
//! each derived event has an id computed from (resource, version, event type, stream), and
//! the sweep skips ids its stream already holds, so a replay never duplicates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::routes::{derive, patient_id, RoutingFile};
use crate::eventstore::log::SharedEventStore;
use crate::eventstore::{EventStore, ExpectedVersion, NewEvent};
use crate::pipeline::{HookError, Interaction, PostSaveHook, RequestContext, Saved};
use crate::store::ResourceStore;

/// Largest event data a FHIR write records (an append carries at most
/// `MAX_APPEND_BYTES`, and one write may send several events to one stream).
const MAX_EVENT_DATA: usize = 512 << 10;

/// A mark older than this is the sweep's: the hook that set it has finished or failed.
pub const STALE: Duration = Duration::from_secs(60);

/// Who caused a write: becomes the events' `correlationId` and `actor` metadata.
pub struct Cause<'a> {
    pub request_id: &'a str,
    pub actor: Option<&'a str>,
}

pub struct EventRecorder {
    routes: RoutingFile,
    events: SharedEventStore,
    store: ResourceStore,
}

impl EventRecorder {
    pub fn new(routes: RoutingFile, events: SharedEventStore, store: ResourceStore) -> Arc<EventRecorder> {
        Arc::new(EventRecorder { routes, events, store })
    }

    /// Indexes the mark on the collections of the routed types, for the sweep. Made here,
    /// from the routing file, not by a migration: on SecantusDB every index costs each
    /// update of its collection (~0.35 ms), so types nobody routes do not carry it.
    pub async fn ensure_indexes(&self) -> Result<(), mongodb::error::Error> {
        let index = mongodb::IndexModel::builder()
            .keys(bson::doc! { "eventsPending": 1 })
            .options(mongodb::options::IndexOptions::builder().name("events_pending".to_string()).sparse(true).build())
            .build();
        for rt in fhir_model::RESOURCE_TYPES.iter().filter(|t| self.routes.covers(t)) {
            let collection = crate::store::mongo::current_collection(rt);
            self.store.database().collection::<bson::Document>(&collection).create_index(index.clone()).await?;
        }
        Ok(())
    }

    /// The (stream, event) pairs a write yields, in order.
    async fn plan(&self, saved: &Saved<'_>, origin: &Cause<'_>) -> Result<Vec<(String, NewEvent)>, HookError> {
        let rt = saved.resource_type;
        let derived = derive(saved);
        // The resource the templates read: the new content, or for a delete the last one.
        let Some(content) = saved.resource.or(saved.previous) else { return Ok(Vec::new()) };
        let mut related: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        let mut out = Vec::new();
        for d in derived {
            for template in self.routes.templates(rt, d.event_type) {
                for ty in template.referenced_types().filter(|t| *t != rt) {
                    if !related.contains_key(ty) {
                        if let Some(found) = self.related(ty, rt, content).await? {
                            related.insert(ty.to_string(), found);
                        }
                    }
                }
                // Documented: a template without a value sends nothing (the shipped
                // `source:{{meta.source}}` has none for most writes), so this is no warning.
                let Some(stream) = template.render(rt, content, &related) else {
                    tracing::debug!(
                        resource_type = rt,
                        id = saved.id,
                        event = d.event_type,
                        "stream template has no value for this resource; event not sent there"
                    );
                    continue;
                };
                let mut metadata = BTreeMap::new();
                metadata.insert("correlationId".to_string(), origin.request_id.to_string());
                if let Some(actor) = origin.actor {
                    metadata.insert("actor".to_string(), actor.to_string());
                }
                metadata.insert("causationId".to_string(), format!("{rt}/{}/_history/{}", saved.id, saved.version));
                metadata.insert("source".to_string(), "fhir".to_string());
                let mut data = d.data.to_string();
                if data.len() > MAX_EVENT_DATA {
                    // Too big for an event (appends are capped): point at the version instead.
                    data = serde_json::json!({
                        "resourceType": rt, "id": saved.id, "versionId": saved.version.to_string(),
                        "omitted": format!("{} bytes; read {rt}/{}/_history/{}", data.len(), saved.id, saved.version),
                    })
                    .to_string();
                }
                out.push((
                    stream.clone(),
                    NewEvent {
                        event_id: Some(event_id(rt, saved.id, saved.version, d.event_type, &stream)),
                        event_type: d.event_type.to_string(),
                        data,
                        metadata,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// The `ty` resource a `rt` resource refers to (only Patient, through subject/patient).
    async fn related(
        &self,
        ty: &str,
        rt: &str,
        content: &Map<String, Value>,
    ) -> Result<Option<Map<String, Value>>, HookError> {
        if ty != "Patient" {
            return Ok(None);
        }
        let Some(id) = patient_id(rt, content) else { return Ok(None) };
        let found = self.store.read("Patient", &id).await.map_err(|e| HookError(e.to_string()))?;
        Ok(found.and_then(|v| v.resource))
    }

    /// Appends a write's events. `replay`: skip events their stream already holds.
    pub async fn record(&self, saved: &Saved<'_>, origin: &Cause<'_>, replay: bool) -> Result<usize, HookError> {
        let planned = self.plan(saved, origin).await?;
        let mut streams: Vec<(String, Vec<NewEvent>)> = Vec::new();
        for (stream, event) in planned {
            match streams.iter_mut().find(|(s, _)| *s == stream) {
                Some((_, events)) => events.push(event),
                None => streams.push((stream, vec![event])),
            }
        }
        let mut appended = 0;
        for (stream, mut events) in streams {
            if replay {
                let ids: Vec<Uuid> = events.iter().filter_map(|e| e.event_id).collect();
                let held = self.events.existing_ids(&stream, &ids).await.map_err(|e| HookError(e.to_string()))?;
                events.retain(|e| !e.event_id.is_some_and(|id| held.contains(&id)));
                if events.is_empty() {
                    continue;
                }
            }
            appended += events.len();
            self.events.append(&stream, ExpectedVersion::Any, events).await.map_err(|e| HookError(e.to_string()))?;
        }
        Ok(appended)
    }

    /// Records the marked versions whose hooks did not finish. Returns how many versions.
    pub async fn sweep(&self) -> Result<usize, HookError> {
        let err = |e: crate::store::StoreError| HookError(e.to_string());
        let mut done = 0;
        for rt in fhir_model::RESOURCE_TYPES.iter().filter(|t| self.routes.covers(t)) {
            let marked = self.store.events_pending(rt, STALE).await.map_err(err)?;
            for (id, versions) in marked {
                for v in versions {
                    let Some(version) = self.store.version(rt, &id, v).await.map_err(err)? else { continue };
                    let previous = match v > 1 {
                        true => self.store.version(rt, &id, v - 1).await.map_err(err)?,
                        false => None,
                    };
                    let interaction = match version.method.as_str() {
                        "POST" => Interaction::Create,
                        "DELETE" => Interaction::Delete,
                        "PATCH" => Interaction::Patch,
                        _ => Interaction::Update,
                    };
                    let saved = Saved {
                        interaction,
                        resource_type: rt,
                        id: &id,
                        version: v,
                        resource: version.resource.as_ref(),
                        previous: previous.as_ref().and_then(|p| p.resource.as_ref()),
                    };
                    self.record(&saved, &Cause { request_id: "recovery", actor: None }, true).await?;
                    self.store.clear_events_pending(rt, &id, v).await.map_err(err)?;
                    done += 1;
                }
            }
        }
        Ok(done)
    }
}

impl PostSaveHook for EventRecorder {
    fn name(&self) -> &'static str {
        "event-recorder"
    }

    fn durable_for(&self, rt: &str) -> bool {
        self.routes.covers(rt)
    }

    fn after_save<'a>(&'a self, ctx: &'a RequestContext, saved: &'a Saved<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            // A type no route names was not marked and yields no event: nothing to record
            // and no mark to clear (that clear is a MongoDB update, on every write).
            if !self.routes.covers(saved.resource_type) {
                return Ok(());
            }
            // The write path clears the mark once this succeeded (with the history flag).
            let origin = Cause { request_id: &ctx.request_id, actor: ctx.actor.as_deref() };
            self.record(saved, &origin, false).await.map(|_| ())
        })
    }
}

/// A stable event id for (resource, version, event type, stream): FNV-1a over the parts,
/// twice with different offsets for 128 bits. The same write always yields the same ids,
/// which is what lets a replay skip what is already stored.
pub fn event_id(rt: &str, id: &str, version: i64, event_type: &str, stream: &str) -> Uuid {
    let key = format!("{rt}\u{1f}{id}\u{1f}{version}\u{1f}{event_type}\u{1f}{stream}");
    // Version 8 (custom) UUID layout: the version and variant bits are set.
    let mut bytes = crate::model::digest128(&key).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_distinct() {
        let a = event_id("Encounter", "e1", 2, "patient_admit", "patient:M1");
        assert_eq!(a, event_id("Encounter", "e1", 2, "patient_admit", "patient:M1"));
        assert_ne!(a, event_id("Encounter", "e1", 2, "patient_admit", "encounter:e1"));
        assert_ne!(a, event_id("Encounter", "e1", 3, "patient_admit", "patient:M1"));
        assert_eq!(a.get_version_num(), 8);
    }
}
