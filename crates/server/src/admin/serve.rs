//! The admin listener's accept loop, with the bounds `axum::serve` does not offer (issue 20,
//! item 7: ~20,000 idle connections to it took every descriptor the MQTT listeners needed).
//!
//! - At most `admin.max_connections` open at once: the loop takes a slot before it accepts,
//!   so further clients wait in the kernel's backlog and hold no descriptor of ours.
//! - `admin.header_timeout`: from when a request is awaited (a new connection, or the end of
//!   the previous response on a kept-alive one) to the end of its headers. hyper arms it each
//!   time it waits for a request head, so it is also the idle limit between requests.
//! - `admin.idle_timeout`: a connection on which nothing was read or written for this long is
//!   closed, whatever it is doing (a body that trickles, a response nobody reads).
//!
//! The admin listener's descriptors are counted out of the process's limit at start
//! (`descriptors.rs`), so whatever happens here cannot take the ones MQTT listeners need.

use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After a shutdown, how long a request being answered may take to finish.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// How long to stop accepting after EMFILE/ENFILE and the like.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds from `[admin]`.
pub(super) struct Bounds {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in progress finish (within
/// `SHUTDOWN_LIMIT`).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let bounds = Arc::new(bounds);
    let tracker = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12: pause rather than spin.
                if matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) {
                    tracing::warn!(error = %e, "admin listener: accept failed for lack of resources; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let app = app.clone();
        let bounds = bounds.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection(stream, app, &bounds, &shutdown).await;
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One connection: HTTP/1.1 with keep-alive, ended by the idle timeout, a header timeout or a
/// shutdown (after the request in progress, if any).
async fn connection(stream: TcpStream, app: Router, bounds: &Bounds, shutdown: &CancellationToken) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched {
        inner: stream,
        started,
        last: last.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, TowerToHyperService::new(app)));
    let mut shutting_down = false;
    let mut stop_by = None;
    loop {
        let idle_until = started + Duration::from_millis(last.load(Relaxed)) + bounds.idle_timeout;
        let until = stop_by.map_or(idle_until, |s: Instant| s.min(idle_until));
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep_until(until.into()) => {
                let moved = started + Duration::from_millis(last.load(Relaxed)) + bounds.idle_timeout;
                if moved <= Instant::now() || stop_by.is_some_and(|s| s <= Instant::now()) {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
                stop_by = Some(Instant::now() + SHUTDOWN_LIMIT);
            }
        }
    }
}

/// The socket, noting when it last moved a byte (milliseconds since the connection began).
struct Watched {
    inner: TcpStream,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
