use std::sync::Arc;

use crate::pipeline::Hooks;
use crate::store::ResourceStore;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: ResourceStore,
    pub clickhouse: clickhouse::Client,
    pub hooks: Hooks,
    /// Public base URL, no trailing slash (e.g. `http://127.0.0.1:8080`).
    pub base_url: Arc<str>,
    pub body_limit: usize,
}

impl AppState {
    /// `{base}/4_0_0`.
    pub fn fhir_base(&self) -> String {
        format!("{}/4_0_0", self.base_url)
    }
}
