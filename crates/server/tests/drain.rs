//! Graceful drain on SIGTERM, against the real `petrel` binary with the disk store.
//!
//! What a user of the broker counts on when it is stopped politely:
//!
//! - it stops taking new clients; every MQTT 5 client is sent DISCONNECT 0x8B (Server
//!   shutting down) and closed, every 3.1.1 client just closed; the process exits 0;
//! - what was queued for a connected client goes out before its DISCONNECT;
//! - nothing the broker acknowledged is lost across the drain and a restart, for offline and
//!   for online-but-slow persistent subscribers, and the retained message stays;
//! - a client closed by the shutdown without having sent DISCONNECT has its will published
//!   [MQTT-3.1.2-8]; one that sent DISCONNECT 0x00 has not;
//! - `shutdown_grace` (or `--shutdown-grace`) bounds the drain: a subscriber that never reads
//!   does not keep the process alive.
//!
//! Each test runs its own broker on a port-0 listener (the address is read from its log), with
//! its own store and no admin listener, so the tests run side by side.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A reply that should come at once.
const PROMPT: Duration = Duration::from_secs(5);
/// A subscriber has everything once nothing more came for this long.
const QUIET: Duration = Duration::from_secs(1);
/// How much later than its bound the process may exit: the final store flush and the
/// process teardown, on a loaded 2-core CI machine.
const EXIT_MARGIN: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// The broker process.

/// A `petrel` process, killed when dropped so that a failing test leaves nothing running.
struct Petrel {
    child: Child,
    addr: SocketAddr,
    /// Its configuration file and log. The store lives elsewhere: a restart reuses it.
    dir: PathBuf,
    /// When SIGTERM was sent.
    terminated: Option<Instant>,
}

impl Petrel {
    /// Starts petrel with the disk store in `data` and `shutdown_grace = grace`; `mqtt` holds
    /// further lines of its `[mqtt]` table, `args` further command-line arguments.
    fn start(data: &Path, grace: &str, mqtt: &str, args: &[&str]) -> Petrel {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "petrel-drain-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let config = dir.join("petrel.toml");
        let text = format!(
            "shutdown_grace = \"{grace}\"\nsys_interval = \"0s\"\n\n\
             [[listeners]]\nbind = \"127.0.0.1:0\"\n\n\
             [admin]\nenabled = false\n\n\
             [mqtt]\n{mqtt}\n\n\
             [storage]\ndir = \"{}\"\nfsync = \"always\"\n",
            data.display()
        );
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.join("petrel.log")).expect("create log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
        command
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        dies_with_test(&mut command);
        let child = command.spawn().expect("spawn petrel");
        let mut petrel = Petrel {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
            dir,
            terminated: None,
        };
        let started = Instant::now();
        loop {
            if let Some(addr) = listening_addr(&petrel.log()) {
                petrel.addr = addr;
                return petrel;
            }
            if let Ok(Some(status)) = petrel.child.try_wait() {
                panic!("petrel exited at start with {status}:\n{}", petrel.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "petrel not listening after 15 s:\n{}",
                petrel.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("petrel.log")).unwrap_or_default()
    }

    fn sigterm(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped (it is reaped only through `child`).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.terminated = Some(Instant::now());
    }

    /// Waits for the process to exit, at most `limit` after SIGTERM; its status and how long
    /// after SIGTERM it exited (to within the 10 ms poll).
    async fn exited(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let terminated = self.terminated.expect("SIGTERM sent");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let took = terminated.elapsed();
                println!("petrel exited {took:?} after SIGTERM with {status}");
                return (status, took);
            }
            assert!(
                terminated.elapsed() < limit,
                "petrel still running {limit:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Petrel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- last lines of the petrel log ---");
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address in the log line `... listening addr=127.0.0.1:PORT protocol=tcp`.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("listening"))?;
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A store directory, removed when the test ends (also on failure).
struct DataDir(PathBuf);

impl DataDir {
    fn new(label: &str) -> DataDir {
        let dir =
            std::env::temp_dir().join(format!("petrel-drain-data-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DataDir(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Packets, written out by hand (3.1.1 ones come from `support`).

/// Fixed header (type and flags, remaining length as a variable byte integer) plus body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A will: QoS 1, no properties (so Will Delay Interval 0).
struct Will<'a> {
    topic: &'a str,
    payload: &'a str,
}

/// A v5 CONNECT, keepalive 60, with Session Expiry Interval `expiry` (absent when 0) and
/// Receive Maximum `receive_maximum`.
fn connect_v5(
    client_id: &str,
    clean_start: bool,
    expiry: u32,
    receive_maximum: u16,
    will: Option<Will>,
) -> Vec<u8> {
    let mut flags = if clean_start { 0x02 } else { 0x00 };
    if will.is_some() {
        flags |= 0x04 | (1 << 3); // will, QoS 1
    }
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, flags, 0x00, 60];
    let mut props = vec![0x21];
    props.extend_from_slice(&receive_maximum.to_be_bytes());
    if expiry > 0 {
        props.push(0x11);
        props.extend_from_slice(&expiry.to_be_bytes());
    }
    body.push(props.len() as u8);
    body.extend_from_slice(&props);
    string(&mut body, client_id.as_bytes());
    if let Some(will) = will {
        body.push(0x00); // will properties: none
        string(&mut body, will.topic.as_bytes());
        string(&mut body, will.payload.as_bytes());
    }
    packet(0x10, &body)
}

/// A 3.1.1 CONNECT, keepalive 60, with Clean Session as given and an optional QoS 1 will.
fn connect_v311_with(client_id: &str, clean_session: bool, will: Option<Will>) -> Vec<u8> {
    let mut flags = if clean_session { 0x02 } else { 0x00 };
    if will.is_some() {
        flags |= 0x04 | (1 << 3);
    }
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 60];
    string(&mut body, client_id.as_bytes());
    if let Some(will) = will {
        string(&mut body, will.topic.as_bytes());
        string(&mut body, will.payload.as_bytes());
    }
    packet(0x10, &body)
}

/// A v5 SUBSCRIBE with one filter, no properties.
fn subscribe_v5(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0x00);
    string(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

/// A v5 SUBACK granting `qos` to one filter, no properties.
fn suback_v5(packet_id: u16, qos: u8) -> Vec<u8> {
    let id = packet_id.to_be_bytes();
    vec![0x90, 0x04, id[0], id[1], 0x00, qos]
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62), PUBCOMP (0x70): success, no properties.
fn ack(kind: u8, packet_id: u16) -> Vec<u8> {
    let id = packet_id.to_be_bytes();
    vec![kind, 0x02, id[0], id[1]]
}

/// DISCONNECT, Normal disconnection (0x00), from a v5 client.
const DISCONNECT_NORMAL_V5: [u8; 3] = [0xe0, 0x01, 0x00];
/// DISCONNECT from a 3.1.1 client.
const DISCONNECT_V311: [u8; 2] = [0xe0, 0x00];

/// Server DISCONNECT with reason code 0x8B, Server shutting down: `e0 xx 8b ...`.
fn is_shutdown_disconnect(packet: &[u8]) -> bool {
    packet.len() >= 3 && packet[0] == 0xe0 && packet[2] == 0x8b
}

/// Reads a variable byte integer at `*i`, moving past it.
fn varint(bytes: &[u8], i: &mut usize) -> usize {
    let mut value = 0usize;
    let mut shift = 0;
    loop {
        let byte = bytes[*i];
        *i += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// A PUBLISH as its receiver sees it.
#[derive(Debug)]
struct Delivery {
    topic: String,
    qos: u8,
    dup: bool,
    retain: bool,
    packet_id: u16,
    payload: Vec<u8>,
}

impl Delivery {
    fn parse(packet: &[u8], v5: bool) -> Delivery {
        assert_eq!(packet[0] & 0xf0, 0x30, "not a PUBLISH: {}", brief(packet));
        let qos = (packet[0] >> 1) & 0x03;
        let mut i = 1;
        varint(packet, &mut i);
        let topic_len = usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
        let topic = String::from_utf8_lossy(&packet[i + 2..i + 2 + topic_len]).into_owned();
        i += 2 + topic_len;
        let mut packet_id = 0;
        if qos > 0 {
            packet_id = u16::from_be_bytes([packet[i], packet[i + 1]]);
            i += 2;
        }
        if v5 {
            let props = varint(packet, &mut i);
            i += props;
        }
        Delivery {
            topic,
            qos,
            dup: packet[0] & 0x08 != 0,
            retain: packet[0] & 0x01 != 0,
            packet_id,
            payload: packet[i..].to_vec(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A packet for a failure message: its first bytes only (payloads can be large).
fn brief(packet: &[u8]) -> String {
    if packet.len() <= 12 {
        hex(packet)
    } else {
        format!("{} ... ({} bytes)", hex(&packet[..12]), packet.len())
    }
}

fn briefs(packets: &[Vec<u8>]) -> String {
    let lines: Vec<String> = packets.iter().map(|p| brief(p)).collect();
    format!("[{}]", lines.join("; "))
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Opens a connection, sends `connect` and returns the client with the CONNACK it got.
async fn open(addr: SocketAddr, connect: &[u8]) -> (RawClient, Vec<u8>) {
    let mut client = RawClient::connect(addr).await;
    client.send(connect).await;
    let connack = client.packet(PROMPT).await.expect("CONNACK");
    assert_eq!(
        connack[0],
        0x20,
        "CONNACK expected, got {}",
        brief(&connack)
    );
    (client, connack)
}

/// A v5 client, connected: its CONNACK says Success.
async fn open_v5(addr: SocketAddr, connect: &[u8]) -> RawClient {
    let (client, connack) = open(addr, connect).await;
    assert_eq!(connack[3], 0x00, "CONNACK Success, got {}", hex(&connack));
    client
}

/// A 3.1.1 client with Clean Session 0 or with a will, connected.
async fn open_v311(addr: SocketAddr, connect: &[u8]) -> RawClient {
    let (client, connack) = open(addr, connect).await;
    assert_eq!(connack, CONNACK_ACCEPTED, "CONNACK accepted");
    client
}

/// Reads deliveries until the broker is quiet for `QUIET`, acknowledging each (PUBACK; PUBREC
/// then PUBCOMP for QoS 2).
async fn receive_all(client: &mut RawClient, v5: bool) -> Vec<Delivery> {
    let mut got = Vec::new();
    while let Ok(packet) = client.packet(QUIET).await {
        match packet[0] & 0xf0 {
            0x30 => {
                let delivery = Delivery::parse(&packet, v5);
                match delivery.qos {
                    1 => client.send(&ack(0x40, delivery.packet_id)).await,
                    2 => client.send(&ack(0x50, delivery.packet_id)).await,
                    _ => {}
                }
                got.push(delivery);
            }
            0x60 => {
                let id = u16::from_be_bytes([packet[2], packet[3]]);
                client.send(&ack(0x70, id)).await;
            }
            _ => panic!("unexpected packet {}", brief(&packet)),
        }
    }
    got
}

/// A client arriving during the drain is not served: its TCP connect fails, or its CONNECT
/// gets no CONNACK, or CONNACK 0x88 (Server unavailable).
async fn assert_newcomer_refused(addr: SocketAddr) {
    let mut stream = match tokio::time::timeout(PROMPT, tokio::net::TcpStream::connect(addr)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            println!("newcomer: connect failed ({e})");
            return;
        }
        Err(_) => {
            println!("newcomer: connect timed out");
            return;
        }
    };
    if stream
        .write_all(&connect_v5("newcomer", true, 0, 10, None))
        .await
        .is_err()
    {
        println!("newcomer: CONNECT could not be sent");
        return;
    }
    // Whatever comes within 2 s, until the broker closes the socket.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut chunk = [0u8; 256];
    let ended = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break "closed",
            Ok(Err(_)) => break "reset",
            Err(_) => break "still open after 2 s",
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    };
    println!("newcomer: connected, got [{}], {ended}", hex(&got));
    assert!(
        got.is_empty() || (got.len() >= 4 && got[0] == 0x20 && got[3] == 0x88),
        "a client connecting during the drain got [{}]: neither nothing nor CONNACK 0x88",
        hex(&got)
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Clients are told and closed; newcomers are refused; the process exits 0.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_v5_clients_with_0x8b_closes_v311_ones_and_exits_0() {
    let data = DataDir::new("close");
    let mut petrel = Petrel::start(&data.0, "30s", "", &[]);
    let mut v5 = open_v5(petrel.addr, &connect_v5("five", true, 0, 10, None)).await;
    let mut v311 = RawClient::connected(petrel.addr, "three", 60).await;

    petrel.sigterm();
    // MQTT 5: DISCONNECT 0x8B, Server shutting down, then the socket closes.
    let five = v5.until_closed(PROMPT).await.unwrap_or_else(|packets| {
        panic!(
            "v5 client still open {PROMPT:?} after SIGTERM; got {}",
            briefs(&packets)
        )
    });
    assert_eq!(
        five.packets.len(),
        1,
        "v5 client: one DISCONNECT then close, got {}",
        briefs(&five.packets)
    );
    assert!(
        is_shutdown_disconnect(&five.packets[0]),
        "v5 client: DISCONNECT 0x8B (e0 xx 8b ...), got {}",
        hex(&five.packets[0])
    );
    // 3.1.1 has no server DISCONNECT: the socket just closes.
    let three = v311.until_closed(PROMPT).await.unwrap_or_else(|packets| {
        panic!(
            "3.1.1 client still open {PROMPT:?} after SIGTERM; got {}",
            briefs(&packets)
        )
    });
    assert!(
        three.packets.is_empty(),
        "3.1.1 client: close without any packet, got {}",
        briefs(&three.packets)
    );

    // Nothing held the drain: the process exits long before its 30 s grace, with status 0.
    let addr = petrel.addr;
    let (exit, ()) = tokio::join!(
        petrel.exited(Duration::from_secs(5)),
        assert_newcomer_refused(addr)
    );
    assert!(exit.0.success(), "exit status {}", exit.0);
}

// ---------------------------------------------------------------------------------------------
// 2. What is queued for a connected client goes out before its DISCONNECT.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_are_written_before_the_disconnect() {
    const MESSAGES: usize = 500;
    let data = DataDir::new("flush");
    // An in-flight window as large as the backlog: the broker may send all of it unacknowledged.
    let mut petrel = Petrel::start(&data.0, "5s", "max_inflight = 1000", &[]);
    let mut sub = open_v5(petrel.addr, &connect_v5("reader", true, 0, 1000, None)).await;
    sub.send(&subscribe_v5(1, "drain/flush", 1)).await;
    sub.expect(&suback_v5(1, 1), PROMPT).await;

    // 500 × 16 KiB, all acknowledged to the publisher; the subscriber reads none of it yet.
    // 8 MiB is about twice what loopback sockets buffer between a writer and a reader that
    // does not read (4 MiB send buffer at most, net.ipv4.tcp_wmem), so at SIGTERM much of it
    // still waits in the broker.
    let mut publ = RawClient::connected(petrel.addr, "flusher", 60).await;
    let payload = |n: usize| format!("{n:05}-{}", "x".repeat(16 * 1024 - 6));
    for n in 0..MESSAGES {
        let id = (n + 1) as u16;
        publ.send(&publish("drain/flush", 1, id, payload(n).as_bytes()))
            .await;
    }
    for n in 0..MESSAGES {
        publ.expect(&puback((n + 1) as u16), PROMPT).await;
    }

    petrel.sigterm();
    let (exit, read) = tokio::join!(
        petrel.exited(Duration::from_secs(5) + EXIT_MARGIN),
        sub.until_closed(Duration::from_secs(8))
    );
    let close = read.unwrap_or_else(|packets| {
        panic!(
            "subscriber still open 8 s after SIGTERM; {} packets, the last {}",
            packets.len(),
            packets.last().map_or(String::new(), |p| brief(p))
        )
    });
    let (last, publishes) = close
        .packets
        .split_last()
        .expect("the subscriber got nothing at all after SIGTERM");
    let received: Vec<String> = publishes
        .iter()
        .map(|p| Delivery::parse(p, true).text()[..5].to_string())
        .collect();
    let expected: Vec<String> = (0..MESSAGES).map(|n| format!("{n:05}")).collect();
    assert!(
        received == expected,
        "every queued message, in order, before the DISCONNECT: got {} of {MESSAGES} \
         (first missing: {:?}); last packet {}",
        received.len(),
        expected.iter().find(|e| !received.contains(e)),
        brief(last)
    );
    assert!(
        is_shutdown_disconnect(last),
        "after the messages: DISCONNECT 0x8B, got {}",
        brief(last)
    );
    assert!(exit.0.success(), "exit status {}", exit.0);
}

// ---------------------------------------------------------------------------------------------
// 3. Nothing acknowledged is lost across the drain and a restart.

/// Publishes alternately QoS 1 (`drain/stream/q1`) and QoS 2 (`drain/stream/q2`), one at a
/// time, until the broker closes the connection; returns each payload the broker acknowledged
/// (PUBACK, PUBREC) with its QoS. `count` follows the number acknowledged as it grows.
async fn publish_until_closed(
    mut publ: RawClient,
    count: Arc<AtomicUsize>,
) -> BTreeMap<String, u8> {
    let mut acked = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0..100_000u32 {
        assert!(
            Instant::now() < deadline,
            "publisher still served 15 s after it began"
        );
        let qos = if n % 2 == 0 { 1 } else { 2 };
        let id = (n % 60_000 + 1) as u16;
        let payload = format!("m{n}");
        let topic = if qos == 1 {
            "drain/stream/q1"
        } else {
            "drain/stream/q2"
        };
        if publ
            .try_send(&publish(topic, qos, id, payload.as_bytes()))
            .await
            .is_err()
        {
            break;
        }
        let Ok(reply) = publ.packet(PROMPT).await else {
            break;
        };
        match (qos, reply[0]) {
            (1, 0x40) | (2, 0x50) => {
                acked.insert(payload, qos);
                count.store(acked.len(), Ordering::Relaxed);
            }
            _ => panic!("unexpected reply {}", hex(&reply)),
        }
        if qos == 2 {
            // PUBREL; closed before PUBCOMP, the message was acknowledged all the same.
            if publ.try_send(&ack(0x62, id)).await.is_err() || publ.packet(PROMPT).await.is_err() {
                break;
            }
        }
    }
    acked
}

/// Checks one subscriber's deliveries after the restart against what was acknowledged on the
/// topics it subscribed: every QoS 1 message at least once, every QoS 2 message exactly once.
fn assert_delivered(who: &str, acked: &BTreeMap<String, u8>, qos_wanted: &[u8], got: &[Delivery]) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for delivery in got {
        *counts.entry(delivery.text()).or_insert(0) += 1;
    }
    let mut missing = Vec::new();
    for (payload, qos) in acked.iter().filter(|(_, q)| qos_wanted.contains(q)) {
        match counts.get(payload) {
            None => missing.push(payload.clone()),
            Some(&n) => assert!(
                *qos == 1 || n == 1,
                "{who}: QoS 2 message {payload} delivered {n} times"
            ),
        }
    }
    assert!(
        missing.is_empty(),
        "{who}: {} acknowledged messages lost across the drain, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_is_lost_across_a_drain_and_a_restart() {
    let data = DataDir::new("stream");
    // Queues large enough for everything: a message dropped at a queue bound is dropped by
    // design (counted and logged), not lost.
    let mqtt = "max_queued_messages = 1000000";
    let mut petrel = Petrel::start(&data.0, "5s", mqtt, &[]);

    // (a) Offline persistent subscribers, one per QoS.
    for (id, filter, qos) in [
        ("offline-q1", "drain/stream/q1", 1u8),
        ("offline-q2", "drain/stream/q2", 2),
    ] {
        let mut s = open_v311(petrel.addr, &connect_v311_with(id, false, None)).await;
        s.send(&subscribe(1, filter, qos)).await;
        s.expect(&suback(1, qos), PROMPT).await;
        s.send(&DISCONNECT_V311).await;
        s.until_closed(PROMPT)
            .await
            .expect("closed after DISCONNECT");
    }
    // (b) An online persistent subscriber that reads nothing and acknowledges nothing.
    let mut slow = open_v5(petrel.addr, &connect_v5("slow", true, 3600, 100, None)).await;
    slow.send(&subscribe_v5(1, "drain/stream/+", 2)).await;
    slow.expect(&suback_v5(1, 2), PROMPT).await;
    // A retained message.
    let mut retainer = RawClient::connected(petrel.addr, "retainer", 60).await;
    let mut retained = publish("drain/retained", 1, 1, b"kept");
    retained[0] |= 0x01;
    retainer.send(&retained).await;
    retainer.expect(&puback(1), PROMPT).await;
    drop(retainer);

    // The publisher streams; SIGTERM lands mid-stream, once 100 messages are acknowledged
    // (or after 3 s on a machine with a slow fsync).
    let publ = RawClient::connected(petrel.addr, "streamer", 60).await;
    let count = Arc::new(AtomicUsize::new(0));
    let stream = tokio::spawn(publish_until_closed(publ, count.clone()));
    let started = Instant::now();
    while count.load(Ordering::Relaxed) < 100 && started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    petrel.sigterm();
    let (exit, slow_close) = tokio::join!(
        petrel.exited(Duration::from_secs(5) + EXIT_MARGIN),
        slow.until_closed(Duration::from_secs(8))
    );
    let acked = stream.await.expect("publisher task");
    assert!(exit.0.success(), "exit status {}", exit.0);
    match slow_close {
        Ok(close) => println!(
            "slow subscriber: {} packets before the close, the last {}",
            close.packets.len(),
            close.packets.last().map_or(String::new(), |p| brief(p))
        ),
        Err(packets) => panic!(
            "slow subscriber still open after the broker exited ({} packets)",
            packets.len()
        ),
    }
    println!("{} messages acknowledged before the drain", acked.len());
    assert!(
        acked.len() >= 10,
        "too few messages acknowledged to mean anything: {}",
        acked.len()
    );

    // Restart on the same store: every subscriber gets every acknowledged message.
    let petrel = Petrel::start(&data.0, "5s", mqtt, &[]);
    for (id, qos) in [("offline-q1", 1u8), ("offline-q2", 2)] {
        let mut s = RawClient::connect(petrel.addr).await;
        s.send(&connect_v311_with(id, false, None)).await;
        s.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await; // session present
        let got = receive_all(&mut s, false).await;
        println!("{id}: {} deliveries after the restart", got.len());
        assert_delivered(id, &acked, &[qos], &got);
    }
    let (mut slow, connack) = open(petrel.addr, &connect_v5("slow", false, 3600, 100, None)).await;
    assert_eq!(
        &connack[2..4],
        &[0x01, 0x00],
        "slow: session present, Success"
    );
    let got = receive_all(&mut slow, true).await;
    println!(
        "slow: {} deliveries after the restart ({} marked DUP)",
        got.len(),
        got.iter().filter(|d| d.dup).count()
    );
    assert_delivered("slow", &acked, &[1, 2], &got);

    // The retained message survived.
    let mut late = RawClient::connected(petrel.addr, "late", 60).await;
    late.send(&subscribe(1, "drain/retained", 1)).await;
    late.expect(&suback(1, 1), PROMPT).await;
    let packet = late.packet(PROMPT).await.expect("the retained message");
    let retained = Delivery::parse(&packet, false);
    assert!(retained.retain, "RETAIN set on {}", brief(&packet));
    assert_eq!(retained.text(), "kept");
}

// ---------------------------------------------------------------------------------------------
// 4. Wills at shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_of_clients_closed_by_the_shutdown_are_published_not_of_those_that_left() {
    let data = DataDir::new("wills");
    let mut petrel = Petrel::start(&data.0, "5s", "", &[]);
    // A persistent subscriber to the will topics, offline at SIGTERM.
    let mut watcher = open_v311(petrel.addr, &connect_v311_with("watcher", false, None)).await;
    watcher.send(&subscribe(1, "drain/wills/+", 1)).await;
    watcher.expect(&suback(1, 1), PROMPT).await;
    watcher.send(&DISCONNECT_V311).await;
    watcher
        .until_closed(PROMPT)
        .await
        .expect("closed after DISCONNECT");

    // Connected at SIGTERM, with wills (delay 0): one MQTT 5 client, one 3.1.1.
    let will = |topic, payload| Some(Will { topic, payload });
    let mut doomed5 = open_v5(
        petrel.addr,
        &connect_v5(
            "doomed5",
            true,
            0,
            10,
            will("drain/wills/doomed5", "doomed5 gone"),
        ),
    )
    .await;
    let mut doomed3 = open_v311(
        petrel.addr,
        &connect_v311_with("doomed3", true, will("drain/wills/doomed3", "doomed3 gone")),
    )
    .await;
    // Left with DISCONNECT 0x00 before SIGTERM: its will is discarded [MQTT-3.1.2-10].
    let mut polite = open_v5(
        petrel.addr,
        &connect_v5(
            "polite",
            true,
            0,
            10,
            will("drain/wills/polite", "polite gone"),
        ),
    )
    .await;
    polite.send(&DISCONNECT_NORMAL_V5).await;
    polite
        .until_closed(PROMPT)
        .await
        .expect("closed after DISCONNECT");

    petrel.sigterm();
    let closed5 = doomed5
        .until_closed(PROMPT)
        .await
        .expect("doomed5 closed by the shutdown");
    assert!(
        closed5
            .packets
            .last()
            .is_some_and(|p| is_shutdown_disconnect(p)),
        "doomed5: DISCONNECT 0x8B, got {}",
        briefs(&closed5.packets)
    );
    doomed3
        .until_closed(PROMPT)
        .await
        .expect("doomed3 closed by the shutdown");
    let (status, _) = petrel.exited(Duration::from_secs(5) + EXIT_MARGIN).await;
    assert!(status.success(), "exit status {status}");

    // After the restart the watcher finds exactly the wills of the clients the shutdown closed.
    let petrel = Petrel::start(&data.0, "5s", "", &[]);
    let mut watcher = RawClient::connect(petrel.addr).await;
    watcher
        .send(&connect_v311_with("watcher", false, None))
        .await;
    watcher.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await;
    let got: BTreeSet<(String, String)> = receive_all(&mut watcher, false)
        .await
        .into_iter()
        .map(|d| (d.topic.clone(), d.text()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("drain/wills/doomed3", "doomed3 gone"),
        ("drain/wills/doomed5", "doomed5 gone"),
    ]
    .into_iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    assert_eq!(
        got, want,
        "wills after the restart: the two closed by the shutdown [MQTT-3.1.2-8], not the one \
         that sent DISCONNECT 0x00"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The grace period bounds the drain.

/// A v5 subscriber that never reads, with about 8 MiB in flight to it (more than the kernel's
/// socket buffers hold) and more queued, and an idle v5 bystander. After SIGTERM: the
/// bystander gets DISCONNECT 0x8B, a newcomer is refused while the drain runs, and the
/// process exits 0 within the 2 s grace plus the margin.
async fn a_subscriber_that_never_reads_is_cut_off_at_the_grace(
    label: &str,
    config_grace: &str,
    args: &[&str],
) {
    const MESSAGES: u16 = 64;
    const SIZE: usize = 256 * 1024;
    let grace = Duration::from_secs(2);
    let data = DataDir::new(label);
    let mut petrel = Petrel::start(&data.0, config_grace, "", args);
    let mut stuck = open_v5(petrel.addr, &connect_v5("stuck", true, 0, 1000, None)).await;
    stuck.send(&subscribe_v5(1, "drain/stuck", 1)).await;
    stuck.expect(&suback_v5(1, 1), PROMPT).await;
    let mut bystander = open_v5(petrel.addr, &connect_v5("bystander", true, 0, 10, None)).await;

    // 64 × 256 KiB, all acknowledged: max_inflight (32) of them are written, 8 MiB, which
    // the sockets cannot hold; the rest wait in the broker.
    let mut publ = RawClient::connected(petrel.addr, "flooder", 60).await;
    let body = vec![b'x'; SIZE];
    for id in 1..=MESSAGES {
        publ.send(&publish("drain/stuck", 1, id, &body)).await;
    }
    for id in 1..=MESSAGES {
        publ.expect(&puback(id), PROMPT).await;
    }

    petrel.sigterm();
    // Shutdown has begun once the bystander is closed.
    let bystanders = bystander
        .until_closed(grace + EXIT_MARGIN)
        .await
        .expect("bystander closed by the shutdown");
    assert!(
        bystanders
            .packets
            .last()
            .is_some_and(|p| is_shutdown_disconnect(p)),
        "bystander: DISCONNECT 0x8B, got {}",
        briefs(&bystanders.packets)
    );
    println!(
        "{label}: bystander closed {:?} after SIGTERM; petrel running: {}",
        bystanders.at - petrel.terminated.expect("SIGTERM sent"),
        petrel.running()
    );
    let addr = petrel.addr;
    let ((status, took), ()) = tokio::join!(
        petrel.exited(grace + Duration::from_secs(8)),
        assert_newcomer_refused(addr)
    );
    assert!(status.success(), "exit status {status}");
    assert!(
        took <= grace + EXIT_MARGIN,
        "{label}: exited {took:?} after SIGTERM, later than the {grace:?} grace + {EXIT_MARGIN:?}"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    a_subscriber_that_never_reads_is_cut_off_at_the_grace("grace-config", "2s", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_on_the_command_line_overrides_the_config() {
    a_subscriber_that_never_reads_is_cut_off_at_the_grace(
        "grace-cli",
        "60s",
        &["--shutdown-grace", "2s"],
    )
    .await;
}
