//! Attacks on the transports (issue 20, items 2, 7, 10, 11): what a client can make the broker
//! buffer before and around MQTT, and what the admin listener can take from the MQTT ones.
//!
//! - A WebSocket client that sends pings as fast as it can and never reads: one pong per ping
//!   was queued without bound (17 MiB -> 2.3 GiB in 10 s).
//! - WebSocket clients that send fragments of a message that never ends.
//! - Incomplete CONNECTs of ~1 MiB each, held until the connect deadline (300 held 318 MiB).
//! - Idle connections to the admin listener, which exhausted the process's descriptors.
//! - `--check-config` passing an admin port in use and a unix socket in a missing directory.
//!
//! WebSocket frames are written by hand (masked, as a client must [RFC 6455 5.3]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Broker};

/// What every flood here must stay under: the broker's peak resident memory growth.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Samples the broker's resident memory every 10 ms until dropped; `peak` is the highest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_of(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Opens a WebSocket to `addr` (path /mqtt, subprotocol mqtt) and reads the 101 answer.
async fn ws_open(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to petrel");
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("upgrade");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("the upgrade answer in time")
            .expect("read the upgrade answer");
        assert_eq!(n, 1, "petrel closed during the upgrade");
        answer.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 101"), "no upgrade: {text}");
    stream
}

/// One masked client frame: `first` is FIN and opcode (0x89 a ping, 0x02 a binary start
/// without FIN, 0x00 a continuation, 0x82 a whole binary message).
fn ws_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Writes `bytes` over and over for `run`, never reading; a write that blocks (the broker
/// stopped reading) is retried until the time is up. Returns the bytes written.
async fn flood(stream: &mut TcpStream, bytes: &[u8], run: Duration) -> u64 {
    let until = tokio::time::Instant::now() + run;
    let mut sent = 0u64;
    loop {
        match tokio::time::timeout_at(until, stream.write_all(bytes)).await {
            Ok(Ok(())) => sent += bytes.len() as u64,
            Ok(Err(_)) | Err(_) => return sent,
        }
    }
}

/// A WebSocket client sends pings (125-byte payloads, the most a control frame carries) as
/// fast as it can for 5 s and reads nothing. Each ping owes a pong; the broker must stop
/// reading once those cannot be written, not queue them. Bound: peak RSS growth < 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ping_flood_does_not_grow_memory() {
    let _machine = support::heavy().await;
    let broker = Broker::start("protocol = \"ws\"");
    let mut ws = ws_open(broker.addr).await;
    let before = broker.rss_kib();
    let watch = RssWatch::start(broker.pid());
    let ping = ws_frame(0x89, &[0x55; 125]);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 512)
        .collect();
    let sent = flood(&mut ws, &burst, Duration::from_secs(5)).await;
    let peak = watch.peak().max(broker.rss_kib());
    drop(watch);
    let growth = peak.saturating_sub(before);
    println!(
        "ping flood: {} MiB of pings sent, RSS {before} KiB -> peak {peak} KiB (+{growth} KiB)",
        sent >> 20
    );
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "a ping flood grew the broker by {growth} KiB"
    );
    // The broker still serves others.
    ws_open(broker.addr).await;
}

/// Starts `clients` connections that each send `prefix` and then `body` (shared), and never
/// finish; returns how many the broker closed within `wait` after they sent all they could.
async fn half_sent(
    addr: SocketAddr,
    clients: usize,
    prefix: impl Fn(usize) -> Vec<u8>,
    body: Arc<Vec<u8>>,
    wait: Duration,
) -> (usize, Vec<TcpStream>) {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let first = prefix(i);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect to petrel");
            // The broker may close as soon as it has the header: later writes then fail.
            let _ = stream.write_all(&first).await;
            let _ = tokio::time::timeout(wait, stream.write_all(&body)).await;
            let mut byte = [0u8; 64];
            let closed = loop {
                match tokio::time::timeout(wait, stream.read(&mut byte)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(_)) => continue,
                    Err(_) => break false,
                }
            };
            (closed, stream)
        }));
    }
    let mut closed = 0;
    let mut open = Vec::new();
    for task in tasks {
        let (was_closed, stream) = task.await.expect("client task");
        closed += usize::from(was_closed);
        open.push(stream);
    }
    (closed, open)
}

/// A 3.1.1 CONNECT's start that announces `size` bytes in all (a will payload would make it
/// that long); only this prefix is sent by itself.
fn big_connect_v311_prefix(size: usize) -> Vec<u8> {
    let mut out = vec![0x10];
    let mut len = size - 5;
    for _ in 0..4 {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
    }
    // protocol name, level 4, flags: clean session + will, keepalive 60
    out.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x06, 0x00, 0x3c]);
    out
}

/// 300 clients each send ~1 MiB of a CONNECT (a huge will) and never the last bytes. Before
/// the fix each was buffered until the connect deadline (318 MiB). Now a CONNECT larger than
/// `max_connect_size` (64 KiB) is refused from its fixed header. Bound: peak RSS growth
/// < 64 MiB, every connection closed long before the 10 s connect deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_connect_flood_is_refused_from_the_header() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(2048).expect("descriptors for 300 clients");
    let broker = Broker::start("");
    let before = broker.rss_kib();
    let watch = RssWatch::start(broker.pid());
    let size = 1024 * 1024;
    let body = Arc::new(vec![0x61; size - 20]);
    let started = Instant::now();
    let (closed, _streams) = half_sent(
        broker.addr,
        300,
        |_| big_connect_v311_prefix(size),
        body,
        Duration::from_secs(3),
    )
    .await;
    let peak = watch.peak().max(broker.rss_kib());
    drop(watch);
    let growth = peak.saturating_sub(before);
    println!(
        "pre-CONNECT flood: {closed}/300 closed in {:?}; RSS {before} KiB -> peak {peak} KiB (+{growth} KiB)",
        started.elapsed()
    );
    assert!(growth < RSS_GROWTH_LIMIT_KIB, "grew by {growth} KiB");
    assert_eq!(closed, 300, "every oversized CONNECT is refused at once");
    support::RawClient::connected(broker.addr, "after-flood", 0).await;
}

/// The same flood with the per-connection limit raised to 1 MiB: now only the broker-wide
/// budget for partial input (`max_partial_input_total`, 32 MiB) stands between the clients
/// and the broker's memory, and it closes unauthenticated connections past it. Bound: peak
/// RSS growth < 64 MiB; a client that completes its CONNECT still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_connect_flood_is_held_to_the_partial_input_budget() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(2048).expect("descriptors for 300 clients");
    let broker = Broker::start_with(
        "",
        "[storage]\nmode = \"memory\"\n[mqtt]\nmax_connect_size = 2097152\n",
    );
    let before = broker.rss_kib();
    let watch = RssWatch::start(broker.pid());
    let size = 1024 * 1024;
    let body = Arc::new(vec![0x61; size - 20]);
    let (closed, streams) = half_sent(
        broker.addr,
        300,
        |_| big_connect_v311_prefix(size),
        body,
        Duration::from_secs(3),
    )
    .await;
    support::RawClient::connected(broker.addr, "during-flood", 0).await;
    let peak = watch.peak().max(broker.rss_kib());
    drop(watch);
    drop(streams);
    let growth = peak.saturating_sub(before);
    println!(
        "pre-CONNECT flood past the budget: {closed}/300 closed; RSS {before} KiB -> peak {peak} KiB (+{growth} KiB)"
    );
    assert!(growth < RSS_GROWTH_LIMIT_KIB, "grew by {growth} KiB");
    assert!(closed >= 250, "only {closed} of 300 were shed");
}

/// A v5 CONNECT larger than `max_connect_size` gets CONNACK 0x95 (Packet too large) as soon
/// as its header and protocol level are in; a 3.1.1 one is closed (no such return code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_connect_is_refused_in_the_clients_version() {
    let _machine = support::light().await;
    let broker = Broker::start("");
    // v5: remaining length 100,000 (a0 8d 06), then "MQTT" level 5, clean start.
    let mut client = support::RawClient::connect(broker.addr).await;
    client
        .send(&[
            0x10, 0xa0, 0x8d, 0x06, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02,
        ])
        .await;
    let close = client
        .until_closed(Duration::from_secs(3))
        .await
        .expect("closed at once");
    assert_eq!(
        close.packets,
        vec![vec![0x20, 0x03, 0x00, 0x95, 0x00]],
        "CONNACK 0x95"
    );
    let mut client = support::RawClient::connect(broker.addr).await;
    client.send(&big_connect_v311_prefix(100_000)).await;
    let close = client
        .until_closed(Duration::from_secs(3))
        .await
        .expect("closed at once");
    assert!(close.packets.is_empty(), "3.1.1 has no code for it");
    // One just under the limit is read whole (and then fails on its content, not its size).
    support::RawClient::connected(broker.addr, "small", 0).await;
}

/// 100 WebSocket clients each start a binary message, send 16 KiB fragments of it up to just
/// under the message limit (1 MiB + 64 KiB) and never end it, without a CONNECT. tungstenite
/// assembles a message before anything reads it, so each made the broker hold ~1 MiB until
/// the connect deadline. Before CONNECT the WebSocket layer now holds input to
/// `max_connect_size` (+64 KiB) and the partial-input budget. Bound: peak RSS growth
/// < 64 MiB, every client closed within 3 s (the connect deadline is 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_fragment_flood_before_connect_is_bounded() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(2048).expect("descriptors for 64 clients");
    let broker = Broker::start("protocol = \"ws\"");
    let before = broker.rss_kib();
    let watch = RssWatch::start(broker.pid());
    let fragment = ws_frame(0x00, &[0x42; 16 * 1024]);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let addr = broker.addr;
        let fragment = fragment.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = ws_open(addr).await;
            let _ = ws.write_all(&ws_frame(0x02, &[0x42; 1024])).await;
            for _ in 0..59 {
                if ws.write_all(&fragment).await.is_err() {
                    break;
                }
            }
            let mut byte = [0u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(3), ws.read(&mut byte)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(_)) => continue,
                    Err(_) => break false,
                }
            }
        }));
    }
    let mut closed = 0;
    for task in tasks {
        closed += usize::from(task.await.expect("client task"));
    }
    let peak = watch.peak().max(broker.rss_kib());
    drop(watch);
    let growth = peak.saturating_sub(before);
    println!("WebSocket fragment flood: {closed}/100 closed; RSS {before} KiB -> peak {peak} KiB (+{growth} KiB)");
    assert!(growth < RSS_GROWTH_LIMIT_KIB, "grew by {growth} KiB");
    assert_eq!(closed, 100, "every endless message is refused");
    ws_open(broker.addr).await;
}

/// The broker's open file limit in the descriptor tests: small, so that hundreds of sockets
/// exhaust it (the attack used ~20,000 against the default limit).
const LOW_NOFILE: u64 = 400;

/// Opens up to `n` TCP connections to `addr` and keeps them (idle); a connect that the kernel
/// does not complete within 100 ms (a full backlog) is given up, and after ten in a row so is
/// the rest.
async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    let mut failed_in_a_row = 0;
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                open.push(stream);
                failed_in_a_row = 0;
            }
            _ => {
                failed_in_a_row += 1;
                if failed_in_a_row == 10 {
                    break;
                }
            }
        }
    }
    open
}

/// 1,000 idle connections to the admin listener of a broker limited to 400 descriptors. Before,
/// it accepted them all until the process ran out of descriptors, and MQTT CONNECTs failed.
/// Now it serves at most `admin.max_connections` (64) at once (the rest wait in the kernel's
/// backlog) and those are counted out of the descriptors before MQTT gets any. Bound: the
/// broker stays under its limit and an MQTT client still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_cannot_take_the_mqtt_listeners_descriptors() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(4096).expect("descriptors for the attack");
    let admin = support::free_port();
    let broker = Broker::start_with_open_files(
        "",
        &format!("[storage]\nmode = \"memory\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n"),
        LOW_NOFILE,
    );
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let flood = idle_connections(admin_addr, 1000).await;
    // Let the broker accept what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = broker.open_fds();
    println!(
        "{} idle admin connections opened; the broker holds {fds} descriptors (limit {LOW_NOFILE})",
        flood.len()
    );
    assert!(
        fds < LOW_NOFILE as usize - 32,
        "the admin listener took the process to {fds} descriptors"
    );
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(support::RawClient::connected(broker.addr, &format!("c{i}"), 0).await);
    }
    drop(flood);
}

/// A broker limited to 400 descriptors with two MQTT listeners: 400 idle connections to the
/// first take all it may have (its reserve and the shared slots), and the second still
/// accepts a client (its `reserved_connections`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_cannot_take_another_listeners_descriptors() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(4096).expect("descriptors for the attack");
    let second = support::free_port();
    let broker = Broker::start_with_open_files(
        "",
        &format!(
            "[storage]\nmode = \"memory\"\n[admin]\nenabled = false\n\
             [[listeners]]\nbind = \"127.0.0.1:{second}\"\n"
        ),
        LOW_NOFILE,
    );
    let flood = idle_connections(broker.addr, 400).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = broker.open_fds();
    println!(
        "{} idle connections to the first listener; the broker holds {fds} descriptors",
        flood.len()
    );
    assert!(fds < LOW_NOFILE as usize - 32, "{fds} descriptors held");
    let second: SocketAddr = ([127, 0, 0, 1], second).into();
    for i in 0..10 {
        support::RawClient::connected(second, &format!("s{i}"), 0).await;
    }
    drop(flood);
}

/// An admin connection that sends half a request, and one left idle after a response, are
/// closed after `admin.header_timeout`; neither holds a slot longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_header_and_idle_timeouts() {
    let _machine = support::light().await;
    let admin = support::free_port();
    let broker = Broker::start_with(
        "",
        &format!(
            "[storage]\nmode = \"memory\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\
             header_timeout = \"1s\"\nidle_timeout = \"3s\"\n"
        ),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let mut half = TcpStream::connect(addr).await.expect("connect to admin");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.expect("connect to admin");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for (what, stream) in [
        ("half a request", &mut half),
        ("idle after a response", &mut idle),
    ] {
        let mut buf = [0u8; 4096];
        let closed_at = loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("{what}: still open after 5 s"),
            }
        };
        println!("{what}: closed after {closed_at:?}");
        assert!(
            closed_at < Duration::from_millis(2500),
            "{what}: {closed_at:?}"
        );
    }
    drop(broker);
}

/// Runs `petrel --check-config` on `text`; its exit status and stderr.
fn check_config(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "petrel-check-{}-{}",
        std::process::id(),
        support::free_port()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join("petrel.toml");
    std::fs::write(&path, text).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run petrel --check-config");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--check-config` refuses what a start would fail on: an `[admin] bind` address someone
/// else holds, and a unix socket whose directory does not exist. Each error names its key.
#[test]
fn check_config_finds_unusable_listener_addresses() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let addr = taken.local_addr().unwrap();
    let (ok, stderr) = check_config(&format!(
        "[storage]\nmode = \"memory\"\n[admin]\nbind = \"{addr}\"\n"
    ));
    assert!(!ok, "an admin port in use passed: {stderr}");
    assert!(stderr.contains("admin.bind"), "the key is named: {stderr}");

    let (ok, stderr) = check_config(
        "[storage]\nmode = \"memory\"\n[admin]\nenabled = false\n[[listeners]]\n\
         protocol = \"unix\"\nsocket = \"/nonexistent-petrel-dir/mqtt.sock\"\n",
    );
    assert!(!ok, "a socket in a missing directory passed: {stderr}");
    assert!(
        stderr.contains("listeners[0].socket"),
        "the key is named: {stderr}"
    );

    // And what a start can use still passes.
    let (ok, stderr) = check_config(&format!(
        "[storage]\nmode = \"memory\"\n[admin]\nbind = \"127.0.0.1:{}\"\n[[listeners]]\n\
         protocol = \"unix\"\nsocket = \"{}/petrel-check-{}.sock\"\n",
        support::free_port(),
        std::env::temp_dir().display(),
        std::process::id()
    ));
    assert!(ok, "a usable configuration failed: {stderr}");
}

/// 100 clients of a PROXY-protocol listener each send a v2 header announcing 64 KiB of TLVs and
/// 60 KiB of them, and stop. The header being read counts against the partial-input budget
/// (1 MiB here): past it, further clients are closed rather than each held to the connect
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_count_against_the_partial_input_budget() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(2048).expect("descriptors for 100 clients");
    let broker = Broker::start_with(
        "proxy_protocol = \"required\"",
        "[storage]\nmode = \"memory\"\n[mqtt]\nmax_partial_input_total = 1048576\n",
    );
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let (closed, _streams) = half_sent(
        broker.addr,
        100,
        |_| header.clone(),
        Arc::new(vec![0u8; 60 * 1024]),
        Duration::from_secs(2),
    )
    .await;
    println!("PROXY headers past the budget: {closed}/100 closed");
    assert!(closed >= 80, "only {closed} of 100 were shed");
}

/// 100 anonymous clients connect with keep alive 0 (no deadline at all) and each send all but
/// the last bytes of a 1 MiB PUBLISH. Before, each was held for ever (100 MiB). Such
/// connections may take the partial-input budget (16 MiB here) to twice itself; past that
/// they are closed too. A client with a keep alive still publishes 1 MiB meanwhile. Bound:
/// peak RSS growth < 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_clients_cannot_pin_incomplete_packets() {
    let _machine = support::heavy().await;
    support::raise_open_files_limit(2048).expect("descriptors for 100 clients");
    let broker = Broker::start_with(
        "",
        "[storage]\nmode = \"memory\"\n[mqtt]\nmax_partial_input_total = 16777216\n",
    );
    let before = broker.rss_kib();
    let watch = RssWatch::start(broker.pid());
    let publish = support::publish("big", 0, 0, &vec![0x61; 1024 * 1024 - 16]);
    let body = Arc::new(publish[..publish.len() - 10].to_vec());
    let connect = support::connect_v311("x", 0);
    let (closed, streams) = half_sent(
        broker.addr,
        100,
        |i| {
            let mut c = connect.clone();
            // Client id "x" becomes k00..k99: two bytes longer.
            let id = format!("k{i:02}");
            c.truncate(c.len() - 3);
            c[1] += 2;
            c.extend_from_slice(&(id.len() as u16).to_be_bytes());
            c.extend_from_slice(id.as_bytes());
            c
        },
        body,
        Duration::from_secs(3),
    )
    .await;
    // A client with a keep alive is not refused room while the others hold the budget: its
    // deadline bounds how long it can hold an incomplete packet.
    let mut steady = support::RawClient::connected(broker.addr, "steady", 60).await;
    steady.send(&publish).await;
    steady.send(&support::PINGREQ).await;
    steady
        .expect(&support::PINGRESP, Duration::from_secs(5))
        .await;
    let peak = watch.peak().max(broker.rss_kib());
    drop(watch);
    drop(streams);
    let growth = peak.saturating_sub(before);
    println!(
        "keep alive 0, incomplete 1 MiB PUBLISHes: {closed}/100 closed; RSS {before} KiB -> peak {peak} KiB (+{growth} KiB)"
    );
    assert!(growth < RSS_GROWTH_LIMIT_KIB, "grew by {growth} KiB");
    assert!(closed >= 60, "only {closed} of 100 were closed");
}

/// An admin client pipelines requests for the 38 KB OpenAPI document and never reads the
/// answers: once the socket buffers are full nothing moves, and after `admin.idle_timeout`
/// the connection is closed (its header timeout, an hour here, would never fire: hyper is
/// busy writing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_idle_timeout_closes_a_client_that_does_not_read() {
    let _machine = support::light().await;
    let admin = support::free_port();
    let broker = Broker::start_with(
        "",
        &format!(
            "[storage]\nmode = \"memory\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\
             header_timeout = \"1h\"\nidle_timeout = \"1s\"\n"
        ),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let stream = TcpStream::connect(addr).await.expect("connect to admin");
    let (mut reader, mut writer) = stream.into_split();
    let request = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    // The writes stop being taken once the broker stops reading (it is stuck writing).
    let _ = tokio::time::timeout(Duration::from_secs(3), writer.write_all(&request)).await;
    let stalled = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now drain what was sent before the close: the stream must end.
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    println!(
        "admin client that does not read: ended {:?} after it stalled",
        stalled.elapsed()
    );
    assert!(ended.is_ok(), "still open 13 s after it stopped reading");
    drop(broker);
}
