//! Black-box tests over HTTP against real MongoDB and ClickHouse servers (see `make test`).
//! One test binary (faster to link than one per file), one module per topic.

mod bundle;
mod cli;
mod concurrency;
mod costs;
mod crash;
mod crud;
mod errors;
mod eventstore;
mod faults;
mod group;
mod helpers;
mod hooks;
mod hostile;
mod interop;
mod ops;
mod patch;
mod pipeline;
mod projections;
mod roundtrip;
mod search;
mod search_params;
