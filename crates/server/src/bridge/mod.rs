//! Bridges: this broker connects to another MQTT broker as a client and carries the messages
//! of configured topics each way (`[[bridges]]`).
//!
//! A bridge is two MQTT client connections and a relay between them:
//!
//! - **local**: an in-memory pipe (`tokio::io::duplex`) to this broker, driven by the same
//!   connection driver as any client, as the internal client `$bridge/<name>`
//!   ([`Connection::set_internal`]: no authenticator, no ACL, an id no client may take). Its
//!   session is persistent and never expires, and it subscribes to the `out` filters: while
//!   the remote is unreachable, messages going out queue there, durably and within the
//!   session bounds, exactly as for an offline client, and the session resends what was in
//!   flight when the link comes back;
//! - **remote**: TCP, TLS, WebSocket or WebSocket over TLS to the remote broker, MQTT 5.0 or
//!   3.1.1, subscribed to the `in` filters.
//!
//! The relay passes packets through with their packet ids: a PUBLISH from the local session
//! goes to the remote with the id the local broker gave it, and the remote's PUBACK / PUBREC /
//! PUBCOMP come back to the local session with the same id (and the same the other way). Each
//! side's flow control thus reaches the other: the local session sends at most as many
//! unacknowledged messages as the remote accepts, and a message is acknowledged to its source
//! only once its destination acknowledged it: no QoS 1/2 message is lost when either side
//! fails. Topics are rewritten by the first matching rule's prefix.
//!
//! Loops: the local subscriptions are No Local (what the bridge publishes here is not sent
//! back to it), and so are the remote ones (MQTT 5.0), or the 3.1.1 CONNECT carries the
//! bridge bit (protocol level | 0x80) that Mosquitto and petrel honour the same way.
//!
//! The relay never blocks on a write while data waits to be read: both sides are read and
//! written in one loop. Memory is bounded by the in-flight windows for QoS 1/2; QoS 0
//! messages past [`QOS0_BUFFER`] of unwritten output are dropped (and counted).

mod link;
mod transport;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_codec::{
    Connect, Disconnect, MqttString, Packet, PacketId, ProtocolVersion, PubAck, Publish, QoS,
    ReasonCode, RetainHandling, Subscribe, SubscriptionOptions, TopicFilter, TopicName,
};
use petrel_engine::connection::INTERNAL_CLIENT_PREFIX;
use petrel_engine::topic_index::filter_matches;
use petrel_engine::{Broker, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BridgeConfig, BridgeDirection, BridgeVersion};
use link::{ReadError, Reader, Writer};

/// Unwritten output past which QoS 0 messages are dropped rather than buffered.
pub const QOS0_BUFFER: usize = 1024 * 1024;

/// Size of the in-memory pipe to the local broker, each way.
const LOCAL_PIPE: usize = 64 * 1024;

/// A bridge's state, as metrics and the admin API show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Dialling the remote, or waiting before the next attempt.
    Connecting = 0,
    /// Connected: messages flow.
    Up = 1,
    /// Stopped with the server.
    Stopped = 2,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Stopped => "stopped",
        }
    }
}

/// What a bridge did, shared with metrics and the admin API.
#[derive(Debug)]
pub struct BridgeStatus {
    pub name: String,
    pub address: String,
    pub transport: &'static str,
    pub version: &'static str,
    /// The client id at the remote.
    pub remote_client_id: String,
    state: AtomicU8,
    /// Links established (CONNACK accepted).
    pub connects: AtomicU64,
    /// Connection attempts that failed, and links that ended other than by a stop.
    pub failures: AtomicU64,
    /// Messages carried to the remote (`out`) and from it (`in`).
    pub forwarded_out: AtomicU64,
    pub forwarded_in: AtomicU64,
    /// Messages dropped: QoS 0 past the output buffer, matching no rule (a subscription
    /// left from an earlier configuration), or too large for the other side.
    pub dropped: AtomicU64,
    /// Broker uptime (ms) when the current link came up; 0 while down.
    connected_at_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl BridgeStatus {
    fn new(config: &BridgeConfig) -> BridgeStatus {
        BridgeStatus {
            name: config.name.clone(),
            address: config.address.clone(),
            transport: config.transport.as_str(),
            version: config.version.as_str(),
            remote_client_id: config.remote_client_id(),
            state: AtomicU8::new(LinkState::Connecting as u8),
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            forwarded_out: AtomicU64::new(0),
            forwarded_in: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            connected_at_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn state(&self) -> LinkState {
        match self.state.load(Ordering::Relaxed) {
            1 => LinkState::Up,
            2 => LinkState::Stopped,
            _ => LinkState::Connecting,
        }
    }

    /// Broker uptime (ms) when the link came up, while it is up.
    pub fn connected_at_ms(&self) -> Option<u64> {
        let at = self.connected_at_ms.load(Ordering::Relaxed);
        (self.state() == LinkState::Up).then_some(at)
    }

    /// Why the last attempt or link failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The local session that queues what goes out.
    pub fn local_client_id(&self) -> String {
        local_client_id(&self.name)
    }

    fn set_state(&self, state: LinkState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    fn failed(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
    }
}

fn local_client_id(name: &str) -> String {
    format!("{INTERNAL_CLIENT_PREFIX}{name}")
}

/// A bridge ready to run: its configuration with the files it names read.
pub struct Bridge {
    config: BridgeConfig,
    password: Option<Bytes>,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    pub status: Arc<BridgeStatus>,
}

/// A bridge whose files could not be read, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("bridges[{index}] ({name}): {key}: {message}")]
pub struct BridgeError {
    pub index: usize,
    pub name: String,
    pub key: &'static str,
    pub message: String,
}

impl Bridge {
    /// Reads what `config` names (password file, certificates): a problem stops the start.
    pub fn prepare(index: usize, config: &BridgeConfig) -> Result<Bridge, BridgeError> {
        let error = |key: &'static str, message: String| BridgeError {
            index,
            name: config.name.clone(),
            key,
            message,
        };
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => Some(Bytes::from(p.clone().into_bytes())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| error("password_file", format!("{}: {e}", path.display())))?;
                Some(Bytes::from(
                    text.lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                        .into_bytes(),
                ))
            }
            (None, None) => None,
        };
        let tls = if config.transport.is_tls() {
            let cert_key = config.cert.as_deref().zip(config.key.as_deref());
            let tls = crate::tls::client_config(config.ca_file.as_deref(), cert_key)
                .map_err(|e| error(e.key, e.message))?;
            Some(Arc::new(tls))
        } else {
            None
        };
        Ok(Bridge {
            config: config.clone(),
            password,
            tls,
            status: Arc::new(BridgeStatus::new(config)),
        })
    }

    /// Runs the bridge until `stop`: connects, relays, and after a failure waits (exponential
    /// backoff with jitter) and connects again.
    pub async fn run(self, broker: Arc<Broker>, stop: CancellationToken, tracker: TaskTracker) {
        let config = &self.config;
        let status = &self.status;
        let mut delay = config.reconnect_delay;
        loop {
            status.set_state(LinkState::Connecting);
            let attempt = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout(config.connect_timeout, self.connect_remote(&broker)) => r,
            };
            match attempt {
                Ok(Ok(remote)) => {
                    let started = Instant::now();
                    status.connects.fetch_add(1, Ordering::Relaxed);
                    status
                        .connected_at_ms
                        .store(broker.uptime_ms(), Ordering::Relaxed);
                    status.set_state(LinkState::Up);
                    tracing::info!(bridge = %config.name, remote = %config.address, "bridge connected");
                    let ended = self.relay(remote, &broker, &stop, &tracker).await;
                    status.set_state(LinkState::Connecting);
                    match ended {
                        Ok(()) => break,
                        Err(why) => {
                            tracing::warn!(bridge = %config.name, remote = %config.address, error = %why, "bridge link lost");
                            status.failed(why);
                        }
                    }
                    // A link that held a while starts the backoff over.
                    if started.elapsed() >= config.reconnect_delay_max.min(Duration::from_secs(10))
                    {
                        delay = config.reconnect_delay;
                    }
                }
                Ok(Err(why)) => {
                    tracing::warn!(bridge = %config.name, remote = %config.address, error = %why, "bridge connection failed");
                    status.failed(why);
                }
                Err(_) => {
                    let why = format!("no CONNACK within {:?}", config.connect_timeout);
                    tracing::warn!(bridge = %config.name, remote = %config.address, error = %why, "bridge connection failed");
                    status.failed(why);
                }
            }
            let wait = jitter(delay);
            delay = (delay * 2).min(config.reconnect_delay_max);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        status.set_state(LinkState::Stopped);
    }

    /// Dials the remote and completes CONNECT / CONNACK.
    async fn connect_remote(&self, broker: &Broker) -> Result<Remote, String> {
        let config = &self.config;
        let stream = transport::dial(config, self.tls.clone())
            .await
            .map_err(|e| format!("{}: {e}", config.address))?;
        let version = match config.version {
            BridgeVersion::V5 => ProtocolVersion::V5,
            BridgeVersion::V3_1_1 => ProtocolVersion::V3_1_1,
        };
        let (mut reader, mut writer) = link::split(stream, version);
        let mut properties = petrel_codec::Properties::default();
        if version.is_v5() {
            properties.session_expiry_interval =
                Some(u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX));
            // What this side accepts in flight: the local session's own bound.
            let limits = broker.limits();
            properties.receive_maximum = Some(config.max_inflight.min(limits.receive_maximum));
            properties.maximum_packet_size = Some(limits.max_packet_size);
        }
        let connect = Connect {
            protocol: version,
            clean_start: config.clean_start,
            keep_alive: u16::try_from(config.keepalive.as_secs()).unwrap_or(u16::MAX),
            properties,
            client_id: MqttString::new(&config.remote_client_id())
                .map_err(|e| format!("client_id: {e}"))?,
            will: None,
            username: config
                .username
                .as_deref()
                .map(MqttString::new)
                .transpose()
                .map_err(|e| format!("username: {e}"))?,
            password: self.password.clone(),
            bridge: !version.is_v5(),
        };
        writer.queue(&Packet::Connect(Box::new(connect)));
        writer
            .write_all()
            .await
            .map_err(|e| format!("sending CONNECT: {e}"))?;
        let connack = match reader.packet().await {
            Ok(Packet::ConnAck(ack)) => ack,
            Ok(other) => return Err(format!("expected CONNACK, got {:?}", other.packet_type())),
            Err(e) => return Err(format!("waiting for CONNACK: {e}")),
        };
        if connack.reason != ReasonCode::SUCCESS {
            return Err(format!(
                "the remote refused the connection: {}",
                connack.reason
            ));
        }
        let props = &connack.properties;
        writer.max_packet = props.maximum_packet_size.unwrap_or(u32::MAX);
        Ok(Remote {
            reader,
            writer,
            receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
            maximum_qos: props.maximum_qos.map_or(QoS::ExactlyOnce, |q| {
                if q == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                }
            }),
            retain_available: props.retain_available != Some(0),
            session_present: connack.session_present,
            keep_alive: props
                .server_keep_alive
                .map_or(config.keepalive, |s| Duration::from_secs(u64::from(s))),
        })
    }

    /// Connects the local side and relays until the link fails (`Err` with why) or `stop`.
    async fn relay(
        &self,
        mut remote: Remote,
        broker: &Arc<Broker>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        let config = &self.config;
        let status = &self.status;
        // The local side: a client of this broker over an in-memory pipe.
        let (ours, theirs) = tokio::io::duplex(LOCAL_PIPE);
        let mut conn = Connection::new(
            broker.clone(),
            format!("bridge:{}", config.name),
            Instant::now(),
            config.connect_timeout,
        );
        conn.set_internal();
        // Our own pipe: not metered against the clients' partial input budget.
        tracker.spawn(crate::driver::drive(
            theirs,
            conn,
            stop.clone(),
            (),
            crate::input::InputShare::unmetered(),
        ));
        let (mut local_r, mut local_w) = link::split(Box::new(ours), ProtocolVersion::V5);
        let mut properties = petrel_codec::Properties::default();
        // Never expires: what goes out waits here while the remote is unreachable.
        properties.session_expiry_interval = Some(u32::MAX);
        // The local session sends no more unacknowledged messages than the remote takes.
        properties.receive_maximum = Some(config.max_inflight.min(remote.receive_maximum));
        properties.maximum_packet_size = Some(remote.writer.max_packet);
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: 0,
            properties,
            client_id: MqttString::new(&local_client_id(&config.name))
                .map_err(|e| format!("local client id: {e}"))?,
            will: None,
            username: None,
            password: None,
            bridge: false,
        };
        local_w.queue(&Packet::Connect(Box::new(connect)));
        local_w
            .write_all()
            .await
            .map_err(|e| format!("local CONNECT: {e}"))?;
        let local_receive_maximum = match local_r.packet().await {
            Ok(Packet::ConnAck(ack)) if ack.reason == ReasonCode::SUCCESS => {
                // What comes from the remote larger than this broker takes is dropped.
                local_w.max_packet = ack.properties.maximum_packet_size.unwrap_or(u32::MAX);
                ack.properties.receive_maximum.unwrap_or(u16::MAX)
            }
            Ok(Packet::ConnAck(ack)) => {
                return Err(format!(
                    "the local broker refused the bridge: {}",
                    ack.reason
                ))
            }
            Ok(other) => {
                return Err(format!(
                    "local: expected CONNACK, got {:?}",
                    other.packet_type()
                ))
            }
            Err(e) => return Err(format!("local CONNACK: {e}")),
        };

        // Subscriptions, each side: answered (SUBACK) within the relay.
        let subscribe = |direction: BridgeDirection, cap: QoS, v5: bool| {
            let mut seen = HashSet::new();
            let filters: Vec<(TopicFilter, SubscriptionOptions)> = config
                .topics
                .iter()
                .filter(|t| t.direction == direction && seen.insert(t.filter.clone()))
                .filter_map(|t| {
                    let filter = TopicFilter::new(&t.filter).ok()?;
                    let qos = QoS::from_u8(t.qos).unwrap_or(QoS::AtLeastOnce).min(cap);
                    let mut options = SubscriptionOptions::new(qos);
                    if v5 {
                        options.no_local = true;
                        options.retain_as_published = true;
                        options.retain_handling = RetainHandling::OnNewSubscription;
                    }
                    Some((filter, options))
                })
                .collect();
            (!filters.is_empty()).then(|| {
                Packet::Subscribe(Subscribe {
                    packet_id: PacketId::new(1).expect("1 is a packet id"),
                    properties: petrel_codec::Properties::default(),
                    filters,
                })
            })
        };
        if let Some(s) = subscribe(BridgeDirection::Out, remote.maximum_qos, true) {
            local_w.queue(&s);
        }
        if let Some(s) = subscribe(
            BridgeDirection::In,
            QoS::ExactlyOnce,
            remote.writer.version.is_v5(),
        ) {
            remote.writer.queue(&s);
        }
        if !remote.session_present && !config.clean_start {
            tracing::info!(bridge = %config.name, "the remote had no session for the bridge: a new one starts");
        }

        let mut relay = Relay {
            config,
            status,
            retain_available: remote.retain_available,
            inbound: HashSet::new(),
            local_receive_maximum: usize::from(local_receive_maximum),
            dropped_local: HashSet::new(),
            dropped_remote: HashSet::new(),
        };
        let keep_alive = remote.keep_alive;
        let mut last_sent = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let mut tick = tokio::time::interval(if keep_alive.is_zero() {
            Duration::from_secs(3600)
        } else {
            (keep_alive / 4).max(Duration::from_millis(250))
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let remote_paused = relay.inbound.len() >= relay.local_receive_maximum;
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                packet = local_r.packet() => match packet {
                    Ok(p) => {
                        if let Err(why) = relay.on_local(p, &mut local_w, &mut remote.writer) {
                            break Err(why);
                        }
                    }
                    Err(ReadError::Closed) => break Err("the local broker closed the bridge's connection".to_owned()),
                    Err(e) => break Err(format!("local: {e}")),
                },
                packet = remote.reader.packet(), if !remote_paused => match packet {
                    Ok(Packet::PingResp) => ping_sent = None,
                    Ok(p) => {
                        if let Err(why) = relay.on_remote(p, &mut local_w, &mut remote.writer) {
                            break Err(why);
                        }
                    }
                    Err(e) => break Err(format!("remote: {e}")),
                },
                r = local_w.write_some(), if local_w.pending() => {
                    if let Err(e) = r {
                        break Err(format!("local write: {e}"));
                    }
                }
                r = remote.writer.write_some(), if remote.writer.pending() => {
                    match r {
                        Ok(()) => last_sent = Instant::now(),
                        Err(e) => break Err(format!("remote write: {e}")),
                    }
                }
                _ = tick.tick(), if !keep_alive.is_zero() => {
                    if let Some(at) = ping_sent {
                        if at.elapsed() >= keep_alive {
                            break Err(format!("no PINGRESP within {keep_alive:?}"));
                        }
                    } else if last_sent.elapsed() >= keep_alive / 2 {
                        remote.writer.queue(&Packet::PingReq);
                        ping_sent = Some(Instant::now());
                    }
                }
            }
        };
        // Both sides are told the bridge leaves: the remote keeps its session (clean_start
        // permitting) and the local session keeps queueing.
        let bye = Packet::Disconnect(Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: petrel_codec::Properties::default(),
        });
        if result.is_ok() {
            remote.writer.queue(&bye);
            let _ = tokio::time::timeout(Duration::from_secs(1), remote.writer.close()).await;
        }
        local_w.queue(&bye);
        let _ = tokio::time::timeout(Duration::from_secs(1), local_w.close()).await;
        result
    }
}

/// The remote side once connected.
struct Remote {
    reader: Reader,
    writer: Writer,
    receive_maximum: u16,
    maximum_qos: QoS,
    retain_available: bool,
    session_present: bool,
    keep_alive: Duration,
}

/// The packet-by-packet relay between the two sides.
struct Relay<'a> {
    config: &'a BridgeConfig,
    status: &'a BridgeStatus,
    retain_available: bool,
    /// Ids of QoS 1/2 messages from the remote given to the local broker and not yet
    /// acknowledged by it: the remote is not read past the local Receive Maximum (a 3.1.1
    /// remote has no such bound of its own).
    inbound: HashSet<u16>,
    local_receive_maximum: usize,
    /// QoS 2 ids completed on the spot (the message matched no rule): the PUBREL that
    /// follows is answered here too.
    dropped_local: HashSet<u16>,
    dropped_remote: HashSet<u16>,
}

/// The first rule of `direction` whose filter matches `topic`: its prefix.
fn rule_prefix<'c>(
    config: &'c BridgeConfig,
    direction: BridgeDirection,
    topic: &str,
) -> Option<&'c str> {
    config
        .topics
        .iter()
        .find(|t| t.direction == direction && filter_matches(&t.filter, topic))
        .map(|t| t.prefix.as_str())
}

/// `publish` under `prefix`, for the other side: no topic alias or subscription ids (they
/// belong to the connection it came on).
fn rewrite(mut publish: Publish, prefix: &str) -> Option<Publish> {
    if !prefix.is_empty() {
        publish.topic = TopicName::new(&format!("{prefix}{}", &*publish.topic)).ok()?;
    }
    publish.properties.topic_alias = None;
    publish.properties.subscription_identifiers.clear();
    Some(publish)
}

impl Relay<'_> {
    /// A packet from the local broker: deliveries on the `out` subscriptions, and answers to
    /// what came from the remote.
    fn on_local(
        &mut self,
        packet: Packet,
        local: &mut Writer,
        remote: &mut Writer,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(publish) => {
                let qos = publish.qos;
                let id = publish.packet_id;
                let forwarded = rule_prefix(self.config, BridgeDirection::Out, &publish.topic)
                    .and_then(|prefix| rewrite(publish, prefix))
                    .map(|mut p| {
                        if !self.retain_available {
                            p.retain = false;
                        }
                        p
                    })
                    .filter(|_| qos != QoS::AtMostOnce || remote.buf.len() < QOS0_BUFFER)
                    .is_some_and(|p| remote.queue(&Packet::Publish(p)));
                if forwarded {
                    self.status.forwarded_out.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Not for the remote (no rule, too large, QoS 0 past the buffer): the
                    // exchange ends here.
                    self.status.dropped.fetch_add(1, Ordering::Relaxed);
                    complete_here(qos, id, local, &mut self.dropped_local);
                }
            }
            // Answers to the remote's messages.
            Packet::PubAck(ack) => {
                self.inbound.remove(&ack.packet_id.get());
                remote.queue(&Packet::PubAck(ack));
            }
            Packet::PubRec(ack) => {
                if ack.reason.is_error() {
                    self.inbound.remove(&ack.packet_id.get());
                }
                remote.queue(&Packet::PubRec(ack));
            }
            Packet::PubComp(ack) => {
                self.inbound.remove(&ack.packet_id.get());
                remote.queue(&Packet::PubComp(ack));
            }
            // The local session releases a QoS 2 message it gave us.
            Packet::PubRel(ack) => {
                if self.dropped_local.remove(&ack.packet_id.get()) {
                    local.queue(&Packet::PubComp(PubAck::new(ack.packet_id)));
                } else {
                    remote.queue(&Packet::PubRel(ack));
                }
            }
            Packet::SubAck(ack) => {
                self.check_suback("local", &ack.reasons);
            }
            Packet::Disconnect(d) => {
                return Err(format!(
                    "the local broker disconnected the bridge: {}",
                    d.reason
                ))
            }
            other => {
                return Err(format!(
                    "unexpected {:?} from the local broker",
                    other.packet_type()
                ))
            }
        }
        Ok(())
    }

    /// A packet from the remote: deliveries on the `in` subscriptions, and answers to what
    /// went out.
    fn on_remote(
        &mut self,
        packet: Packet,
        local: &mut Writer,
        remote: &mut Writer,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(publish) => {
                let qos = publish.qos;
                let id = publish.packet_id;
                let forwarded = rule_prefix(self.config, BridgeDirection::In, &publish.topic)
                    .and_then(|prefix| rewrite(publish, prefix))
                    .filter(|_| qos != QoS::AtMostOnce || local.buf.len() < QOS0_BUFFER)
                    .is_some_and(|p| local.queue(&Packet::Publish(p)));
                if forwarded {
                    self.status.forwarded_in.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = id {
                        self.inbound.insert(id.get());
                    }
                } else {
                    self.status.dropped.fetch_add(1, Ordering::Relaxed);
                    complete_here(qos, id, remote, &mut self.dropped_remote);
                }
            }
            // Answers to what went out, for the local session.
            Packet::PubAck(ack) => {
                local.queue(&Packet::PubAck(ack));
            }
            Packet::PubRec(ack) => {
                local.queue(&Packet::PubRec(ack));
            }
            Packet::PubComp(ack) => {
                local.queue(&Packet::PubComp(ack));
            }
            Packet::PubRel(ack) => {
                if self.dropped_remote.remove(&ack.packet_id.get()) {
                    remote.queue(&Packet::PubComp(PubAck::new(ack.packet_id)));
                } else {
                    local.queue(&Packet::PubRel(ack));
                }
            }
            Packet::SubAck(ack) => {
                self.check_suback("remote", &ack.reasons);
            }
            Packet::Disconnect(d) => {
                return Err(format!("the remote disconnected the bridge: {}", d.reason))
            }
            other => {
                return Err(format!(
                    "unexpected {:?} from the remote",
                    other.packet_type()
                ))
            }
        }
        Ok(())
    }

    fn check_suback(&self, side: &str, reasons: &[ReasonCode]) {
        for code in reasons.iter().filter(|c| c.is_error()) {
            let why = format!("the {side} broker refused a subscription: {code}");
            tracing::error!(bridge = %self.config.name, "{why}");
            *self
                .status
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        }
    }
}

/// Ends a QoS 1/2 exchange with its sender when the message goes no further.
fn complete_here(qos: QoS, id: Option<PacketId>, sender: &mut Writer, dropped: &mut HashSet<u16>) {
    let Some(id) = id else { return };
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            sender.queue(&Packet::PubAck(PubAck::new(id)));
        }
        QoS::ExactlyOnce => {
            dropped.insert(id.get());
            sender.queue(&Packet::PubRec(PubAck::new(id)));
        }
    }
}

/// A wait drawn at random between half of `delay` and all of it.
fn jitter(delay: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let _ = getrandom::getrandom(&mut bytes);
    let fraction = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    delay.mul_f64(0.5 + 0.5 * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_of_the_direction_names_the_prefix() {
        let config: BridgeConfig = toml::from_str(
            "name = \"b\"\naddress = \"127.0.0.1:1883\"\n\
             [[topics]]\ndirection = \"out\"\nfilter = \"a/#\"\nprefix = \"one/\"\n\
             [[topics]]\ndirection = \"out\"\nfilter = \"a/b\"\nprefix = \"two/\"\n\
             [[topics]]\ndirection = \"in\"\nfilter = \"#\"\nprefix = \"in/\"\n",
        )
        .unwrap();
        assert_eq!(
            rule_prefix(&config, BridgeDirection::Out, "a/b"),
            Some("one/")
        );
        assert_eq!(rule_prefix(&config, BridgeDirection::Out, "c"), None);
        assert_eq!(rule_prefix(&config, BridgeDirection::In, "c"), Some("in/"));
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
                "{d:?}"
            );
        }
    }
}
