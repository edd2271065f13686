//! The HTTP listener: hyper's HTTP/1 server with the bounds `axum::serve` leaves out.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout is off: a client sending a
//! header byte a minute, or leaving a kept-alive connection idle, held its connection for ever,
//! and enough of them took the process's file descriptors (Kafka's and Redis's connections
//! failed too). Here every connection must send each request's headers within
//! `http.header_timeout_ms` (waiting idle for the next request included) and its body within
//! `http.body_timeout_ms`, at most `http.max_connections` are served at once (more are closed at
//! once), and a graceful stop waits at most [`DRAIN`] for open connections before closing them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::METRICS;

/// Connections the admin address (`http.admin_listen`: probes and metrics) serves at once.
pub const ADMIN_CONNECTIONS: usize = 64;

/// Longest a graceful stop waits for open connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    max_connections: usize,
    (header_timeout, body_timeout): (Duration, Duration),
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let mut refused_logged = false;
    let mut conns = tokio::task::JoinSet::new();
    let app = app.layer(axum::middleware::map_request(move |req| {
        std::future::ready(with_body_deadline(req, body_timeout))
    }));
    loop {
        // Finished connections are reaped as new ones come.
        while conns.try_join_next().is_some() {}
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
        conns.spawn(async move {
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
    conns.abort_all();
}

/// How a body past its deadline fails (the ingest doors answer it 408).
pub const BODY_TOO_SLOW: &str = "the body took longer than";

/// Each request's body must arrive within `within` of its headers (`http.body_timeout_ms`; the
/// ingest doors keep their own 30 s too): a client announcing a body and sending none no longer
/// holds its connection — and its handler — for ever.
fn with_body_deadline(req: axum::extract::Request, within: Duration) -> axum::extract::Request {
    req.map(|b| {
        axum::body::Body::new(Deadline {
            inner: b,
            sleep: Box::pin(tokio::time::sleep(within)),
            within,
        })
    })
}

/// A request body that fails once its deadline passed before it ended.
struct Deadline {
    inner: axum::body::Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    within: Duration,
}

impl http_body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f);
        }
        if std::future::Future::poll(self.sleep.as_mut(), cx).is_ready() {
            let secs = self.within.as_secs();
            return Poll::Ready(Some(Err(axum::Error::new(format!(
                "{BODY_TOO_SLOW} {secs} s to arrive"
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
