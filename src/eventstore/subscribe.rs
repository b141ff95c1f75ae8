//! Subscriptions over any [`EventStore`]: catch up by paging `read_log`, then follow by
//! waiting for more and paging again.
//!
//! Gap safety comes from the store, not from here: `read_log` only ever returns a prefix of
//! the log with no hole a later append could fill (see `log`), so a subscriber that asks
//! for "after the last position I saw" can never skip an event.

use std::sync::Arc;

use futures_util::Stream;

use super::{EventStore, EventStoreError, StoredEvent};

/// Events from `from` on, in position order, forever. `page` bounds each read. After an
/// error the stream yields it and ends (the caller resumes from its last position).
pub fn subscribe<S: EventStore>(
    store: Arc<S>,
    from: u64,
    page: usize,
) -> impl Stream<Item = Result<StoredEvent, EventStoreError>> + Send + 'static {
    let state = (store, from, std::collections::VecDeque::<StoredEvent>::new(), false);
    futures_util::stream::unfold(state, move |(store, mut next, mut buffered, failed)| async move {
        if failed {
            return None;
        }
        loop {
            if let Some(e) = buffered.pop_front() {
                return Some((Ok(e), (store, next, buffered, false)));
            }
            match store.read_log(next, page).await {
                Ok(events) if events.is_empty() => store.wait_for_more(next as i64 - 1).await,
                Ok(events) => {
                    next = events.last().map_or(next, |e| e.position + 1);
                    buffered.extend(events);
                }
                Err(e) => return Some((Err(e), (store, next, buffered, true))),
            }
        }
    })
}
