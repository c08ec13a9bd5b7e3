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
    /// The first listener's address (a unix listener has none: then 0.0.0.0:0).
    pub addr: SocketAddr,
    /// Every IP listener's address, in configuration order.
    pub addrs: Vec<SocketAddr>,
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
        // In-process brokers keep nothing on disk unless a test asks for it.
        config.storage.mode = petrel_server::config::StorageMode::Memory;
        // No $SYS figures unless a test asks for them.
        config.sys_interval = Duration::ZERO;
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
        let mut config = Config::from_toml_str(toml, "test.toml").expect("valid test config");
        if !toml.contains("[storage]") {
            config.storage.mode = petrel_server::config::StorageMode::Memory;
        }
        if !toml.contains("sys_interval") {
            config.sys_interval = Duration::ZERO;
        }
        TestBroker::start_with(|c| *c = config).await
    }

    pub fn serve(server: Server) -> TestBroker {
        let addrs = server.local_addrs();
        let addr = addrs
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let broker = server.broker().clone();
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(server.run(shutdown.clone(), Duration::from_secs(2)));
        TestBroker {
            addr,
            addrs,
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

/// Certificates made at run time for TLS tests: a CA, and leaf certificates it signs.
pub mod pki {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    /// A directory under the system temp dir, removed when dropped.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(label: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "petrel-{label}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        pub fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
        pub pem: String,
    }

    /// A leaf certificate and its key, PEM.
    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
                .expect("self-signed CA");
            let pem = issuer.pem();
            Ca { issuer, pem }
        }

        /// A server certificate for localhost and 127.0.0.1.
        pub fn server(&self) -> Leaf {
            self.leaf("petrel test server", &["localhost", "127.0.0.1"], false)
        }

        /// A client certificate with subject CN `cn`.
        pub fn client(&self, cn: &str) -> Leaf {
            self.leaf(cn, &[], true)
        }

        fn leaf(&self, cn: &str, sans: &[&str], client: bool) -> Leaf {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        }

        /// A rustls client config trusting this CA, optionally presenting `identity`.
        pub fn client_config(&self, identity: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
                roots.add(cert.expect("CA pem")).expect("add CA");
            }
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
            let mut config = match identity {
                None => builder.with_no_client_auth(),
                Some(leaf) => {
                    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .expect("client chain");
                    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
                    builder
                        .with_client_auth_cert(chain, key)
                        .expect("client auth")
                }
            };
            config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Arc::new(config)
        }
    }

    impl Leaf {
        /// Writes `name.pem` and `name.key` into `dir`; returns their paths.
        pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
            let cert = dir.join(format!("{name}.pem"));
            let key = dir.join(format!("{name}.key"));
            std::fs::write(&cert, &self.cert_pem).expect("write cert");
            std::fs::write(&key, &self.key_pem).expect("write key");
            (cert, key)
        }
    }

    /// Connects over TLS to `addr` as `localhost`.
    pub async fn connect_tls(
        addr: std::net::SocketAddr,
        config: Arc<ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }
}
