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
