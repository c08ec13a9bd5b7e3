//! Shared helpers for the black-box tests: an in-process broker on an ephemeral loopback port,
//! and a raw client that speaks bytes, so tests read like protocol transcripts.
//!
//! ```ignore
//! let broker = TestBroker::start().await;
//! let mut c = RawClient::connect(broker.addr).await;
//! c.send_hex("10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 61").await; // CONNECT "a"
//! c.expect_hex("20 02 00 00").await;                                 // CONNACK accepted
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use petrel_codec::{Packet, ProtocolVersion};
use petrel_engine::Broker;
use petrel_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something the broker should do promptly.
pub const PROMPT: Duration = Duration::from_secs(5);

/// A broker serving on 127.0.0.1 with an OS-assigned port, stopped when dropped.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    shutdown: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestBroker {
    /// Embedded defaults, on an ephemeral port.
    pub async fn start() -> TestBroker {
        TestBroker::start_with(|_| {}).await
    }

    /// Defaults adjusted by `adjust` (the listener's `bind` is forced to an ephemeral port).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let mut config = Config::default();
        adjust(&mut config);
        for l in &mut config.listeners {
            l.bind = "127.0.0.1:0".parse().expect("literal address");
        }
        let server = Server::bind(&config).await.expect("bind test broker");
        TestBroker::serve(server)
    }

    /// A broker from TOML text, exactly as a user would write it (with `bind` forced to an
    /// ephemeral port).
    pub async fn start_toml(toml: &str) -> TestBroker {
        let config = Config::from_toml_str(toml, "test.toml").expect("valid test config");
        TestBroker::start_with(|c| *c = config).await
    }

    pub fn serve(server: Server) -> TestBroker {
        let addr = server.local_addrs()[0];
        let broker = server.broker().clone();
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(server.run(shutdown.clone(), Duration::from_secs(2)));
        TestBroker {
            addr,
            broker,
            shutdown,
            done: Some(done),
        }
    }

    /// Stops the broker the way SIGTERM does and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Parses "10 0c 00 04" (spaces and newlines ignored) into bytes.
pub fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).expect("ascii");
            u8::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex {s:?} in {text:?}"))
        })
        .collect()
}

/// `first`, the remaining length as a variable byte integer, then `body`; as hex.
pub fn frame(first: u8, body: &[u8]) -> String {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut byte = (n & 0x7f) as u8;
        n >>= 7;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    to_hex(&out)
}

/// A two-byte length and the bytes (§1.5.3).
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a read ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The broker closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived within the wait.
    TimedOut,
}

/// A client that sends and expects raw bytes.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    /// The version packets are decoded with in `recv`.
    pub version: ProtocolVersion,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to test broker");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: BytesMut::new(),
            version: ProtocolVersion::V3_1_1,
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to broker");
    }

    pub async fn send_hex(&mut self, text: &str) {
        self.send_bytes(&hex(text)).await;
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut buf = BytesMut::new();
        petrel_codec::encode(packet, self.version, &mut buf).expect("encode");
        self.send_bytes(&buf).await;
    }

    /// Reads exactly `n` bytes, or reports why it could not.
    pub async fn read_exact(&mut self, n: usize, wait: Duration) -> Result<Vec<u8>, ReadOutcome> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(ReadOutcome::TimedOut),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadOutcome::Closed),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        Ok(self.buf.split_to(n).to_vec())
    }

    /// Asserts the next bytes from the broker are exactly `text` (hex).
    pub async fn expect_hex(&mut self, text: &str) {
        let want = hex(text);
        match self.read_exact(want.len(), PROMPT).await {
            Ok(got) => assert_eq!(to_hex(&got), to_hex(&want), "unexpected bytes from broker"),
            Err(why) => panic!(
                "expected {text} from broker, got {why:?} (buffered: {})",
                to_hex(&self.buf)
            ),
        }
    }

    /// Decodes the next packet, waiting up to `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Packet, ReadOutcome> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match petrel_codec::decode(&mut self.buf, self.version, u32::MAX) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => panic!(
                    "broker sent a malformed packet: {e} ({})",
                    to_hex(&self.buf)
                ),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(ReadOutcome::TimedOut),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadOutcome::Closed),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// The next packet; panics if none arrives promptly.
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(PROMPT).await {
            Ok(p) => p,
            Err(why) => panic!("expected a packet from the broker, got {why:?}"),
        }
    }

    /// Asserts the broker closes the connection within `wait`, ignoring any bytes it sends
    /// first (which are returned).
    pub async fn expect_closed_within(&mut self, wait: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("broker did not close the connection within {wait:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return self.buf.split().to_vec(),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    pub async fn expect_closed(&mut self) -> Vec<u8> {
        self.expect_closed_within(PROMPT).await
    }

    /// Asserts nothing arrives (and the connection stays open) for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.recv_within(wait).await {
            Err(ReadOutcome::TimedOut) => {}
            Err(ReadOutcome::Closed) => panic!("broker closed the connection unexpectedly"),
            Ok(p) => panic!("expected silence, got {p:?}"),
        }
    }
}

/// A 3.1.1 CONNECT as hex: client id, clean session flag, keepalive seconds.
pub fn connect_v311_hex(client_id: &str, clean: bool, keep_alive: u16) -> String {
    let mut body = hex("00 04 4d 51 54 54 04");
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    to_hex(&packet)
}

impl RawClient {
    /// Connects with 3.1.1 and asserts CONNACK accepted with the given session-present flag.
    pub async fn connect_v311(
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> RawClient {
        let mut c = RawClient::connect(addr).await;
        c.send_hex(&connect_v311_hex(client_id, clean, keep_alive))
            .await;
        c
    }
}
