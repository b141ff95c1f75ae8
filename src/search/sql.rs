//! The candidate queries of a plan, as ClickHouse SQL with bound parameters. Every value
//! from a request is a parameter (`{pN:String}`, `{pN:Array(String)}`); the text is built
//! only from the fixed fragments below.

use clickhouse::query::Query;

use super::detached::Targets;
use super::flusher::TABLE;
use super::plan::{KeyCond, KeySet, Step};

/// Most bytes of strings sent in one array parameter (ClickHouse's HTTP interface refuses
/// form fields over 128 KiB).
pub const PARAMETER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
enum Param {
    Str(String),
    Strs(Vec<String>),
    U64(u64),
}

/// SQL text and its parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sql {
    pub text: String,
    params: Vec<(String, Param)>,
}

impl Sql {
    fn name(&self) -> String {
        format!("p{}", self.params.len())
    }

    /// Appends a string parameter's placeholder.
    pub fn str(&mut self, v: &str) -> &mut Self {
        let n = self.name();
        self.text.push_str(&format!("{{{n}:String}}"));
        self.params.push((n, Param::Str(v.to_string())));
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        let n = self.name();
        self.text.push_str(&format!("{{{n}:UInt64}}"));
        self.params.push((n, Param::U64(v)));
        self
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends another query's text with its parameters, renamed after this one's (a
    /// subquery built on its own, e.g. a chain's inner search).
    pub fn append(&mut self, other: &Sql) -> &mut Self {
        let offset = self.params.len();
        let mut rest = other.text.as_str();
        // Placeholders are `{pN:Type}`; the fixed fragments never contain `{p`.
        while let Some(at) = rest.find("{p") {
            self.text.push_str(&rest[..at]);
            let tail = &rest[at + 2..];
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            let n = tail[..digits].parse::<usize>().ok().filter(|_| tail[digits..].starts_with(':'));
            match n {
                Some(n) => {
                    self.text.push_str(&format!("{{p{}", n + offset));
                    rest = &tail[digits..];
                }
                None => {
                    self.text.push_str("{p");
                    rest = tail;
                }
            }
        }
        self.text.push_str(rest);
        for (i, (_, p)) in other.params.iter().enumerate() {
            self.params.push((format!("p{}", i + offset), p.clone()));
        }
        self
    }

    /// `column IN (…)` (or `NOT IN`) over any number of strings: one array parameter per
    /// [`PARAMETER_BYTES`].
    pub fn in_list(&mut self, column: &str, values: &[String], negated: bool) -> &mut Self {
        if values.is_empty() {
            return self.push(if negated { "1" } else { "0" });
        }
        let (op, join) = if negated { ("NOT IN", " AND ") } else { ("IN", " OR ") };
        self.push("(");
        let mut first = true;
        for chunk in chunks(values) {
            if !first {
                self.push(join);
            }
            first = false;
            let n = self.name();
            self.text.push_str(&format!("{column} {op} {{{n}:Array(String)}}"));
            self.params.push((n, Param::Strs(chunk.to_vec())));
        }
        self.push(")")
    }

    /// A query of this SQL on `ch`, parameters bound.
    pub fn query(&self, ch: &clickhouse::Client) -> Query {
        // The text, without its parameters (`ROSTER_LOG=roster::search::sql=trace`).
        tracing::trace!(sql = %self.text, "search query");
        let mut q = ch.query(&self.text);
        for (name, p) in &self.params {
            q = match p {
                Param::Str(s) => q.param(name, s),
                Param::Strs(v) => q.param(name, v),
                Param::U64(n) => q.param(name, n),
            };
        }
        q
    }
}

/// Splits strings into runs that each fit one query parameter (ClickHouse's HTTP interface
/// refuses longer form fields, "Field value too long").
pub fn chunks(values: &[String]) -> impl Iterator<Item = &[String]> {
    let mut rest = values;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut bytes, mut n) = (0, 0);
        while n < rest.len() && (n == 0 || bytes + rest[n].len() * 2 + 3 <= PARAMETER_BYTES) {
            bytes += rest[n].len() * 2 + 3;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// `(key …)`: any condition of the set.
pub fn key_set(sql: &mut Sql, set: &KeySet) {
    let eqs: Vec<String> =
        set.0.iter().filter_map(|c| if let KeyCond::Eq(k) = c { Some(k.clone()) } else { None }).collect();
    let others: Vec<&KeyCond> = set.0.iter().filter(|c| !matches!(c, KeyCond::Eq(_))).collect();
    if eqs.is_empty() && others.is_empty() {
        sql.push("0");
        return;
    }
    sql.push("(");
    let mut first = true;
    if eqs.len() == 1 {
        sql.push("key = ").str(&eqs[0]);
        first = false;
    } else if !eqs.is_empty() {
        sql.in_list("key", &eqs, false);
        first = false;
    }
    for c in others {
        if !first {
            sql.push(" OR ");
        }
        first = false;
        match c {
            KeyCond::Range(from, to) => {
                sql.push("(key >= ").str(from).push(" AND key < ").str(to).push(")");
            }
            KeyCond::Contains { from, to, needle, skip } => {
                sql.push("(key >= ").str(from).push(" AND key < ").str(to).push(" AND position(key, ").str(needle);
                sql.push(", ").u64(*skip as u64 + 1).push(") > 0)");
            }
            KeyCond::Refers { prefix, inner, .. } => {
                sql.push("key IN (SELECT concat(").str(prefix).push(", id) FROM (").append(inner).push("))");
            }
            KeyCond::Eq(_) => {}
        }
    }
    sql.push(")");
}

/// The ids of `rt` with a key in the set (a subquery).
pub fn ids_with(sql: &mut Sql, rt: &str, set: &KeySet) {
    sql.push(&format!("SELECT id FROM {TABLE} FINAL WHERE rt = ")).str(rt).push(" AND ");
    key_set(sql, set);
}

/// `SELECT id … WHERE …` (no `GROUP BY`) of the driver within the "with" steps, the last
/// outermost; `others` give the driver of a detached reference the ids to look up.
fn nested(sql: &mut Sql, rt: &str, driver: &Driver, withs: &[&KeySet], others: &[&Step], after: Option<&str>) {
    match withs.split_last() {
        Some((outer, inner)) => {
            ids_with(sql, rt, outer);
            sql.push(" AND id IN (");
            nested(sql, rt, driver, inner, others, after);
            sql.push(")");
        }
        None => match driver {
            Driver::Keys(set) => ids_with(sql, rt, set),
            Driver::Targets(t) => {
                sql.push("SELECT id FROM (");
                t.refs.write_targets(sql, &t.sources, &t.target_type, after, ids_among(others), None);
                sql.push(") WHERE 1");
            }
        },
    }
}

/// The ids an `Ids` step (`_id=`) allows, to look targets up by (the step still applies).
fn ids_among<'a>(steps: &[&'a Step]) -> Option<&'a [String]> {
    steps.iter().find_map(|s| match s {
        Step::Ids(ids) => Some(ids.as_slice()),
        _ => None,
    })
}

/// What finds the first candidates.
#[derive(Debug, Clone)]
pub enum Driver {
    Keys(KeySet),
    Targets(Targets),
}

/// The candidate ids of `rt`: found by the driver, and every other step; never one of
/// `excluded` (documents the search reads from MongoDB); after `after` when given.
/// One row per id (`SELECT id … GROUP BY id`).
///
/// "With" steps nest around the driver: each reads its keys only for the ids of the step
/// inside it (`key = K AND id IN (…)` is a primary-key lookup of those ids under K), so a
/// common code under a patient's few Observations reads those few rows, not the code's
/// 50k (measured 12.5 ms against 22.8 ms at 1M Observations). Other steps filter the
/// outermost.
pub fn candidates(
    sql: &mut Sql,
    rt: &str,
    driver: &Driver,
    others: &[&Step],
    excluded: &[String],
    after: Option<&str>,
) {
    let withs: Vec<&KeySet> =
        others.iter().filter_map(|s| if let Step::With(set) = s { Some(set) } else { None }).collect();
    nested(sql, rt, driver, &withs, others, after);
    for step in others {
        match step {
            // Nested above.
            Step::With(_) => {}
            Step::Without(set) => {
                sql.push(" AND id NOT IN (");
                ids_with(sql, rt, set);
                sql.push(")");
            }
            Step::Ids(ids) => {
                sql.push(" AND ").in_list("id", ids, false);
            }
            Step::Targets(t) => {
                sql.push(" AND id IN (");
                t.refs.write_targets(sql, &t.sources, &t.target_type, None, ids_among(others), None);
                sql.push(")");
            }
            Step::IdsIn(q) => {
                sql.push(" AND (id IN (").append(&q.sql).push(")");
                if !q.known.is_empty() {
                    let known: Vec<String> = q.known.iter().cloned().collect();
                    sql.push(" OR ").in_list("id", &known, false);
                }
                sql.push(")");
            }
        }
    }
    if !excluded.is_empty() {
        sql.push(" AND ").in_list("id", excluded, true);
    }
    if let Some(after) = after {
        sql.push(" AND id > ").str(after);
    }
    sql.push(" GROUP BY id");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_split_into_several_parameters() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("id-{i:010}")).collect();
        let mut s = Sql::default();
        s.in_list("id", &ids, true);
        assert!(s.params.len() > 1 && s.text.contains(" AND "));
    }

    #[test]
    fn an_appended_query_keeps_its_parameters_under_new_names() {
        let mut inner = Sql::default();
        inner.push("SELECT id FROM t WHERE key = ").str("k").push(" AND n < ").u64(7);
        let mut outer = Sql::default();
        outer.push("SELECT id FROM t WHERE rt = ").str("Patient").push(" AND id IN (").append(&inner).push(")");
        outer.push(" AND id > ").str("a");
        assert_eq!(
            outer.text,
            "SELECT id FROM t WHERE rt = {p0:String} AND id IN (SELECT id FROM t WHERE key = {p1:String} \
             AND n < {p2:UInt64}) AND id > {p3:String}"
        );
        let names: Vec<&str> = outer.params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["p0", "p1", "p2", "p3"]);
        assert_eq!(outer.params[1].1, Param::Str("k".into()));
        assert_eq!(outer.params[2].1, Param::U64(7));
    }
}
