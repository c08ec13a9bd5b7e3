//! Black-box helpers: the real `petrel` binary as a child process, a raw MQTT client that
//! speaks hand-written bytes, and measurements of the broker process from `/proc`.
//!
//! The broker runs in its own process so that its file descriptors, memory and timers are
//! its own: a test can open 10,000 sockets against it and read its resident memory without
//! counting the test's side of the sockets.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How long the broker may take to start listening.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);

/// Attempts at starting a broker: a port picked free can be taken by someone else before the
/// broker binds it.
const START_ATTEMPTS: usize = 5;

/// Timing tests share the machine; the 10,000-socket test must not run beside them or its
/// load would skew their close times. Light tests take it shared, heavy ones exclusive.
static MACHINE: RwLock<()> = RwLock::const_new(());

pub async fn light() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}

pub async fn heavy() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// A `petrel` process serving one TCP listener on 127.0.0.1, killed when dropped.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Broker {
    /// Starts petrel with one listener; `listener_keys` are further TOML lines of that
    /// `[[listeners]]` table (e.g. `connect_timeout = "1s"`).
    pub fn start(listener_keys: &str) -> Broker {
        Broker::start_with(listener_keys, "[storage]\nmode = \"memory\"\n")
    }

    /// As `start`, with `tables` (whole TOML tables, e.g. a `[storage]` one) after the
    /// listener.
    pub fn start_with(listener_keys: &str, tables: &str) -> Broker {
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            match Broker::try_start(listener_keys, tables) {
                Ok(broker) => return broker,
                // Someone took the port between our probe and the broker's bind.
                Err(log) if log.contains("Address already in use") => last_log = log,
                Err(log) => panic!("petrel did not start; its log:\n{log}"),
            }
        }
        panic!(
            "petrel could not bind a free port in {START_ATTEMPTS} attempts; last log:\n{last_log}"
        );
    }

    /// As `start_with`, on `port` (a restart where its clients expect it).
    pub fn start_at(port: u16, listener_keys: &str, tables: &str) -> Broker {
        Broker::try_start_at(port, listener_keys, tables)
            .unwrap_or_else(|log| panic!("petrel did not start on port {port}; its log:\n{log}"))
    }

    fn try_start(listener_keys: &str, tables: &str) -> Result<Broker, String> {
        Broker::try_start_at(free_port(), listener_keys, tables)
    }

    fn try_start_at(port: u16, listener_keys: &str, tables: &str) -> Result<Broker, String> {
        Broker::spawn_at(port, listener_keys, tables, None)
    }

    /// Starts petrel on `port`, with its RLIMIT_NOFILE (soft and hard) set to `open_files` if
    /// given, and waits until it listens.
    fn spawn_at(
        port: u16,
        listener_keys: &str,
        tables: &str,
        open_files: Option<u64>,
    ) -> Result<Broker, String> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = std::env::temp_dir().join(format!(
            "petrel-timeouts-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let config = dir.join("petrel.toml");
        let text = format!("[[listeners]]\nbind = \"{addr}\"\n{listener_keys}\n\n{tables}");
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.join("petrel.log")).expect("create log file");

        let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        dies_with_test(&mut command);
        if let Some(open_files) = open_files {
            // SAFETY: setrlimit is async-signal-safe and reads only the struct passed.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: open_files,
                        rlim_max: open_files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        let child = command.spawn().expect("spawn petrel");
        let broker = Broker { child, addr, dir };

        Broker::wait_ready(broker, Instant::now())
    }

    /// Waits until the broker logged that it listens and the port accepts: the log line rules
    /// out a stranger that grabbed the port, the connect that the socket is really open.
    fn wait_ready(mut broker: Broker, started: Instant) -> Result<Broker, String> {
        loop {
            if broker.log().contains("listening") && StdStream::connect(broker.addr).is_ok() {
                return Ok(broker);
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                return Err(format!("(exited with {status})\n{}", broker.log()));
            }
            if started.elapsed() > STARTUP_LIMIT {
                return Err(format!(
                    "(not listening after {STARTUP_LIMIT:?})\n{}",
                    broker.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("petrel.log")).unwrap_or_default()
    }

    /// Resident memory in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status of petrel");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// File descriptors the broker holds open: one per accepted socket plus a fixed few.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/<pid>/fd of petrel")
            .count()
    }
}

impl Broker {
    /// Stops the broker with SIGTERM and returns its exit status (killed after 10 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for petrel");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the petrel log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes the kernel kill the child `command` starts should the test process die without
/// running its Drop guard (a broker must never outlive its test).
pub fn dies_with_test(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A port nobody listens on right now (the OS picks it; we release it for the broker).
pub fn free_port() -> u16 {
    let probe = StdListener::bind("127.0.0.1:0").expect("bind a probe listener");
    probe.local_addr().expect("probe address").port()
}

/// Raises this process's soft limit on open files to at least `needed` (up to the hard
/// limit). The broker, a child, inherits the raised limit. Returns the new soft limit or why
/// `needed` cannot be had.
pub fn raise_open_files_limit(needed: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    if limit.rlim_max < needed {
        return Err(format!(
            "RLIMIT_NOFILE hard limit is {}, below the {needed} this test needs; raise it (ulimit -Hn)",
            limit.rlim_max
        ));
    }
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(limit.rlim_cur)
}

// ---------------------------------------------------------------------------------------------
// Packets, written out by hand.

pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
pub const PINGREQ: [u8; 2] = [0xc0, 0x00];
pub const PINGRESP: [u8; 2] = [0xd0, 0x00];

/// A 3.1.1 CONNECT, clean session, no will or credentials. For "a" and keepalive 60:
/// `10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 61`.
pub fn connect_v311(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

/// SUBSCRIBE with one filter.
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    frame(0x82, &body)
}

/// SUBACK for one filter granted `qos`.
pub fn suback(packet_id: u16, qos: u8) -> Vec<u8> {
    let id = packet_id.to_be_bytes();
    vec![0x90, 0x03, id[0], id[1], qos]
}

/// PUBLISH; `packet_id` is ignored at QoS 0.
pub fn publish(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

pub fn puback(packet_id: u16) -> Vec<u8> {
    let id = packet_id.to_be_bytes();
    vec![0x40, 0x02, id[0], id[1]]
}

/// Fixed header (type and flags, remaining length as a variable byte integer) plus body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Splits one whole packet off the front of `buf`, if one is there.
fn split_packet(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let byte = *buf.get(i)?;
        len |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        assert!(
            shift < 28,
            "broker sent a malformed remaining length: {}",
            hex(buf)
        );
    }
    if buf.len() < i + len {
        return None;
    }
    Some(buf.drain(..i + len).collect())
}

/// The body of a PUBLISH after its topic and packet id: what the publisher sent.
pub fn publish_payload(packet: &[u8]) -> &[u8] {
    let qos = (packet[0] >> 1) & 0x03;
    let mut i = 1;
    while packet[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let topic_len = usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
    i += 2 + topic_len;
    if qos > 0 {
        i += 2;
    }
    &packet[i..]
}

/// The packet id of a QoS 1/2 PUBLISH.
/// The topic of a PUBLISH packet.
pub fn publish_topic(packet: &[u8]) -> String {
    let mut i = 1;
    while packet[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let len = usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
    String::from_utf8(packet[i + 2..i + 2 + len].to_vec()).expect("a UTF-8 topic")
}

pub fn publish_packet_id(packet: &[u8]) -> u16 {
    let mut i = 1;
    while packet[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let topic_len = usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
    i += 2 + topic_len;
    u16::from_be_bytes([packet[i], packet[i + 1]])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// A client that speaks bytes.

/// How a wait for the broker ended without the expected bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// EOF or a reset: the broker closed the connection.
    Closed,
    /// Nothing (more) arrived in time.
    TimedOut,
}

/// When the broker closed a connection, and what it sent before.
#[derive(Debug)]
pub struct Close {
    pub at: Instant,
    pub packets: Vec<Vec<u8>>,
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// When connecting began. The broker cannot have accepted earlier, so a deadline measured
    /// from here is never early; it is late by the handshake, microseconds on loopback.
    pub opened: Instant,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let opened = Instant::now();
        let stream = TcpStream::connect(addr).await.expect("connect to petrel");
        // Byte-by-byte tests rely on each write leaving as its own segment.
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawClient {
            stream,
            buf: Vec::new(),
            opened,
        }
    }

    /// As `connect`, reporting a refused connection instead of failing the test (for tests
    /// that kill the broker on purpose).
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<RawClient> {
        let opened = Instant::now();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            buf: Vec::new(),
            opened,
        })
    }

    /// Opens a connection and completes a 3.1.1 CONNECT with `keep_alive`.
    pub async fn connected(addr: SocketAddr, client_id: &str, keep_alive: u16) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.send(&connect_v311(client_id, keep_alive)).await;
        client
            .expect(&CONNACK_ACCEPTED, Duration::from_secs(5))
            .await;
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to petrel");
    }

    /// Writes, reporting a broken connection instead of failing the test (for tests that
    /// kill the broker on purpose).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Asserts the next bytes are exactly `want`.
    pub async fn expect(&mut self, want: &[u8], wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while self.buf.len() < want.len() {
            if let Err(why) = self.fill(deadline).await {
                panic!(
                    "expected {} from petrel, got {why:?} after {}",
                    hex(want),
                    hex(&self.buf)
                );
            }
        }
        let got: Vec<u8> = self.buf.drain(..want.len()).collect();
        assert_eq!(hex(&got), hex(want), "unexpected bytes from petrel");
    }

    /// The next whole packet, as raw bytes.
    pub async fn packet(&mut self, wait: Duration) -> Result<Vec<u8>, Ended> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(packet) = split_packet(&mut self.buf) {
                return Ok(packet);
            }
            self.fill(deadline).await?;
        }
    }

    /// Reads until the broker closes the connection, keeping what it sent; `Err` with the
    /// packets so far if it is still open after `wait`.
    pub async fn until_closed(&mut self, wait: Duration) -> Result<Close, Vec<Vec<u8>>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut packets = Vec::new();
        loop {
            while let Some(packet) = split_packet(&mut self.buf) {
                packets.push(packet);
            }
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(Ended::Closed) => {
                    return Ok(Close {
                        at: Instant::now(),
                        packets,
                    })
                }
                Err(Ended::TimedOut) => return Err(packets),
            }
        }
    }

    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), Ended> {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Err(Ended::TimedOut),
            Ok(Ok(0)) | Ok(Err(_)) => Err(Ended::Closed),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

/// Asserts `elapsed` lies in `[expected - early, expected + late]` and says which way it missed.
pub fn assert_close_time(
    what: &str,
    elapsed: Duration,
    expected: Duration,
    early: Duration,
    late: Duration,
) {
    println!("{what}: closed after {elapsed:?} (expected {expected:?})");
    assert!(
        elapsed + early >= expected,
        "{what}: closed after {elapsed:?}, before the {expected:?} deadline"
    );
    assert!(
        elapsed <= expected + late,
        "{what}: closed after {elapsed:?}, later than {expected:?} + {late:?}"
    );
}

/// One series of the broker's `/metrics` on admin port `admin`: `name` is the whole series
/// name with labels and a trailing space (e.g. `petrel_connections `).
pub async fn metric(admin: u16, name: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// The admin API's OpenAPI document, which the answers are checked against.
pub const OPENAPI: &str = include_str!("../../src/admin/openapi.json");

/// Asserts `value` is what the OpenAPI document says `method path` answers with `status`.
pub fn conforms(method: &str, path: &str, status: u16, value: &serde_json::Value) {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let path_only = path.split('?').next().unwrap();
    // The document's template for this path.
    let (template, item) = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(template, _)| {
            let t: Vec<&str> = template.split('/').collect();
            let p: Vec<&str> = path_only.split('/').collect();
            t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t.starts_with('{') || t == p)
        })
        .unwrap_or_else(|| panic!("{path_only} is not in the OpenAPI document"));
    let operation = &item[method.to_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} is not described"
    );
    let mut response = operation["responses"][status.to_string()].clone();
    assert!(
        response.is_object(),
        "{method} {template} answered {status}, which the document does not list: {value}"
    );
    if let Some(reference) = response.get("$ref").and_then(serde_json::Value::as_str) {
        let name = reference.rsplit('/').next().unwrap();
        response = doc["components"]["responses"][name].clone();
    }
    let schema = &response["content"]["application/json"]["schema"];
    let wrapped = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [schema],
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&wrapped).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} ({status}) does not match the OpenAPI document: {errors:?}\n{value}"
    );
}

/// A v5 CONNECT: clean start as asked, keep alive, Session Expiry Interval.
pub fn connect_v5(client_id: &str, clean: bool, keep_alive: u16, expiry: u32) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05];
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(5);
    body.push(0x11);
    body.extend_from_slice(&expiry.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

pub fn subscribe_v5(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0); // no properties
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    let mut out = vec![0x82, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

impl Broker {
    /// As `start_with`, with the broker's RLIMIT_NOFILE (soft and hard) set to `open_files`,
    /// so that a test can exhaust its descriptors with hundreds of sockets.
    pub fn start_with_open_files(listener_keys: &str, tables: &str, open_files: u64) -> Broker {
        Broker::spawn_at(free_port(), listener_keys, tables, Some(open_files))
            .unwrap_or_else(|log| panic!("petrel did not start; its log:\n{log}"))
    }
}
