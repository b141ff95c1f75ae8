//! Runs a search: candidates from ClickHouse's `SearchIndex` for every resource whose
//! latest version is indexed, and from MongoDB for the rest (documents still
//! `historyPending`, whose keys are evaluated here by the same plan), merged in the
//! requested order, then each page's documents read from MongoDB and checked by the
//! matcher (see `plan` for why keys only find candidates).
//!
//! Why this split (see also docs/search.md): MongoDB on this machine answers a single
//! indexed equality fast but scans for `$and` of multikey predicates, low-selectivity
//! `find().limit()` and regexes, and an index over every key costs each write 2–4×; a
//! ClickHouse index sorted by (type, key, id) answers equality, prefix and range lookups,
//! intersections and sorts in a few ms at millions of rows, and is written in batches off
//! the request path. Read-your-writes comes from the overlay: a document leaves
//! `historyPending` only once its keys are in ClickHouse.
//!
//! Chains and `_has`: an inner search that matches at most `Engine::listed_ids`
//! resources (`fhir.search_listed_ids`, default [`LISTED_IDS`]) becomes a list of ids or
//! references, looked up by key; a larger one stays a ClickHouse subquery inside the
//! outer search (`KeyCond::Refers`, `Step::IdsIn`), with the pending documents of the
//! inner type evaluated here as everywhere else. A `_has` over a detached reference
//! (a Group's members) takes at most that many sources (a 400 beyond).
//!
//! Bounds: at most [`PENDING_LIMIT`] pending documents are read per search (beyond, they are
//! flushed first); a page takes at most [`ROUNDS`] rounds of candidates.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::definitions::{registry, Definition, ParamType};
use super::detached::{DetachedReferences, Targets};
use super::flusher::TABLE;
use super::keys::{after_prefix, key};
use super::matcher::any_matches;
use super::plan::{every_resource, key_set, steps, IdQuery, KeyCond, KeySet, Step};
use super::query::{Clause, Test};
use super::sql::{self, Driver, Sql};
use crate::error::FhirError;
use crate::store::{ResourceStore, Version};

/// The default of `fhir.search_listed_ids`: most ids a chain or `_has` step resolves to
/// as a list (beyond, it stays a subquery). A list of keys is a primary-key lookup each;
/// a subquery reads the inner search's rows in the same query.
pub const LISTED_IDS: usize = 10_000;
/// Most pending documents read by one search.
const PENDING_LIMIT: i64 = 5_000;
/// Most rounds of candidates for one page (when the matcher rejects many).
const ROUNDS: usize = 5;
/// Most rounds while a page is still empty (see `Engine::page`).
const MAX_ROUNDS: usize = 8;
/// Most candidate rows one round asks for.
const MAX_BATCH: usize = 1_000;
/// Most given ids whose documents a search reads to count them when not asked to.
const CHEAP_IDS: usize = 1_000;
/// Most ids a count reads the documents of; more are counted in the index (when nothing
/// but ids is asked).
const COUNT_BY_READING: usize = 50;
/// Most sort keys.
pub const MAX_SORTS: usize = 5;
/// Settings of the page queries: most read a few granules, where more threads only cost
/// their start-up (measured: 6.6 → 5.1 ms for a point lookup with one thread).
const SMALL_QUERY: &str = " SETTINGS max_threads = 2";

/// One `_sort` key: a parameter (`None` = `_id`), and its direction.
#[derive(Debug, Clone)]
pub struct SortKey {
    pub def: Option<Arc<Definition>>,
    pub descending: bool,
}

impl SortKey {
    /// The keys that give a resource its sort value, and whether the largest is taken.
    fn keys(&self) -> Option<(KeySet, bool)> {
        let def = self.def.as_ref()?;
        let tag = match def.kind {
            ParamType::String => 'p',
            ParamType::Token => 'c',
            ParamType::Reference => 'r',
            ParamType::Uri => 'u',
            ParamType::Number | ParamType::Quantity => 'v',
            ParamType::Date if self.descending => 'H',
            ParamType::Date => 'L',
            ParamType::Composite | ParamType::Special => return None,
        };
        let from = key(&def.code, tag, "");
        let to = after_prefix(&from);
        Some((KeySet(vec![KeyCond::Range(from, to)]), self.descending))
    }
}

/// Whether a sort on this parameter is possible.
pub fn sortable(def: &Arc<Definition>) -> bool {
    SortKey { def: Some(def.clone()), descending: false }.keys().is_some()
}

/// Where a resource stands in a search's order: per sort key (missing, value), then id.
/// It is also the paging cursor (JSON in `_cursor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    #[serde(rename = "s")]
    pub parts: Vec<(bool, String)>,
    pub id: String,
}

impl Position {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &str, sorts: usize) -> Result<Position, FhirError> {
        let bad = || FhirError::bad_request("_cursor: this paging cursor is not valid for this search");
        if s.len() > 8192 {
            return Err(bad());
        }
        let p: Position = serde_json::from_str(s).map_err(|_| bad())?;
        (p.parts.len() == sorts).then_some(p).ok_or_else(bad)
    }

    fn cmp(&self, other: &Position, sorts: &[SortKey]) -> Ordering {
        for (i, s) in sorts.iter().filter(|s| s.def.is_some()).enumerate() {
            let (a, b) = (&self.parts[i], &other.parts[i]);
            let by = a.0.cmp(&b.0).then_with(|| match s.descending {
                true => b.1.cmp(&a.1),
                false => a.1.cmp(&b.1),
            });
            if by != Ordering::Equal {
                return by;
            }
        }
        match ids_descending(sorts) {
            true => other.id.cmp(&self.id),
            false => self.id.cmp(&other.id),
        }
    }
}

/// Whether ids end the order descending: as `_id` says when named last (`_sort=-date,_id`),
/// else the first sort parameter's way, so a descending sort reads the index backwards in
/// its own order (`key DESC, id DESC`; ClickHouse cannot read `key DESC, id` in order:
/// 48 ms for a page of 1M Observations' dates against 14.5 ms). R4 leaves the order of
/// equal values open.
fn ids_descending(sorts: &[SortKey]) -> bool {
    match sorts.last() {
        Some(named) if named.def.is_none() => named.descending,
        _ => sorts.iter().find(|s| s.def.is_some()).is_some_and(|s| s.descending),
    }
}

/// Whether to count the matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    None,
    /// Without `_total`: the count when it comes with the first page's query (or the page
    /// holds every match), none where it would take a query of its own, such as a page of
    /// a million-member Group's Patients or a page sorted by one parameter (as Medplum and
    /// HAPI omit it unless asked).
    WhenCheap,
    Accurate,
}

/// A search of one type.
#[derive(Debug, Clone)]
pub struct Request {
    pub rt: String,
    pub clauses: Vec<Clause>,
    /// Sort keys; empty = by id.
    pub sort: Vec<SortKey>,
    pub count: usize,
    pub cursor: Option<Position>,
    pub total: Total,
}

/// A page of matches.
#[derive(Debug)]
pub struct Page {
    pub matches: Vec<Version>,
    pub total: Option<u64>,
    /// Where the next page starts, when there may be one.
    pub next: Option<Position>,
}

/// The stores a search reads.
#[derive(Clone)]
pub struct Engine {
    pub ch: clickhouse::Client,
    pub store: ResourceStore,
    /// This server's FHIR base (its absolute references are relative in the index).
    pub base: Arc<str>,
    /// References kept out of stored content, answered by their type (see `detached`).
    pub detached: Option<Arc<dyn DetachedReferences>>,
    /// Most ids a chain or `_has` step resolves to as a list (see the module docs).
    pub listed_ids: usize,
}

/// What the inner search of a chain or `_has` resolved to.
enum Resolved {
    /// Its candidates, at most `Engine::listed_ids`.
    Ids(Vec<String>),
    /// More: the indexed candidates as a subquery (`SELECT id …`, pending documents left
    /// out), and the pending documents that are candidates.
    Query { sql: Sql, pending: Vec<Version> },
}

fn unavailable(e: impl std::fmt::Display) -> FhirError {
    FhirError::unavailable("the search index is unavailable; retry", &e)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Ranked {
    id: String,
    s: Vec<String>,
    total: u64,
}

/// What one round of a page reads from the index: for this search, with this plan and
/// overlay, the candidates after `after`, at most `limit`.
#[derive(Clone, Copy)]
struct Round<'a> {
    req: &'a Request,
    plan: &'a Plan,
    overlay: &'a Overlay,
    after: Option<&'a Position>,
    limit: usize,
}

/// One round's candidates from the index, in the search's order.
struct Candidates {
    positions: Vec<Position>,
    /// Whether the index may hold more after the last of them.
    more: bool,
    /// On a first page, how many there are in all, where the same query counted them.
    total: Option<u64>,
}

impl Candidates {
    /// Positions read with a limit: there may be more when the limit was reached.
    fn of(positions: impl Iterator<Item = Position>, limit: usize) -> Candidates {
        let positions: Vec<Position> = positions.collect();
        Candidates { more: positions.len() >= limit, positions, total: None }
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Keyed {
    id: String,
    key: String,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Counted {
    id: String,
    total: u64,
}

/// The documents a search reads from MongoDB, and which of them are candidates.
#[derive(Default)]
struct Overlay {
    /// Every pending id (left out of ClickHouse's answer).
    ids: Vec<String>,
    /// The pending versions whose keys satisfy the plan.
    candidates: Vec<Version>,
}

impl Engine {
    /// One page of a search. The total comes with the first page's candidates (one query)
    /// where it can; a later page's total is counted while the page is read.
    pub async fn search(&self, req: &Request) -> Result<Page, FhirError> {
        let started = std::time::Instant::now();
        let clauses = self.resolve(&req.rt, &req.clauses).await?;
        let resolved_at = started.elapsed();
        let mut plan = Plan::new(&req.rt, &clauses);
        // A page of given ids reads their documents, pending or not: nothing to overlay.
        let overlay = match plan.ids_page(req) {
            Some(_) => Overlay::default(),
            None => self.overlay(&req.rt, &mut plan).await?,
        };
        let overlaid_at = started.elapsed();
        let accurate = req.total == Total::Accurate;
        let wanted = req.total != Total::None;
        let first = req.cursor.is_none();
        // Whether the first page's query counts; a later page, or a first page whose query
        // does not when the client asked for the total, counts while the page is read.
        let cheap = plan.counts_with_page(req);
        let page = async {
            match req.count {
                0 => Ok((Vec::new(), None, None)),
                n => self.page(req, &plan, &clauses, &overlay, n, wanted && first && cheap).await,
            }
        };
        let count = async {
            match (accurate || (wanted && cheap)) && (!first || req.count == 0 || !cheap) {
                true => self.count(&req.rt, &plan, &clauses, &overlay).await.map(Some),
                false => Ok(None),
            }
        };
        let ((matches, next, indexed), counted) = tokio::try_join!(page, count)?;
        let total = match (wanted, counted, indexed) {
            (false, _, _) => None,
            (true, Some(n), _) => Some(n),
            // A first page that holds every match is its own total.
            (true, None, _) if first && next.is_none() => Some(matches.len() as u64),
            (true, None, Some(indexed)) => Some(indexed + self.pending_matches(&overlay, &clauses)),
            (true, None, None) if accurate || plan.ids_page(req).is_some_and(|ids| ids.len() <= CHEAP_IDS) => {
                Some(self.count(&req.rt, &plan, &clauses, &overlay).await?)
            }
            (true, None, None) => None,
        };
        // Where a search's time goes (`ROSTER_LOG=roster::search=debug`), cumulative.
        tracing::debug!(
            resource_type = req.rt,
            resolved_us = resolved_at.as_micros() as u64,
            overlaid_us = overlaid_at.as_micros() as u64,
            paged_us = started.elapsed().as_micros() as u64,
            pending = overlay.ids.len(),
            "search timings"
        );
        Ok(Page { matches, total, next })
    }

    /// Chains become the references they resolve to, `_has` the ids it resolves to.
    fn resolve<'a>(
        &'a self,
        rt: &'a str,
        clauses: &'a [Clause],
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<Clause>, FhirError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(clauses.len());
            for c in clauses {
                out.push(match c {
                    Clause::Chain { def, chain } => {
                        let mut targets = Vec::new();
                        let mut queries = Vec::new();
                        for t in &chain.types {
                            match self.resolved(t, std::slice::from_ref(&chain.inner)).await? {
                                Resolved::Ids(ids) => targets.extend(ids.into_iter().map(|id| format!("{t}/{id}"))),
                                Resolved::Query { sql, pending } => {
                                    targets.extend(pending.iter().map(|v| format!("{t}/{}", v.id)));
                                    queries.push(KeyCond::Refers {
                                        prefix: key(&def.code, 'r', &format!("{t}/")),
                                        inner: Arc::new(sql),
                                        found: Default::default(),
                                    });
                                }
                            }
                        }
                        let any = vec![Test::RefAny(targets)];
                        match queries.is_empty() {
                            true => Clause::Param { def: def.clone(), not: false, any },
                            false => {
                                let KeySet(mut conds) = key_set(def, &any);
                                conds.extend(queries);
                                Clause::Keys(KeySet(conds))
                            }
                        }
                    }
                    Clause::Has(h) => {
                        let sources = self.resolved(&h.source_type, std::slice::from_ref(&h.inner)).await?;
                        match (self.detached_for(&h.source_type, &h.reference.code), sources) {
                            (Some(refs), Resolved::Ids(sources)) => {
                                refs.settle(&sources).await.map_err(unavailable)?;
                                Clause::Targets(Targets {
                                    refs,
                                    sources,
                                    target_type: rt.to_string(),
                                    among: Default::default(),
                                })
                            }
                            (Some(_), Resolved::Query { .. }) => {
                                return Err(FhirError::bad_request(format!(
                                    "a _has condition on {} matches more than {} resources; narrow it",
                                    h.source_type, self.listed_ids
                                )))
                            }
                            (None, sources) => self.referenced(&h.source_type, sources, &h.reference.code, rt).await?,
                        }
                    }
                    Clause::Param { def, not: false, any } if self.detached_for(rt, &def.code).is_some() => {
                        let refs = self.detached_for(rt, &def.code).expect("checked");
                        let mut sources = Vec::new();
                        for target in reference_targets(def, any) {
                            sources.extend(refs.sources_of(&target).await.map_err(unavailable)?);
                        }
                        sources.sort_unstable();
                        sources.dedup();
                        Clause::Ids(sources)
                    }
                    Clause::AnyOf(parts) => Clause::AnyOf(self.resolve(rt, parts).await?),
                    Clause::List(lists) => Clause::Ids(self.list_entries(rt, lists).await?),
                    other => other.clone(),
                });
            }
            Ok(out)
        })
    }

    /// The ids of `rt` that are entries (`List.entry.item`, not flagged `deleted`) of these
    /// Lists; a List that does not exist has none. An item refers as `rt/id`, as this
    /// server's absolute URL, or with a version (`/_history/n`, which `_list` ignores).
    async fn list_entries(&self, rt: &str, lists: &[String]) -> Result<Vec<String>, FhirError> {
        let mut ids = Vec::new();
        for list in self.store.by_ids("List", lists).await? {
            let Some(resource) = list.resource.as_ref().filter(|_| !list.deleted) else { continue };
            let entries = resource.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            for entry in entries {
                if entry.get("deleted").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                let Some(reference) = entry.pointer("/item/reference").and_then(Value::as_str) else { continue };
                // `Type/id` when the reference is relative or this server's (see `extract`).
                let (target, ty, _) = super::extract::split_reference(reference, &self.base);
                if let Some(id) =
                    target.strip_prefix(rt).and_then(|t| t.strip_prefix('/')).filter(|_| ty.as_deref() == Some(rt))
                {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn detached_for(&self, source_type: &str, code: &str) -> Option<Arc<dyn DetachedReferences>> {
        self.detached.as_ref().filter(|d| d.covers(source_type, code)).cloned()
    }

    /// The candidates of `rt` under these clauses (not checked by the matcher): a list
    /// when there are at most `listed_ids`, else a subquery and the pending candidates.
    async fn resolved(&self, rt: &str, clauses: &[Clause]) -> Result<Resolved, FhirError> {
        let clauses = self.resolve(rt, clauses).await?;
        let mut plan = Plan::new(rt, &clauses);
        if let Some(ids) = plan.only_ids().filter(|ids| ids.len() <= CHEAP_IDS) {
            // `_id=` alone (`_has:Group:member:_id=G`): those that exist, read.
            return Ok(Resolved::Ids(self.existing(rt, ids, &clauses).await?));
        }
        let overlay = self.overlay(rt, &mut plan).await?;
        let mut sql = Sql::default();
        sql::candidates(&mut sql, rt, &plan.driver, &plan.others(), &overlay.ids, None);
        let mut listed = sql.clone();
        listed.push(" LIMIT ").u64(self.listed_ids as u64 + 1);
        let mut ids: Vec<String> = listed.query(&self.ch).fetch_all().await.map_err(unavailable)?;
        if ids.len() + overlay.candidates.len() > self.listed_ids {
            return Ok(Resolved::Query { sql, pending: overlay.candidates });
        }
        ids.extend(overlay.candidates.iter().map(|v| v.id.clone()));
        Ok(Resolved::Ids(ids))
    }

    /// The `target` resources that these `source` resources reference through `code`: a
    /// list of ids when there are at most `listed_ids`, else a subquery.
    async fn referenced(&self, source: &str, sources: Resolved, code: &str, target: &str) -> Result<Clause, FhirError> {
        let prefix = key(code, 'r', &format!("{target}/"));
        // `Type/id/_history/n` keys sit beside the `Type/id` key of the same reference.
        let id_of = |k: &str| k.strip_prefix(prefix.as_str()).filter(|id| !id.contains('/')).map(str::to_string);
        let mut sql = Sql::default();
        sql.push("SELECT target AS id FROM (SELECT substring(key, ").u64(prefix.len() as u64 + 1);
        sql.push(&format!(") AS target FROM {TABLE} FINAL WHERE rt = ")).str(source).push(" AND ");
        sql::key_set(&mut sql, &KeySet(vec![KeyCond::Range(prefix.clone(), after_prefix(&prefix))]));
        sql.push(" AND position(key, '/', ").u64(prefix.len() as u64 + 1).push(") = 0 AND ");
        // The pending sources' targets come from their own keys; the index's rows of
        // them may be outdated, so the subquery leaves them out.
        let pending: Vec<Version> = match sources {
            Resolved::Ids(ids) => {
                let pending = self.pending(source).await?;
                let pending_ids: Vec<String> = pending.iter().map(|v| v.id.clone()).collect();
                sql.in_list("id", &ids, false);
                if !pending_ids.is_empty() {
                    sql.push(" AND ").in_list("id", &pending_ids, true);
                }
                let ids: std::collections::HashSet<String> = ids.into_iter().collect();
                pending.into_iter().filter(|v| !v.deleted && ids.contains(&v.id)).collect()
            }
            Resolved::Query { sql: inner, pending } => {
                sql.push("id IN (").append(&inner).push(")");
                pending
            }
        };
        sql.push(")");
        let known: std::collections::HashSet<String> =
            pending.iter().flat_map(|v| v.search.keys.iter().filter_map(|k| id_of(k))).collect();
        let mut listed = Sql::default();
        listed.push("SELECT DISTINCT id FROM (").append(&sql).push(") LIMIT ").u64(self.listed_ids as u64 + 1);
        let mut ids: Vec<String> = listed.query(&self.ch).fetch_all().await.map_err(unavailable)?;
        if ids.len() + known.len() > self.listed_ids {
            return Ok(Clause::IdsIn(IdQuery {
                sql: Arc::new(sql),
                known: Arc::new(known),
                among: Default::default(),
            }));
        }
        ids.extend(known);
        ids.sort_unstable();
        ids.dedup();
        Ok(Clause::Ids(ids))
    }

    /// The documents of `rt` whose keys may not be in the index, with their keys (from
    /// their content for a version stored before keys were; see `reindex`).
    async fn pending(&self, rt: &str) -> Result<Vec<Version>, FhirError> {
        let mut pending = self.store.search_pending(rt, PENDING_LIMIT).await?;
        for v in pending.iter_mut() {
            v.search.keys = super::stored_keys(v, &self.base);
        }
        Ok(pending)
    }

    /// The pending documents of `rt`, and which are candidates. When there are too many
    /// (ClickHouse was away), they are flushed first.
    async fn overlay(&self, rt: &str, plan: &mut Plan) -> Result<Overlay, FhirError> {
        let mut pending = self.pending(rt).await?;
        if pending.len() as i64 >= PENDING_LIMIT {
            self.store.repair_history(rt).await?;
            pending = self.pending(rt).await?;
        }
        let ids: Vec<String> = pending.iter().map(|v| v.id.clone()).collect();
        self.fill_targets(plan, &ids).await?;
        self.fill_subqueries(plan, &pending).await?;
        let candidates = pending.into_iter().filter(|v| !v.deleted && plan.holds(&v.id, &v.search.keys)).collect();
        Ok(Overlay { ids, candidates })
    }

    /// Which of these ids are among each detached step's targets (for evaluating the
    /// pending documents in Rust).
    async fn fill_targets(&self, plan: &mut Plan, ids: &[String]) -> Result<(), FhirError> {
        let steps = plan.rest.iter_mut().filter_map(|s| match s {
            Step::Targets(t) => Some(t),
            _ => None,
        });
        let driver = match &mut plan.driver {
            Driver::Targets(t) => Some(t),
            Driver::Keys(_) => None,
        };
        for t in steps.chain(driver) {
            if ids.is_empty() {
                continue;
            }
            let mut sql = Sql::default();
            sql.push("SELECT id FROM (");
            t.refs.write_targets(&mut sql, &t.sources, &t.target_type, None, Some(ids), None);
            sql.push(") WHERE ").in_list("id", ids, false);
            let among: Vec<String> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
            t.among = Arc::new(among.into_iter().collect());
        }
        Ok(())
    }

    /// What each subquery of the plan finds among the pending documents: the ids their
    /// keys refer to (`KeyCond::Refers`), their own ids (`Step::IdsIn`).
    async fn fill_subqueries(&self, plan: &mut Plan, pending: &[Version]) -> Result<(), FhirError> {
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = pending.iter().map(|v| v.id.clone()).collect();
        let driver = match &mut plan.driver {
            Driver::Keys(set) => Some(set),
            Driver::Targets(_) => None,
        };
        let mut sets = Vec::new();
        for step in plan.rest.iter_mut() {
            match step {
                Step::With(set) | Step::Without(set) => sets.push(set),
                Step::IdsIn(q) => q.among = Arc::new(self.found(&q.sql, &ids).await?),
                Step::Ids(_) | Step::Targets(_) => {}
            }
        }
        for cond in driver.into_iter().chain(sets).flat_map(|set| set.0.iter_mut()) {
            if let KeyCond::Refers { prefix, inner, found } = cond {
                let mut named: Vec<String> = pending
                    .iter()
                    .flat_map(|v| v.search.keys.iter().filter_map(|k| k.strip_prefix(prefix.as_str())))
                    .map(str::to_string)
                    .collect();
                named.sort_unstable();
                named.dedup();
                *found = Arc::new(self.found(inner, &named).await?);
            }
        }
        Ok(())
    }

    /// Which of these ids a subquery (`SELECT id …`) finds.
    async fn found(&self, subquery: &Sql, ids: &[String]) -> Result<std::collections::HashSet<String>, FhirError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let mut sql = Sql::default();
        sql.push("SELECT DISTINCT id FROM (").append(subquery).push(") WHERE ").in_list("id", ids, false);
        let found: Vec<String> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
        Ok(found.into_iter().collect())
    }

    async fn count(&self, rt: &str, plan: &Plan, clauses: &[Clause], overlay: &Overlay) -> Result<u64, FhirError> {
        if let Some(ids) = plan.only_ids() {
            let only_ids = clauses.iter().all(|c| matches!(c, Clause::Ids(_)));
            if ids.len() <= COUNT_BY_READING || !only_ids {
                // Given ids: those whose documents exist and match (read, as their page is).
                return Ok(self.existing(rt, ids, clauses).await?.len() as u64);
            }
            // Many ids and nothing else (what a `_has` resolved to): the index counts those
            // that exist (reading 500 documents took 300–600 ms), the pending ones are read.
            let mut plan = Plan::new(rt, clauses);
            let overlay = self.overlay(rt, &mut plan).await?;
            return Ok(self.count_indexed(rt, &plan, &overlay).await? + self.pending_matches(&overlay, clauses));
        }
        Ok(self.count_indexed(rt, plan, overlay).await? + self.pending_matches(overlay, clauses))
    }

    /// The candidates in the index (the overlay's documents left out).
    async fn count_indexed(&self, rt: &str, plan: &Plan, overlay: &Overlay) -> Result<u64, FhirError> {
        let mut sql = Sql::default();
        sql.push("SELECT count() FROM (");
        sql::candidates(&mut sql, rt, &plan.driver, &plan.others(), &overlay.ids, None);
        sql.push(")");
        sql.query(&self.ch).fetch_one().await.map_err(unavailable)
    }

    /// Of these ids of `rt`, those whose current documents exist and match, read from
    /// MongoDB a thousand at a time.
    async fn existing(&self, rt: &str, ids: &[String], clauses: &[Clause]) -> Result<Vec<String>, FhirError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1_000) {
            let read = self.store.by_ids(rt, chunk).await?;
            out.extend(read.into_iter().filter(|v| !v.deleted && satisfies(v, clauses, &self.base)).map(|v| v.id));
        }
        Ok(out)
    }

    /// How many of the documents read from MongoDB match.
    fn pending_matches(&self, overlay: &Overlay, clauses: &[Clause]) -> u64 {
        overlay.candidates.iter().filter(|v| satisfies(v, clauses, &self.base)).count() as u64
    }

    /// Candidates in order after `after`, at most `limit`, from ClickHouse (see
    /// [`Plan::pages_targets`] for how a detached reference alone is paged); with `total`
    /// (on a first page), how many candidates there are in all, counted by the same query
    /// (`None` where that would cost a read of every candidate the page does not need).
    async fn ranked(&self, round: Round<'_>, total: bool) -> Result<Candidates, FhirError> {
        let Round { req, plan, overlay, after, limit } = round;
        let total = total && after.is_none();
        let sorts: Vec<(KeySet, bool)> = req.sort.iter().filter_map(SortKey::keys).collect();
        let ids_desc = ids_descending(&req.sort);
        if let Some(ids) = plan.ids_page(req) {
            // `_id=` alone (or what a member index resolved to): the candidates are the
            // ids themselves; reading their documents tells which exist and match.
            let mut page: Vec<&String> = ids.iter().filter(|id| after.is_none_or(|a| **id > a.id)).collect();
            page.sort_unstable();
            page.dedup();
            page.truncate(limit);
            return Ok(Candidates::of(
                page.into_iter().map(|id| Position { parts: Vec::new(), id: id.clone() }),
                limit,
            ));
        }
        let mut sql = Sql::default();
        if let (true, Driver::Targets(t)) = (plan.pages_targets(req), &plan.driver) {
            // Only a detached reference narrows it: a page of its targets, read in order.
            let skip = overlay.ids.len() as u64;
            sql.push("SELECT id FROM (");
            t.refs.write_targets(
                &mut sql,
                &t.sources,
                &t.target_type,
                after.map(|a| a.id.as_str()),
                None,
                Some(limit as u64 + skip),
            );
            sql.push(") WHERE 1");
            if !overlay.ids.is_empty() {
                sql.push(" AND ").in_list("id", &overlay.ids, true);
            }
            sql.push(" GROUP BY id ORDER BY id LIMIT ").u64(limit as u64).push(SMALL_QUERY);
            let ids: Vec<String> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
            return Ok(Candidates::of(ids.into_iter().map(|id| Position { parts: Vec::new(), id }), limit));
        }
        if sorts.is_empty() {
            // The window counts the grouped candidates before the limit: the total at
            // no extra read.
            sql.push("SELECT id, count() OVER () AS total FROM (");
            sql::candidates(
                &mut sql,
                &req.rt,
                &plan.driver,
                &plan.others(),
                &overlay.ids,
                after.map(|a| a.id.as_str()),
            );
            sql.push(") ORDER BY id LIMIT ").u64(limit as u64).push(SMALL_QUERY);
            let rows: Vec<Counted> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
            let counted = total.then(|| rows.first().map_or(0, |r| r.total));
            let rows = rows.into_iter().map(|r| Position { parts: Vec::new(), id: r.id });
            return Ok(Candidates { total: counted, ..Candidates::of(rows, limit) });
        }
        // Those with the first sort key, in order (unless the cursor is past them).
        let mut out = Vec::new();
        let mut counted = None;
        let past_present = after.is_some_and(|a| a.parts[0].0);
        if !past_present && sorts.len() == 1 {
            let (rows, more) = self.in_key_order(round, &sorts[0]).await?;
            if more {
                return Ok(Candidates { positions: rows, more, total: None });
            }
            out = rows;
        } else if !past_present {
            // `s` = [missing0, value0, missing1, value1, …] as strings ('1' = missing).
            sql.push("SELECT id, [");
            for (i, (set, largest)) in sorts.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.push("toString(countIf(");
                sql::key_set(&mut sql, set);
                sql.push(&format!(") = 0), {}(key, ", if *largest { "maxIf" } else { "minIf" }));
                sql::key_set(&mut sql, set);
                sql.push(")");
            }
            sql.push("] AS s, ");
            if total {
                sql.push("ifNull((SELECT count() FROM (");
                sql::candidates(&mut sql, &req.rt, &plan.driver, &plan.others(), &overlay.ids, None);
                sql.push(")), 0)");
            } else {
                sql.push("toUInt64(0)");
            }
            sql.push(&format!(" AS total FROM {TABLE} FINAL WHERE rt = ")).str(&req.rt).push(" AND (");
            for (i, (set, _)) in sorts.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                sql::key_set(&mut sql, set);
            }
            sql.push(") AND id IN (");
            sql::candidates(&mut sql, &req.rt, &plan.driver, &plan.others(), &overlay.ids, None);
            sql.push(") GROUP BY id HAVING s[1] = '0'");
            if let Some(after) = after {
                sql.push(" AND ");
                after_condition(&mut sql, &sorts, ids_desc, after);
            }
            sql.push(" ORDER BY ");
            for (i, (_, largest)) in sorts.iter().enumerate() {
                sql.push(&format!("s[{}], s[{}]{}, ", 2 * i + 1, 2 * i + 2, if *largest { " DESC" } else { "" }));
            }
            sql.push(if ids_desc { "id DESC LIMIT " } else { "id LIMIT " }).u64(limit as u64).push(SMALL_QUERY);
            let rows: Vec<Ranked> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
            // No row: none has the sort key, so the second phase counts them all.
            counted = rows.first().filter(|_| total).map(|r| r.total);
            out.extend(
                rows.into_iter().map(|r| Position {
                    parts: r.s.chunks(2).map(|c| (c[0] == "1", c[1].clone())).collect(),
                    id: r.id,
                }),
            );
            if out.len() >= limit {
                return Ok(Candidates { positions: out, more: true, total: counted });
            }
        }
        // Then those without it, by id (their later sort keys do not order them).
        let mut sql = Sql::default();
        sql.push("SELECT id, count() OVER () AS total FROM (");
        sql::candidates(&mut sql, &req.rt, &plan.driver, &plan.others(), &overlay.ids, None);
        sql.push(" HAVING id NOT IN (");
        sql::ids_with(&mut sql, &req.rt, &sorts[0].0);
        sql.push("))");
        if let Some(after) = after.filter(|a| a.parts[0].0) {
            sql.push(if ids_desc { " WHERE id < " } else { " WHERE id > " }).str(&after.id);
        }
        sql.push(if ids_desc { " ORDER BY id DESC LIMIT " } else { " ORDER BY id LIMIT " });
        sql.u64((limit - out.len()) as u64).push(SMALL_QUERY);
        let rows: Vec<Counted> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
        if total && counted.is_none() && out.is_empty() {
            counted = Some(rows.first().map_or(0, |r| r.total));
        }
        let missing = vec![(true, String::new()); sorts.len()];
        let more = rows.len() >= limit - out.len();
        out.extend(rows.into_iter().map(|r| Position { parts: missing.clone(), id: r.id }));
        Ok(Candidates { positions: out, more, total: counted })
    }

    /// One sort key's part of a page: the rows of the sort's keys from the cursor on, in
    /// the index's order, of resources among the candidates, at most `limit` rows; and
    /// whether there may be more.
    ///
    /// Read without `FINAL`, so ClickHouse reads in the table's order and stops after the
    /// few granules the page needs, where merging would read every resource's key first
    /// (measured at 1M Observations: 90 ms for a page by date, against 15 ms). The rows are
    /// therefore positions, not yet answers: a resource appears at each of its values, and
    /// at a value an unmerged older version had. `page` keeps a row only where it is the
    /// document's own sort value (`position_of` on its keys), which is exactly one row per
    /// matching resource at its place in the order, also after a cursor.
    ///
    /// A step on the sort's own parameter whose range runs to the sort's end (`ge`/`gt`
    /// under a descending date sort, `le`/`lt` under an ascending one) narrows the read
    /// instead of the candidates: the largest (smallest) value is in such a range exactly
    /// when any value is.
    async fn in_key_order(
        &self,
        round: Round<'_>,
        (set, largest): &(KeySet, bool),
    ) -> Result<(Vec<Position>, bool), FhirError> {
        let Round { req, plan, overlay, after, limit } = round;
        let [KeyCond::Range(from, to)] = set.0.as_slice() else { return Ok((Vec::new(), false)) };
        let (mut from, mut to) = (from.clone(), to.clone());
        let every = KeySet(vec![KeyCond::Eq(every_resource())]);
        let mut steps = plan.steps();
        steps.retain(|step| match step {
            Step::With(set) if *set == every => false,
            Step::With(KeySet(conds)) => match conds.as_slice() {
                [KeyCond::Range(f, t)] if *largest && *t == to && *f >= from => {
                    from = f.clone();
                    false
                }
                [KeyCond::Range(f, t)] if !*largest && *f == from && *t <= to => {
                    to = t.clone();
                    false
                }
                _ => true,
            },
            _ => true,
        });
        let mut sql = Sql::default();
        sql.push(&format!("SELECT id, key FROM {TABLE} WHERE rt = ")).str(&req.rt);
        sql.push(" AND key >= ").str(&from).push(" AND key < ").str(&to).push(" AND deleted = 0");
        // Ids run their own way (see `ids_descending`): usually the key's, so the read is
        // the table's order or its reverse.
        let ids_desc = ids_descending(&req.sort);
        let (key_op, key_order) = if *largest { ("<", "DESC") } else { (">", "ASC") };
        let (id_op, id_order) = if ids_desc { ("<", "DESC") } else { (">", "ASC") };
        if let Some(Position { parts, id }) = after {
            sql.push(&format!(" AND (key {key_op} ")).str(&parts[0].1);
            sql.push(" OR (key = ").str(&parts[0].1).push(&format!(" AND id {id_op} ")).str(id).push("))");
        }
        if let Some(rest) = Plan::of_steps(steps) {
            sql.push(" AND id IN (");
            sql::candidates(&mut sql, &req.rt, &rest.driver, &rest.others(), &[], None);
            sql.push(")");
        }
        if !overlay.ids.is_empty() {
            sql.push(" AND ").in_list("id", &overlay.ids, true);
        }
        sql.push(&format!(" ORDER BY key {key_order}, id {id_order} LIMIT ")).u64(limit as u64).push(SMALL_QUERY);
        // Unmerged copies of a row stay: `page` merges equal positions.
        let rows: Vec<Keyed> = sql.query(&self.ch).fetch_all().await.map_err(unavailable)?;
        let more = rows.len() >= limit;
        Ok((rows.into_iter().map(|r| Position { parts: vec![(false, r.key)], id: r.id }).collect(), more))
    }

    /// A page: candidates in order from both sources, read and checked, until the page is
    /// full, the candidates end, or [`ROUNDS`] rounds (more while the page is still empty: an
    /// empty page with a `next` link ends most clients' paging).
    ///
    /// Each round asks for four times the rows of the one before (up to [`MAX_BATCH`]): rows
    /// are rejected where the matcher disagrees with the index, and, in a one-key sort read
    /// in the index's order (see `in_key_order`), at every value an older version of a
    /// resource had until ClickHouse merges its rows away: a resource written many times
    /// leaves many such rows, which a page of `_count=1` would otherwise step through two at
    /// a time.
    async fn page(
        &self,
        req: &Request,
        plan: &Plan,
        clauses: &[Clause],
        overlay: &Overlay,
        count: usize,
        total: bool,
    ) -> Result<(Vec<Version>, Option<Position>, Option<u64>), FhirError> {
        let want = count + 1;
        let mut pending: Vec<(Position, &Version)> =
            overlay.candidates.iter().map(|v| (position_of(&v.id, &v.search.keys, &req.sort), v)).collect();
        let sorted = req.sort.iter().any(|s| s.def.is_some());
        pending.sort_by(|a, b| a.0.cmp(&b.0, &req.sort));
        let mut after = req.cursor.clone();
        let mut found: Vec<(Position, Version)> = Vec::new();
        let mut counted = None;
        let mut batch = want;
        for round in 0..MAX_ROUNDS {
            if round >= ROUNDS && !found.is_empty() {
                break;
            }
            let round_started = std::time::Instant::now();
            let asked = Round { req, plan, overlay, after: after.as_ref(), limit: batch };
            let indexed = self.ranked(asked, total && round == 0).await?;
            let ranked_at = round_started.elapsed();
            counted = counted.or(indexed.total);
            let (merged, ends) =
                merge_round(indexed.positions, indexed.more, &pending, after.as_ref(), batch, &req.sort);
            let mut to_read: Vec<String> =
                merged.iter().filter(|(_, v)| v.is_none()).map(|(p, _)| p.id.clone()).collect();
            to_read.sort_unstable();
            to_read.dedup();
            let read = self.store.by_ids(&req.rt, &to_read).await?;
            tracing::debug!(
                round,
                batch,
                rows = merged.len(),
                ranked_us = ranked_at.as_micros() as u64,
                read_us = round_started.elapsed().as_micros() as u64,
                "search round"
            );
            for (p, v) in &merged {
                // A resource may have rows at several positions: the one its document puts
                // it at is kept.
                let version = match v {
                    Some(v) => Some((*v).clone()),
                    None => read.iter().find(|r| r.id == p.id).cloned(),
                };
                // A sorted row stands where the document's own sort value puts it, or not at
                // all (a document changed since its row was read waits for the next page).
                let placed =
                    |v: &Version| !sorted || position_of(&v.id, &super::stored_keys(v, &self.base), &req.sort) == *p;
                if let Some(version) = version.filter(|v| !v.deleted && placed(v) && satisfies(v, clauses, &self.base))
                {
                    found.push((p.clone(), version));
                }
            }
            after = merged.last().map(|(p, _)| p.clone());
            if found.len() >= want || ends || after.is_none() {
                let next = (found.len() > count).then(|| found[count - 1].0.clone());
                found.truncate(count);
                return Ok((found.into_iter().map(|(_, v)| v).collect(), next, counted));
            }
            batch = (batch * 4).min(MAX_BATCH.max(want));
        }
        // Many candidates were rejected: a short page, continued where the rounds stopped.
        Ok((found.into_iter().map(|(_, v)| v).collect(), after, counted))
    }
}

/// One round's candidates: the index's rows and the pending documents' positions after
/// the cursor, in order, at most `batch`; and whether the candidates end with them.
///
/// Invariant: no position past the last row the index gave is kept unless the index has
/// no more rows (it may hold rows between that one and a pending position, which the next
/// round, starting after the last position kept, would otherwise step over). Counting the
/// index's rows is not enough to know that: unmerged copies of a row (a read without
/// `FINAL`, see `in_key_order`) are one position, so a full batch of rows can be fewer
/// positions. Found with `_count=1` paging (fhirpy, under load): the index gave two
/// copies of an older position of A, a pending B came after them, and the next round
/// began after B, past A's current row.
fn merge_round<T: Copy>(
    indexed: Vec<Position>,
    more: bool,
    pending: &[(Position, T)],
    after: Option<&Position>,
    batch: usize,
    sort: &[SortKey],
) -> (Vec<(Position, Option<T>)>, bool) {
    let exhausted = !more;
    let seen_to = indexed.last().cloned().filter(|_| more);
    let mut merged: Vec<(Position, Option<T>)> = indexed.into_iter().map(|p| (p, None)).collect();
    merged.extend(
        pending
            .iter()
            .filter(|(p, _)| after.is_none_or(|a| p.cmp(a, sort) == Ordering::Greater))
            .take(batch)
            .map(|(p, v)| (p.clone(), Some(*v))),
    );
    merged.sort_by(|a, b| a.0.cmp(&b.0, sort));
    merged.dedup_by(|a, b| a.0 == b.0);
    if let Some(last) = seen_to {
        merged.retain(|(p, _)| p.cmp(&last, sort) != Ordering::Greater);
    }
    merged.truncate(batch);
    let ends = exhausted && merged.len() < batch;
    (merged, ends)
}

/// `HAVING`: after a position, in the order `s[1], s[2] [DESC], …, id [DESC]` (ids as
/// `ids_descending` says).
fn after_condition(sql: &mut Sql, sorts: &[(KeySet, bool)], ids_desc: bool, after: &Position) {
    // Components in order: (expression, descending, value).
    let mut parts: Vec<(String, bool, String)> = Vec::new();
    for (i, (_, largest)) in sorts.iter().enumerate() {
        let (missing, value) = &after.parts[i];
        parts.push((format!("s[{}]", 2 * i + 1), false, if *missing { "1" } else { "0" }.to_string()));
        parts.push((format!("s[{}]", 2 * i + 2), *largest, value.clone()));
    }
    parts.push(("id".into(), ids_desc, after.id.clone()));
    sql.push("(");
    for k in 0..parts.len() {
        if k > 0 {
            sql.push(" OR ");
        }
        sql.push("(");
        for (j, (expr, descending, value)) in parts[..=k].iter().enumerate() {
            if j > 0 {
                sql.push(" AND ");
            }
            let op = match (j == k, descending) {
                (false, _) => "=",
                (true, false) => ">",
                (true, true) => "<",
            };
            sql.push(&format!("{expr} {op} ")).str(value);
        }
        sql.push(")");
    }
    sql.push(")");
}

/// A version's position, from its own keys (as ClickHouse computes it).
fn position_of(id: &str, keys: &[String], sort: &[SortKey]) -> Position {
    let parts: Vec<(bool, String)> = sort
        .iter()
        .filter_map(SortKey::keys)
        .map(|(set, largest)| {
            let matching = keys.iter().filter(|k| set.0.iter().any(|c| c.matches(k)));
            let value = if largest { matching.max() } else { matching.min() };
            match value {
                Some(k) => (false, k.clone()),
                None => (true, String::new()),
            }
        })
        .collect();
    // Without the first sort key, only the id orders it (as ClickHouse's second phase).
    if parts.first().is_some_and(|p| p.0) {
        let missing = vec![(true, String::new()); parts.len()];
        return Position { parts: missing, id: id.to_string() };
    }
    Position { parts, id: id.to_string() }
}

/// Whether a version satisfies every clause (chains and `_has` resolved).
pub fn satisfies(v: &Version, clauses: &[Clause], base: &str) -> bool {
    let Some(resource) = v.resource.as_ref() else { return false };
    let resource = Value::Object(resource.clone());
    clauses.iter().all(|c| holds(v, &resource, c, base))
}

fn holds(v: &Version, resource: &Value, c: &Clause, base: &str) -> bool {
    let rt = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    match c {
        Clause::Param { def, not, any } => {
            let values = super::extract::values_of(def, resource, base);
            any.iter().any(|t| any_matches(&values, t, &[])) != *not
        }
        Clause::Missing { def, missing } => super::extract::values_of(def, resource, base).is_empty() == *missing,
        Clause::Ids(ids) => ids.contains(&v.id),
        Clause::LastUpdated(any) => match registry().get(rt, "_lastUpdated") {
            Some(def) => {
                let values = super::extract::values_of(def, resource, base);
                any.iter().any(|t| any_matches(&values, t, &[]))
            }
            None => true,
        },
        Clause::Chain { .. } | Clause::Has(_) | Clause::List(_) => true,
        Clause::AnyOf(parts) => parts.iter().any(|p| holds(v, resource, p, base)),
        // Checked when the candidate was found (by the subquery, or by `Plan::holds`).
        Clause::Targets(_) | Clause::Keys(_) | Clause::IdsIn(_) => true,
    }
}

/// The `Type/id`s a reference parameter's tests name (for a detached reference).
fn reference_targets(def: &Definition, any: &[Test]) -> Vec<String> {
    let mut out = Vec::new();
    for t in any {
        match t {
            Test::Reference(super::query::RefTarget::Local { ty, id, .. }) => out.push(format!("{ty}/{id}")),
            Test::Reference(super::query::RefTarget::Id(id)) => {
                out.extend(def.targets.iter().map(|ty| format!("{ty}/{id}")));
            }
            Test::RefAny(targets) => out.extend(targets.iter().cloned()),
            _ => {}
        }
    }
    out
}

/// A search's steps: the driver (the first "with" step, else the first detached step,
/// else every resource) and the rest.
struct Plan {
    driver: Driver,
    rest: Vec<Step>,
}

impl Plan {
    fn new(rt: &str, clauses: &[Clause]) -> Plan {
        let all: Vec<Step> = clauses.iter().flat_map(|c| steps(rt, c)).collect();
        Plan::of_steps(all)
            .unwrap_or(Plan { driver: Driver::Keys(KeySet(vec![KeyCond::Eq(every_resource())])), rest: Vec::new() })
    }

    /// A plan of these steps; `None` when there are none (every resource).
    fn of_steps(mut all: Vec<Step>) -> Option<Plan> {
        // The narrowest "with" step drives (see `KeySet::breadth`); the first of equals.
        let with = (0..all.len())
            .filter_map(|i| match &all[i] {
                Step::With(set) => Some((set.breadth(), i)),
                _ => None,
            })
            .min()
            .map(|(_, i)| i);
        let targets = all.iter().position(|s| matches!(s, Step::Targets(_)));
        let driver = match (with, targets) {
            (Some(i), _) | (None, Some(i)) => match all.remove(i) {
                Step::With(set) => Driver::Keys(set),
                Step::Targets(t) => Driver::Targets(t),
                _ => unreachable!("found as With or Targets"),
            },
            (None, None) if all.is_empty() => return None,
            (None, None) => Driver::Keys(KeySet(vec![KeyCond::Eq(every_resource())])),
        };
        Some(Plan { driver, rest: all })
    }

    /// Every step, the driver's first.
    fn steps(&self) -> Vec<Step> {
        let driver = match &self.driver {
            Driver::Keys(set) => Step::With(set.clone()),
            Driver::Targets(t) => Step::Targets(t.clone()),
        };
        std::iter::once(driver).chain(self.rest.iter().cloned()).collect()
    }

    /// Whether a page is a range of a detached reference's targets (nothing else narrows
    /// the search and no sort orders it): a million-member Group's page reads a page,
    /// while its count would read every member.
    fn pages_targets(&self, req: &Request) -> bool {
        matches!(self.driver, Driver::Targets(_)) && self.rest.is_empty() && req.sort.iter().all(|s| s.def.is_none())
    }

    /// The ids of a plan that is only `_id=` (or ids a detached reference resolved to):
    /// its candidates are known without a lookup.
    fn only_ids(&self) -> Option<&[String]> {
        match (&self.driver, self.rest.as_slice()) {
            (Driver::Keys(KeySet(set)), [Step::Ids(ids)]) if *set == [KeyCond::Eq(every_resource())] => Some(ids),
            _ => None,
        }
    }

    /// [`Self::only_ids`] of an unsorted search: its pages are read from the ids alone.
    fn ids_page(&self, req: &Request) -> Option<&[String]> {
        self.only_ids().filter(|_| req.sort.iter().all(|s| s.def.is_none()))
    }

    /// Whether the first page's query counts the candidates too: not where the page is
    /// read in an order that stops early (a detached reference's targets, one sort key),
    /// as counting would read every candidate.
    fn counts_with_page(&self, req: &Request) -> bool {
        !self.pages_targets(req) && req.sort.iter().filter(|s| s.def.is_some()).count() != 1
    }

    fn others(&self) -> Vec<&Step> {
        self.rest.iter().collect()
    }

    fn holds(&self, id: &str, keys: &[String]) -> bool {
        let driver = match &self.driver {
            Driver::Keys(set) => set.any(keys),
            Driver::Targets(t) => t.among.contains(id),
        };
        driver && self.rest.iter().all(|s| s.holds(id, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: &str) -> Position {
        Position { parts: Vec::new(), id: id.to_string() }
    }

    fn ids<T>(merged: &[(Position, Option<T>)]) -> Vec<&str> {
        merged.iter().map(|(p, _)| p.id.as_str()).collect()
    }

    #[test]
    fn a_round_keeps_no_pending_position_past_the_last_row_the_index_gave() {
        // Given a full batch of two rows from the index that are copies of one position,
        // and a pending document after it,
        let (indexed, pending) = (vec![at("a"), at("a")], vec![(at("c"), 'c')]);
        // when a round merges them,
        let (merged, ends) = merge_round(indexed, true, &pending, None, 2, &[]);
        // then the pending one waits: the index may hold rows between "a" and "c".
        assert_eq!(ids(&merged), ["a"]);
        assert!(!ends);
    }

    #[test]
    fn an_index_with_no_more_rows_lets_the_pending_positions_through() {
        let (merged, ends) = merge_round(vec![at("a")], false, &[(at("c"), 'c')], None, 3, &[]);
        assert_eq!(ids(&merged), ["a", "c"]);
        assert_eq!(merged[1].1, Some('c'));
        assert!(ends, "fewer positions than asked and nothing left");
    }

    #[test]
    fn a_round_interleaves_both_sources_after_the_cursor_up_to_the_batch() {
        let pending = [(at("a"), 'a'), (at("c"), 'c'), (at("e"), 'e')];
        let (merged, ends) = merge_round(vec![at("b"), at("d")], true, &pending, Some(&at("a")), 2, &[]);
        assert_eq!(ids(&merged), ["b", "c"]);
        assert!(!ends);
    }
}
