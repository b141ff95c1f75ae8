//! One lease protocol for every job only one process may do at a time: appending to the
//! event log, flushing a Group's member batches, feeding a projection.
//!
//! A lease is a field of a MongoDB document, `{by, until, holder}`:
//! - `by`: the tenure's id (a fresh UUID per taking), which every conditional update of the
//!   holder names, so a holder that lost the lease can change nothing;
//! - `until`: when it ends, by the taker's clock (process clocks are assumed to agree within
//!   a second, NTP);
//! - `holder`: the process (`store::holder`), so a process on the same machine can tell a
//!   dead holder and take over at once instead of waiting for `until`.
//!
//! Rules, stated once:
//! - A lease is **free** when the field is absent or `until` has passed, or when its holder
//!   is certainly dead; a tenure may also take again what it holds (a renewal: users that
//!   keep one tenure id across takings, like a projection runner, renew by taking).
//!   [`Lease::take`] takes a free lease in one conditional update; when
//!   it is held, it reads the holder to see whether it is dead, at most once per
//!   [`Lease::checking_holder_every`] (a taker polling every few milliseconds would
//!   otherwise add a read to every poll).
//! - A holder starts no write it could not finish before the lease ends: [`Term::allows`]
//!   with the write's time budget ([`Term`] keeps the deadline by the monotonic clock, minus
//!   a safety margin).
//! - A holder renews once less than half its term is left ([`Term::should_renew`]).
//!
//! What each lease guards, and what happens to work in flight when it is lost, is the
//! business of its user (`eventstore::appender`, `group::flusher`, `projection::runner`).

use std::sync::Mutex;
use std::time::Duration;

use bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use tokio::time::Instant;

use super::holder;
use super::mongo::is_duplicate_key;

/// The condition "the lease in `field` is free at `now`" (absent or expired).
pub fn free(field: &str, now: DateTime) -> Document {
    doc! { "$or": [ { field: { "$exists": false } }, { format!("{field}.until"): { "$lt": now } } ] }
}

/// The lease value for tenure `by` lasting `ttl` from now.
pub fn grant(by: &str, ttl: Duration) -> Document {
    let until = DateTime::from_millis(DateTime::now().timestamp_millis() + ttl.as_millis() as i64);
    doc! { "by": by, "until": until, "holder": holder::this_process() }
}

/// The outcome of [`Lease::take`].
#[derive(Debug)]
pub enum Taken {
    /// The lease is this tenure's; the document as it was before (`None`: created).
    Granted(Option<Document>),
    /// Another live holder has it (or its holder was not checked this time).
    Held,
    /// No document matches the filter (and the lease does not create one).
    Absent,
}

/// A lease kept in one field of the documents of one collection, for a term of `ttl`.
pub struct Lease {
    collection: Collection<Document>,
    field: &'static str,
    ttl: Duration,
    /// Create the document when no document matches the filter.
    create: bool,
    holder_check_every: Duration,
    last_holder_check: Mutex<Option<Instant>>,
}

impl Lease {
    pub fn new(collection: Collection<Document>, field: &'static str, ttl: Duration) -> Lease {
        Lease {
            collection,
            field,
            ttl,
            create: false,
            holder_check_every: Duration::ZERO,
            last_holder_check: Mutex::default(),
        }
    }

    /// Creates the document when none matches (a collision with a concurrent taker counts
    /// as held).
    pub fn creating(self) -> Lease {
        Lease { create: true, ..self }
    }

    /// Reads a holder to see whether it is dead at most once per `every` (default: on each
    /// take that finds the lease held).
    pub fn checking_holder_every(self, every: Duration) -> Lease {
        Lease { holder_check_every: every, ..self }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether this take may read the holder (and counts it as read now).
    fn holder_check_due(&self) -> bool {
        let mut last = self.last_holder_check.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= self.holder_check_every);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Takes the lease of the document matching `filter` for tenure `by`, if it is free or
    /// its holder is dead. `projection` limits the document returned (empty: all of it).
    pub async fn take(
        &self,
        filter: &Document,
        by: &str,
        projection: Document,
    ) -> Result<Taken, mongodb::error::Error> {
        let (collection, field) = (&self.collection, self.field);
        let mut when_free = filter.clone();
        let free_or_ours = doc! { "$or": [ free(field, DateTime::now()), { format!("{field}.by"): by } ] };
        when_free.insert("$and", vec![free_or_ours]);
        let set = doc! { "$set": { field: grant(by, self.ttl) } };
        let taken = collection
            .find_one_and_update(when_free, set.clone())
            .upsert(self.create)
            .projection(projection.clone())
            .return_document(ReturnDocument::Before)
            .await;
        match taken {
            Ok(Some(before)) => return Ok(Taken::Granted(Some(before))),
            Ok(None) if self.create => return Ok(Taken::Granted(None)),
            Ok(None) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e),
        }
        if !self.holder_check_due() {
            return Ok(Taken::Held);
        }
        // Held (or, without `create`, no such document): take it over if its holder is gone.
        let Some(current) = collection.find_one(filter.clone()).projection(doc! { field: 1 }).await? else {
            return Ok(if self.create { Taken::Held } else { Taken::Absent });
        };
        let lease = current.get_document(field).ok();
        let dead = lease.filter(|l| l.get_document("holder").is_ok_and(holder::is_dead));
        let Some(dead_by) = dead.and_then(|l| l.get_str("by").ok()) else { return Ok(Taken::Held) };
        tracing::info!(field, dead = dead_by, "taking over a lease whose holder is gone");
        let mut held_by_dead = filter.clone();
        held_by_dead.insert(format!("{field}.by"), dead_by);
        let before = collection
            .find_one_and_update(held_by_dead, set)
            .projection(projection)
            .return_document(ReturnDocument::Before);
        match before.await? {
            Some(before) => Ok(Taken::Granted(Some(before))),
            None => Ok(Taken::Held),
        }
    }

    /// Takes for tenure `by` the free leases of the documents with an `_id` in `ids` that
    /// match `filter`: one update for all of them, whatever their number (a second one
    /// when some lease was left behind expired). A lease taken where there was none gets
    /// `fresh: true` in its value: no earlier holder can have left work half-done. The
    /// caller reads back which documents name `by`. A dead holder's lease is not checked
    /// here: it is taken once expired (a caller that cannot wait uses [`Lease::take`]).
    pub async fn take_many(&self, filter: &Document, ids: &[String], by: &str) -> Result<(), mongodb::error::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let field = self.field;
        let mut value = grant(by, self.ttl);
        let mut absent = filter.clone();
        absent.insert("_id", doc! { "$in": ids });
        absent.insert(field, doc! { "$exists": false });
        value.insert("fresh", true);
        let taken = self.collection.update_many(absent, doc! { "$set": { field: value.clone() } }).await?;
        if (taken.modified_count as usize) < ids.len() {
            let mut expired = filter.clone();
            expired.insert("_id", doc! { "$in": ids });
            expired.insert(format!("{field}.until"), doc! { "$lt": DateTime::now() });
            value.insert("fresh", false);
            self.collection.update_many(expired, doc! { "$set": { field: value } }).await?;
        }
        Ok(())
    }
}

/// A tenure's time, by this process's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Term {
    granted: Instant,
    ttl: Duration,
    margin: Duration,
}

impl Term {
    /// A term of `ttl` starting when the taking began (`granted`), of which the last
    /// `margin` is not used for writes.
    pub fn new(granted: Instant, ttl: Duration, margin: Duration) -> Term {
        Term { granted, ttl, margin }
    }

    /// No write starts after this.
    pub fn deadline(&self) -> Instant {
        self.granted + self.ttl.saturating_sub(self.margin)
    }

    /// Whether a write that may take `budget` can start now.
    pub fn allows(&self, budget: Duration) -> bool {
        Instant::now() + budget < self.deadline()
    }

    /// Whether less than half the term is left: time to renew.
    pub fn should_renew(&self) -> bool {
        self.granted.elapsed() >= self.ttl / 2
    }

    /// The term after a renewal that began at `at`.
    pub fn renewed(&self, at: Instant) -> Term {
        Term { granted: at, ..*self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_term_allows_writes_that_end_before_its_margin_and_asks_for_renewal_halfway() {
        let term = Term::new(Instant::now(), Duration::from_secs(10), Duration::from_secs(2));
        assert!(term.allows(Duration::from_secs(3)));
        assert!(!term.should_renew());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(term.should_renew(), "half the term is gone");
        assert!(term.allows(Duration::from_millis(2_900)), "8 s deadline, 5 s gone");
        assert!(!term.allows(Duration::from_secs(3)), "a 3 s write would end after the deadline");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!term.allows(Duration::ZERO), "past the deadline: the margin is not used");
        let renewed = term.renewed(Instant::now());
        assert!(renewed.allows(Duration::from_secs(7)) && !renewed.should_renew());
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lease_is_asked_about_its_holder_at_most_once_per_interval() {
        // No server is contacted: the client connects lazily.
        let db = mongodb::Client::with_uri_str("mongodb://127.0.0.1:9/").await.unwrap().database("unused");
        let every = Duration::from_millis(250);
        let lease = Lease::new(db.collection("c"), "lease", Duration::from_secs(10)).checking_holder_every(every);
        assert!(lease.holder_check_due(), "the first finding of a held lease checks at once");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!lease.holder_check_due(), "a poll 5 ms later does not read the holder again");
        tokio::time::sleep(every).await;
        assert!(lease.holder_check_due());
        let unthrottled = Lease::new(db.collection("c"), "lease", Duration::from_secs(10));
        assert!(unthrottled.holder_check_due() && unthrottled.holder_check_due(), "by default every time");
    }

    #[test]
    fn free_means_absent_or_expired() {
        let now = DateTime::from_millis(1_000);
        let condition = free("lease", now);
        assert_eq!(condition, doc! { "$or": [ { "lease": { "$exists": false } }, { "lease.until": { "$lt": now } } ] });
        let lease = grant("t1", Duration::from_secs(10));
        assert_eq!(lease.get_str("by").unwrap(), "t1");
        assert!(lease.get_datetime("until").unwrap().timestamp_millis() > DateTime::now().timestamp_millis());
    }
}
