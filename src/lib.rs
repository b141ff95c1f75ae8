//! roster: a FHIR R4 server for large, fast-changing Groups, on MongoDB and ClickHouse.
//!
//! Request path: `fhir` (HTTP handlers) → `pipeline` (load, draft, plan, commit under the
//! version guard, hooks) → `store` (MongoDB). Schema lives in `clickhouse/` and `mongo/`, applied by
//! `migrate`.

pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod eventstore;
pub mod fhir;
pub mod graphql;
pub mod group;
pub mod migrate;
pub mod model;
pub mod pipeline;
pub mod projection;
pub mod recording;
pub mod rejection;
pub mod search;
pub mod server;
pub mod startup;
pub mod state;
pub mod store;
pub mod supervise;
pub mod telemetry;
