//! The accept loop: HTTP/1.1 connections served by hyper, each closed when
//! it waits too long for a request's head, and all of them drained when
//! the node stops.
//!
//! Without a timeout a client that opened a connection and then went
//! quiet (a crashed process behind a NAT that forgot it, a request cut
//! off mid-header, or a client that means harm) held its socket and task
//! for as long as the node ran; enough of them and `accept` fails for
//! everyone. The same holds for a client that sends a request and never
//! reads the answer: the answer waits in memory for it (a page of a list
//! is up to 8 MiB), so a connection whose answer makes no progress for
//! the idle timeout is closed too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
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
            TokioIo::new(UnreadAnswersEnd::new(stream, idle)),
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

/// A connection whose writes fail once the peer has taken none of what
/// is sent for `idle`: 50 clients that asked for a page of a list and
/// read nothing held 600 MB of the node's memory, with no end.
struct UnreadAnswersEnd<S> {
    inner: S,
    idle: Duration,
    /// Armed when a write could not go out, disarmed when one does.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> UnreadAnswersEnd<S> {
    fn new(inner: S, idle: Duration) -> Self {
        UnreadAnswersEnd {
            inner,
            idle,
            stalled: None,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let idle = self.idle;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read none of the answer for {} s",
                    idle.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for UnreadAnswersEnd<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UnreadAnswersEnd<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shut = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, shut)
    }
}
