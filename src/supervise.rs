//! Background tasks that come back after a panic, and a record of which are down.
//!
//! Why: the server's background loops (member batch sweeps, event recording recovery and
//! retention, projection feeding) run for the life of the process. A panic in one used to
//! end it silently: its work stopped while `/ready` kept saying ready. Here each runs in a
//! task of its own under a supervisor that logs the panic with the task's name, waits
//! ([`restart_delays`]: 100 ms doubling to 30 s, reset after a minute of good running), and starts
//! it again; while it waits the task is *down*, and `/ready` answers 503 naming it.
//!
//! A task that returns normally is finished and not restarted. Aborting the handle
//! [`Tasks::spawn`] returns stops the supervisor and the task it runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The first wait after a panic; it doubles per panic in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A task that ran this long since its last start counts as healthy again: the next panic
/// waits [`FIRST_BACKOFF`].
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// The waits before the restarts after panics in a row: the first, the second, …
pub fn restart_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The supervised tasks of one application, and which of them are down.
#[derive(Clone, Default)]
pub struct Tasks {
    /// Down tasks: name → panics in a row.
    down: Arc<Mutex<BTreeMap<String, u32>>>,
}

/// Aborts a task when dropped (so aborting a supervisor aborts what it supervises).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tasks {
    /// Runs `make()` as task `name`, again after each panic (see the module doc).
    pub fn spawn<F, Fut>(&self, name: impl Into<String>, make: F) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let down = self.down.clone();
        tokio::spawn(async move {
            let mut panics = 0u32;
            let mut delays = restart_delays();
            loop {
                let started = Instant::now();
                let mut task = AbortOnDrop(tokio::spawn(make()));
                let ended = (&mut task.0).await;
                match ended {
                    Ok(()) => {
                        tracing::info!(task = %name, "background task finished");
                        return;
                    }
                    Err(e) if e.is_panic() => {
                        if started.elapsed() >= HEALTHY_AFTER {
                            (panics, delays) = (0, restart_delays());
                        }
                        panics += 1;
                        let wait = delays.next().unwrap_or(MAX_BACKOFF);
                        tracing::error!(task = %name, panics, restart_in = ?wait, "background task panicked");
                        // Down while waiting; up again when restarted, or if aborted meanwhile.
                        let _down = Down::mark(&down, &name, panics);
                        tokio::time::sleep(wait).await;
                        tracing::info!(task = %name, "background task restarted");
                    }
                    Err(_) => return, // cancelled
                }
            }
        })
    }

    /// The tasks down now (waiting to be restarted), by name.
    pub fn down(&self) -> Vec<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

/// A task's entry in the down list, removed when dropped.
struct Down<'a> {
    list: &'a Mutex<BTreeMap<String, u32>>,
    name: &'a str,
}

impl<'a> Down<'a> {
    fn mark(list: &'a Mutex<BTreeMap<String, u32>>, name: &'a str, panics: u32) -> Down<'a> {
        list.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), panics);
        Down { list, name }
    }
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).remove(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_to_a_cap() {
        // Whole milliseconds: the policy computes in f32.
        let delays: Vec<u128> = restart_delays().take(1000).map(|d| d.as_micros().div_ceil(1000)).collect();
        assert_eq!(delays[..5], [100, 200, 400, 800, 1600]);
        assert_eq!(delays[9], MAX_BACKOFF.as_millis());
        assert_eq!(delays[999], MAX_BACKOFF.as_millis(), "and it goes on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_down_until_restarted_then_runs_on() {
        let tasks = Tasks::default();
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let handle = tasks.spawn("flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n <= 2 {
                    panic!("start {n} fails");
                }
                std::future::pending::<()>().await;
            }
        });
        // Given a task whose first two starts panic:
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(tasks.down(), ["flaky"], "down while waiting 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "restarted after 100 ms; panicked again");
        assert_eq!(tasks.down(), ["flaky"], "down again, now for 200 ms");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "the second wait is longer");
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Then it runs, and nothing is down.
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert!(tasks.down().is_empty());
        handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_task_is_not_restarted_and_an_abort_stops_the_task() {
        let tasks = Tasks::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let done = tasks.spawn("once", move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        done.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let ticks = Arc::new(AtomicU32::new(0));
        let counted = ticks.clone();
        let forever = tasks.spawn("ticker", move || {
            let counted = counted.clone();
            async move {
                loop {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(35)).await;
        forever.abort();
        let _ = forever.await;
        let seen = ticks.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), seen, "the supervised task stopped with its supervisor");

        // Aborted while down: no longer listed.
        let failing = tasks.spawn("failing", || async { panic!("always") });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(tasks.down(), ["failing"]);
        failing.abort();
        let _ = failing.await;
        assert!(tasks.down().is_empty());
    }
}
