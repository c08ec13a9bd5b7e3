//! Accepting connections: one task per listener, a connection limit per listener, and a pause
//! instead of a busy loop when the process runs out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_engine::{Broker, Connection};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::driver;

/// How long to stop accepting after EMFILE/ENFILE/ENOMEM: long enough for connections to close
/// and free descriptors, short enough that clients barely notice.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) struct Listener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
}

impl Listener {
    pub async fn bind(config: &ListenerConfig) -> io::Result<Listener> {
        let socket = if config.bind.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Restarting over connections in TIME_WAIT must not fail with "address in use".
        socket.set_reuseaddr(true)?;
        socket.bind(config.bind)?;
        let socket = socket.listen(config.backlog)?;
        Ok(Listener {
            config: config.clone(),
            socket,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accepts until `shutdown`; each connection runs on `tracker` so the server can wait for
    /// all of them to finish.
    pub async fn run(self, broker: Arc<Broker>, shutdown: CancellationToken, tracker: TaskTracker) {
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let connect_timeout = self.config.connect_timeout;
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let accepted = tokio::select! {
                r = self.socket.accept() => r,
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) if is_resource_exhaustion(&e) => {
                    tracing::warn!(error = %e, "accept failed for lack of resources; pausing accepts");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                Err(e) => {
                    // A connection reset between SYN and accept and the like: that client's
                    // problem, not the listener's.
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            // The accept instant starts the connect deadline; nothing later may reset it.
            let accepted_at = Instant::now();
            // MQTT packets are small and latency-sensitive; writes are already batched per pass.
            let _ = stream.set_nodelay(true);
            let conn = Connection::new(
                broker.clone(),
                peer.to_string(),
                accepted_at,
                connect_timeout,
            );
            // The driver future is spawned as is (no wrapping async block), so the task holds
            // one copy of the connection's state: its size is most of an idle connection's
            // memory. The permit rides along and frees the slot when the driver ends.
            tracker.spawn(driver::drive(stream, conn, shutdown.clone(), permit));
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}
