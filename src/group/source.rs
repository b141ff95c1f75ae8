//! The committed membership as the planner reads it: a trait, so the planner's arithmetic
//! over the virtual member list can be unit-tested over a map (`Memory`), while the server
//! reads ClickHouse's views (`group::read`).
//!
//! Only committed state comes through here; pending batches and the member index are laid
//! over it by the planner itself.

use std::collections::HashMap;

use futures_util::future::BoxFuture;

use super::read::{self, MemberRow};
use crate::error::FhirError;

pub trait MemberSource: Sync {
    /// Active members of the group, or `None` if it never had a member event.
    fn enumerated_count<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Option<u64>, FhirError>>;
    /// The latest state of each of `references` that has one (active or not).
    fn lookup<'a>(
        &'a self,
        group: &'a str,
        references: &'a [String],
    ) -> BoxFuture<'a, Result<HashMap<String, MemberRow>, FhirError>>;
    /// The active member at `index` in position order.
    fn at_index<'a>(&'a self, group: &'a str, index: u64) -> BoxFuture<'a, Result<Option<MemberRow>, FhirError>>;
    /// Every active member, in position order.
    fn all_active<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<MemberRow>, FhirError>>;
}

impl MemberSource for clickhouse::Client {
    fn enumerated_count<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Option<u64>, FhirError>> {
        Box::pin(async move { Ok(read::enumerated_count(self, group, None).await?) })
    }

    fn lookup<'a>(
        &'a self,
        group: &'a str,
        references: &'a [String],
    ) -> BoxFuture<'a, Result<HashMap<String, MemberRow>, FhirError>> {
        Box::pin(async move { Ok(read::lookup(self, group, references).await?) })
    }

    fn at_index<'a>(&'a self, group: &'a str, index: u64) -> BoxFuture<'a, Result<Option<MemberRow>, FhirError>> {
        Box::pin(async move { Ok(read::at_index(self, group, index).await?) })
    }

    fn all_active<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<MemberRow>, FhirError>> {
        Box::pin(async move {
            let mut cursor = read::members(self, group, None)?;
            let mut rows = Vec::new();
            while let Some(row) = cursor.next().await? {
                rows.push(row);
            }
            Ok(rows)
        })
    }
}

#[cfg(test)]
pub mod memory {
    //! Committed membership in memory, for unit tests of the planner.
    use super::*;

    /// Committed membership in memory, for tests: group → every member's latest state.
    #[derive(Default)]
    pub struct Memory {
        pub groups: HashMap<String, Vec<MemberRow>>,
    }

    impl Memory {
        fn active(&self, group: &str) -> Vec<MemberRow> {
            let mut rows: Vec<MemberRow> =
                self.groups.get(group).into_iter().flatten().filter(|r| r.active).cloned().collect();
            rows.sort_by_key(|r| r.position);
            rows
        }
    }

    impl MemberSource for Memory {
        fn enumerated_count<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Option<u64>, FhirError>> {
            let count = self.groups.contains_key(group).then(|| self.active(group).len() as u64);
            Box::pin(async move { Ok(count) })
        }

        fn lookup<'a>(
            &'a self,
            group: &'a str,
            references: &'a [String],
        ) -> BoxFuture<'a, Result<HashMap<String, MemberRow>, FhirError>> {
            let found = self
                .groups
                .get(group)
                .into_iter()
                .flatten()
                .filter(|r| references.contains(&r.member_reference))
                .map(|r| (r.member_reference.clone(), r.clone()))
                .collect();
            Box::pin(async move { Ok(found) })
        }

        fn at_index<'a>(&'a self, group: &'a str, index: u64) -> BoxFuture<'a, Result<Option<MemberRow>, FhirError>> {
            let row = self.active(group).into_iter().nth(index as usize);
            Box::pin(async move { Ok(row) })
        }

        fn all_active<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<MemberRow>, FhirError>> {
            let rows = self.active(group);
            Box::pin(async move { Ok(rows) })
        }
    }
}
