//! Conditional create, update and delete (R4 http.html#ccreate, #cond-update, #cdelete),
//! atomic across requests and server processes.
//!
//! Why a lock: "search, then write if nothing matched" lets two concurrent requests with
//! the same condition both find nothing and both create. So each conditional write first
//! takes a lease on its condition (a document in `_conditions` whose `_id` is the type and
//! the normalized condition; `store::lease`), then searches (the search sees every
//! acknowledged write, see `search::execute`), writes, and releases. Two requests with one
//! condition therefore run one after the other, and the second finds what the first made.
//! Conditions that differ but match the same resources are not serialized against each
//! other (as on HAPI); the condition a client repeats on a retry is the case this covers.
//!
//! Failure: a holder killed mid-way leaves its lease, which is free once its holder is
//! known dead (same machine) or its term ([`TERM`]) passed; a waiter gives up after
//! [`WAIT`] with a 503. The write itself is an ordinary write (committed or not).

use std::time::Duration;

use bson::doc;

use crate::error::FhirError;
use crate::state::AppState;
use crate::store::lease::{Lease, Taken};

/// How long a condition's lease lasts (a holder searches and writes one resource).
const TERM: Duration = Duration::from_secs(15);
/// How long a request waits for a condition held by another.
const WAIT: Duration = Duration::from_secs(20);
/// Longest key kept as written; longer ones are digested.
const KEY_BYTES: usize = 512;

/// The collection of condition leases.
pub const COLLECTION: &str = "_conditions";

/// `Type?sorted&pairs`: one key per condition, however its parameters were ordered.
pub fn condition_key(rt: &str, condition: &str) -> String {
    let mut pairs: Vec<(String, String)> =
        form_urlencoded::parse(condition.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    pairs.sort();
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &pairs {
        q.append_pair(k, v);
    }
    let key = format!("{rt}?{}", q.finish());
    if key.len() <= KEY_BYTES {
        return key;
    }
    format!("{rt}#{:032x}", crate::model::digest128(&key))
}

/// A held condition: released on [`Held::release`] (or when its term ends).
struct Held {
    key: String,
    by: String,
}

/// Runs `work` holding the condition (see the module docs), and releases it whatever
/// `work` returns.
pub async fn holding<T>(
    state: &AppState,
    rt: &str,
    condition: &str,
    work: impl AsyncFnOnce() -> Result<T, FhirError>,
) -> Result<T, FhirError> {
    let held = hold(state, rt, condition).await?;
    let done = work().await;
    held.release(state).await;
    done
}

/// Takes the lease of a condition, waiting while another request holds it.
async fn hold(state: &AppState, rt: &str, condition: &str) -> Result<Held, FhirError> {
    let key = condition_key(rt, condition);
    let by = uuid::Uuid::new_v4().to_string();
    let lease = Lease::new(state.store.database().collection(COLLECTION), "lease", TERM)
        .creating()
        .checking_holder_every(Duration::from_millis(500));
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match lease.take(&doc! { "_id": &key }, &by, doc! { "_id": 1 }).await {
            Ok(Taken::Granted(_)) => return Ok(Held { key, by }),
            Ok(Taken::Held | Taken::Absent) => {}
            Err(e) => return Err(FhirError::unavailable("the conditional write could not be serialized; retry", e)),
        }
        if started.elapsed() >= WAIT {
            return Err(FhirError::unavailable(
                format!("another conditional write on '{condition}' is still in progress; retry"),
                "condition lease held",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

impl Held {
    /// Frees the condition (best effort: a lease left behind ends with its term).
    async fn release(self, state: &AppState) {
        let coll = state.store.database().collection::<bson::Document>(COLLECTION);
        if let Err(e) = coll.delete_one(doc! { "_id": &self.key, "lease.by": &self.by }).await {
            tracing::warn!(key = self.key, error = %e, "a condition lease stays until its term ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_parameter_order_and_bound_their_length() {
        assert_eq!(condition_key("Patient", "b=2&a=1"), condition_key("Patient", "a=1&b=2"));
        assert_ne!(condition_key("Patient", "a=1"), condition_key("Observation", "a=1"));
        let long = format!("identifier={}", "x".repeat(2000));
        let k = condition_key("Patient", &long);
        assert!(k.len() < 64 && k.starts_with("Patient#"));
        assert_ne!(k, condition_key("Patient", &format!("{long}y")));
    }
}
