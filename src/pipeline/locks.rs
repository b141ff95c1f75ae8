//! In-process serialization of writes to one resource.
//!
//! The version guard in MongoDB is what makes concurrent writes safe, across any number of
//! server processes. But under contention every loser redoes its work (for a Group PATCH,
//! ClickHouse reads included) and retries. Queuing writers of the same resource inside a
//! process turns that spinning into a short wait; the guard still settles races between
//! processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

use crate::store::ResourceKey;

#[derive(Clone, Default)]
pub struct WriteLocks(Arc<Mutex<HashMap<ResourceKey, Weak<tokio::sync::Mutex<()>>>>>);

impl WriteLocks {
    /// Waits for exclusive write access to `key` within this process.
    pub async fn lock(&self, key: ResourceKey) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    if map.len() >= 1024 && map.len().is_power_of_two() {
                        map.retain(|_, w| w.strong_count() > 0);
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_writer_per_key() {
        let locks = WriteLocks::default();
        let a = locks.lock(ResourceKey::new("Group", "1")).await;
        let other =
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(ResourceKey::new("Group", "2")))
                .await;
        assert!(other.is_ok(), "other keys are free");
        let same =
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(ResourceKey::new("Group", "1")))
                .await;
        assert!(same.is_err(), "the same key waits");
        drop(a);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(ResourceKey::new("Group", "1")))
            .await
            .is_ok());
    }
}
