//! One network connection's protocol state machine, for every MQTT version, with no I/O.
//!
//! The server's driver owns a `Connection` and calls, in a loop:
//! * [`Connection::handle_packet`] for each decoded packet (`handle_decode_error` when decoding
//!   failed),
//! * [`Connection::poll_deliver`] to move queued messages into the write buffer (it registers
//!   the task's waker with the session so publishers can wake it),
//! * [`Connection::handle_timeout`] when [`Connection::deadline`] passes,
//! * and writes [`Connection::output`] to the socket.
//!
//! Any of them may return a [`CloseReason`]; the driver then calls [`Connection::close`],
//! flushes the output (a CONNACK refusal or a v5 DISCONNECT) and drops the socket.
//!
//! Timing, the reason this crate exists: until CONNECT the only deadline is the connect timeout
//! counted from accept; afterwards the only one is 1.5 × the client's keepalive counted from the
//! last packet *received* [MQTT-3.1.2-24]. Sending never moves either deadline, and keepalive 0
//! means no deadline at all.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use petrel_codec::{
    ConnAck, Connect, DecodeError, Disconnect, LastWill, MqttString, Packet, Properties,
    ProtocolVersion, PubAck, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};

use crate::auth::{AuthDecision, Credentials};
use crate::broker::Broker;
use crate::message::Message;
use crate::session::{Delivery, Owner, Session};
use crate::stats::Stats;

/// Stop moving queued messages into the write buffer past this many bytes: the rest waits in
/// the session queue, where its bounds apply, until the socket drains.
pub const OUT_HIGH_WATER: usize = 64 * 1024;

/// A client broke a rule of the protocol. Each variant names the statement; `reason_code` is
/// the one place they map to MQTT 5 reason codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("malformed packet: {0}")]
    Malformed(DecodeError),
    #[error("first packet was {0}, not CONNECT [MQTT-3.1.0-1]")]
    FirstPacketNotConnect(&'static str),
    #[error("second CONNECT on one connection [MQTT-3.1.0-2]")]
    SecondConnect,
    #[error("{0} is sent only by a server")]
    ServerOnlyPacket(&'static str),
    #[error("topic alias not allowed: the server's Topic Alias Maximum is 0 [MQTT-3.3.2-9]")]
    TopicAliasInvalid,
    #[error("PUBLISH from a client carries a Subscription Identifier [MQTT-3.3.4-6]")]
    SubscriptionIdFromClient,
    #[error("AUTH without an authentication method in CONNECT [MQTT-4.12.0-1]")]
    UnexpectedAuth,
    #[error("retained PUBLISH while Retain Available is 0 [MQTT-3.3.1-15]")]
    RetainNotSupported,
    #[error("SUBSCRIBE with a Subscription Identifier, which this server does not support [MQTT-3.8.2-?]")]
    SubscriptionIdsNotSupported,
}

impl Violation {
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Violation::Malformed(e) => e.reason_code(),
            Violation::TopicAliasInvalid => ReasonCode::TOPIC_ALIAS_INVALID,
            Violation::RetainNotSupported => ReasonCode::RETAIN_NOT_SUPPORTED,
            Violation::SubscriptionIdsNotSupported => {
                ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED
            }
            _ => ReasonCode::PROTOCOL_ERROR,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT. `with_will` is v5 reason 0x04.
    Disconnect {
        with_will: bool,
    },
    /// No complete CONNECT within the listener's connect timeout.
    ConnectTimeout,
    /// Nothing received for 1.5 × keepalive [MQTT-3.1.2-24].
    KeepAliveTimeout,
    Violation(Violation),
    /// CONNACK with a failure code was sent [MQTT-3.2.2-5].
    Refused(ReasonCode),
    /// Another connection with the same client id took the session [MQTT-3.1.4-2].
    TakenOver,
    /// The client closed the socket.
    PeerClosed,
    /// Reading or writing the socket failed.
    IoError,
    ServerShutdown,
}

impl CloseReason {
    /// Whether the will message is published [MQTT-3.1.2-8]: on every end except a normal
    /// DISCONNECT, a refused CONNECT and our own orderly shutdown.
    fn publishes_will(&self) -> bool {
        match self {
            CloseReason::Disconnect { with_will } => *with_will,
            CloseReason::Refused(_) | CloseReason::ServerShutdown => false,
            _ => true,
        }
    }

    /// The reason code of the DISCONNECT a v5 client is sent before the close, if any.
    fn disconnect_code(&self) -> Option<ReasonCode> {
        match self {
            CloseReason::Violation(v) => Some(v.reason_code()),
            CloseReason::KeepAliveTimeout => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            CloseReason::TakenOver => Some(ReasonCode::SESSION_TAKEN_OVER),
            CloseReason::ServerShutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            _ => None,
        }
    }
}

impl From<Violation> for CloseReason {
    fn from(v: Violation) -> Self {
        CloseReason::Violation(v)
    }
}

enum State {
    AwaitingConnect { deadline: Instant },
    Connected(Box<Attached>),
    Closed,
}

/// What a connection knows once CONNECT succeeded.
struct Attached {
    session: Arc<Session>,
    version: ProtocolVersion,
    client_id: MqttString,
    /// 1.5 × keepalive; `None` when the client chose 0.
    idle_limit: Option<Duration>,
    /// When the last packet arrived from the client. Only inbound packets move it.
    last_received: Instant,
    /// Boxed: a will carries a full property set, and most clients have none, so an idle
    /// connection should not pay for one inline.
    will: Option<Box<LastWill>>,
    /// Outbound in-flight window: our limit, lowered to the client's v5 Receive Maximum.
    window: usize,
    /// Set while this client, as a publisher, waits for a subscriber's queue to drain.
    pause: Option<Pause>,
}

/// A publisher paused by flow control: nothing more is read from it until `subscriber`'s
/// queue drains to half, the subscriber is found stalled, or goes away.
struct Pause {
    subscriber: Arc<Session>,
    /// The subscriber's `drained` counter when the current wait began.
    progress: u64,
    /// When to check the subscriber for progress.
    check_at: Instant,
}

pub struct Connection {
    broker: Arc<Broker>,
    id: u64,
    peer: String,
    state: State,
    out: BytesMut,
}

impl Connection {
    /// A connection accepted at `now`; CONNECT must be complete by `now + connect_timeout`
    /// (the listener's setting). No other deadline applies before then.
    pub fn new(
        broker: Arc<Broker>,
        peer: String,
        now: Instant,
        connect_timeout: Duration,
    ) -> Connection {
        let deadline = now + connect_timeout;
        Connection {
            id: broker.next_connection_id(),
            broker,
            peer,
            state: State::AwaitingConnect { deadline },
            out: BytesMut::new(),
        }
    }

    /// The version packets are decoded with: the client's once CONNECT is in; before that only
    /// CONNECT is legal and it announces its own version.
    pub fn version(&self) -> ProtocolVersion {
        match &self.state {
            State::Connected(a) => a.version,
            _ => ProtocolVersion::V3_1_1,
        }
    }

    pub fn max_packet_size(&self) -> u32 {
        self.broker.limits.max_packet_size
    }

    pub fn client_id(&self) -> Option<&str> {
        match &self.state {
            State::Connected(a) => Some(a.client_id.as_str()),
            _ => None,
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// Bytes waiting to be written to the socket. The driver writes them and removes what was
    /// written (`advance`).
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// When `handle_timeout` must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingConnect { deadline } => Some(*deadline),
            // While paused nothing is read, so the keepalive cannot be judged: only the
            // flow-control check is due.
            State::Connected(a) => match &a.pause {
                Some(p) => Some(p.check_at),
                None => a.idle_limit.map(|limit| a.last_received + limit),
            },
            State::Closed => None,
        }
    }

    /// Whether reading from the client is paused by flow control. The driver then reads
    /// nothing (and decodes nothing more from what it already read) until `poll_resume`.
    pub fn is_paused(&self) -> bool {
        matches!(&self.state, State::Connected(a) if a.pause.is_some())
    }

    /// While paused: `Ready` once the publisher may go on (reading resumes, and the keepalive
    /// counts from `now`: time the broker spent not reading is not held against the client);
    /// otherwise `Pending` with the waker registered with the subscriber's session.
    pub fn poll_resume(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<()> {
        let State::Connected(a) = &mut self.state else {
            return Poll::Ready(());
        };
        let Some(pause) = &a.pause else {
            return Poll::Ready(());
        };
        if pause.subscriber.wait_for_room(cx, &self.broker.limits) {
            a.pause = None;
            a.last_received = a.last_received.max(now);
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), CloseReason> {
        if let State::Connected(a) = &mut self.state {
            if let Some(pause) = &mut a.pause {
                if now < pause.check_at {
                    return Ok(());
                }
                // The wait ran out: a subscriber that moved messages meanwhile is slow, and we
                // keep pacing to it; one that moved none is stalled and stops holding us up.
                let (progress, stalled) = pause
                    .subscriber
                    .check_progress(pause.progress, &self.broker.stats);
                if stalled || progress == pause.progress {
                    a.pause = None;
                    a.last_received = a.last_received.max(now);
                } else {
                    pause.progress = progress;
                    pause.check_at = now + self.broker.limits.flow_control_timeout;
                }
                return Ok(());
            }
        }
        match self.deadline() {
            Some(deadline) if now >= deadline => match self.state {
                State::AwaitingConnect { .. } => {
                    Stats::add(&self.broker.stats.connect_timeouts, 1);
                    Err(CloseReason::ConnectTimeout)
                }
                _ => {
                    Stats::add(&self.broker.stats.keepalive_timeouts, 1);
                    Err(CloseReason::KeepAliveTimeout)
                }
            },
            _ => Ok(()),
        }
    }

    /// Decoding failed: decide what the client is told. An unsupported protocol level gets
    /// CONNACK return code 1 in the 3.1.1 format before the close [MQTT-3.1.2-2].
    pub fn handle_decode_error(&mut self, error: DecodeError) -> CloseReason {
        if let (State::AwaitingConnect { .. }, DecodeError::UnsupportedProtocolLevel(_)) =
            (&self.state, &error)
        {
            let refusal = ConnAck {
                session_present: false,
                reason: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                properties: Properties::default(),
            };
            self.write(&Packet::ConnAck(refusal), ProtocolVersion::V3_1_1);
            return CloseReason::Refused(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
        }
        CloseReason::Violation(Violation::Malformed(error))
    }

    pub fn handle_packet(&mut self, now: Instant, packet: Packet) -> Result<(), CloseReason> {
        let attached = match &mut self.state {
            State::AwaitingConnect { .. } => {
                return match packet {
                    Packet::Connect(connect) => self.handle_connect(now, *connect),
                    other => Err(Violation::FirstPacketNotConnect(other.name()).into()),
                };
            }
            State::Connected(a) => a,
            State::Closed => return Err(CloseReason::IoError),
        };
        attached.last_received = now;
        match packet {
            Packet::Publish(p) => self.handle_publish(now, p),
            Packet::PubAck(ack) => self.handle_puback(ack),
            Packet::PubRec(ack) => self.handle_pubrec(ack),
            Packet::PubRel(ack) => self.handle_pubrel(ack),
            Packet::PubComp(ack) => self.handle_pubcomp(ack),
            Packet::Subscribe(s) => self.handle_subscribe(s),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u),
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => Err(CloseReason::Disconnect {
                with_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL,
            }),
            Packet::Connect(_) => Err(Violation::SecondConnect.into()),
            Packet::Auth(_) => Err(Violation::UnexpectedAuth.into()),
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => Err(Violation::ServerOnlyPacket(other.name()).into()),
        }
    }

    fn attached(&self) -> Result<&Attached, CloseReason> {
        match &self.state {
            State::Connected(a) => Ok(a),
            _ => Err(CloseReason::IoError),
        }
    }

    fn write(&mut self, packet: &Packet, version: ProtocolVersion) {
        if let Err(e) = petrel_codec::encode(packet, version, &mut self.out) {
            tracing::error!(error = %e, packet = packet.name(), "cannot encode packet");
        }
    }

    /// Writes a packet in the connection's version.
    fn send(&mut self, packet: &Packet) {
        let version = self.version();
        self.write(packet, version);
    }

    fn refuse(&mut self, version: ProtocolVersion, reason: ReasonCode) -> Result<(), CloseReason> {
        let refusal = ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        };
        self.write(&Packet::ConnAck(refusal), version);
        self.state = State::Closed;
        Err(CloseReason::Refused(reason))
    }

    fn handle_connect(&mut self, now: Instant, connect: Connect) -> Result<(), CloseReason> {
        let version = connect.protocol;
        let limits = &self.broker.limits;
        if self.broker.is_shutting_down() {
            return self.refuse(version, ReasonCode::SERVER_UNAVAILABLE);
        }

        // Client identifier (§3.1.3.1).
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            // 3.1 requires 1-23 characters; 3.1.1 allows empty only with clean session
            // [MQTT-3.1.3-7] [MQTT-3.1.3-8]; 5.0 always assigns one.
            let allowed = limits.allow_empty_client_id
                && match version {
                    ProtocolVersion::V3_1 => false,
                    ProtocolVersion::V3_1_1 => connect.clean_start,
                    ProtocolVersion::V5 => true,
                };
            if !allowed {
                tracing::debug!(peer = %self.peer, "empty client id refused [MQTT-3.1.3-8]");
                return self.refuse(version, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
            }
            let generated = self.broker.generate_client_id();
            let id = MqttString::new(&generated).unwrap_or_default();
            if version.is_v5() {
                assigned = Some(id.clone());
            }
            id
        } else if connect.client_id.len() > usize::from(limits.max_client_id_len) {
            tracing::debug!(peer = %self.peer, len = connect.client_id.len(), "client id too long");
            return self.refuse(version, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        } else {
            connect.client_id.clone()
        };

        // Enhanced authentication (AUTH exchanges) is not offered yet: a client that asks for a
        // method is told so rather than silently authenticated without it (§4.12).
        if connect.properties.authentication_method.is_some() {
            tracing::debug!(peer = %self.peer, client_id = %client_id, "authentication method not supported");
            return self.refuse(version, ReasonCode::BAD_AUTHENTICATION_METHOD);
        }

        let decision = self.broker.authenticator().authenticate(&Credentials {
            client_id: &client_id,
            username: connect.username.as_ref(),
            password: connect.password.as_deref(),
            peer: &self.peer,
        });
        if decision != AuthDecision::Allow {
            tracing::info!(peer = %self.peer, client_id = %client_id, ?decision, "connection refused by authentication");
            return self.refuse(version, decision.reason_code());
        }

        // 3.x: Clean Session 0 keeps the session after the connection. 5.0: Session Expiry
        // Interval > 0 does (absent means 0) [MQTT-3.1.2-23]; expiry timing itself is kept
        // as "until resumed or cleaned" for now.
        let persistent = if version.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0) > 0
        } else {
            !connect.clean_start
        };
        let attach = self
            .broker
            .attach(&client_id, connect.clean_start, persistent, self.id);
        if attach.took_over {
            Stats::add(&self.broker.stats.takeovers, 1);
            tracing::info!(client_id = %client_id, peer = %self.peer, "session taken over by a new connection");
        }
        if let Some(waker) = attach.displaced {
            waker.wake();
        }

        let mut keep_alive = connect.keep_alive;
        let mut properties = Properties::default();
        if version.is_v5() {
            // Server Keep Alive (§3.2.2.3.14): the broker may impose a maximum.
            if limits.max_keepalive > 0 && (keep_alive == 0 || keep_alive > limits.max_keepalive) {
                keep_alive = limits.max_keepalive;
                properties.server_keep_alive = Some(keep_alive);
            }
            properties.assigned_client_identifier = assigned;
            properties.maximum_packet_size = Some(limits.max_packet_size);
            properties.receive_maximum = Some(u16::MAX);
            properties.subscription_identifier_available = Some(0);
            properties.shared_subscription_available = Some(0);
            if !limits.retain_available {
                properties.retain_available = Some(0);
            }
        }
        let window = usize::from(limits.max_inflight).min(usize::from(
            connect.properties.receive_maximum.unwrap_or(u16::MAX),
        ));
        let connack = ConnAck {
            session_present: attach.session_present,
            reason: ReasonCode::SUCCESS,
            properties,
        };
        self.write(&Packet::ConnAck(connack), version);
        if attach.session_present {
            attach
                .session
                .lock()
                .resend_inflight(version, &mut self.out);
        }
        Stats::add(&self.broker.stats.connections_current, 1);
        Stats::add(&self.broker.stats.connections_total, 1);
        tracing::debug!(client_id = %client_id, peer = %self.peer, %version, keep_alive, clean = connect.clean_start, "client connected");
        self.state = State::Connected(Box::new(Attached {
            session: attach.session,
            version,
            client_id,
            idle_limit: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_received: now,
            will: connect.will.map(Box::new),
            window: window.max(1),
            pause: None,
        }));
        Ok(())
    }

    fn handle_publish(&mut self, now: Instant, publish: Publish) -> Result<(), CloseReason> {
        let a = self.attached()?;
        let (version, session) = (a.version, a.session.clone());
        // After a takeover this connection may not publish in the session's name.
        if !session.is_owned_by(self.id) {
            return Err(CloseReason::TakenOver);
        }
        if publish.properties.topic_alias.is_some() {
            return Err(Violation::TopicAliasInvalid.into());
        }
        if !publish.properties.subscription_identifiers.is_empty() {
            return Err(Violation::SubscriptionIdFromClient.into());
        }
        let mut retain = publish.retain;
        if retain && !self.broker.limits.retain_available {
            if version.is_v5() {
                return Err(Violation::RetainNotSupported.into());
            }
            retain = false;
        }
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        if qos == QoS::ExactlyOnce {
            let Some(id) = packet_id else {
                return Err(Violation::Malformed(DecodeError::ZeroPacketId).into());
            };
            let mut st = session.lock();
            if st.owner != Owner::Connection(self.id) {
                return Err(CloseReason::TakenOver);
            }
            // A repeat of a QoS 2 PUBLISH whose PUBREL has not arrived is acknowledged again
            // but not delivered again [MQTT-4.3.3-9].
            if !st.inbound_qos2.insert(id.get()) {
                drop(st);
                self.send(&Packet::PubRec(PubAck::new(id)));
                return Ok(());
            }
        }
        let topic = publish.topic.clone();
        let mut message = Message::from_publish(publish, topic, session.id);
        message.retain = retain;
        let message = Arc::new(message);
        if retain {
            self.broker.retain(&message);
        }
        let routed = self.broker.route(&message);
        Stats::add(&self.broker.stats.messages_received, 1);
        if let Some(subscriber) = routed.congested {
            // The message is queued (so it is acknowledged below), but this publisher reads
            // nothing more until the subscriber catches up.
            Stats::add(&self.broker.stats.flow_control_pauses, 1);
            let progress = subscriber.lock().drained;
            if let State::Connected(a) = &mut self.state {
                a.pause = Some(Pause {
                    subscriber,
                    progress,
                    check_at: now + self.broker.limits.flow_control_timeout,
                });
            }
        }
        let reason = if routed.matched == 0 && version.is_v5() {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.send(&Packet::PubAck(PubAck::with_reason(id, reason)))
            }
            (QoS::ExactlyOnce, Some(id)) => {
                self.send(&Packet::PubRec(PubAck::with_reason(id, reason)))
            }
            _ => {}
        }
        Ok(())
    }

    /// Runs `f` on the session state if this connection still owns it.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&mut crate::session::SessionState) -> T,
    ) -> Result<T, CloseReason> {
        let a = self.attached()?;
        let mut st = a.session.lock();
        if st.owner != Owner::Connection(self.id) {
            return Err(CloseReason::TakenOver);
        }
        Ok(f(&mut st))
    }

    fn handle_puback(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        // An unknown id is ignored: it may be a late duplicate after a resend.
        self.with_session(|st| st.acknowledge(ack.packet_id))?;
        Ok(())
    }

    fn handle_pubrec(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        let id = ack.packet_id;
        if ack.reason.is_error() {
            // v5: a failure PUBREC ends the exchange; no PUBREL follows (§4.3.3).
            self.with_session(|st| {
                if let Some(i) = st.inflight.iter().position(|f| f.packet_id == id) {
                    st.inflight.remove(i);
                }
            })?;
            return Ok(());
        }
        let known = self.with_session(|st| st.received(id))?;
        let reply = if known {
            PubAck::new(id)
        } else {
            PubAck::with_reason(id, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
        };
        self.send(&Packet::PubRel(reply));
        Ok(())
    }

    fn handle_pubrel(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        let id = ack.packet_id;
        let known = self.with_session(|st| st.inbound_qos2.remove(&id.get()))?;
        // PUBCOMP even for an unknown id: the client may be repeating PUBREL after we already
        // completed [MQTT-4.3.3-11].
        let reply = if known {
            PubAck::new(id)
        } else {
            PubAck::with_reason(id, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
        };
        self.send(&Packet::PubComp(reply));
        Ok(())
    }

    fn handle_pubcomp(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        self.with_session(|st| st.completed(ack.packet_id))?;
        Ok(())
    }

    fn handle_subscribe(&mut self, subscribe: Subscribe) -> Result<(), CloseReason> {
        let a = self.attached()?;
        let (version, session) = (a.version, a.session.clone());
        if !subscribe.properties.subscription_identifiers.is_empty() {
            return Err(Violation::SubscriptionIdsNotSupported.into());
        }
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut replay = Vec::new();
        for (filter, options) in &subscribe.filters {
            if version.is_v5() && filter.starts_with("$share/") {
                reasons.push(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED);
                continue;
            }
            let Some(existed) = self.broker.subscribe(&session, self.id, filter, *options) else {
                return Err(CloseReason::TakenOver);
            };
            reasons.push(ReasonCode(options.qos as u8));
            let send_retained = match options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscription => !existed,
                RetainHandling::Never => false,
            };
            if send_retained {
                for message in self.broker.retained_matching(filter) {
                    let qos = message.qos.min(options.qos);
                    replay.push(Delivery {
                        message,
                        qos,
                        retain: true,
                        weight: 0,
                    });
                }
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
        if !replay.is_empty() {
            // Queued behind the SUBACK just written [MQTT-3.8.4-4], sent with RETAIN set.
            self.with_session(|st| {
                for d in replay {
                    st.push_retained(d);
                }
            })?;
        }
        Ok(())
    }

    fn handle_unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), CloseReason> {
        let session = self.attached()?.session.clone();
        let reasons = unsubscribe
            .filters
            .iter()
            .map(|f| {
                if self.broker.unsubscribe(&session, self.id, f) {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
        Ok(())
    }

    /// Moves queued messages into the output, within the in-flight window and the output
    /// high-water mark. `Ready(Ok)` when something was written; `Pending` with the waker
    /// registered when nothing can be sent until a publisher queues more; `Ready(Err)` when the
    /// session was taken over.
    pub fn poll_deliver(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CloseReason>> {
        let State::Connected(a) = &self.state else {
            return Poll::Pending;
        };
        if self.out.len() >= OUT_HIGH_WATER {
            // The driver polls again once the socket has taken some of the output.
            return Poll::Pending;
        }
        let mut st = a.session.lock();
        if st.owner != Owner::Connection(self.id) {
            return Poll::Ready(Err(CloseReason::TakenOver));
        }
        let mut wake = Vec::new();
        let sent = st.drain(
            a.version,
            a.window,
            &mut self.out,
            OUT_HIGH_WATER,
            &self.broker.limits,
            &mut wake,
        );
        if sent > 0 {
            drop(st);
            wake.into_iter().for_each(std::task::Waker::wake);
            Stats::add(&self.broker.stats.messages_sent, sent as u64);
            return Poll::Ready(Ok(()));
        }
        if st.queue.is_empty() {
            // Only a new message can give us work: ask publishers to wake us. When the queue
            // is blocked on the in-flight window instead, an acknowledgement (read from the
            // socket, which wakes the task anyway) is what unblocks it, so publishers need not.
            let fresh = !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if fresh {
                st.waker = Some(cx.waker().clone());
            }
        }
        Poll::Pending
    }

    /// Ends the connection: tells a v5 client why when the server is the one closing, detaches
    /// from the session (a clean session is discarded) and publishes the will where the
    /// specification requires it. Safe to call more than once.
    pub fn close(&mut self, reason: &CloseReason) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        if matches!(state, State::Closed) {
            return;
        }
        // Every protocol violation is counted here, once, whether or not CONNECT completed.
        if let CloseReason::Violation(_) = reason {
            Stats::add(&self.broker.stats.protocol_errors, 1);
        }
        let State::Connected(a) = state else {
            return;
        };
        let a = *a;
        if a.version.is_v5() {
            if let Some(code) = reason.disconnect_code() {
                self.write(
                    &Packet::Disconnect(Disconnect::with_reason(code)),
                    a.version,
                );
            }
        }
        match reason {
            CloseReason::Violation(v) => {
                tracing::info!(client_id = %a.client_id, peer = %self.peer, rule = %v, "closing connection: protocol violation");
            }
            CloseReason::KeepAliveTimeout => {
                tracing::info!(client_id = %a.client_id, peer = %self.peer, "closing connection: keepalive expired");
            }
            other => {
                tracing::debug!(client_id = %a.client_id, peer = %self.peer, reason = ?other, "connection closed");
            }
        }
        self.broker.detach(&a.session, self.id);
        self.broker
            .stats
            .connections_current
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if reason.publishes_will() {
            if let Some(will) = a.will {
                self.publish_will(*will, a.session.id);
            }
        }
    }

    fn publish_will(&self, will: LastWill, origin: crate::message::SessionId) {
        let retain = will.retain && self.broker.limits.retain_available;
        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain,
            topic: will.topic.clone(),
            packet_id: None,
            properties: will.properties,
            payload: will.payload,
        };
        let mut message = Message::from_publish(publish, will.topic, origin);
        // Will Delay Interval is connection metadata, not a message property.
        if message.properties.will_delay_interval.is_some() {
            message.properties.will_delay_interval = None;
        }
        let message = Arc::new(message);
        if retain {
            self.broker.retain(&message);
        }
        self.broker.route(&message);
        Stats::add(&self.broker.stats.wills_published, 1);
    }

    /// This connection's id: unique for the broker's lifetime, used as the session owner tag.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Connection {
    /// A driver that ends without calling `close` (a panic, a cancelled task) must not leave
    /// the session marked as attached: treat it as a lost connection.
    fn drop(&mut self) {
        if self.is_connected() {
            self.close(&CloseReason::IoError);
        }
    }
}
