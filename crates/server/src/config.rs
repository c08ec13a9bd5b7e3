//! Broker configuration: the TOML file format, its built-in defaults, and
//! validation whose errors point at `file:line: key`.
//!
//! Loading reads the text twice, cheaply (config files are small):
//!
//! 1. `toml::de::DeTable` parses the document and keeps the byte span of every
//!    key and value. Syntax errors surface here.
//! 2. serde deserializes the typed [`Config`] from that tree. Unknown keys
//!    (`deny_unknown_fields`), wrong types and malformed values surface here,
//!    each with the span of the offending key or value.
//! 3. [`Config::validate`] checks the rules serde cannot express: ranges,
//!    non-zero durations, distinct bind addresses.
//!
//! Whatever fails, the spanned tree from step 1 turns the failure into a
//! dotted key path (`listeners[0].connect_timeout`) and a line number, so an
//! operator reads `petrel.toml:3: listeners[0].connect_timeout: must be
//! greater than zero` instead of a serde backtrace. Nothing here panics on
//! file contents.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where errors say a config came from when it was built in code rather than
/// read from a file (see [`Config::validate`]).
const BUILT_IN_ORIGIN: &str = "<config>";

/// The whole broker configuration. `Config::default()` is what petrel runs
/// with when no file is given, and what every absent key falls back to.
///
/// The doc comments on these structs are written for operators: they are the
/// descriptions in docs/configuration.md, which
/// `crates/server/tests/config_reference.rs` generates from them (meaning,
/// unit, what 0 or "" does; ranges and defaults it takes from the code).
/// `Serialize` exists for that reference and writes the same spelling
/// `Deserialize` reads (durations as "10s", addresses as "IP:port").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a table of petrel settings")]
pub struct Config {
    /// Sockets that accept clients, one `[[listeners]]` table each. Without
    /// any, petrel listens on 127.0.0.1:1883 (TCP), so a broker started
    /// without a configuration is not exposed to the network. An explicit
    /// `listeners = []` is an error: a broker that listens nowhere is a typo.
    pub listeners: Vec<ListenerConfig>,
    /// Open client connections across all listeners together. Past it, new
    /// clients wait in the kernel's accept backlog until a connection closes,
    /// as with a listener's own `max_connections`.
    pub max_connections: usize,
    /// File descriptors kept for everything but client connections (the
    /// store's files, logs, configuration files read on SIGHUP, the HTTP
    /// authentication hook, bridges, NATS). At start petrel raises its soft
    /// RLIMIT_NOFILE to the hard limit and gives client connections only
    /// what is left after this, the listening sockets and the admin
    /// listener's `max_connections`: `max_connections` is lowered to fit (and
    /// logged), so a flood on one port cannot take the descriptors the rest
    /// of the process needs. Raise the limit (`ulimit -n`, systemd
    /// `LimitNOFILE`) rather than lowering this.
    pub reserved_descriptors: usize,
    /// Protocol limits, each a bound on what one client (or all together)
    /// may make the broker hold. SIGHUP puts a changed `[mqtt]` table in
    /// service: new connections and new messages follow it.
    pub mqtt: MqttConfig,
    /// Who may connect and what they may do. SIGHUP reloads the whole table,
    /// the password file and the ACL file without dropping connections
    /// (connected clients follow the new ACL from their next packet); a file
    /// with an error is refused whole and the running configuration stays.
    pub auth: AuthConfig,
    /// What survives a restart, and how.
    pub storage: StorageConfig,
    /// The operations listener (metrics, admin API, dashboard). Without an
    /// `[admin]` table it runs on 127.0.0.1:9183 when that port is free (a
    /// warning otherwise); with one, as configured, and a failure to bind
    /// stops the start.
    pub admin: Option<AdminConfig>,
    /// How often the `$SYS/broker/...` statistics topics are published.
    /// "0s" publishes none.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub sys_interval: Duration,
    /// On SIGTERM or SIGINT: how long connected clients get to receive what
    /// is queued for them before they are sent DISCONNECT (MQTT 5: 0x8B,
    /// server shutting down) and closed; the store is flushed after. The
    /// command line's `--shutdown-grace` overrides it. A service manager's
    /// stop timeout must be longer (the systemd unit in dist/ allows 30s).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub shutdown_grace: Duration,
    /// Connections from this broker to other MQTT brokers, one `[[bridges]]`
    /// table each, with the topics they carry each way.
    pub bridges: Vec<BridgeConfig>,
    /// Cluster mode: several petrel nodes act as one broker, sharing a NATS
    /// cluster (with JetStream) as their fabric. Off while `nats` is empty.
    pub cluster: ClusterConfig,
}

/// The `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a [cluster] table")]
pub struct ClusterConfig {
    /// NATS servers of the shared NATS cluster ("nats://host:4222"); any one
    /// reachable is enough. Empty: a single node, no NATS. JetStream must be
    /// enabled on the servers.
    pub nats: Vec<String>,
    /// This node's name in the cluster: unique, kept across restarts (its
    /// durable consumer and its keys in NATS carry it); 1 to 64 of A-Z a-z
    /// 0-9 - _. Empty: the host name.
    pub node_id: String,
    /// JetStream replicas of the message stream and the buckets: 1 for one
    /// NATS server, 3 for a three-server NATS cluster (survives the loss of
    /// one). Used when they are first created.
    pub replicas: usize,
    /// How long the start waits for a NATS server before it fails.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub connect_timeout: Duration,
    /// How often this node writes its heartbeat to the membership bucket.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub heartbeat: Duration,
    /// After how long without a heartbeat a node counts as gone. At least
    /// twice `heartbeat`.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub node_timeout: Duration,
    /// Bound on the bytes of QoS 1/2 messages the stream holds for nodes and
    /// shared groups that have not taken them yet (a stopped node's, say).
    pub stream_max_bytes: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            node_id: String::new(),
            replicas: 1,
            connect_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(5),
            stream_max_bytes: 1 << 30,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// The node id in service: the configured one, or one made from the host name.
    pub fn effective_node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let id: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if id.is_empty() {
            "petrel".to_owned()
        } else {
            id
        }
    }

    fn check(&self) -> Result<(), Violation> {
        let key = |name: &str| KeyPath::root().key("cluster").key(name);
        let bad = |name: &str, message: String| {
            Err(Violation {
                key: key(name),
                message,
            })
        };
        for (i, url) in self.nats.iter().enumerate() {
            if url.trim().is_empty() || url.contains(char::is_whitespace) {
                return Err(Violation {
                    key: key("nats").index(i),
                    message: format!(
                        "{url:?} is not a NATS server address such as \"nats://127.0.0.1:4222\""
                    ),
                });
            }
        }
        if !self.node_id.is_empty() && !petrel_cluster::names::valid_node_id(&self.node_id) {
            return bad(
                "node_id",
                format!("{:?}: use 1 to 64 of A-Z a-z 0-9 - _", self.node_id),
            );
        }
        if !(1..=5).contains(&self.replicas) {
            return bad("replicas", "must be 1 to 5".to_owned());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must be greater than zero".to_owned());
        }
        if self.heartbeat.is_zero() {
            return bad("heartbeat", "must be greater than zero".to_owned());
        }
        if self.node_timeout < self.heartbeat * 2 {
            return bad(
                "node_timeout",
                "must be at least twice heartbeat".to_owned(),
            );
        }
        if self.stream_max_bytes < 1 << 20 {
            return bad(
                "stream_max_bytes",
                "must be at least 1 MiB (1048576)".to_owned(),
            );
        }
        Ok(())
    }
}

/// One `[[bridges]]` entry: this broker connects to another one as a client
/// and carries the messages of its `topics` each way. Messages going out wait
/// in a persistent local session ("$bridge/<name>", bounded like any session
/// by `[mqtt]`) while the remote is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[bridges]] table")]
pub struct BridgeConfig {
    /// Required: names the bridge in logs, metrics and the admin API, and its
    /// local session; letters, digits, "-" and "_", unique.
    pub name: String,
    /// Required: the remote broker, "host:port" ("[::1]:1883" for an IPv6
    /// address). The host name is resolved at each connection attempt.
    pub address: String,
    /// "tcp", "tls", "ws" (WebSocket) or "wss" (WebSocket over TLS).
    pub transport: BridgeTransport,
    /// ws and wss: the HTTP path of the WebSocket upgrade.
    pub path: String,
    /// tls and wss: PEM CA certificates the remote's certificate must chain
    /// to. Unset: the Mozilla root certificates built into petrel.
    pub ca_file: Option<PathBuf>,
    /// tls and wss: a PEM client certificate chain for mutual TLS, with
    /// `key`.
    pub cert: Option<PathBuf>,
    /// tls and wss: the PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// tls and wss: the name the remote's certificate must carry (and SNI).
    /// Unset: the host of `address`.
    pub server_name: Option<String>,
    /// MQTT version spoken to the remote: "5.0" or "3.1.1". With 5.0 the
    /// remote subscriptions are No Local; with 3.1.1 the CONNECT carries the
    /// bridge bit that Mosquitto and petrel honour the same way (loop guard).
    pub version: BridgeVersion,
    /// The client id at the remote. Empty: "petrel-" and the bridge's name.
    pub client_id: String,
    /// The user name at the remote, if it asks for one.
    pub username: Option<String>,
    /// The password at the remote. Give this or `password_file`, not both.
    pub password: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Start a new session at the remote on every connection. false: the
    /// remote keeps the bridge's subscriptions and what it queued for it
    /// while the link was down.
    pub clean_start: bool,
    /// 5.0: how long the remote keeps the bridge's session after the link
    /// drops (Session Expiry Interval, whole seconds).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub session_expiry: Duration,
    /// The keep alive asked of the remote (whole seconds, at most 65535s);
    /// "0s" turns it off.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub keepalive: Duration,
    /// From the start of a connection attempt until the remote's CONNACK
    /// (name resolution, TCP, TLS and WebSocket included).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub connect_timeout: Duration,
    /// The wait before the first reconnect attempt; it doubles after each
    /// failure up to `reconnect_delay_max`, each wait drawn at random between
    /// half of it and all of it (jitter), and starts over once a link held.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub reconnect_delay: Duration,
    /// The longest wait between reconnect attempts.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub reconnect_delay_max: Duration,
    /// Unacknowledged QoS 1/2 messages in each direction (1 to 65535); the
    /// remote's own Receive Maximum may lower it.
    pub max_inflight: u16,
    /// Required, at least one: the topics carried, one `[[bridges.topics]]`
    /// table each.
    pub topics: Vec<BridgeTopic>,
}

/// One `[[bridges.topics]]` entry: which messages a bridge carries, which
/// way, and under what name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[bridges.topics]] table")]
pub struct BridgeTopic {
    /// "out": messages published here that match `filter` go to the remote;
    /// "in": messages published at the remote that match `filter` come here.
    pub direction: BridgeDirection,
    /// Required: a topic filter ("+" and "#" allowed, no "$share/"), on this
    /// broker for "out", on the remote for "in".
    pub filter: String,
    /// Put in front of the topic on the other side: at the remote for "out",
    /// here for "in" (e.g. "site1/"). A message matching several rules of a
    /// direction goes once, under the first rule's prefix.
    pub prefix: String,
    /// The highest QoS the messages are carried with (0, 1 or 2).
    pub qos: u8,
}

/// How a bridge reaches the remote broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BridgeTransport {
    #[default]
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// The MQTT version a bridge speaks to the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum BridgeVersion {
    #[serde(rename = "3.1.1")]
    V3_1_1,
    #[default]
    #[serde(rename = "5.0")]
    V5,
}

/// Which way a bridge topic rule carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BridgeDirection {
    /// From this broker to the remote.
    #[default]
    Out,
    /// From the remote to this broker.
    In,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            name: String::new(),
            address: String::new(),
            transport: BridgeTransport::Tcp,
            path: "/mqtt".to_owned(),
            ca_file: None,
            cert: None,
            key: None,
            server_name: None,
            version: BridgeVersion::V5,
            client_id: String::new(),
            username: None,
            password: None,
            password_file: None,
            clean_start: false,
            session_expiry: Duration::from_secs(3600),
            keepalive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::from_secs(1),
            reconnect_delay_max: Duration::from_secs(60),
            max_inflight: 32,
            topics: Vec::new(),
        }
    }
}

impl Default for BridgeTopic {
    fn default() -> Self {
        BridgeTopic {
            direction: BridgeDirection::Out,
            filter: String::new(),
            prefix: String::new(),
            qos: 1,
        }
    }
}

impl BridgeTransport {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeTransport::Tcp => "tcp",
            BridgeTransport::Tls => "tls",
            BridgeTransport::Ws => "ws",
            BridgeTransport::Wss => "wss",
        }
    }

    /// Whether the transport runs over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, BridgeTransport::Tls | BridgeTransport::Wss)
    }
}

impl BridgeVersion {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeVersion::V3_1_1 => "3.1.1",
            BridgeVersion::V5 => "5.0",
        }
    }
}

impl BridgeDirection {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeDirection::Out => "out",
            BridgeDirection::In => "in",
        }
    }
}

impl BridgeConfig {
    /// The client id used at the remote.
    pub fn remote_client_id(&self) -> String {
        if self.client_id.is_empty() {
            format!("petrel-{}", self.name)
        } else {
            self.client_id.clone()
        }
    }

    /// The host and port of `address` (brackets of an IPv6 address removed).
    pub fn host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.address.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        (!host.is_empty() && !host.contains(['[', ']', '/', ' '])).then_some((host, port))
    }

    fn check(&self, i: usize, earlier: &[BridgeConfig]) -> Result<(), Violation> {
        let key = |name: &str| KeyPath::root().key("bridges").index(i).key(name);
        let fail = |name: &str, message: String| {
            Err(Violation {
                key: key(name),
                message,
            })
        };
        if self.name.is_empty() {
            return fail("name", "is required".to_owned());
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return fail(
                "name",
                format!("{:?}: only letters, digits, \"-\" and \"_\"", self.name),
            );
        }
        if let Some(first) = earlier.iter().position(|b| b.name == self.name) {
            return fail(
                "name",
                format!("{:?} is already the name of bridges[{first}]", self.name),
            );
        }
        if self.address.is_empty() {
            return fail("address", "is required".to_owned());
        }
        if self.host_port().is_none() {
            return fail(
                "address",
                format!("{:?} is not \"host:port\"", self.address),
            );
        }
        if matches!(self.transport, BridgeTransport::Ws | BridgeTransport::Wss)
            && !self.path.starts_with('/')
        {
            return fail("path", "must start with \"/\"".to_owned());
        }
        if !self.transport.is_tls() {
            for (name, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
                ("server_name", self.server_name.is_some()),
            ] {
                if set {
                    return fail(
                        name,
                        format!(
                            "only for the tls and wss transports, not {}",
                            self.transport.as_str()
                        ),
                    );
                }
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            let missing = if self.cert.is_some() { "key" } else { "cert" };
            return fail(missing, "cert and key go together".to_owned());
        }
        if let Some(name) = &self.server_name {
            if tokio_rustls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return fail(
                    "server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                );
            }
        }
        if self.remote_client_id().len() > usize::from(u16::MAX) {
            return fail("client_id", "longer than 65535 bytes".to_owned());
        }
        if self.password.is_some() && self.password_file.is_some() {
            return fail(
                "password_file",
                "give password or password_file, not both".to_owned(),
            );
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if has_password && self.username.is_none() && self.version == BridgeVersion::V3_1_1 {
            return fail(
                "username",
                "MQTT 3.1.1 sends a password only with a user name".to_owned(),
            );
        }
        if self.keepalive.as_secs() > u64::from(u16::MAX) || self.keepalive.subsec_nanos() != 0 {
            return fail("keepalive", "whole seconds, at most 65535s".to_owned());
        }
        if self.session_expiry.as_secs() > u64::from(u32::MAX) {
            return fail("session_expiry", "at most 4294967295s".to_owned());
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("reconnect_delay", self.reconnect_delay),
        ] {
            if value.is_zero() {
                return fail(name, "must be greater than zero".to_owned());
            }
        }
        if self.reconnect_delay_max < self.reconnect_delay {
            return fail(
                "reconnect_delay_max",
                "must be at least reconnect_delay".to_owned(),
            );
        }
        if self.max_inflight == 0 {
            return fail("max_inflight", "must be 1 to 65535".to_owned());
        }
        if self.topics.is_empty() {
            return fail(
                "topics",
                "at least one [[bridges.topics]] table is required".to_owned(),
            );
        }
        for (t, topic) in self.topics.iter().enumerate() {
            let key = |name: &str| key("topics").index(t).key(name);
            let fail = |name: &str, message: String| {
                Err(Violation {
                    key: key(name),
                    message,
                })
            };
            if topic.filter.is_empty() {
                return fail("filter", "is required".to_owned());
            }
            if topic.filter.starts_with("$share/") {
                return fail(
                    "filter",
                    "a bridge cannot take a shared subscription".to_owned(),
                );
            }
            if let Err(e) = petrel_codec::TopicFilter::new(&topic.filter) {
                return fail("filter", format!("{:?}: {e}", topic.filter));
            }
            if topic.prefix.contains(['+', '#', '\0']) {
                return fail(
                    "prefix",
                    format!("{:?}: no wildcards in a topic prefix", topic.prefix),
                );
            }
            if topic.qos > 2 {
                return fail("qos", format!("{} is not 0, 1 or 2", topic.qos));
            }
        }
        Ok(())
    }
}

/// The `[admin]` table: the HTTP listener for operators.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "an [admin] table")]
pub struct AdminConfig {
    /// Whether the operations listener runs at all.
    pub enabled: bool,
    /// `IP:port` of the HTTP listener: `/metrics` (Prometheus), `/healthz`,
    /// `/readyz`, the JSON API under `/api/v1` and the dashboard at `/`.
    /// Loopback by default; in a container, bind "0.0.0.0:9183" and set a
    /// token.
    #[serde(serialize_with = "serialize_display")]
    pub bind: SocketAddr,
    /// Bearer token the JSON API and the dashboard require
    /// (`Authorization: Bearer ...`); no white space. Empty, with no
    /// `token_file`: a random token is made at each start and logged.
    pub token: String,
    /// A file whose first line is the token, to keep it out of the
    /// configuration file. Give `token` or `token_file`, not both.
    pub token_file: Option<PathBuf>,
    /// Whether `/metrics` requires the token too (Prometheus then needs it
    /// as its bearer token).
    pub metrics_require_token: bool,
    /// HTTP connections the admin listener serves at once; further ones
    /// wait in the kernel's backlog (holding no descriptor of petrel's).
    /// Counted out of the descriptors left for MQTT clients (see
    /// `reserved_descriptors`).
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the
    /// request is awaited: from accept, and after each response on a
    /// kept-alive connection (so it is also the idle time allowed between
    /// requests).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub header_timeout: Duration,
    /// A connection on which nothing is read or written for this long is
    /// closed, whatever it is doing (a body that trickles in, a response
    /// that is not read).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub idle_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9183)),
            token: String::new(),
            token_file: None,
            metrics_require_token: false,
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The `[storage]` table: what survives a restart, and how.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a [storage] table")]
pub struct StorageConfig {
    /// "disk": persistent sessions (with their subscriptions, queued and
    /// in-flight QoS 1/2 messages) and retained messages are kept in `dir`
    /// and restored at start. "memory": nothing is kept; a restart starts
    /// empty.
    pub mode: StorageMode,
    /// Directory of the disk store; created if missing. Relative paths are
    /// relative to the working directory. `--check-config` checks that petrel
    /// can create files there (or create it). Every record is checksummed and
    /// verified at start: a damaged store (a journal or segment byte changed,
    /// a record that does not decode) stops the start naming the file and
    /// offset or the record, and nothing in it is changed; only the unfinished
    /// last write of a crash is dropped (logged). `petrel store check DIR`
    /// lists the damage; `petrel store salvage DIR --into NEW_DIR` copies
    /// every record that reads into a new store.
    pub dir: PathBuf,
    /// When writes reach the disk: "always" (synced after every group
    /// commit: nothing acknowledged is lost even if the machine fails),
    /// "every_ms" (synced at most `fsync_interval` later: a machine failure
    /// loses that much) or "never" (left to the OS: survives a crash of
    /// petrel, not of the machine). QoS 1/2 messages are acknowledged once
    /// written, whatever the policy.
    pub fsync: FsyncPolicy,
    /// With `fsync = "every_ms"`: the longest a change waits for its sync.
    /// Must be greater than zero.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub fsync_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    #[default]
    Disk,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    Always,
    #[default]
    EveryMs,
    Never,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::Disk,
            dir: PathBuf::from("./petrel-data"),
            fsync: FsyncPolicy::EveryMs,
            fsync_interval: Duration::from_millis(100),
        }
    }
}

/// The `[auth]` table: who may connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "an [auth] table")]
pub struct AuthConfig {
    /// Whether a client that sends no user name may connect. With false,
    /// configure `[[auth.users]]`, `password_file`, `[auth.http]` or client
    /// certificates (`require_client_cert`), or no client could connect (an
    /// error). A network listener open to anonymous clients is warned about
    /// at start.
    pub allow_anonymous: bool,
    /// Users known from this file, one `[[auth.users]]` table each. A client
    /// that sends a user name must match one of them (or the password file,
    /// or the HTTP hook): by CONNECT password or by the MQTT 5
    /// SCRAM-SHA-256 exchange.
    pub users: Vec<UserConfig>,
    /// A TOML file of topic rules (`[[rules]]`, each naming `user`,
    /// `client_id`, `certificate`, `anonymous = true` or `everyone = true`,
    /// with `access` = "publish", "subscribe" or "both" and `topics`, filters
    /// where `%u` is the user name and `%c` the client id). What no rule
    /// allows is denied. Unset: every client may publish and subscribe to
    /// every topic, except publishing under `$SYS`. The file may also bind
    /// client ids to logins (`[[client_ids]]` with `client_id` and any of
    /// `users`, `certificates`, `anonymous = true`): only those logins may
    /// connect with a bound id, they may open each other's sessions under it,
    /// and a `client_id` rule needs its id bound (a client id alone proves
    /// nothing). Whatever the file says, a session belongs to the login that
    /// made it: another login's CONNECT with its client id is refused (0x87).
    pub acl_file: Option<PathBuf>,
    /// A file of `user:hash` lines, kept with `petrel passwd FILE USER`:
    /// PHC strings, argon2id as petrel writes them, or pbkdf2-sha512 and
    /// bcrypt hashes moved from other brokers.
    pub password_file: Option<PathBuf>,
    /// Failed logins one client address may make in a minute; past it, that
    /// address's logins are refused (not authorized) without checking a
    /// password. An attempt counts from the moment it is checked (and is
    /// given back if it succeeds), so that many at once cannot exceed it.
    pub max_failed_logins: u32,
    /// Bytes of memory all password hash checks running at once may use,
    /// broker-wide: what logins from clients that are not yet authenticated
    /// can cost. An argon2id check is charged its memory parameter and a
    /// quarter more (24 MiB at petrel's 19 MiB), so the default runs two at
    /// once; bcrypt and pbkdf2 checks are charged 1 MiB each. A hash that
    /// needs more than this runs alone.
    pub hash_memory: u64,
    /// Logins waiting for a password hash check or running one, broker-wide.
    /// Past it a login is refused as server busy (MQTT 5 0x89, 3.1.1 return
    /// code 3) without checking anything.
    pub max_pending_logins: usize,
    /// Logins from one client address (IPv4, or IPv6 /64) waiting for a
    /// password hash check or running one. Past it that address's logins are
    /// refused as server busy, so a flood from one address leaves room for
    /// the others. Raise it when many clients log in at once from behind
    /// one NAT address.
    pub max_pending_logins_per_address: u32,
    /// An HTTP service that decides on user names petrel does not know
    /// (neither in `[[auth.users]]` nor in the password file). A JSON object
    /// with CONNECT's `client_id`, `username` and `password`, the client's
    /// address (`peer`) and its `certificate_identity` (or null) is POSTed to
    /// `url`; 2xx admits, 401/403 refuse, and any other answer, an error or
    /// no answer within `timeout` refuses too (and is logged).
    pub http: Option<HttpAuthConfig>,
}

/// `[auth.http]`: the authentication hook. CONNECT's credentials are POSTed
/// as JSON; 2xx admits, 401/403 refuse, and any other answer, an error or
/// no answer in time refuses too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "an [auth.http] table")]
pub struct HttpAuthConfig {
    /// Where credentials are POSTed: an http:// or https:// URL. Required
    /// when the table is present (the empty default is refused).
    pub url: String,
    /// How long an answer may take; past it the login is refused. Greater
    /// than zero; the client's connect deadline bounds it too.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Duration,
    /// How long an answer is remembered, keyed by a digest of the
    /// credentials; "0s" asks the service every time.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub cache_ttl: Duration,
    /// Answers remembered at most. When it is full, expired answers are
    /// dropped, and if none has expired the cache starts over. 0 remembers
    /// none.
    pub cache_size: usize,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            url: String::new(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(60),
            cache_size: 10_000,
        }
    }
}

/// One `[[auth.users]]` entry: a name and exactly one of `password` (kept only
/// as SCRAM keys derived at start) or `scram_sha256` (keys derived elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a [[auth.users]] table")]
pub struct UserConfig {
    /// The user name clients log in with; not empty, unique.
    pub name: String,
    /// The password, in clear text in this file; petrel keeps only salted
    /// SCRAM keys derived from it at start. Give this or `scram_sha256`.
    #[serde(default)]
    pub password: Option<String>,
    /// SCRAM-SHA-256 keys derived elsewhere, so the file holds no password:
    /// "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>", base64.
    /// Give this or `password`.
    #[serde(default)]
    pub scram_sha256: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: true,
            users: Vec::new(),
            acl_file: None,
            password_file: None,
            max_failed_logins: 10,
            hash_memory: 64 * 1024 * 1024,
            max_pending_logins: 64,
            max_pending_logins_per_address: 1,
            http: None,
        }
    }
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[listeners]] table")]
pub struct ListenerConfig {
    /// The transport: "tcp", "tls" (TLS 1.2/1.3, ALPN "mqtt"), "ws"
    /// (WebSocket), "wss" (WebSocket over TLS) or "unix" (Unix domain
    /// socket). Every listener serves MQTT 3.1, 3.1.1 and 5.0.
    pub protocol: ListenerProtocol,
    /// `IP:port` to listen on: "0.0.0.0:1883" or "[::]:1883" for every
    /// interface. Host names are not resolved. Port 0 picks a free port.
    /// Ignored by unix listeners.
    #[serde(
        deserialize_with = "deserialize_socket_addr",
        serialize_with = "serialize_display"
    )]
    pub bind: SocketAddr,
    /// From accept until a complete CONNECT has been read (PROXY header, TLS
    /// handshake and WebSocket upgrade included); past it the connection is
    /// closed. Bounds how long a silent or slow peer holds a connection slot
    /// before it is known who it is. Greater than zero. After CONNECT only
    /// the keep alive (1.5 × the client's) applies.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub connect_timeout: Duration,
    /// Open connections on this listener. Past it, new clients wait in the
    /// kernel's accept backlog until a slot frees, so file descriptors and
    /// per-connection memory stay bounded.
    pub max_connections: usize,
    /// Connections of the server-wide total (`max_connections` at the top,
    /// as lowered to fit the descriptors) kept for this listener alone (at
    /// most its own `max_connections`): a flood on another listener cannot
    /// take them. The rest of the total is shared, first come first served.
    /// Reserves that together exceed the total are each held to an equal
    /// part of it.
    pub reserved_connections: usize,
    /// Length of the kernel's queue of connections not yet accepted. A burst
    /// of reconnects larger than this makes clients wait for a SYN retry
    /// (about 1 s); the kernel may cap it (net.core.somaxconn).
    pub backlog: u32,
    /// Optional, greater than zero and at most `connect_timeout`: from accept
    /// until the transport is ready (PROXY header, TLS handshake, WebSocket
    /// upgrade). Unset: only `connect_timeout` applies.
    #[serde(
        deserialize_with = "deserialize_optional_duration",
        serialize_with = "serialize_optional_duration"
    )]
    pub handshake_timeout: Option<Duration>,
    /// ws and wss: the HTTP path of the WebSocket upgrade; starts with "/".
    pub path: String,
    /// tls and wss (required there): PEM certificate chain, leaf first. The
    /// file is read again on SIGHUP and when it changes; a broken new one is
    /// logged and the old one stays in service.
    pub cert: Option<PathBuf>,
    /// tls and wss (required there): PEM private key of `cert` (PKCS#8,
    /// PKCS#1 or SEC1; RSA, ECDSA or Ed25519). Reloaded with `cert`.
    pub key: Option<PathBuf>,
    /// tls and wss: PEM CA certificates that client certificates are checked
    /// against (mutual TLS). Unset: no client certificate is asked for. A
    /// verified certificate is a login, its identity (`cert_identity`) the
    /// user name in topic rules.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients that present no certificate.
    pub require_client_cert: bool,
    /// What names a client with a verified certificate: "cn" (subject common
    /// name), "san" (first DNS or e-mail subject alternative name) or
    /// "none" (the certificate is checked but names no one).
    pub cert_identity: CertIdentity,
    /// PROXY protocol (v1 and v2) header in front of the connection, as load
    /// balancers send it: "off", "optional" (used when present) or
    /// "required" (connections without one are refused). Only enable it
    /// behind a proxy you trust: the header sets the client address.
    pub proxy_protocol: ProxyProtocol,
    /// ws and wss: take the client address from `X-Forwarded-For` (only
    /// behind a reverse proxy you trust).
    pub trust_x_forwarded_for: bool,
    /// unix (required there): the socket's path. A socket file left by an
    /// earlier run is replaced (never another kind of file); the file is
    /// removed at stop.
    pub socket: Option<PathBuf>,
    /// unix: the socket file's permissions, octal as for chmod ("0660").
    /// Unset: as the process umask leaves them.
    pub socket_mode: Option<String>,
    /// New connections accepted per second from one client address (a short
    /// burst of as many is allowed); past it they are closed at once. 0 = no
    /// limit.
    pub max_connection_rate_per_ip: u32,
    /// Connections one client address may hold open on this listener at
    /// once; past it new ones are closed at once. 0 = no limit.
    pub max_connections_per_ip: u32,
}

/// What part of a verified client certificate names the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertIdentity {
    #[default]
    Cn,
    San,
    None,
}

impl CertIdentity {
    pub fn as_str(self) -> &'static str {
        match self {
            CertIdentity::Cn => "cn",
            CertIdentity::San => "san",
            CertIdentity::None => "none",
        }
    }
}

impl ProxyProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::Optional => "optional",
            ProxyProtocol::Required => "required",
        }
    }
}

/// Whether a listener expects a PROXY protocol header before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    Optional,
    Required,
}

/// How a listener speaks to its clients. An enum rather than a string so that
/// adding `tls`, `ws`, `wss` and `unix` later makes every `match` say where
/// they need handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// MQTT over plain TCP.
    #[default]
    Tcp,
    /// MQTT over TLS 1.2/1.3.
    Tls,
    /// MQTT over WebSocket (binary frames).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
    /// MQTT over a Unix domain socket.
    Unix,
}

/// The `[mqtt]` table: protocol limits, every one a bound on memory that a
/// client could otherwise grow without limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt] table")]
pub struct MqttConfig {
    /// Largest inbound packet in bytes, fixed header included. A larger one
    /// is refused from its header alone (MQTT 5: DISCONNECT 0x95) before its
    /// body is read. MQTT 5 clients are told it in CONNACK. In cluster mode
    /// it is held to what one NATS message carries (the servers'
    /// `max_payload` less 8 KiB).
    pub max_packet_size: u32,
    /// Largest packet accepted before the client is authenticated (its
    /// CONNECT, will payload, user name, password and properties included,
    /// and MQTT 5 AUTH packets during an exchange); the lower of this and
    /// `max_packet_size` applies. A larger CONNECT is refused from its fixed
    /// header (MQTT 5: CONNACK 0x95, Packet too large; MQTT 3.x: the
    /// connection is closed), so a client that has proved nothing cannot make
    /// the broker buffer a whole `max_packet_size`. Raise it for clients
    /// with larger wills. On WebSocket listeners it also bounds what a
    /// client may send before CONNECT beyond one message (pings, fragments),
    /// plus 64 KiB.
    pub max_connect_size: u32,
    /// Bytes of incomplete packets all connections together may hold while
    /// the rest arrives (the broker's read buffers, and PROXY headers and
    /// WebSocket messages being assembled before CONNECT). A connection
    /// that is not yet authenticated and would take the total past it is
    /// closed, so these are shed first. Authenticated clients with keep
    /// alive 0 (no deadline bounds how long they hold an incomplete packet)
    /// may take it to twice this and are closed past that; those with a
    /// keep alive are counted but not refused (their deadline bounds the
    /// time, `max_packet_size` the size).
    pub max_partial_input_total: usize,
    /// Outbound QoS 1/2 messages sent to one client and not yet acknowledged
    /// (also capped by an MQTT 5 client's own Receive Maximum). Further
    /// messages wait in the session queue.
    pub max_inflight: u16,
    /// QoS 1/2 messages one session may hold waiting, while its client is
    /// offline or its in-flight window is full. Past it, messages for an
    /// offline or stalled session are dropped as `queue_overflow` says and
    /// counted; a connected subscriber holds its publishers back instead
    /// (see `flow_control_timeout`).
    pub max_queued_messages: usize,
    /// Payload bytes one session may hold waiting, same policy. The byte
    /// bound matters as much as the count because payloads range up to
    /// `max_packet_size`.
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages all sessions together may hold waiting. Past it,
    /// messages for offline and stalled sessions are dropped (as
    /// `queue_overflow` says) and counted; connected subscribers keep their
    /// own bounds and flow control.
    pub max_queued_messages_total: usize,
    /// Payload bytes all sessions together may hold waiting, same policy
    /// (default 4 GiB).
    pub max_queued_bytes_total: usize,
    /// Longest topic name or filter accepted, in bytes (MQTT 5: 0x90 for a
    /// topic name, 0x8F for a filter).
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Subscriptions one client may hold; a SUBSCRIBE past it is refused
    /// (0x97 in MQTT 5, 0x80 in 3.1.1).
    pub max_subscriptions_per_client: usize,
    /// Retained messages the broker keeps. A PUBLISH that would set a new
    /// one past it is refused whole (PUBACK/PUBREC 0x97 in MQTT 5; in 3.1.1
    /// acknowledged and dropped) and counted; replacing or clearing one
    /// always works.
    pub max_retained_messages: usize,
    /// Topic and payload bytes of all retained messages together; a PUBLISH
    /// that would take them past it is refused the same way.
    pub max_retained_bytes: usize,
    /// Retained messages one client may have set (the last to set a topic
    /// holds it), a client being its login (user name or certificate
    /// identity; an anonymous one, its address), not a client id it could
    /// change; past it a new one is refused the same way. 0 = no per-client
    /// limit. Counted from when it is set (a reload that sets it counts what
    /// is set from then on).
    pub max_retained_per_client: usize,
    /// PUBLISH packets one client may send per second (a token bucket);
    /// 0 = no limit. Past it QoS 0 messages are dropped and QoS 1/2 slowed
    /// (the client is not read from until it is back under the rate).
    pub max_inbound_messages_per_second: u32,
    /// Payload bytes one client may publish per second, same policy; 0 = no
    /// limit.
    pub max_inbound_bytes_per_second: u32,
    /// Bytes of QoS 0 messages one connection may have waiting to be
    /// written. Same flow-control policy as the queue bounds.
    pub outbox_bytes: usize,
    /// Flow control: a publisher whose message fills a connected subscriber's
    /// queue (`max_queued_messages`, `max_queued_bytes`, `outbox_bytes`) is
    /// not read from until that queue drains to half, so nothing is dropped.
    /// A subscriber may hold its publishers back this long in total within
    /// `flow_control_window`, whether it reads nothing or only a trickle;
    /// then it is a slow consumer: it stops holding publishers up, and
    /// messages for it past its bounds are dropped (its queue's overflow
    /// policy) and counted until it catches up. "0s" never pauses publishers
    /// and drops at once.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub flow_control_timeout: Duration,
    /// The window `flow_control_timeout` is a budget within: hold time a
    /// subscriber used comes back at `flow_control_timeout` per window, so
    /// other subscribers of its publishers keep about (window - timeout) /
    /// window of their rate. At least `flow_control_timeout`.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub flow_control_window: Duration,
    /// Also disconnect a subscriber found slow (MQTT 5: DISCONNECT 0x97
    /// Quota exceeded) rather than only dropping what its queue cannot hold.
    pub slow_consumer_disconnect: bool,
    /// Longest accepted client identifier in bytes (see also
    /// `strict_v31_client_id`).
    pub max_client_id_len: u16,
    /// Whether retained messages are stored and delivered. Advertised to
    /// MQTT 5 clients (Retain Available). With false, an MQTT 5 client that
    /// publishes a retained message is disconnected (0x9A); for 3.x clients
    /// the retain flag is ignored.
    pub retain_available: bool,
    /// Whether a client that connects with an empty client id (and a clean
    /// session) gets a generated one (MQTT 5: Assigned Client Identifier)
    /// rather than being refused.
    pub allow_empty_client_id: bool,
    /// Cap on the keep alive an MQTT 5 client may ask for, in seconds: one
    /// asking for more, or for none (0), is told this one (Server Keep
    /// Alive). MQTT 3.x has no way to say so. 0 = no cap.
    pub max_keepalive: u16,
    /// MQTT 5 Receive Maximum: QoS 2 messages a client may have in flight to
    /// the broker, unreleased. A client past it is disconnected (0x93).
    pub receive_maximum: u16,
    /// MQTT 5 Topic Alias Maximum, both ways: aliases a client may set, and
    /// the most the broker uses towards a client. 0 turns aliases off.
    pub topic_alias_maximum: u16,
    /// Highest QoS accepted from publishers and granted to subscribers (0, 1
    /// or 2); advertised to MQTT 5 clients.
    pub maximum_qos: u8,
    /// Whether filters with `+` or `#` are accepted.
    pub wildcard_subscriptions: bool,
    /// Whether MQTT 5 Subscription Identifiers are accepted.
    pub subscription_identifiers: bool,
    /// Whether `$share/{group}/{filter}` subscriptions are served (to MQTT 5
    /// and 3.x clients alike).
    pub shared_subscriptions: bool,
    /// Longest MQTT 5 Session Expiry Interval granted, in seconds; a client
    /// asking for more gets this. 4294967295 = no cap (a session may be
    /// kept forever).
    pub max_session_expiry_interval: u32,
    /// Refuse (0x99) a message whose Payload Format Indicator says UTF-8 text
    /// when its payload is not.
    pub check_payload_format: bool,
    /// Response Information sent to MQTT 5 clients that ask for it: this
    /// prefix with the client id appended. "" sends none.
    pub response_information: String,
    /// Hold MQTT 3.1 (not 3.1.1) clients to client ids of 1 to 23
    /// characters, as that version requires.
    pub strict_v31_client_id: bool,
    /// What goes when an offline (or stalled) session's queue is full:
    /// "drop_newest" (the message arriving) or "drop_oldest" (the oldest
    /// queued).
    pub queue_overflow: QueueOverflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueOverflow {
    #[default]
    DropNewest,
    DropOldest,
}

/// Everything that can go wrong loading a config. Each variant's `Display`
/// reads `origin[:line]: [key: ]what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, has a key petrel does not know, or has a
    /// value of the wrong type or form. `key` is `None` for syntax errors and
    /// for unknown keys (whose message names the key and its table).
    #[error("{}", render(origin, *line, key.as_deref(), message))]
    Parse {
        origin: String,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// The document is well-formed but breaks a rule, e.g. a zero timeout or
    /// two listeners on the same address. `line` is the line of `key`, or of
    /// the nearest enclosing table when the key was left to its default.
    #[error("{}", render(origin, *line, Some(key), message))]
    Invalid {
        origin: String,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

fn render(origin: &str, line: Option<usize>, key: Option<&str>, message: &str) -> String {
    let line = line.map(|line| format!(":{line}")).unwrap_or_default();
    let key = key.map(|key| format!(": {key}")).unwrap_or_default();
    format!("{origin}{line}{key}: {message}")
}

const DEFAULT_BIND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1883));

/// The largest packet MQTT can express: a remaining length of at most
/// 268,435,455 (four variable-length bytes) plus the fixed header's type byte
/// and those four length bytes.
const MQTT_MAX_PACKET_SIZE: u64 = 268_435_455 + 5;

/// Below this not even a minimal CONNECT fits, so no client could connect.
const MIN_PACKET_SIZE: u64 = 16;

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: vec![ListenerConfig::default()],
            max_connections: 100_000,
            reserved_descriptors: 64,
            mqtt: MqttConfig::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            admin: None,
            sys_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            bridges: Vec::new(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            protocol: ListenerProtocol::Tcp,
            bind: DEFAULT_BIND,
            connect_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            reserved_connections: 32,
            backlog: 1024,
            handshake_timeout: None,
            path: "/mqtt".to_owned(),
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            cert_identity: CertIdentity::Cn,
            proxy_protocol: ProxyProtocol::Off,
            trust_x_forwarded_for: false,
            socket: None,
            socket_mode: None,
            max_connection_rate_per_ip: 0,
            max_connections_per_ip: 0,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            max_connect_size: 64 * 1024,
            max_partial_input_total: 32 * 1024 * 1024,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_queued_messages_total: 10_000_000,
            max_queued_bytes_total: 4 * 1024 * 1024 * 1024,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions_per_client: 10_000,
            max_retained_messages: petrel_engine::Limits::default().max_retained_messages,
            max_retained_bytes: petrel_engine::Limits::default().max_retained_bytes,
            max_retained_per_client: petrel_engine::Limits::default().max_retained_per_client,
            max_inbound_messages_per_second: 0,
            max_inbound_bytes_per_second: 0,
            outbox_bytes: 1024 * 1024,
            flow_control_timeout: Duration::from_secs(5),
            flow_control_window: petrel_engine::Limits::default().flow_control_window,
            slow_consumer_disconnect: petrel_engine::Limits::default().slow_consumer_disconnect,
            max_client_id_len: 65_535,
            retain_available: true,
            allow_empty_client_id: true,
            max_keepalive: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            maximum_qos: 2,
            wildcard_subscriptions: true,
            subscription_identifiers: true,
            shared_subscriptions: true,
            max_session_expiry_interval: u32::MAX,
            check_payload_format: true,
            response_information: "response/".to_owned(),
            strict_v31_client_id: true,
            queue_overflow: QueueOverflow::DropNewest,
        }
    }
}

impl ListenerConfig {
    /// The keys that depend on the transport: each only where it applies, and
    /// what a transport needs present and loadable (TLS files are read here so
    /// that `--check-config` catches a bad certificate).
    fn check_transport(&self, i: usize) -> Result<(), Violation> {
        let fail = |field: &str, message: String| {
            Err(Violation {
                key: listener_key(i, field),
                message,
            })
        };
        let p = self.protocol;
        let is_tls = matches!(p, ListenerProtocol::Tls | ListenerProtocol::Wss);
        let is_ws = matches!(p, ListenerProtocol::Ws | ListenerProtocol::Wss);
        if let Some(h) = self.handshake_timeout {
            if h.is_zero() || h > self.connect_timeout {
                return fail(
                    "handshake_timeout",
                    "must be greater than zero and at most connect_timeout".to_owned(),
                );
            }
        }
        for (field, set) in [
            ("cert", self.cert.is_some()),
            ("key", self.key.is_some()),
            ("client_ca", self.client_ca.is_some()),
            ("require_client_cert", self.require_client_cert),
        ] {
            if set && !is_tls {
                return fail(
                    field,
                    format!("applies only to tls and wss listeners, not {p}"),
                );
            }
        }
        if self.require_client_cert && self.client_ca.is_none() {
            return fail(
                "require_client_cert",
                "needs client_ca: the CA client certificates are checked against".to_owned(),
            );
        }
        if self.trust_x_forwarded_for && !is_ws {
            return fail(
                "trust_x_forwarded_for",
                format!("applies only to ws and wss listeners, not {p}"),
            );
        }
        if is_ws && !self.path.starts_with('/') {
            return fail("path", format!("must start with '/' (got {:?})", self.path));
        }
        match p {
            ListenerProtocol::Unix => {
                if self.socket.is_none() {
                    return fail("socket", "required for a unix listener".to_owned());
                }
                if let Some(mode) = &self.socket_mode {
                    if crate::listener::parse_mode(mode).is_none() {
                        return fail(
                            "socket_mode",
                            format!("{mode:?} is not an octal mode such as \"0660\""),
                        );
                    }
                }
            }
            _ => {
                for (field, set) in [
                    ("socket", self.socket.is_some()),
                    ("socket_mode", self.socket_mode.is_some()),
                ] {
                    if set {
                        return fail(field, format!("applies only to unix listeners, not {p}"));
                    }
                }
            }
        }
        if is_tls {
            if let Err(e) = crate::tls::TlsConfig::load(self) {
                return fail(e.key, e.message);
            }
        }
        Ok(())
    }
}

impl ListenerProtocol {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Tcp => "tcp",
            ListenerProtocol::Tls => "tls",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
            ListenerProtocol::Unix => "unix",
        }
    }
}

impl fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Config {
    /// Parses and validates a config document. `origin` names it in error
    /// messages, normally the file path.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let root = DeTable::parse(text).map_err(|err| syntax_error(text, origin, &err))?;
        let config = Config::deserialize(toml::de::Deserializer::from(root.clone()))
            .map_err(|err| deserialize_error(text, origin, root.get_ref(), &err))?;
        config.check().map_err(|violation| {
            let line =
                span_of(root.get_ref(), &violation.key).map(|span| line_at(text, span.start));
            violation.into_error(origin, line)
        })?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`. A missing file is an
    /// error: the caller asked for this file. Run with `Config::default()`
    /// when no file is given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Checks the rules that types alone do not enforce. [`from_toml_str`]
    /// calls it and adds line numbers; called directly on a config built in
    /// code, errors name the key but no file or line.
    ///
    /// [`from_toml_str`]: Config::from_toml_str
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check()
            .map_err(|violation| violation.into_error(BUILT_IN_ORIGIN, None))
    }

    fn check(&self) -> Result<(), Violation> {
        if self.listeners.is_empty() {
            return Err(Violation {
                key: KeyPath::root().key("listeners"),
                message: "at least one listener is required".to_owned(),
            });
        }
        for (i, bridge) in self.bridges.iter().enumerate() {
            bridge.check(i, &self.bridges[..i])?;
        }
        self.cluster.check()?;
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.connect_timeout.is_zero() {
                return Err(Violation {
                    key: listener_key(i, "connect_timeout"),
                    message: "must be greater than zero".to_owned(),
                });
            }
            listener.check_transport(i)?;
            // Port 0 asks the OS for a fresh port on every bind, so several
            // listeners on `127.0.0.1:0` do not collide. A unix listener has no
            // address (its socket path is checked with the transport).
            if listener.bind.port() == 0 || listener.protocol == ListenerProtocol::Unix {
                continue;
            }
            if let Some(first) = self.listeners[..i]
                .iter()
                .position(|l| l.bind == listener.bind)
            {
                return Err(Violation {
                    key: listener_key(i, "bind"),
                    message: format!(
                        "address {} is already used by listeners[{first}]",
                        listener.bind
                    ),
                });
            }
        }
        self.check_auth()?;
        if let Some(admin) = self.admin.as_ref().filter(|a| a.enabled) {
            let key = |name: &str| KeyPath::root().key("admin").key(name);
            if let Some(i) = self
                .listeners
                .iter()
                .position(|l| l.protocol != ListenerProtocol::Unix && l.bind == admin.bind)
                .filter(|_| admin.bind.port() != 0)
            {
                return Err(Violation {
                    key: key("bind"),
                    message: format!("address {} is already used by listeners[{i}]", admin.bind),
                });
            }
            if admin.token.chars().any(char::is_whitespace) {
                return Err(Violation {
                    key: key("token"),
                    message: "may not contain white space".to_owned(),
                });
            }
            if !admin.token.is_empty() && admin.token_file.is_some() {
                return Err(Violation {
                    key: key("token_file"),
                    message: "give token or token_file, not both".to_owned(),
                });
            }
            for (name, value) in [
                ("header_timeout", admin.header_timeout),
                ("idle_timeout", admin.idle_timeout),
            ] {
                if value.is_zero() {
                    return Err(Violation {
                        key: key(name),
                        message: "must be greater than zero".to_owned(),
                    });
                }
            }
        }
        if self.mqtt.flow_control_window < self.mqtt.flow_control_timeout
            || self.mqtt.flow_control_window.is_zero()
        {
            return Err(Violation {
                key: KeyPath::root().key("mqtt").key("flow_control_window"),
                message: "must be greater than zero and at least flow_control_timeout".to_owned(),
            });
        }
        if self.storage.fsync == FsyncPolicy::EveryMs && self.storage.fsync_interval.is_zero() {
            return Err(Violation {
                key: KeyPath::root().key("storage").key("fsync_interval"),
                message: "must be greater than zero".to_owned(),
            });
        }
        for (key, value, bounds) in self.numeric_settings() {
            if !bounds.contains(value) {
                return Err(Violation {
                    message: format!("{} (got {value})", bounds.describe()),
                    key,
                });
            }
        }
        Ok(())
    }

    fn check_auth(&self) -> Result<(), Violation> {
        let auth = &self.auth;
        let user_key =
            |i: usize, field: &str| KeyPath::root().key("auth").key("users").index(i).key(field);
        if let Some(http) = &auth.http {
            let key = |name: &str| KeyPath::root().key("auth").key("http").key(name);
            if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
                return Err(Violation {
                    key: key("url"),
                    message: format!("{:?} is not an http:// or https:// URL", http.url),
                });
            }
            if http.timeout.is_zero() {
                return Err(Violation {
                    key: key("timeout"),
                    message: "must be greater than zero".to_owned(),
                });
            }
        }
        let certificate_logins = self.listeners.iter().any(|l| l.require_client_cert);
        if !auth.allow_anonymous
            && auth.users.is_empty()
            && auth.password_file.is_none()
            && auth.http.is_none()
            && !certificate_logins
        {
            return Err(Violation {
                key: KeyPath::root().key("auth").key("allow_anonymous"),
                message: "is false but no [[auth.users]], password_file or client \
                          certificates are configured: no client could connect"
                    .to_owned(),
            });
        }
        for (i, user) in auth.users.iter().enumerate() {
            if user.name.is_empty() {
                return Err(Violation {
                    key: user_key(i, "name"),
                    message: "must not be empty".to_owned(),
                });
            }
            if let Some(first) = auth.users[..i].iter().position(|u| u.name == user.name) {
                return Err(Violation {
                    key: user_key(i, "name"),
                    message: format!(
                        "user {:?} is already defined by auth.users[{first}]",
                        user.name
                    ),
                });
            }
            match (&user.password, &user.scram_sha256) {
                (Some(_), None) => {}
                (None, Some(text)) => {
                    if let Err(why) = petrel_engine::scram::ScramCredentials::parse(text) {
                        return Err(Violation {
                            key: user_key(i, "scram_sha256"),
                            message: why,
                        });
                    }
                }
                _ => {
                    return Err(Violation {
                        key: user_key(i, "password"),
                        message: "give exactly one of password and scram_sha256".to_owned(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Every integer setting's allowed range as `(key, min, max)`, array
    /// indices written `[]` (`listeners[].backlog`); `max` is `None` where
    /// only the field's type limits the value. The configuration reference
    /// (docs/configuration.md) prints these, so the ranges it states are the
    /// ones validation applies.
    pub fn integer_ranges() -> Vec<(String, u64, Option<u64>)> {
        Config::default()
            .numeric_settings()
            .into_iter()
            .map(|(key, _, bounds)| (key.generic(), bounds.min, bounds.max))
            .collect()
    }

    /// Every integer setting with its allowed range. This list is the one
    /// place ranges are written down: validation walks it, and a parse error
    /// for an integer that does not even fit its field's type looks its key
    /// up here, so that `max_inflight = 0` and `max_inflight = 70000` get the
    /// same message.
    fn numeric_settings(&self) -> Vec<(KeyPath, u64, Bounds)> {
        let mut settings = vec![
            (
                KeyPath::root().key("max_connections"),
                as_u64(self.max_connections),
                Bounds::at_least(1),
            ),
            (
                KeyPath::root().key("reserved_descriptors"),
                as_u64(self.reserved_descriptors),
                Bounds::at_least(16),
            ),
            (
                KeyPath::root().key("auth").key("max_failed_logins"),
                u64::from(self.auth.max_failed_logins),
                Bounds::at_least(1),
            ),
            (
                KeyPath::root().key("auth").key("hash_memory"),
                self.auth.hash_memory,
                Bounds::at_least(1 << 20),
            ),
            (
                KeyPath::root().key("auth").key("max_pending_logins"),
                as_u64(self.auth.max_pending_logins),
                Bounds::at_least(1),
            ),
            (
                KeyPath::root()
                    .key("auth")
                    .key("max_pending_logins_per_address"),
                u64::from(self.auth.max_pending_logins_per_address),
                Bounds::at_least(1),
            ),
        ];
        settings.push((
            KeyPath::root().key("admin").key("max_connections"),
            as_u64(
                self.admin
                    .as_ref()
                    .map_or(AdminConfig::default().max_connections, |a| {
                        a.max_connections
                    }),
            ),
            Bounds::at_least(1),
        ));
        for (i, listener) in self.listeners.iter().enumerate() {
            settings.push((
                listener_key(i, "max_connections"),
                as_u64(listener.max_connections),
                Bounds::at_least(1),
            ));
            settings.push((
                listener_key(i, "backlog"),
                u64::from(listener.backlog),
                Bounds::between(1, 65_535),
            ));
        }
        let mqtt = &self.mqtt;
        let mqtt_key = |name| KeyPath::root().key("mqtt").key(name);
        settings.extend([
            (
                mqtt_key("max_packet_size"),
                u64::from(mqtt.max_packet_size),
                Bounds::between(MIN_PACKET_SIZE, MQTT_MAX_PACKET_SIZE),
            ),
            (
                mqtt_key("max_connect_size"),
                u64::from(mqtt.max_connect_size),
                Bounds::between(MIN_PACKET_SIZE, MQTT_MAX_PACKET_SIZE),
            ),
            (
                mqtt_key("max_partial_input_total"),
                as_u64(mqtt.max_partial_input_total),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_inflight"),
                u64::from(mqtt.max_inflight),
                Bounds::between(1, 65_535),
            ),
            (
                mqtt_key("max_queued_messages"),
                as_u64(mqtt.max_queued_messages),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_queued_bytes"),
                as_u64(mqtt.max_queued_bytes),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_queued_messages_total"),
                as_u64(mqtt.max_queued_messages_total),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_queued_bytes_total"),
                as_u64(mqtt.max_queued_bytes_total),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_topic_length"),
                as_u64(mqtt.max_topic_length),
                Bounds::between(1, 65_535),
            ),
            (
                mqtt_key("max_topic_levels"),
                as_u64(mqtt.max_topic_levels),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_subscriptions_per_client"),
                as_u64(mqtt.max_subscriptions_per_client),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_retained_messages"),
                as_u64(mqtt.max_retained_messages),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_retained_bytes"),
                as_u64(mqtt.max_retained_bytes),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_retained_per_client"),
                as_u64(mqtt.max_retained_per_client),
                Bounds::at_least(0),
            ),
            (
                mqtt_key("outbox_bytes"),
                as_u64(mqtt.outbox_bytes),
                Bounds::at_least(1),
            ),
            (
                mqtt_key("max_client_id_len"),
                u64::from(mqtt.max_client_id_len),
                Bounds::between(1, 65_535),
            ),
            (
                mqtt_key("max_keepalive"),
                u64::from(mqtt.max_keepalive),
                Bounds::between(0, 65_535),
            ),
            (
                mqtt_key("receive_maximum"),
                u64::from(mqtt.receive_maximum),
                Bounds::between(1, 65_535),
            ),
            (
                mqtt_key("topic_alias_maximum"),
                u64::from(mqtt.topic_alias_maximum),
                Bounds::between(0, 65_535),
            ),
            (
                mqtt_key("maximum_qos"),
                u64::from(mqtt.maximum_qos),
                Bounds::between(0, 2),
            ),
            (
                mqtt_key("max_session_expiry_interval"),
                u64::from(mqtt.max_session_expiry_interval),
                Bounds::between(0, u64::from(u32::MAX)),
            ),
        ]);
        settings
    }
}

/// A commented TOML document listing every key with its default value.
/// `petrel` can print it as a starting point for a config file; it parses
/// back to `Config::default()`.
pub fn default_config_toml() -> String {
    let defaults = Config::default();
    let mqtt = &defaults.mqtt;
    let mut out = String::from(
        "# petrel configuration.\n\
         # Every key is optional: the values below are the built-in defaults.\n\
         # Durations are written like \"500ms\", \"10s\" or \"1m\"; sizes are bytes.\n\
         # SIGHUP reloads [auth] (with its password and ACL files) and [mqtt];\n\
         # everything else takes effect at the next start. `petrel --check-config\n\
         # FILE` checks a file; docs/configuration.md describes every key.\n\
         \n\
         # Open connections across all listeners.\n\
         max_connections = {max_connections}\n\
         # Descriptors kept for all but client connections; connections get what\n\
         # RLIMIT_NOFILE leaves after these (max_connections is lowered to fit).\n\
         reserved_descriptors = {reserved_descriptors}\n\
         # How often the $SYS/broker/... topics are published; \"0s\" = never.\n\
         sys_interval = \"{sys_interval}\"\n\
         # On SIGTERM: time clients get to receive what is queued for them before\n\
         # DISCONNECT (MQTT 5: 0x8B, server shutting down); the store is flushed after.\n\
         shutdown_grace = \"{shutdown_grace}\"\n\
         \n\
         # One [[listeners]] table per socket that accepts clients. Without any,\n\
         # petrel listens on 127.0.0.1:1883; `listeners = []` is an error.\n\
         # Certificate files reload on SIGHUP and when they change.\n",
    )
    .replace("{max_connections}", &defaults.max_connections.to_string())
    .replace(
        "{reserved_descriptors}",
        &defaults.reserved_descriptors.to_string(),
    )
    .replace(
        "{sys_interval}",
        &humantime::format_duration(defaults.sys_interval).to_string(),
    )
    .replace(
        "{shutdown_grace}",
        &humantime::format_duration(defaults.shutdown_grace).to_string(),
    );
    for listener in &defaults.listeners {
        out.push_str(&format!(
            "[[listeners]]\n\
             # Transport: \"tcp\", \"tls\", \"ws\", \"wss\" or \"unix\".\n\
             protocol = \"{protocol}\"\n\
             # IP:port to listen on. \"0.0.0.0:1883\" or \"[::]:1883\" for all interfaces.\n\
             bind = \"{bind}\"\n\
             # Time a client has, from accept, to send a complete CONNECT.\n\
             connect_timeout = \"{timeout}\"\n\
             # Open connections on this listener; further ones wait in the backlog.\n\
             max_connections = {max_connections}\n\
             # Connections of the server-wide total only this listener may use.\n\
             reserved_connections = {reserved}\n\
             # Connections the kernel queues before petrel accepts them (1 to 65535).\n\
             backlog = {backlog}\n\
             # New connections per second from one address; 0 = no limit.\n\
             max_connection_rate_per_ip = {rate}\n\
             # Connections one address may hold open at once; 0 = no limit.\n\
             max_connections_per_ip = {per_ip}\n\
             # PROXY protocol v1/v2 header first: \"off\", \"optional\" or \"required\".\n\
             proxy_protocol = \"{proxy}\"\n\
             # Optional, at most connect_timeout: time for the PROXY header, TLS\n\
             # handshake and WebSocket upgrade alone.\n\
             # handshake_timeout = \"5s\"\n\
             # ws and wss: the HTTP path of the WebSocket upgrade.\n\
             path = \"{path}\"\n\
             # ws and wss: take the client address from X-Forwarded-For (only behind\n\
             # a proxy you trust).\n\
             trust_x_forwarded_for = {xff}\n\
             # tls and wss: PEM certificate chain and private key; client_ca (PEM)\n\
             # turns on mutual TLS.\n\
             # cert = \"certs/server.pem\"\n\
             # key = \"certs/server.key\"\n\
             # client_ca = \"certs/ca.pem\"\n\
             # With client_ca: refuse clients without a certificate.\n\
             require_client_cert = {require}\n\
             # What names a client with a verified certificate: \"cn\", \"san\" or \"none\".\n\
             cert_identity = \"{identity}\"\n\
             # unix: the socket's path and permissions.\n\
             # socket = \"/run/petrel/mqtt.sock\"\n\
             # socket_mode = \"0660\"\n\
             \n",
            protocol = listener.protocol,
            bind = listener.bind,
            timeout = humantime::format_duration(listener.connect_timeout),
            max_connections = listener.max_connections,
            reserved = listener.reserved_connections,
            backlog = listener.backlog,
            rate = listener.max_connection_rate_per_ip,
            per_ip = listener.max_connections_per_ip,
            proxy = listener.proxy_protocol.as_str(),
            path = listener.path.escape_default(),
            xff = listener.trust_x_forwarded_for,
            require = listener.require_client_cert,
            identity = listener.cert_identity.as_str(),
        ));
    }
    out.push_str(&format!(
        "# Protocol limits. SIGHUP reloads them: new connections and messages\n\
         # follow the new values.\n\
         [mqtt]\n\
         # Largest inbound packet in bytes, header included ({MIN_PACKET_SIZE} to {MQTT_MAX_PACKET_SIZE}).\n\
         max_packet_size = {max_packet_size}\n\
         # Largest packet before the client is authenticated: a larger CONNECT\n\
         # (will payload included) is refused from its header (MQTT 5: 0x95).\n\
         max_connect_size = {max_connect_size}\n\
         # Bytes of incomplete packets all connections may hold together; past\n\
         # it, connections not yet authenticated are closed.\n\
         max_partial_input_total = {max_partial_input_total}\n\
         # Unacknowledged outbound QoS 1/2 messages per client (1 to 65535).\n\
         max_inflight = {max_inflight}\n\
         # QoS 1/2 messages a session may hold while its client is offline or\n\
         # its in-flight window is full. An offline session drops messages past\n\
         # it; for a connected one, see flow_control_timeout.\n\
         max_queued_messages = {max_queued_messages}\n\
         # Payload bytes a session may hold queued.\n\
         max_queued_bytes = {max_queued_bytes}\n\
         # QoS 1/2 messages and payload bytes all sessions together may hold;\n\
         # past them, messages for offline and stalled sessions are dropped.\n\
         max_queued_messages_total = {max_queued_messages_total}\n\
         max_queued_bytes_total = {max_queued_bytes_total}\n\
         # Longest topic name or filter in bytes (1 to 65535), and most levels.\n\
         max_topic_length = {max_topic_length}\n\
         max_topic_levels = {max_topic_levels}\n\
         # Subscriptions one client may hold (SUBACK 0x97 past it).\n\
         max_subscriptions_per_client = {max_subscriptions_per_client}\n\
         # Retained messages kept, and their topic and payload bytes together;\n\
         # a PUBLISH that would set a new one past them is refused (0x97).\n\
         max_retained_messages = {max_retained_messages}\n\
         max_retained_bytes = {max_retained_bytes}\n\
         # Retained messages one login (anonymous: one address) may have set;\n\
         # 0 = no per-client limit.\n\
         max_retained_per_client = {max_retained_per_client}\n\
         # PUBLISH packets and payload bytes one client may send per second;\n\
         # 0 = no limit. Past them QoS 0 is dropped, QoS 1/2 slowed.\n\
         max_inbound_messages_per_second = {max_inbound_messages_per_second}\n\
         max_inbound_bytes_per_second = {max_inbound_bytes_per_second}\n\
         # Bytes of QoS 0 messages waiting to be written to one connection.\n\
         outbox_bytes = {outbox_bytes}\n\
         # A publisher that fills a connected subscriber's queue is not read\n\
         # from until the queue drains to half, so nothing is lost. A subscriber\n\
         # that holds its publishers this long in total within the window (reading\n\
         # nothing, or a trickle) is a slow consumer: it stops holding them up,\n\
         # and what does not fit its queue is dropped and counted. \"0s\" = drop\n\
         # at once. slow_consumer_disconnect also closes it (MQTT 5: 0x97).\n\
         flow_control_timeout = \"{flow_control_timeout}\"\n\
         flow_control_window = \"{flow_control_window}\"\n\
         slow_consumer_disconnect = {slow_consumer_disconnect}\n\
         # Longest client id in bytes (1 to 65535; MQTT 3.1 allowed 23).\n\
         max_client_id_len = {max_client_id_len}\n\
         # Store and deliver retained messages.\n\
         retain_available = {retain_available}\n\
         # Generate an id for a client that connects with an empty one and a\n\
         # clean session, instead of refusing it.\n\
         allow_empty_client_id = {allow_empty_client_id}\n\
         # Largest keep alive a client may ask for, in seconds; 0 = no cap.\n\
         max_keepalive = {max_keepalive}\n\
         # MQTT 5: QoS 2 messages a client may have in flight to the broker.\n\
         receive_maximum = {receive_maximum}\n\
         # MQTT 5: topic aliases allowed each way; 0 = none.\n\
         topic_alias_maximum = {topic_alias_maximum}\n\
         # Highest QoS accepted and granted (0 to 2).\n\
         maximum_qos = {maximum_qos}\n\
         # Accept subscriptions with + and # wildcards.\n\
         wildcard_subscriptions = {wildcard_subscriptions}\n\
         # Accept MQTT 5 subscription identifiers.\n\
         subscription_identifiers = {subscription_identifiers}\n\
         # Serve $share/{{group}}/{{filter}} shared subscriptions.\n\
         shared_subscriptions = {shared_subscriptions}\n\
         # Longest MQTT 5 session expiry interval granted, in seconds\n\
         # (4294967295 = no cap).\n\
         max_session_expiry_interval = {max_session_expiry_interval}\n\
         # Refuse messages marked as UTF-8 text whose payload is not UTF-8.\n\
         check_payload_format = {check_payload_format}\n\
         # Response Information prefix for MQTT 5 clients that ask (client id\n\
         # appended); \"\" = none.\n\
         response_information = \"{response_information}\"\n\
         # Hold MQTT 3.1 clients to 23-character client ids.\n\
         strict_v31_client_id = {strict_v31_client_id}\n\
         # When an offline session's queue is full: \"drop_newest\" or \"drop_oldest\".\n\
         queue_overflow = \"{queue_overflow}\"\n",
        max_packet_size = mqtt.max_packet_size,
        max_connect_size = mqtt.max_connect_size,
        max_partial_input_total = mqtt.max_partial_input_total,
        max_inflight = mqtt.max_inflight,
        max_queued_messages = mqtt.max_queued_messages,
        max_queued_bytes = mqtt.max_queued_bytes,
        max_queued_messages_total = mqtt.max_queued_messages_total,
        max_queued_bytes_total = mqtt.max_queued_bytes_total,
        max_topic_length = mqtt.max_topic_length,
        max_topic_levels = mqtt.max_topic_levels,
        max_subscriptions_per_client = mqtt.max_subscriptions_per_client,
        max_retained_messages = mqtt.max_retained_messages,
        max_retained_bytes = mqtt.max_retained_bytes,
        max_retained_per_client = mqtt.max_retained_per_client,
        max_inbound_messages_per_second = mqtt.max_inbound_messages_per_second,
        max_inbound_bytes_per_second = mqtt.max_inbound_bytes_per_second,
        outbox_bytes = mqtt.outbox_bytes,
        flow_control_timeout = humantime::format_duration(mqtt.flow_control_timeout),
        flow_control_window = humantime::format_duration(mqtt.flow_control_window),
        slow_consumer_disconnect = mqtt.slow_consumer_disconnect,
        max_client_id_len = mqtt.max_client_id_len,
        retain_available = mqtt.retain_available,
        allow_empty_client_id = mqtt.allow_empty_client_id,
        max_keepalive = mqtt.max_keepalive,
        receive_maximum = mqtt.receive_maximum,
        topic_alias_maximum = mqtt.topic_alias_maximum,
        maximum_qos = mqtt.maximum_qos,
        wildcard_subscriptions = mqtt.wildcard_subscriptions,
        subscription_identifiers = mqtt.subscription_identifiers,
        shared_subscriptions = mqtt.shared_subscriptions,
        max_session_expiry_interval = mqtt.max_session_expiry_interval,
        check_payload_format = mqtt.check_payload_format,
        response_information = mqtt.response_information.escape_default(),
        strict_v31_client_id = mqtt.strict_v31_client_id,
        queue_overflow = match mqtt.queue_overflow {
            QueueOverflow::DropNewest => "drop_newest",
            QueueOverflow::DropOldest => "drop_oldest",
        },
    ));
    let http = HttpAuthConfig::default();
    out.push_str(&format!(
        "\n# Who may connect. SIGHUP reloads this table (with the password and ACL\n\
         # files it names) without dropping connections.\n\
         [auth]\n\
         # Let clients that send no user name connect. Set to false, with users,\n\
         # a password file, [auth.http] or client certificates, to require a login.\n\
         allow_anonymous = {allow_anonymous}\n\
         # Failed logins one client address may make in a minute before its\n\
         # logins are refused without checking a password.\n\
         max_failed_logins = {max_failed_logins}\n\
         # Bytes all password hash checks running at once may use (an argon2id\n\
         # check is charged 24 MiB), and how many logins may wait for one or run one,\n\
         # broker-wide and per client address; past them, logins are refused as\n\
         # server busy.\n\
         hash_memory = {hash_memory}\n\
         max_pending_logins = {max_pending_logins}\n\
         max_pending_logins_per_address = {max_pending_logins_per_address}\n\
         # A file of user:hash lines (argon2id written by `petrel passwd FILE USER`;\n\
         # pbkdf2-sha512 and bcrypt hashes from other brokers are accepted too).\n\
         # password_file = \"passwords\"\n\
         # Topic authorization: a TOML file of [[rules]], each naming one of\n\
         # user, client_id, certificate, anonymous = true or everyone = true,\n\
         # with access = \"publish\" | \"subscribe\" | \"both\" and topics = [filters]\n\
         # (%u: user name, %c: client id). What no rule allows is denied. Unset:\n\
         # everything is allowed but publishing to $SYS.\n\
         # acl_file = \"acl.toml\"\n\
         # An HTTP service for user names petrel does not know: CONNECT's\n\
         # credentials are POSTed as JSON; 2xx admits, 401/403 refuse, and\n\
         # anything else (or no answer within timeout) refuses. Answers are\n\
         # remembered for cache_ttl (\"0s\": not at all), cache_size at most.\n\
         # [auth.http]\n\
         # url = \"http://127.0.0.1:8080/mqtt/auth\"\n\
         # timeout = \"{http_timeout}\"\n\
         # cache_ttl = \"{http_cache_ttl}\"\n\
         # cache_size = {http_cache_size}\n\
         # Known users, one [[auth.users]] table each: a client that sends a user\n\
         # name must match one, by CONNECT password or by the MQTT 5\n\
         # SCRAM-SHA-256 exchange. Each has a password (kept only as salted keys)\n\
         # or, so that this file holds no password, scram_sha256 keys made\n\
         # elsewhere (\"SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>\").\n\
         # [[auth.users]]\n\
         # name = \"alice\"\n\
         # password = \"change me\"\n\
         # Or, instead of password:\n\
         # scram_sha256 = \"SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>\"\n",
        allow_anonymous = defaults.auth.allow_anonymous,
        max_failed_logins = defaults.auth.max_failed_logins,
        hash_memory = defaults.auth.hash_memory,
        max_pending_logins = defaults.auth.max_pending_logins,
        max_pending_logins_per_address = defaults.auth.max_pending_logins_per_address,
        http_timeout = humantime::format_duration(http.timeout),
        http_cache_ttl = humantime::format_duration(http.cache_ttl),
        http_cache_size = http.cache_size,
    ));
    out.push_str(&format!(
        "\n[storage]\n\
         # \"disk\": persistent sessions, their subscriptions and retained messages\n\
         # survive a restart (kept in dir). \"memory\": a restart starts empty.\n\
         mode = \"{mode}\"\n\
         # A damaged store stops the start; `petrel store check DIR` lists the damage,\n\
         # `petrel store salvage DIR --into NEW_DIR` copies what reads.\n\
         dir = \"{dir}\"\n\
         # When writes reach the disk: \"always\" (after every change; survives a\n\
         # machine failure), \"every_ms\" (within fsync_interval), \"never\" (left to\n\
         # the OS: survives a crash of petrel, not of the machine).\n\
         fsync = \"{fsync}\"\n\
         fsync_interval = \"{interval}\"\n",
        mode = match defaults.storage.mode {
            StorageMode::Disk => "disk",
            StorageMode::Memory => "memory",
        },
        dir = defaults.storage.dir.display().to_string().escape_default(),
        fsync = match defaults.storage.fsync {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EveryMs => "every_ms",
            FsyncPolicy::Never => "never",
        },
        interval = humantime::format_duration(defaults.storage.fsync_interval),
    ));
    let admin = AdminConfig::default();
    out.push_str(&format!(
        "\n# The operations listener: /metrics (Prometheus), /healthz, /readyz, the\n\
         # JSON API under /api/v1 and the dashboard at /. Without this table it runs\n\
         # on 127.0.0.1:9183 when that port is free; with it, as set here, and a\n\
         # failure to bind stops the start.\n\
         [admin]\n\
         enabled = {enabled}\n\
         bind = \"{bind}\"\n\
         # Bearer token the JSON API and dashboard require. Empty (and no\n\
         # token_file): a random token is made at each start and logged.\n\
         token = \"\"\n\
         # Or read it from the first line of a file:\n\
         # token_file = \"/etc/petrel/admin-token\"\n\
         # Require the token on /metrics too.\n\
         metrics_require_token = {metrics_require_token}\n\
         # HTTP connections served at once (out of the descriptors MQTT does not\n\
         # get); time for a request's headers (and idle time between requests);\n\
         # time a connection may move no byte at all.\n\
         max_connections = {max_connections}\n\
         header_timeout = \"{header_timeout}\"\n\
         idle_timeout = \"{idle_timeout}\"\n",
        enabled = admin.enabled,
        bind = admin.bind,
        metrics_require_token = admin.metrics_require_token,
        max_connections = admin.max_connections,
        header_timeout = humantime::format_duration(admin.header_timeout),
        idle_timeout = humantime::format_duration(admin.idle_timeout),
    ));
    let bridge = BridgeConfig::default();
    let topic = BridgeTopic::default();
    out.push_str(&format!(
        "\n# Bridges to other MQTT brokers, one [[bridges]] table each (none by\n\
         # default). Messages going out wait in the local session \"$bridge/<name>\"\n\
         # while the remote is unreachable.\n\
         # [[bridges]]\n\
         # name = \"cloud\"\n\
         # address = \"broker.example.com:8883\"\n\
         # \"tcp\", \"tls\", \"ws\" or \"wss\"; ws and wss use path.\n\
         # transport = \"{transport}\"\n\
         # path = \"{path}\"\n\
         # tls and wss: CA certificates (default: the built-in Mozilla roots), a\n\
         # client certificate, and the name the remote's certificate carries.\n\
         # ca_file = \"certs/ca.pem\"\n\
         # cert = \"certs/bridge.pem\"\n\
         # key = \"certs/bridge.key\"\n\
         # server_name = \"broker.example.com\"\n\
         # \"5.0\" or \"3.1.1\".\n\
         # version = \"{version}\"\n\
         # The client id at the remote; empty: \"petrel-<name>\".\n\
         # client_id = \"\"\n\
         # username = \"edge1\"\n\
         # password = \"secret\"\n\
         # password_file = \"/etc/petrel/bridge-password\"\n\
         # clean_start = {clean_start}\n\
         # session_expiry = \"{session_expiry}\"\n\
         # keepalive = \"{keepalive}\"\n\
         # connect_timeout = \"{connect_timeout}\"\n\
         # Backoff between attempts: doubles from reconnect_delay up to\n\
         # reconnect_delay_max, with jitter.\n\
         # reconnect_delay = \"{reconnect_delay}\"\n\
         # reconnect_delay_max = \"{reconnect_delay_max}\"\n\
         # Unacknowledged QoS 1/2 messages each way.\n\
         # max_inflight = {max_inflight}\n\
         # One [[bridges.topics]] table per rule. \"out\": local filter, remote\n\
         # prefix; \"in\": remote filter, local prefix.\n\
         # [[bridges.topics]]\n\
         # direction = \"{direction}\"\n\
         # filter = \"sensors/#\"\n\
         # prefix = \"\"\n\
         # qos = {qos}\n",
        transport = bridge.transport.as_str(),
        path = bridge.path.escape_default(),
        version = bridge.version.as_str(),
        clean_start = bridge.clean_start,
        session_expiry = humantime::format_duration(bridge.session_expiry),
        keepalive = humantime::format_duration(bridge.keepalive),
        connect_timeout = humantime::format_duration(bridge.connect_timeout),
        reconnect_delay = humantime::format_duration(bridge.reconnect_delay),
        reconnect_delay_max = humantime::format_duration(bridge.reconnect_delay_max),
        max_inflight = bridge.max_inflight,
        direction = topic.direction.as_str(),
        qos = topic.qos,
    ));
    let cluster = ClusterConfig::default();
    out.push_str(&format!(
        "\n# Cluster mode: petrel nodes sharing a NATS cluster (JetStream on) act as\n\
         # one broker. Off while nats is empty.\n\
         [cluster]\n\
         # The NATS servers, for example \"nats://10.0.0.1:4222\"; empty: one node.\n\
         nats = []\n\
         # Unique per node and kept across restarts; empty: the host name.\n\
         node_id = \"\"\n\
         # JetStream replicas (3 with a three-server NATS cluster).\n\
         replicas = {replicas}\n\
         connect_timeout = \"{connect_timeout}\"\n\
         heartbeat = \"{heartbeat}\"\n\
         node_timeout = \"{node_timeout}\"\n\
         stream_max_bytes = {stream_max_bytes}\n",
        replicas = cluster.replicas,
        connect_timeout = humantime::format_duration(cluster.connect_timeout),
        heartbeat = humantime::format_duration(cluster.heartbeat),
        node_timeout = humantime::format_duration(cluster.node_timeout),
        stream_max_bytes = cluster.stream_max_bytes,
    ));
    out
}

fn listener_key(index: usize, field: &str) -> KeyPath {
    KeyPath::root().key("listeners").index(index).key(field)
}

fn as_u64(value: usize) -> u64 {
    // usize is at most 64 bits on every platform Rust supports.
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// An inclusive range of allowed values for an integer setting.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: u64,
    /// `None`: no limit beyond the field's type.
    max: Option<u64>,
}

impl Bounds {
    fn at_least(min: u64) -> Self {
        Bounds { min, max: None }
    }

    fn between(min: u64, max: u64) -> Self {
        Bounds {
            min,
            max: Some(max),
        }
    }

    fn contains(self, value: u64) -> bool {
        value >= self.min && !matches!(self.max, Some(max) if value > max)
    }

    /// "must be between 1 and 65535", "must be at least 1".
    fn describe(self) -> String {
        format!("must be {}", self.range())
    }

    fn range(self) -> String {
        match self.max {
            Some(max) => format!("between {} and {max}", self.min),
            None => format!("at least {}", self.min),
        }
    }
}

/// A broken rule, before it is placed in a file.
struct Violation {
    key: KeyPath,
    message: String,
}

impl Violation {
    fn into_error(self, origin: &str, line: Option<usize>) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_owned(),
            line,
            key: self.key.to_string(),
            message: self.message,
        }
    }
}

/// A position in the document: `listeners[0].bind`, `mqtt.max_inflight`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    fn root() -> Self {
        KeyPath(Vec::new())
    }

    fn key(mut self, key: &str) -> Self {
        self.0.push(Segment::Key(key.to_owned()));
        self
    }

    fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }

    /// The path with array indices dropped, `listeners.max_connections`, to
    /// compare a key in the document with one in [`Config::numeric_settings`].
    fn without_indices(&self) -> KeyPath {
        KeyPath(
            self.0
                .iter()
                .filter(|segment| matches!(segment, Segment::Key(_)))
                .cloned()
                .collect(),
        )
    }

    /// The path with every array index written `[]`: `listeners[].backlog`.
    fn generic(&self) -> String {
        let mut out = String::new();
        for segment in &self.0 {
            match segment {
                Segment::Key(key) if out.is_empty() => out.push_str(key),
                Segment::Key(key) => {
                    out.push('.');
                    out.push_str(key);
                }
                Segment::Index(_) => out.push_str("[]"),
            }
        }
        out
    }

    /// Where an unknown key sits, for `unknown key 'x' in [mqtt]`.
    fn describe_table(&self) -> String {
        match self.0.last() {
            None => "at the top level".to_owned(),
            Some(Segment::Index(_)) => format!("in {self}"),
            Some(Segment::Key(_)) => format!("in [{self}]"),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// What an error span landed on.
enum Hit<'a> {
    /// A key: serde only complains about a key when it is unknown.
    Key,
    Value(&'a DeValue<'a>),
}

/// A syntax error from step 1. There is no key path yet, so quote the text
/// the parser stopped at (for "duplicate key" it is the key).
fn syntax_error(text: &str, origin: &str, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    let near = span
        .clone()
        .and_then(|span| text.get(span))
        .filter(|near| !near.is_empty() && near.len() <= 40 && !near.contains('\n'))
        .map(|near| format!(" at '{near}'"))
        .unwrap_or_default();
    ConfigError::Parse {
        origin: origin.to_owned(),
        line: span.map(|span| line_at(text, span.start)),
        key: None,
        message: format!("invalid TOML{near}: {}", one_line(err.message())),
    }
}

/// Turns a serde error from step 2 into `file:line: key: message`.
fn deserialize_error(
    text: &str,
    origin: &str,
    root: &DeTable<'_>,
    err: &toml::de::Error,
) -> ConfigError {
    let message = one_line(err.message());
    let Some(span) = err.span() else {
        return ConfigError::Parse {
            origin: origin.to_owned(),
            line: None,
            key: None,
            message,
        };
    };
    let line = Some(line_at(text, span.start));
    let Some((path, hit)) = find_at(root, span.start, KeyPath::root()) else {
        return ConfigError::Parse {
            origin: origin.to_owned(),
            line,
            key: None,
            message,
        };
    };
    let message = match hit {
        Hit::Key => {
            let mut table = path.clone();
            let name = match table.0.pop() {
                Some(segment @ Segment::Key(_)) => KeyPath(vec![segment]).to_string(),
                _ => path.to_string(),
            };
            // serde words it "unknown field `x`, expected one of `a`, `b`";
            // keep its list of expected keys and say which table we are in.
            let expected = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once("`, "))
                .map(|(_, expected)| format!(", {expected}"))
                .unwrap_or_default();
            return ConfigError::Parse {
                origin: origin.to_owned(),
                line,
                key: None,
                message: format!("unknown key '{name}' {}{expected}", table.describe_table()),
            };
        }
        // An integer in an integer field can only fail by not fitting the
        // field's type: say so with the setting's own range. Only a number
        // past i64 can overflow a field with no upper bound.
        Hit::Value(DeValue::Integer(raw)) => match bounds_for(&path) {
            Some(bounds) if bounds.max.is_none() && !raw.as_str().starts_with('-') => {
                format!("is too large (got {})", raw.as_str())
            }
            Some(bounds) => format!("{} (got {})", bounds.describe(), raw.as_str()),
            None => message,
        },
        // serde would say "expected u16": name the range instead.
        Hit::Value(other) => match bounds_for(&path) {
            Some(bounds) => {
                let found = other.type_str();
                let article = if found.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                format!(
                    "must be an integer {}, not {article} {found}",
                    bounds.range()
                )
            }
            None => message.replacen("unknown variant", "unknown value", 1),
        },
    };
    ConfigError::Parse {
        origin: origin.to_owned(),
        line,
        key: Some(path.to_string()),
        message,
    }
}

fn bounds_for(path: &KeyPath) -> Option<Bounds> {
    let wanted = path.without_indices();
    Config::default()
        .numeric_settings()
        .into_iter()
        .find(|(key, _, _)| key.without_indices() == wanted)
        .map(|(_, _, bounds)| bounds)
}

/// The deepest key or value whose span holds byte `pos`, and its path.
fn find_at<'a>(table: &'a DeTable<'a>, pos: usize, path: KeyPath) -> Option<(KeyPath, Hit<'a>)> {
    for (key, value) in table.iter() {
        let path = path.clone().key(key.get_ref());
        if holds(key.span(), pos) {
            return Some((path, Hit::Key));
        }
        if let Some(found) = find_in_value(value, pos, path) {
            return Some(found);
        }
    }
    None
}

fn find_in_value<'a>(
    value: &'a Spanned<DeValue<'a>>,
    pos: usize,
    path: KeyPath,
) -> Option<(KeyPath, Hit<'a>)> {
    // Children first: a table's span can cover its whole body.
    let inner = match value.get_ref() {
        DeValue::Table(table) => find_at(table, pos, path.clone()),
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_in_value(item, pos, path.clone().index(i))),
        _ => None,
    };
    inner.or_else(|| holds(value.span(), pos).then(|| (path, Hit::Value(value.get_ref()))))
}

fn holds(span: Range<usize>, pos: usize) -> bool {
    span.start <= pos && (pos < span.end || pos == span.start)
}

/// The span of `path` in the document: of its key where written, else of
/// the nearest enclosing entry that is (a key left to its default has no
/// line of its own; its table does).
fn span_of(root: &DeTable<'_>, path: &KeyPath) -> Option<Range<usize>> {
    let mut table = root;
    let mut items: Option<&[Spanned<DeValue<'_>>]> = None;
    let mut found = None;
    for segment in &path.0 {
        let value = match (segment, items) {
            (Segment::Key(name), None) => match table.get_key_value(name.as_str()) {
                Some((key, value)) => {
                    found = Some(key.span());
                    value
                }
                None => break,
            },
            (Segment::Index(index), Some(array)) => match array.get(*index) {
                Some(value) => {
                    found = Some(value.span());
                    value
                }
                None => break,
            },
            _ => break,
        };
        items = None;
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            DeValue::Array(array) => items = Some(array),
            _ => break,
        }
    }
    found
}

fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// toml's messages can span lines; an error line should not.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"10s\", \"500ms\" or \"1m\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text)
                .map_err(|err| E::custom(format!("invalid duration \"{text}\": {err}")))
        }
    }

    deserializer.deserialize_str(DurationVisitor)
}

fn deserialize_optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(deserializer).map(Some)
}

fn deserialize_socket_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    struct SocketAddrVisitor;

    impl Visitor<'_> for SocketAddrVisitor {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an \"IP:port\" string such as \"0.0.0.0:1883\" or \"[::]:1883\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
            text.parse().map_err(|_| {
                E::custom(format!(
                    "invalid address \"{text}\": expected IP:port such as \"0.0.0.0:1883\" \
                     or \"[::]:1883\" (host names are not resolved)"
                ))
            })
        }
    }

    deserializer.deserialize_str(SocketAddrVisitor)
}

/// The inverse of [`deserialize_duration`]: "10s", "100ms", "1m".
fn serialize_duration<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

fn serialize_optional_duration<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => {
            serializer.serialize_some(&humantime::format_duration(*duration).to_string())
        }
        None => serializer.serialize_none(),
    }
}

/// An address as the text [`deserialize_socket_addr`] reads, whatever the
/// format (serde's own impl writes a tuple for binary formats).
fn serialize_display<T: fmt::Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

#[cfg(test)]
mod tests;
