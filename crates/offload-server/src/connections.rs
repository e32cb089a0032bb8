//! The accept loop: HTTP/1.1 connections served by hyper, each closed when
//! it waits too long for a request's head, and all of them drained when
//! the node stops.
//!
//! Without a timeout a client that opened a connection and then went
//! quiet (a crashed process behind a NAT that forgot it, a request cut
//! off mid-header, or a client that means harm) held its socket and task
//! for as long as the node ran; enough of them and `accept` fails for
//! everyone.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Accepts connections on `listener` until `stop` fires, then asks each
/// open connection to close once its request in flight is answered, and
/// returns when all have.
///
/// `idle` bounds the wait for a request's head: from the connection's
/// opening to its first request, and from each answer to the next request
/// (hyper's header read timeout starts when it starts reading a head, so
/// it is the keep-alive timeout too). It must outlast the idle time of the
/// pools of clients and proxies in front, or they will now and then send a
/// request on a connection the node is closing.
pub(crate) async fn serve_until_stopped(
    listener: TcpListener,
    router: Router,
    idle: Duration,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(idle);
    let open = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !is_the_peers_doing(&e) {
                    // Out of file descriptors, most likely: trying again at
                    // once would spin. Connections that close meanwhile free
                    // some.
                    tracing::warn!(error = %e, "cannot accept a connection; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = open.watch(connection);
        tokio::spawn(async move {
            // A client that hung up or timed out; nothing a handler can
            // still be told.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    open.shutdown().await;
}

/// An accept error that concerns one connection only: the next accept
/// may succeed at once.
fn is_the_peers_doing(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
