//! Accepting connections: one task per listener, a connection limit per listener, a
//! per-address connection rate limit, and a pause instead of a busy loop when the process runs
//! out of file descriptors.
//!
//! Every transport ends in the same connection driver. Before it, in this order and all
//! within the listener's connect deadline (counted from accept): the PROXY header, the TLS
//! handshake, the WebSocket upgrade. The optional `handshake_timeout` bounds those steps
//! alone; `connect_timeout` still bounds everything up to a complete CONNECT, since the
//! `Connection` is created with the accept instant.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_engine::stats::Stats;
use petrel_engine::{Broker, Connection};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, ListenerProtocol, ProxyProtocol};
use crate::input::{InputBudget, InputShare};
use crate::tls::{certificate_identity, TlsConfig, TlsFileError};
use crate::{driver, proxy, ws};

/// How long to stop accepting after EMFILE/ENFILE/ENOMEM: long enough for connections to close
/// and free descriptors, short enough that clients barely notice.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A WebSocket message may hold several MQTT packets; this much above the packet limit.
const WS_MESSAGE_SLACK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(TlsFileError),
    #[error("socket_mode {0:?} is not an octal mode such as \"0660\"")]
    Mode(String),
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

pub(crate) struct Listener {
    pub config: ListenerConfig,
    socket: Socket,
    pub tls: Option<Arc<TlsConfig>>,
    pub stats: Arc<ListenerStats>,
}

/// One listener's figures, for metrics.
pub struct ListenerStats {
    /// `protocol:address`, e.g. `tcp:127.0.0.1:1883`.
    pub name: String,
    /// The listener's connection slots: open connections are the ones taken.
    slots: Arc<Semaphore>,
    max: usize,
    /// Connections accepted (before any PROXY header, TLS or WebSocket step).
    pub accepted: std::sync::atomic::AtomicU64,
    /// 1 while the accept loop holds a slot for the connection it waits for.
    waiting: std::sync::atomic::AtomicUsize,
}

impl ListenerStats {
    /// Connections open now (accepted and not yet closed, whether or not CONNECT completed):
    /// the slots taken, less the one the accept loop holds while it waits.
    pub fn open(&self) -> usize {
        self.max
            .saturating_sub(self.slots.available_permits())
            .saturating_sub(self.waiting.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn set_waiting(&self, waiting: bool) {
        self.waiting
            .store(usize::from(waiting), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Parses a chmod-style octal mode.
pub fn parse_mode(text: &str) -> Option<u32> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8).ok()?;
    (mode <= 0o7777).then_some(mode)
}

impl Listener {
    pub async fn bind(config: &ListenerConfig) -> Result<Listener, BindError> {
        let tls = TlsConfig::load(config).map_err(BindError::Tls)?;
        let socket = match config.protocol {
            ListenerProtocol::Unix => {
                let path = config.socket.clone().unwrap_or_default();
                // A socket file left by an earlier run would make bind fail; only a socket is
                // removed, never another kind of file.
                if let Ok(meta) = std::fs::symlink_metadata(&path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                let listener = UnixListener::bind(&path)?;
                if let Some(text) = &config.socket_mode {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = parse_mode(text).ok_or_else(|| BindError::Mode(text.clone()))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                }
                Socket::Unix(listener, path)
            }
            _ => {
                let socket = if config.bind.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                // Restarting over connections in TIME_WAIT must not fail with "address in use".
                socket.set_reuseaddr(true)?;
                socket.bind(config.bind)?;
                Socket::Tcp(socket.listen(config.backlog)?)
            }
        };
        let mut listener = Listener {
            config: config.clone(),
            socket,
            tls,
            stats: Arc::new(ListenerStats {
                name: String::new(),
                slots: Arc::new(Semaphore::new(config.max_connections)),
                max: config.max_connections,
                accepted: Default::default(),
                waiting: Default::default(),
            }),
        };
        let name = format!("{}:{}", config.protocol, listener.describe());
        if let Some(stats) = Arc::get_mut(&mut listener.stats) {
            stats.name = name;
        }
        Ok(listener)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr(),
            Socket::Unix(..) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a unix listener has no IP address",
            )),
        }
    }

    /// What to log as this listener's address.
    pub fn describe(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.config.bind.to_string(), |a| a.to_string()),
            Socket::Unix(_, path) => path.display().to_string(),
        }
    }

    /// Accepts until `shutdown`; each connection runs on `tracker` so the server can wait for
    /// all of them to finish.
    pub async fn run(
        self,
        broker: Arc<Broker>,
        (reserved, total): (Arc<Semaphore>, Arc<Semaphore>),
        input: Arc<InputBudget>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let slots = self.stats.slots.clone();
        let ctx = Arc::new(Ctx {
            limiter: std::sync::Mutex::new(RateLimiter::new(
                self.config.max_connection_rate_per_ip,
            )),
            per_address: Arc::new(PerAddress {
                limit: self.config.max_connections_per_ip,
                open: std::sync::Mutex::new(HashMap::new()),
            }),
            config: self.config,
            tls: self.tls,
            broker,
            input,
            shutdown: shutdown.clone(),
        });
        loop {
            // A slot on this listener before accepting; the server-wide slot after, so that
            // an idle listener does not hold one that another listener could use. Both are
            // held by the connection's task until it ends.
            let own = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            self.stats.set_waiting(true);
            match &self.socket {
                Socket::Tcp(listener) => {
                    let accepted = tokio::select! {
                        r = listener.accept() => r,
                        _ = shutdown.cancelled() => break,
                    };
                    let (stream, peer) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            accept_failed(e).await;
                            continue;
                        }
                    };
                    Stats::add(&self.stats.accepted, 1);
                    self.stats.set_waiting(false);
                    let Some(mut permit) = server_slot(own, (&reserved, &total), &shutdown).await
                    else {
                        break;
                    };
                    // The accept instant starts the connect deadline; nothing later resets it.
                    let accepted_at = Instant::now();
                    // Behind a PROXY header or a trusted X-Forwarded-For the client's own
                    // address is known only later: the limit is applied there.
                    if !ctx.limit_after_handshake()
                        && !ctx.admit(peer.ip(), accepted_at, &mut permit)
                    {
                        continue;
                    }
                    // MQTT packets are small and latency-sensitive; writes are batched per pass.
                    let _ = stream.set_nodelay(true);
                    if ctx.config.protocol == ListenerProtocol::Tcp
                        && ctx.config.proxy_protocol == ProxyProtocol::Off
                    {
                        // Plain TCP: the driver future is spawned as is (no wrapping async
                        // block), so the task holds one copy of the connection's state: its
                        // size is most of an idle connection's memory. The permit rides along
                        // and frees the slot when the driver ends.
                        let conn = ctx.connection(peer.to_string(), accepted_at);
                        let input = ctx.input_share();
                        tracker.spawn(driver::drive(stream, conn, shutdown.clone(), permit, input));
                    } else {
                        tracker.spawn(establish(ctx.clone(), stream, peer, accepted_at, permit));
                    }
                }
                Socket::Unix(listener, path) => {
                    let accepted = tokio::select! {
                        r = listener.accept() => r,
                        _ = shutdown.cancelled() => break,
                    };
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            accept_failed(e).await;
                            continue;
                        }
                    };
                    Stats::add(&self.stats.accepted, 1);
                    self.stats.set_waiting(false);
                    let Some(permit) = server_slot(own, (&reserved, &total), &shutdown).await
                    else {
                        break;
                    };
                    let conn = ctx.connection(format!("unix:{}", path.display()), Instant::now());
                    let mut input = ctx.input_share();
                    if ctx.config.proxy_protocol == ProxyProtocol::Off {
                        tracker.spawn(driver::drive(stream, conn, shutdown.clone(), permit, input));
                    } else {
                        let ctx = ctx.clone();
                        tracker.spawn(async move {
                            let deadline = ctx.handshake_deadline(Instant::now());
                            let mode = ctx.config.proxy_protocol;
                            let budget = ctx.broker.limits().max_partial_input_total;
                            let read = proxy::read_header(stream, mode, &mut input, budget);
                            let Some((_, stream)) = ctx.step("PROXY header", deadline, read).await
                            else {
                                return;
                            };
                            driver::drive(stream, conn, ctx.shutdown.clone(), permit, input).await
                        });
                    }
                }
            }
        }
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a connection holds while it lives: its slots on the listener and the server, and
/// (with `max_connections_per_ip`) one of its address's.
struct Permit {
    _listener: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
    /// Boxed: only with the limit set, and every connection's task carries the field.
    address: Option<Box<AddressSlot>>,
}

/// Connections open per client address, for `max_connections_per_ip`.
struct PerAddress {
    limit: u32,
    open: std::sync::Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in its address's count; given back when dropped.
struct AddressSlot {
    counts: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Waits for a server-wide slot for a connection just accepted (this listener accepts
/// nothing more meanwhile, so further clients wait in the backlog): one of those reserved for
/// this listener if one is free, else a shared one (`descriptors.rs`).
async fn server_slot(
    own: OwnedSemaphorePermit,
    (reserved, total): (&Arc<Semaphore>, &Arc<Semaphore>),
    shutdown: &CancellationToken,
) -> Option<Permit> {
    tokio::select! {
        biased;
        p = reserved.clone().acquire_owned() => p.ok().map(|all| Permit {
            _listener: own,
            _server: all,
            address: None,
        }),
        p = total.clone().acquire_owned() => p.ok().map(|all| Permit {
            _listener: own,
            _server: all,
            address: None,
        }),
        _ = shutdown.cancelled() => None,
    }
}

async fn accept_failed(e: io::Error) {
    if is_resource_exhaustion(&e) {
        tracing::warn!(error = %e, "accept failed for lack of resources; pausing accepts");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    } else {
        // A connection reset between SYN and accept and the like: that client's problem, not
        // the listener's.
        tracing::debug!(error = %e, "accept failed");
    }
}

/// What every connection of one listener shares.
struct Ctx {
    limiter: std::sync::Mutex<RateLimiter>,
    per_address: Arc<PerAddress>,
    config: ListenerConfig,
    tls: Option<Arc<TlsConfig>>,
    broker: Arc<Broker>,
    /// The partial-input budget all listeners share.
    input: Arc<InputBudget>,
    shutdown: CancellationToken,
}

impl Ctx {
    fn input_share(&self) -> InputShare {
        InputShare::new(self.input.clone())
    }

    fn limit_after_handshake(&self) -> bool {
        self.config.proxy_protocol != ProxyProtocol::Off || self.config.trust_x_forwarded_for
    }

    /// The per-address limits: the connection rate, and the connections open at once (the
    /// connection's place is added to `permit`).
    fn admit(&self, ip: IpAddr, now: Instant, permit: &mut Permit) -> bool {
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(ip, now);
        if !allowed {
            Stats::add(&self.broker.stats.rate_limited, 1);
            tracing::debug!(%ip, "connection refused: per-address connection rate limit");
            return false;
        }
        let limit = self.per_address.limit;
        if limit > 0 {
            let mut open = self
                .per_address
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = open.entry(ip).or_insert(0);
            if *n >= limit {
                drop(open);
                Stats::add(&self.broker.stats.refused_connections_per_ip, 1);
                tracing::debug!(%ip, "connection refused: max_connections_per_ip");
                return false;
            }
            *n += 1;
            permit.address = Some(Box::new(AddressSlot {
                counts: self.per_address.clone(),
                ip,
            }));
        }
        true
    }

    fn connection(&self, peer: String, accepted_at: Instant) -> Connection {
        Connection::new(
            self.broker.clone(),
            peer,
            accepted_at,
            self.config.connect_timeout,
        )
    }

    /// When the transport must be ready: the handshake timeout if set, never past the
    /// connect deadline.
    fn handshake_deadline(&self, accepted_at: Instant) -> Instant {
        let limit = match self.config.handshake_timeout {
            Some(h) => h.min(self.config.connect_timeout),
            None => self.config.connect_timeout,
        };
        accepted_at + limit
    }

    /// Runs one transport step within `deadline` (and until shutdown); a failure is counted
    /// and logged, and ends the connection.
    async fn step<T>(
        &self,
        what: &'static str,
        deadline: Instant,
        fut: impl Future<Output = io::Result<T>>,
    ) -> Option<T> {
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), fut) => r,
            _ = self.shutdown.cancelled() => return None,
        };
        match outcome {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                Stats::add(&self.broker.stats.handshake_failures, 1);
                // A PROXY header refused past the partial-input budget.
                if e.kind() == io::ErrorKind::OutOfMemory {
                    Stats::add(&self.broker.stats.partial_input_shed, 1);
                }
                tracing::debug!(step = what, error = %e, "connection failed before MQTT");
                None
            }
            Err(_) => {
                Stats::add(&self.broker.stats.handshake_failures, 1);
                Stats::add(&self.broker.stats.connect_timeouts, 1);
                tracing::debug!(step = what, "connection timed out before MQTT");
                None
            }
        }
    }
}

/// PROXY header, TLS, WebSocket, then the driver: everything a TCP connection goes through
/// on a listener that is not plain TCP.
async fn establish(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted_at: Instant,
    mut permit: Permit,
) {
    let deadline = ctx.handshake_deadline(accepted_at);
    let config = &ctx.config;
    let (source, stream) = if config.proxy_protocol == ProxyProtocol::Off {
        (None, proxy::Prefixed::new(Vec::new(), stream))
    } else {
        let mut input = ctx.input_share();
        let budget = ctx.broker.limits().max_partial_input_total;
        let read = proxy::read_header(stream, config.proxy_protocol, &mut input, budget);
        let Some(done) = ctx.step("PROXY header", deadline, read).await else {
            return;
        };
        done
    };
    let peer = source.unwrap_or(peer);
    if config.proxy_protocol != ProxyProtocol::Off
        && !config.trust_x_forwarded_for
        && !ctx.admit(peer.ip(), accepted_at, &mut permit)
    {
        return;
    }
    match config.protocol {
        ListenerProtocol::Tcp | ListenerProtocol::Unix => {
            let conn = ctx.connection(peer.to_string(), accepted_at);
            let input = ctx.input_share();
            driver::drive(stream, conn, ctx.shutdown.clone(), permit, input).await;
        }
        ListenerProtocol::Ws => {
            websocket(&ctx, stream, peer, accepted_at, deadline, None, permit).await;
        }
        ListenerProtocol::Tls | ListenerProtocol::Wss => {
            let Some(tls) = ctx.tls.clone() else {
                return;
            };
            let accept = tls.acceptor().accept(stream);
            let Some(stream) = ctx.step("TLS handshake", deadline, accept).await else {
                return;
            };
            let (_, session) = stream.get_ref();
            let identity = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| certificate_identity(leaf, tls.identity));
            tracing::debug!(%peer, sni = session.server_name().unwrap_or(""), identity = identity.as_deref().unwrap_or(""), "TLS established");
            if config.protocol == ListenerProtocol::Wss {
                websocket(&ctx, stream, peer, accepted_at, deadline, identity, permit).await;
            } else {
                let mut conn = ctx.connection(peer.to_string(), accepted_at);
                conn.set_certificate_identity(identity);
                let input = ctx.input_share();
                driver::drive(stream, conn, ctx.shutdown.clone(), permit, input).await;
            }
        }
    }
}

async fn websocket<S>(
    ctx: &Ctx,
    stream: S,
    peer: SocketAddr,
    accepted_at: Instant,
    deadline: Instant,
    identity: Option<String>,
    mut permit: Permit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = ctx.broker.limits();
    let max = limits.max_packet_size as usize + WS_MESSAGE_SLACK;
    // The WebSocket layer assembles a message before the driver sees its bytes: before
    // CONNECT it holds that to the pre-authentication limit and the shared budget too.
    let mut input = ctx.input_share();
    let before_connect = ws::PreAuth {
        share: input.beneath(),
        max_connect: limits.max_connect_size as usize + WS_MESSAGE_SLACK,
        budget: limits.max_partial_input_total,
    };
    drop(limits);
    let upgrade = ws::accept(
        stream,
        &ctx.config.path,
        ctx.config.trust_x_forwarded_for,
        max,
        before_connect,
    );
    let Some((stream, upgrade)) = ctx.step("WebSocket upgrade", deadline, upgrade).await else {
        return;
    };
    let peer = match upgrade.forwarded_for {
        Some(ip) => SocketAddr::new(ip, 0),
        None => peer,
    };
    if ctx.config.trust_x_forwarded_for && !ctx.admit(peer.ip(), accepted_at, &mut permit) {
        return;
    }
    let mut conn = ctx.connection(peer.to_string(), accepted_at);
    conn.set_certificate_identity(identity);
    driver::drive(stream, conn, ctx.shutdown.clone(), permit, input).await;
}

/// For `--check-config`: what a start would find wrong with the addresses, without taking
/// them. An explicit admin address must be free (bound and released at once); a unix
/// socket's directory must exist and be writable, and nothing but a socket may be in its
/// place. Only the admin address is bound: the MQTT ports are usually held by the running
/// broker the checked file is meant to replace.
pub fn check_addresses(config: &crate::Config) -> Result<(), crate::ServerError> {
    let (admin, explicit) = crate::admin::effective(config.admin.as_ref());
    if explicit && admin.enabled && admin.bind.port() != 0 {
        // A running broker that this file is meant to replace holds it too: the error says
        // so, since a start would fail the same way while that broker runs.
        std::net::TcpListener::bind(admin.bind).map_err(|source| {
            crate::admin::AdminError::Bind {
                addr: admin.bind,
                source: std::io::Error::new(
                    source.kind(),
                    format!("{source} (by another process, or a petrel already running with it)"),
                ),
            }
        })?;
    }
    for (index, listener) in config.listeners.iter().enumerate() {
        if listener.protocol != ListenerProtocol::Unix {
            continue;
        }
        let Some(path) = &listener.socket else {
            continue;
        };
        unix_path_problem(path).map_or(Ok(()), |message| {
            Err(crate::ServerError::Listener {
                index,
                key: "socket",
                message: format!("{}: {message}", path.display()),
            })
        })?;
    }
    Ok(())
}

/// Why a unix listener could not bind `path`, if it could not.
fn unix_path_problem(path: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().as_bytes().len() > 107 {
        return Some("longer than the 107 bytes a unix socket path may have".to_owned());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    match std::fs::metadata(dir) {
        Err(e) => {
            return Some(format!(
                "its directory {} cannot be used: {e}",
                dir.display()
            ))
        }
        Ok(meta) if !meta.is_dir() => {
            return Some(format!("{} is not a directory", dir.display()));
        }
        Ok(_) => {}
    }
    let Ok(dir_c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return Some("holds a NUL byte".to_owned());
    };
    // SAFETY: access(2) reads the NUL-terminated path only.
    if unsafe { libc::access(dir_c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Some(format!(
            "its directory {} is not writable: {}",
            dir.display(),
            io::Error::last_os_error()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            Some("a file that is not a socket is in its place".to_owned())
        }
        _ => None,
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// New connections per second per source address: a token bucket per address holding up to
/// one second's worth. Addresses whose bucket is full again are forgotten, so the map stays
/// as small as the set of addresses connecting right now.
struct RateLimiter {
    per_second: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            buckets: HashMap::new(),
        }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let rate = f64::from(self.per_second);
        if self.buckets.len() >= 10_000 {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let mut l = RateLimiter::new(5);
        assert_eq!((0..10).filter(|_| l.allow(ip, t0)).count(), 5);
        assert!(l.allow(other, t0), "per address");
        assert!(!l.allow(ip, t0 + Duration::from_millis(100)));
        assert!(l.allow(ip, t0 + Duration::from_millis(250)));
        assert!(RateLimiter::new(0).allow(ip, t0));
    }

    #[test]
    fn octal_modes() {
        assert_eq!(parse_mode("0660"), Some(0o660));
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0o700"), Some(0o700));
        assert_eq!(parse_mode("0999"), None);
        assert_eq!(parse_mode("rw"), None);
    }
}
