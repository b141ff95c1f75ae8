//! The HTTP/1.1 accept loop, with the limits `axum::serve` does not offer.
//!
//! Why not `axum::serve`: it gives hyper no timer, so a client that sends half a request
//! line and then nothing holds its connection (and a task) forever, and it accepts every
//! connection the kernel hands it. Here:
//! - a request's headers must arrive within `http.header_timeout_ms` (hyper's header read
//!   timeout; it also closes a keep-alive connection idle for that long);
//! - request bodies are bounded in time by layers on the router (`startup::router`), so a
//!   stalled body is answered with a 408 in the API's own error format;
//! - at most `http.max_connections` connections are served at once: the loop takes a permit
//!   before accepting, so further clients wait in the kernel's listen queue instead of each
//!   costing a task and buffers.
//!
//! Shutdown: when `stop` resolves the loop stops accepting, every open connection finishes
//! its in-flight request and closes (keep-alive off), and `serve` returns once they have,
//! or after [`SHUTDOWN_GRACE`] (an event subscription never finishes on its own).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HttpSettings;

/// Longest a shutdown waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long to wait before accepting again after the listener fails (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop` resolves, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpSettings,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_timeout_ms));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Responses go out in more than one write; without TCP_NODELAY, Nagle's algorithm
        // and the client's delayed ACK add ~40 ms to each.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let connection = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that goes away or times out is routine, not a server fault.
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping without them");
    }
    Ok(())
}
