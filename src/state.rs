use std::sync::{Arc, OnceLock};

use axum::extract::FromRef;

use crate::config::GroupSettings;
use crate::eventstore::log::{ClickHouseEventStore, SharedEventStore};
use crate::group::flusher::Flusher;
use crate::group::index::MemberIndex;
use crate::group::writes::GroupWrites;
use crate::group::MemberStorage;
use crate::pipeline::{Behaviours, Hooks, Writer};
use crate::store::ResourceStore;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: ResourceStore,
    pub clickhouse: clickhouse::Client,
    /// The write path (`pipeline`), with the post-save hooks and each type's behaviour.
    pub writer: Writer,
    /// Public base URL, no trailing slash (e.g. `http://127.0.0.1:8080`).
    pub base_url: Arc<str>,
    pub body_limit: usize,
    /// The CapabilityStatement, rendered on first request (`fhir::metadata`): it only
    /// changes with the code and the base URL.
    pub capability_statement: Arc<OnceLock<Arc<str>>>,
    /// Most operations one PATCH may carry (`Settings::max_patch_ops`).
    pub max_patch_ops: usize,
    /// Most resources one conditional DELETE deletes (`fhir.max_conditional_delete`).
    pub max_conditional_delete: usize,
    /// Most ids a chain or `_has` step lists (`fhir.search_listed_ids`).
    pub search_listed_ids: usize,
    /// Most entries in one Bundle posted to the base (`fhir.max_bundle_entries`).
    pub max_bundle_entries: usize,
    /// Who is an active member of recently written groups (see `group::index`).
    pub member_index: Arc<MemberIndex>,
    /// Moves pending member batches into ClickHouse (see `group::flusher`).
    pub flusher: Arc<Flusher>,
    /// References kept out of stored content, for search (a Group's members).
    pub detached: Option<Arc<dyn crate::search::detached::DetachedReferences>>,
    /// The general event store (`/events`).
    pub events: SharedEventStore,
    /// GraphQL over the read models (`/graphql`).
    pub graphql: crate::graphql::RosterSchema,
    /// The supervised background tasks, and which are down (`/ready`).
    pub tasks: crate::supervise::Tasks,
    /// MongoDB commands counted by name, when `mongo.count_ops` is on (`store::ops`).
    pub mongo_ops: Option<Arc<crate::store::ops::OpCounts>>,
}

impl AppState {
    pub fn new(
        store: ResourceStore,
        clickhouse: clickhouse::Client,
        hooks: Hooks,
        base_url: &str,
        body_limit: usize,
        groups: &GroupSettings,
    ) -> AppState {
        let base_url: Arc<str> = Arc::from(base_url.trim_end_matches('/'));
        let flusher = Flusher::new(store.clone(), clickhouse.clone());
        let member_index = Arc::new(MemberIndex::new(groups.index_capacity));
        // The one place that names the types with their own behaviour.
        let (behaviours, detached): (_, Option<Arc<dyn crate::search::detached::DetachedReferences>>) = match groups
            .members
        {
            MemberStorage::Events => {
                let group = GroupWrites::new(store.clone(), clickhouse.clone(), flusher.clone(), member_index.clone());
                let members = crate::group::search::Members { ch: clickhouse.clone(), flusher: flusher.clone() };
                (Behaviours::default().with("Group", Arc::new(group)), Some(Arc::new(members)))
            }
            MemberStorage::Embedded => (Behaviours::default(), None),
        };
        let search = crate::search::flusher::SearchFlusher::new(clickhouse.clone());
        store.set_search_sink(Arc::new(crate::search::flusher::Sink(search)));
        let writer =
            Writer::new(store.clone(), behaviours).with_hooks(hooks).with_search_index(&format!("{base_url}/4_0_0"));
        let events =
            ClickHouseEventStore::new(store.database(), clickhouse.clone()).with_group_members(flusher.clone());
        let events = Arc::new(events);
        let graphql = crate::graphql::schema(crate::graphql::Sources {
            ch: clickhouse.clone(),
            events: events.clone(),
            checkpoints: crate::projection::runner::Checkpoints::new(store.database()),
            snapshots: crate::projection::snapshot::SnapshotStore::new(store.database()),
            projections: crate::projection::builtin::all().iter().map(|p| p.name()).collect(),
        });
        AppState {
            tasks: crate::supervise::Tasks::default(),
            mongo_ops: None,
            graphql,
            events,
            flusher,
            detached,
            store,
            clickhouse,
            writer,
            base_url,
            body_limit,
            capability_statement: Arc::default(),
            max_patch_ops: groups.max_patch_ops.unwrap_or(crate::config::DEFAULT_MAX_PATCH_OPS),
            max_conditional_delete: 1,
            search_listed_ids: crate::search::execute::LISTED_IDS,
            max_bundle_entries: crate::config::DEFAULT_MAX_BUNDLE_ENTRIES,
            member_index,
        }
    }

    /// `{base}/4_0_0`.
    pub fn fhir_base(&self) -> String {
        format!("{}/4_0_0", self.base_url)
    }
}

impl FromRef<AppState> for SharedEventStore {
    fn from_ref(state: &AppState) -> SharedEventStore {
        state.events.clone()
    }
}

impl FromRef<AppState> for crate::graphql::RosterSchema {
    fn from_ref(state: &AppState) -> crate::graphql::RosterSchema {
        state.graphql.clone()
    }
}
