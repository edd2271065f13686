//! The HTTP listener: hyper's HTTP/1 server with the bounds `axum::serve` leaves out.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout is off: a client sending a
//! header byte a minute, or leaving a kept-alive connection idle, held its connection for ever,
//! and enough of them took the process's file descriptors (Kafka's and Redis's connections
//! failed too). Here every connection must send each request's headers within
//! `http.header_timeout_ms` (waiting idle for the next request included), at most
//! `http.max_connections` are served at once (more are closed at once), and a graceful stop waits
//! at most [`DRAIN`] for open connections (a live-update stream of the inbox stays open until
//! its client leaves) before closing them.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::METRICS;

/// Longest a graceful stop waits for open connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    max_connections: usize,
    header_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let mut refused_logged = false;
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "Accepting an HTTP connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            METRICS.http_connections_refused.inc();
            if !refused_logged {
                tracing::warn!(
                    max_connections,
                    "HTTP connections at http.max_connections: new ones are closed (logged once; counted in switchyard_http_connections_refused_total)."
                );
                refused_logged = true;
            }
            drop(tcp);
            continue;
        };
        // Answers (and streamed chunks) go out at once, not after the peer's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "Could not set TCP_NODELAY on a connection.");
        }
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error.");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => {
            tracing::warn!(seconds = DRAIN.as_secs(), "HTTP connections still open after the drain; closing them.");
        }
    }
}
