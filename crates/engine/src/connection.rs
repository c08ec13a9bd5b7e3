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
    Auth, ConnAck, Connect, DecodeError, Disconnect, LastWill, MqttString, Packet, Properties,
    ProtocolVersion, PubAck, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    TopicName, UnsubAck, Unsubscribe,
};

use crate::acl::{is_sys, Identity, Verdict};
use crate::auth::{
    AuthDecision, AuthExchange, AuthOutcome, AuthStep, Credentials, Login, PendingDecision,
};
use crate::broker::{Broker, NotOwner};
use crate::limits::Limits;
use crate::message::Message;
use crate::session::{
    ClientInfo, Delivery, Egress, Held, Journal, Owner, Session, TopicAliases, NEVER_EXPIRES,
};
use crate::shared;
use crate::stats::{version_index, Stats};
use crate::topic_index::filter_matches;

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
    #[error("topic alias {0} is 0 or above the server's Topic Alias Maximum [MQTT-3.3.2-9]")]
    TopicAliasInvalid(u16),
    #[error("PUBLISH names its topic by alias {0}, which was never set [MQTT-3.3.4-?]")]
    TopicAliasUnknown(u16),
    #[error("PUBLISH at QoS {0}, above the server's Maximum QoS [MQTT-3.2.2-11]")]
    QoSNotSupported(u8),
    #[error("more QoS 2 messages unacknowledged than the server's Receive Maximum [MQTT-3.3.4-8]")]
    ReceiveMaximumExceeded,
    #[error("payload marked UTF-8 (Payload Format Indicator 1) is not valid UTF-8 [MQTT-3.3.2-4]")]
    PayloadFormatInvalid,
    #[error("DISCONNECT sets a Session Expiry Interval after CONNECT set 0 [MQTT-3.14.2-2]")]
    SessionExpiryAfterZero,
    #[error("PUBLISH from a client carries a Subscription Identifier [MQTT-3.3.4-6]")]
    SubscriptionIdFromClient,
    #[error("AUTH without an authentication method in CONNECT [MQTT-4.12.0-1]")]
    UnexpectedAuth,
    #[error("AUTH with a method other than CONNECT's [MQTT-4.12.1-1]")]
    AuthMethodMismatch,
    #[error(
        "{0} during the enhanced authentication exchange, which allows only AUTH [MQTT-4.12.0-?]"
    )]
    NotAuthDuringExchange(&'static str),
    #[error("AUTH with reason {0:#04x}, which a client may not send here [MQTT-4.12.0-2]")]
    AuthReasonInvalid(u8),
    #[error("retained PUBLISH while Retain Available is 0 [MQTT-3.3.1-15]")]
    RetainNotSupported,
    #[error("SUBSCRIBE with a Subscription Identifier, which this server does not support [MQTT-3.2.2-?]")]
    SubscriptionIdsNotSupported,
}

impl Violation {
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Violation::Malformed(e) => e.reason_code(),
            Violation::TopicAliasInvalid(_) => ReasonCode::TOPIC_ALIAS_INVALID,
            Violation::QoSNotSupported(_) => ReasonCode::QOS_NOT_SUPPORTED,
            Violation::ReceiveMaximumExceeded => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            Violation::PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
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
    /// A v5 re-authentication failed (§4.12.1).
    AuthenticationFailed,
    /// The client closed the socket.
    PeerClosed,
    /// Reading or writing the socket failed.
    IoError,
    ServerShutdown,
    /// An operator disconnected the client (admin API).
    Administrative,
    /// The client read too slowly while its publishers waited (`slow_consumer_disconnect`):
    /// v5 DISCONNECT 0x97 Quota exceeded.
    SlowConsumer,
    /// An operator is moving clients off this server (admin API): v5 clients are told which
    /// server to use instead (DISCONNECT 0x9C with a Server Reference).
    Redirected,
}

impl CloseReason {
    /// Whether the will message is published [MQTT-3.1.2-8]: on every end except a normal
    /// DISCONNECT and a refused CONNECT. A server shutdown closes the connection without a
    /// DISCONNECT from the client, so it publishes the will too: at once without a Will Delay
    /// Interval, otherwise after it (the pending will is stored with the session, so the
    /// delay runs on after a restart and a client that reconnects in time cancels it).
    fn publishes_will(&self) -> bool {
        match self {
            CloseReason::Disconnect { with_will } => *with_will,
            CloseReason::Refused(_) => false,
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
            CloseReason::Administrative => Some(ReasonCode::ADMINISTRATIVE_ACTION),
            CloseReason::SlowConsumer => Some(ReasonCode::QUOTA_EXCEEDED),
            CloseReason::Redirected => Some(ReasonCode::USE_ANOTHER_SERVER),
            CloseReason::AuthenticationFailed => Some(ReasonCode::NOT_AUTHORIZED),
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
    AwaitingConnect {
        deadline: Instant,
    },
    /// The authenticator is deciding on CONNECT's credentials (a slow hash, a remote
    /// service). Nothing more is read from the client meanwhile [MQTT-3.1.4-?: no data after
    /// CONNECT is processed before CONNACK], and the connect deadline still runs.
    Deciding {
        deadline: Instant,
        pending: Box<Deciding>,
    },
    /// CONNECT asked for an enhanced authentication method and the AUTH exchange is under way.
    /// The connect deadline still runs: it covers the whole exchange.
    Authenticating {
        deadline: Instant,
        pending: Box<PendingConnect>,
    },
    Connected(Box<Attached>),
    Closed,
}

/// A CONNECT waiting for the authenticator's decision, or (cluster mode) for its session to
/// be taken over from another node.
struct Deciding {
    connect: Connect,
    client_id: MqttString,
    assigned: Option<MqttString>,
    decision: PendingDecision,
    /// The enhanced authentication method CONNECT used and its final data, if any.
    enhanced: Option<(MqttString, Option<Vec<u8>>)>,
    /// The cluster's claim on the client id is settled.
    claimed: bool,
}

/// How long a CONNECT may wait for its session to come from another node; the claim itself
/// gives up sooner.
const CLAIM_LIMIT: Duration = Duration::from_secs(15);

/// A CONNECT waiting for its AUTH exchange to finish.
struct PendingConnect {
    connect: Connect,
    client_id: MqttString,
    assigned: Option<MqttString>,
    method: MqttString,
    exchange: Box<dyn AuthExchange>,
}

/// A client that authenticated with an enhanced method: it may re-authenticate (§4.12.1).
struct Enhanced {
    method: MqttString,
    /// A re-authentication under way.
    exchange: Option<Box<dyn AuthExchange>>,
}

/// What a connection knows once CONNECT succeeded.
struct Attached {
    session: Arc<Session>,
    /// How PUBLISH packets are written to this client (window, its Maximum Packet Size, the
    /// topic aliases it was told).
    egress: Egress,
    /// The Session Expiry Interval CONNECT set: a DISCONNECT may not raise 0 [MQTT-3.14.2-2].
    session_expiry: u32,
    /// v5 Request Problem Information: reason strings and user properties may be sent on
    /// packets other than PUBLISH, CONNACK and DISCONNECT [MQTT-3.1.2-29].
    problem_info: bool,
    /// A 3.x bridge (CONNECT's protocol level with bit 0x80): its subscriptions are No Local,
    /// so what it publishes here is not sent back to it.
    bridge: bool,
    /// Topics the client named by alias (v5 inbound topic aliases), indexed by alias - 1.
    inbound_aliases: Vec<Option<TopicName>>,
    /// 1.5 × keepalive; `None` when the client chose 0.
    idle_limit: Option<Duration>,
    /// When the last packet arrived from the client. Only inbound packets move it.
    last_received: Instant,
    /// Boxed: a will carries a full property set, and most clients have none, so an idle
    /// connection should not pay for one inline.
    will: Option<Box<LastWill>>,
    /// Set while this client, as a publisher, waits for a subscriber's queue to drain.
    pause: Option<Pause>,
    /// A subscriber this connection's messages reached lately while it kept up, and when:
    /// see the flow-control wait in `handle_publish`.
    keeper: Option<(Arc<Session>, Instant)>,
    /// The enhanced authentication method CONNECT used, if any.
    enhanced: Option<Box<Enhanced>>,
    /// What waits for the store, in the order it is to be written, with the durability token
    /// each waits for: PUBACK/PUBREC packets until their message is durable, and held
    /// deliveries ([`Held`]).
    /// Boxed: allocated only while something waits, so an idle connection carries one pointer.
    #[allow(clippy::box_collection)]
    pending_acks: Option<Box<std::collections::VecDeque<(u64, Pending)>>>,
    /// The user name CONNECT gave, which the ACL's rules and `%u` refer to. Boxed: an idle
    /// connection without one pays a pointer, not a string.
    username: Option<Box<MqttString>>,
    /// Inbound rate limits, when configured.
    allowance: Option<Box<Allowance>>,
    /// The broker's ACL generation `egress.acl` was compiled from.
    acl_generation: u64,
}

/// Output waiting for a durability token.
#[derive(Debug)]
enum Pending {
    /// A PUBACK or PUBREC, encoded when it goes out.
    Ack(Packet),
    /// PUBLISH (and PUBREL) packets a drain held, already encoded.
    Frames(bytes::Bytes),
    /// In cluster mode: what follows also waits until the fabric has acknowledged this
    /// token (the copies of a message sent to other nodes).
    Forwarded(u64),
}

/// Client ids that start with this belong to the broker's own connections (bridges); a
/// client's CONNECT with one is refused as an invalid client id.
pub const INTERNAL_CLIENT_PREFIX: &str = "$bridge/";

/// A publisher paused by flow control: nothing more is read from it until `subscriber`'s
/// queue drains to half, the subscriber is found stalled, or goes away.
/// A client's inbound allowance (`max_inbound_messages_per_second`,
/// `max_inbound_bytes_per_second`): a token bucket holding up to one second's worth, which a
/// QoS 1/2 message may overdraw; the client is then not read from until it is even again.
struct Allowance {
    messages: f64,
    bytes: f64,
    refilled: Instant,
    /// Not read from until then.
    throttled_until: Option<Instant>,
}

impl Allowance {
    fn new(limits: &Limits, now: Instant) -> Option<Box<Allowance>> {
        (limits.max_inbound_messages_per_second > 0 || limits.max_inbound_bytes_per_second > 0)
            .then(|| {
                Box::new(Allowance {
                    messages: f64::from(limits.max_inbound_messages_per_second),
                    bytes: f64::from(limits.max_inbound_bytes_per_second),
                    refilled: now,
                    throttled_until: None,
                })
            })
    }

    fn refill(&mut self, limits: &Limits, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = self.refilled.max(now);
        let (m, b) = (
            f64::from(limits.max_inbound_messages_per_second),
            f64::from(limits.max_inbound_bytes_per_second),
        );
        self.messages = (self.messages + elapsed * m).min(m);
        self.bytes = (self.bytes + elapsed * b).min(b);
    }

    /// Whether a message of `size` bytes fits the allowance now.
    fn fits(&self, limits: &Limits, size: usize) -> bool {
        (limits.max_inbound_messages_per_second == 0 || self.messages >= 1.0)
            && (limits.max_inbound_bytes_per_second == 0 || self.bytes >= size as f64)
    }

    /// Takes a message of `size` bytes; if that overdraws, returns how long until even.
    fn take(&mut self, limits: &Limits, size: usize) -> Option<Duration> {
        let mut wait: f64 = 0.0;
        if limits.max_inbound_messages_per_second > 0 {
            self.messages -= 1.0;
            if self.messages < 0.0 {
                wait = wait.max(-self.messages / f64::from(limits.max_inbound_messages_per_second));
            }
        }
        if limits.max_inbound_bytes_per_second > 0 {
            self.bytes -= size as f64;
            if self.bytes < 0.0 {
                wait = wait.max(-self.bytes / f64::from(limits.max_inbound_bytes_per_second));
            }
        }
        (wait > 0.0).then(|| Duration::from_secs_f64(wait))
    }
}

struct Pause {
    on: PausedOn,
    /// The subscriber's `drained` counter (the fabric's `progress`) when the current wait
    /// began.
    progress: u64,
    /// The wait holds back other subscribers that keep up: it spends the subscriber's hold
    /// time ([`crate::hold`]). Otherwise it lasts while the subscriber makes progress.
    spends: bool,
    /// When to check the subscriber for progress.
    check_at: Instant,
}

/// What a paused publisher waits for.
enum PausedOn {
    /// A subscriber's queue to drain to half.
    Subscriber(Arc<Session>),
    /// In cluster mode, the fabric's queue to other nodes to drain.
    Fabric,
}

pub struct Connection {
    broker: Arc<Broker>,
    id: u64,
    /// Shared with the session's `ClientInfo` once connected.
    peer: Arc<str>,
    state: State,
    out: BytesMut,
    /// The Maximum Packet Size of the client's CONNECT, for what is written before the
    /// connection is established (a refusal, AUTH).
    client_max_packet: u32,
    /// The name a verified TLS client certificate gives the client, if the transport had
    /// one: the authenticator sees it with the CONNECT, and the ACL applies to it.
    /// Boxed: most clients have none, and every connection carries the field.
    #[allow(clippy::box_collection)]
    certificate: Option<Box<String>>,
    /// Made by the broker itself (a bridge's local side): see [`Connection::set_internal`].
    internal: bool,
}

/// The reason string of a v5 CONNACK refusal.
fn refusal_text(reason: ReasonCode) -> Option<&'static str> {
    Some(match reason {
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => {
            "client identifier not accepted (empty, or too long)"
        }
        ReasonCode::BAD_USER_NAME_OR_PASSWORD => "bad user name or password",
        ReasonCode::NOT_AUTHORIZED => "not authorized",
        ReasonCode::SERVER_UNAVAILABLE => "server shutting down",
        ReasonCode::SERVER_BUSY => "too many logins being checked; try again later",
        ReasonCode::BAD_AUTHENTICATION_METHOD => "authentication method not offered",
        ReasonCode::QOS_NOT_SUPPORTED => "will QoS above the server's Maximum QoS",
        ReasonCode::RETAIN_NOT_SUPPORTED => {
            "retained will, but the server keeps no retained messages"
        }
        ReasonCode::PAYLOAD_FORMAT_INVALID => "will payload marked UTF-8 is not valid UTF-8",
        ReasonCode::PROTOCOL_ERROR => "Authentication Data without an Authentication Method",
        _ => return None,
    })
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
            peer: Arc::from(peer),
            state: State::AwaitingConnect { deadline },
            out: BytesMut::new(),
            client_max_packet: u32::MAX,
            certificate: None,
            internal: false,
        }
    }

    /// Marks a connection the broker makes itself (a bridge's local side, over an in-memory
    /// stream): its CONNECT is accepted without the authenticator and no ACL applies (the
    /// operator's configuration decided what it carries). Only such a connection may use a
    /// client id that starts with [`INTERNAL_CLIENT_PREFIX`].
    pub fn set_internal(&mut self) {
        if let State::AwaitingConnect { .. } = &self.state {
            self.internal = true;
        }
    }

    /// The transport verified a client certificate naming the client `identity` (mutual TLS).
    /// The authenticator sees it with the CONNECT.
    pub fn set_certificate_identity(&mut self, name: Option<String>) {
        if let State::AwaitingConnect { .. } = &self.state {
            self.certificate = name.map(Box::new);
        }
    }

    /// The client certificate's identity, if the transport verified one.
    pub fn certificate_identity(&self) -> Option<&str> {
        self.certificate.as_deref().map(String::as_str)
    }

    /// The version packets are decoded with: the client's once CONNECT is in; before that only
    /// CONNECT is legal and it announces its own version.
    pub fn version(&self) -> ProtocolVersion {
        match &self.state {
            State::Connected(a) => a.egress.version,
            State::Authenticating { .. } => ProtocolVersion::V5,
            State::Deciding { pending, .. } => pending.connect.protocol,
            _ => ProtocolVersion::V3_1_1,
        }
    }

    /// The largest packet to accept next: before the client is authenticated, the lower
    /// pre-authentication limit (`max_connect_size`).
    pub fn max_packet_size(&self) -> u32 {
        let limits = self.broker.limits();
        if self.is_connected() {
            limits.max_packet_size
        } else {
            limits.max_packet_size.min(limits.max_connect_size)
        }
    }

    pub fn client_id(&self) -> Option<&str> {
        match &self.state {
            State::Connected(a) => Some(a.session.client_id.as_str()),
            _ => None,
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
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
            State::AwaitingConnect { deadline, .. }
            | State::Authenticating { deadline, .. }
            | State::Deciding { deadline, .. } => Some(*deadline),
            // While paused nothing is read, so the keepalive cannot be judged: only the
            // flow-control check is due.
            State::Connected(a) => match (
                &a.pause,
                a.allowance.as_ref().and_then(|b| b.throttled_until),
            ) {
                (_, Some(until)) => Some(until),
                (Some(p), None) => Some(p.check_at),
                (None, None) => a.idle_limit.map(|limit| a.last_received + limit),
            },
            State::Closed => None,
        }
    }

    /// Whether output waits for the store (acknowledgements, held deliveries): written by
    /// `poll_deliver` once durable. A draining server waits for it.
    pub fn holds_output(&self) -> bool {
        matches!(&self.state, State::Connected(a) if a.pending_acks.is_some())
    }

    /// Whether reading from the client is paused by flow control. The driver then reads
    /// nothing (and decodes nothing more from what it already read) until `poll_resume`.
    pub fn is_paused(&self) -> bool {
        match &self.state {
            State::Connected(a) => {
                a.pause.is_some()
                    || a.allowance
                        .as_ref()
                        .is_some_and(|b| b.throttled_until.is_some())
            }
            State::Deciding { .. } => true,
            _ => false,
        }
    }

    /// While paused: `Ready` once the publisher may go on (reading resumes, and the keepalive
    /// counts from `now`: time the broker spent not reading is not held against the client);
    /// otherwise `Pending` with the waker registered with the subscriber's session.
    ///
    /// While the authenticator decides on CONNECT: `Ready` with its outcome once it has (the
    /// CONNACK is written; a refusal closes the connection).
    pub fn poll_resume(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
    ) -> Poll<Result<(), CloseReason>> {
        if let State::Deciding { pending, .. } = &mut self.state {
            let decision = match pending.decision.as_mut().poll(cx) {
                Poll::Ready(decision) => decision,
                Poll::Pending => return Poll::Pending,
            };
            let State::Deciding { pending, .. } = std::mem::replace(&mut self.state, State::Closed)
            else {
                return Poll::Ready(Err(CloseReason::IoError));
            };
            let Deciding {
                connect,
                client_id,
                assigned,
                enhanced,
                claimed,
                ..
            } = *pending;
            if decision != AuthDecision::Allow {
                return Poll::Ready(self.decided(now, connect, client_id, assigned, decision));
            }
            return Poll::Ready(self.accept(now, connect, client_id, assigned, enhanced, claimed));
        }
        let State::Connected(a) = &mut self.state else {
            return Poll::Ready(Ok(()));
        };
        // Throttled: the timer (`deadline`) ends it.
        if a.allowance
            .as_ref()
            .is_some_and(|b| b.throttled_until.is_some())
        {
            return Poll::Pending;
        }
        let Some(pause) = &a.pause else {
            return Poll::Ready(Ok(()));
        };
        let resumed = match &pause.on {
            PausedOn::Subscriber(subscriber) => subscriber.wait_for_room(cx, &self.broker.limits()),
            PausedOn::Fabric => self
                .broker
                .fabric()
                .is_none_or(|fabric| !fabric.wait_room(cx.waker())),
        };
        if resumed {
            a.pause = None;
            a.last_received = a.last_received.max(now);
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), CloseReason> {
        if let State::Connected(a) = &mut self.state {
            if let Some(allowance) = &mut a.allowance {
                if let Some(until) = allowance.throttled_until {
                    if now < until {
                        return Ok(());
                    }
                    // Even again: reading resumes, and the time not read is not held against
                    // the client's keepalive.
                    allowance.throttled_until = None;
                    a.last_received = a.last_received.max(now);
                    return Ok(());
                }
            }
            if let Some(pause) = &mut a.pause {
                if now < pause.check_at {
                    return Ok(());
                }
                // The wait ran out. A subscriber with hold time left is waited for that much
                // more; one without is a slow consumer and stops holding us up. The fabric's
                // queue is waited for while it moves.
                let limits = self.broker.limits();
                let more = match &pause.on {
                    PausedOn::Subscriber(subscriber) if pause.spends => {
                        subscriber.check_hold(pause.progress, now, &limits, &self.broker.stats)
                    }
                    PausedOn::Subscriber(subscriber) => {
                        let (progress, stalled) =
                            subscriber.check_progress(pause.progress, &self.broker.stats);
                        let moved = !stalled && progress != pause.progress;
                        pause.progress = progress;
                        moved.then_some(limits.flow_control_timeout)
                    }
                    PausedOn::Fabric => {
                        let progress = self.broker.fabric().map_or(0, |f| f.progress());
                        let moved = progress != pause.progress;
                        pause.progress = progress;
                        moved.then_some(limits.flow_control_timeout)
                    }
                };
                match more {
                    Some(wait) => pause.check_at = now + wait,
                    None => {
                        a.pause = None;
                        a.last_received = a.last_received.max(now);
                    }
                }
                return Ok(());
            }
        }
        match self.deadline() {
            Some(deadline) if now >= deadline => match self.state {
                State::AwaitingConnect { .. }
                | State::Authenticating { .. }
                | State::Deciding { .. } => {
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
            self.broker
                .stats
                .count_refusal(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
            return CloseReason::Refused(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
        }
        CloseReason::Violation(Violation::Malformed(error))
    }

    /// A CONNECT larger than the pre-authentication limit, refused from its fixed header
    /// (`version` is what its variable header says, when that much had arrived). An MQTT 5
    /// client is told why (CONNACK 0x95, Packet too large); a 3.x CONNACK has no such code,
    /// so that client is closed without one [MQTT-3.1.4-1].
    pub fn refuse_oversized_connect(
        &mut self,
        version: Option<ProtocolVersion>,
        error: DecodeError,
    ) -> CloseReason {
        if !matches!(self.state, State::AwaitingConnect { .. }) {
            return self.handle_decode_error(error);
        }
        self.broker
            .stats
            .count_refusal(ReasonCode::PACKET_TOO_LARGE);
        if version == Some(ProtocolVersion::V5) {
            let refusal = ConnAck {
                session_present: false,
                reason: ReasonCode::PACKET_TOO_LARGE,
                properties: Properties::default(),
            };
            self.write(&Packet::ConnAck(refusal), ProtocolVersion::V5);
            return CloseReason::Refused(ReasonCode::PACKET_TOO_LARGE);
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
            State::Authenticating { .. } => return self.continue_connect_auth(now, packet),
            // Not read while deciding; a driver that decodes anyway gets a clear error.
            State::Deciding { .. } => return Err(CloseReason::IoError),
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
            Packet::Subscribe(s) => self.handle_subscribe(now, s),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u),
            Packet::PingReq => {
                // Behind a CONNACK or acknowledgements still waiting for the store.
                self.ack_when_durable(0, Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    // A session that was to end with the connection may not be kept by a
                    // DISCONNECT [MQTT-3.14.2-2]; otherwise the new interval applies now.
                    if attached.session_expiry == 0 && expiry != 0 {
                        return Err(Violation::SessionExpiryAfterZero.into());
                    }
                    let expiry = expiry.min(self.broker.limits().max_session_expiry);
                    self.with_session(|st, _| st.expiry_interval = expiry)?;
                }
                Err(CloseReason::Disconnect {
                    with_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL,
                })
            }
            Packet::Connect(_) => Err(Violation::SecondConnect.into()),
            Packet::Auth(auth) => self.handle_reauth(auth),
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

    /// Writes a SUBACK or DISCONNECT that may carry a reason string, without it if the packet
    /// would otherwise exceed the client's Maximum Packet Size [MQTT-3.1.2-25].
    fn send_within_limit(&mut self, packet: &Packet) {
        let (version, max) = match &self.state {
            State::Connected(a) => (a.egress.version, a.egress.max_packet_size),
            _ => return self.send(packet),
        };
        write_within(&mut self.out, packet, version, max);
    }

    fn refuse(&mut self, version: ProtocolVersion, reason: ReasonCode) -> Result<(), CloseReason> {
        self.broker.stats.count_refusal(reason);
        let mut refusal = ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        };
        // v5: say why in a reason string (always allowed on CONNACK [MQTT-3.1.2-29]), unless
        // that would exceed the client's Maximum Packet Size [MQTT-3.1.2-25].
        if let (true, Some(text)) = (version.is_v5(), refusal_text(reason)) {
            refusal.properties.reason_string = MqttString::new(text).ok();
            let start = self.out.len();
            self.write(&Packet::ConnAck(refusal.clone()), version);
            if self.out.len() - start <= self.client_max_packet as usize {
                self.state = State::Closed;
                return Err(CloseReason::Refused(reason));
            }
            self.out.truncate(start);
            refusal.properties = Properties::default();
        }
        self.write(&Packet::ConnAck(refusal), version);
        self.state = State::Closed;
        Err(CloseReason::Refused(reason))
    }

    fn handle_connect(&mut self, now: Instant, connect: Connect) -> Result<(), CloseReason> {
        let version = connect.protocol;
        self.client_max_packet = connect.properties.maximum_packet_size.unwrap_or(u32::MAX);
        let limits = &self.broker.limits();
        if self.broker.is_shutting_down() {
            return self.refuse(version, ReasonCode::SERVER_UNAVAILABLE);
        }
        // An operator moves clients elsewhere: v5 clients are told where (0x9C with a Server
        // Reference), 3.x ones that this server is unavailable.
        if let (Some(to), false) = (self.broker.redirect(), self.internal) {
            if !version.is_v5() {
                return self.refuse(version, ReasonCode::SERVER_UNAVAILABLE);
            }
            self.broker
                .stats
                .count_refusal(ReasonCode::USE_ANOTHER_SERVER);
            let mut refusal = ConnAck {
                session_present: false,
                reason: ReasonCode::USE_ANOTHER_SERVER,
                properties: Properties::default(),
            };
            refusal.properties.server_reference = Some(to);
            self.write(&Packet::ConnAck(refusal), version);
            self.state = State::Closed;
            return Err(CloseReason::Refused(ReasonCode::USE_ANOTHER_SERVER));
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
        } else if connect.client_id.len() > usize::from(limits.max_client_id_len)
            || (version == ProtocolVersion::V3_1
                && limits.strict_v31_client_id
                && connect.client_id.chars().count() > 23)
        {
            // MQTT 3.1 (§3.1 CONNECT): "between 1 and 23 characters", return code 2.
            tracing::debug!(peer = %self.peer, len = connect.client_id.len(), %version, "client id too long");
            return self.refuse(version, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        } else {
            connect.client_id.clone()
        };

        // Reserved for the broker's own connections: a client must not take over a bridge's
        // session.
        if !self.internal && client_id.starts_with(INTERNAL_CLIENT_PREFIX) {
            tracing::debug!(peer = %self.peer, client_id = %client_id, "client id reserved for bridges");
            return self.refuse(version, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }

        // The will must be one the server can honour [MQTT-3.2.2-12] [MQTT-3.2.2-13].
        if let Some(will) = &connect.will {
            if version.is_v5() && will.qos > limits.maximum_qos {
                return self.refuse(version, ReasonCode::QOS_NOT_SUPPORTED);
            }
            if version.is_v5() && will.retain && !limits.retain_available {
                return self.refuse(version, ReasonCode::RETAIN_NOT_SUPPORTED);
            }
            if limits.check_payload_format
                && will.properties.payload_format_indicator == Some(1)
                && std::str::from_utf8(&will.payload).is_err()
            {
                return self.refuse(version, ReasonCode::PAYLOAD_FORMAT_INVALID);
            }
        }

        // Authentication Data needs an Authentication Method (§3.1.2.11.10).
        if connect.properties.authentication_data.is_some()
            && connect.properties.authentication_method.is_none()
        {
            return self.refuse(version, ReasonCode::PROTOCOL_ERROR);
        }

        if self.internal {
            return self.accept(now, connect, client_id, assigned, None, false);
        }

        // Enhanced authentication (§4.12): the method's exchange decides, through AUTH
        // packets, before the session is touched.
        if let Some(method) = connect.properties.authentication_method.clone() {
            let exchange = self
                .broker
                .authenticator()
                .enhanced()
                .and_then(|e| e.start_exchange(&method, &self.peer));
            let Some(mut exchange) = exchange else {
                tracing::debug!(peer = %self.peer, client_id = %client_id, %method, "authentication method not supported");
                return self.refuse(version, ReasonCode::BAD_AUTHENTICATION_METHOD);
            };
            let data = connect
                .properties
                .authentication_data
                .clone()
                .unwrap_or_default();
            let step = exchange.step(&data);
            let deadline = match &self.state {
                State::AwaitingConnect { deadline, .. } => *deadline,
                _ => now,
            };
            let pending = Box::new(PendingConnect {
                connect,
                client_id,
                assigned,
                method,
                exchange,
            });
            return self.connect_auth_step(now, deadline, step, pending);
        }

        let outcome = self.broker.authenticator().check(&Credentials {
            client_id: &client_id,
            username: connect.username.as_ref(),
            password: connect.password.as_deref(),
            peer: &self.peer,
            certificate_identity: self.certificate_identity(),
        });
        match outcome {
            AuthOutcome::Decided(decision) => {
                self.decided(now, connect, client_id, assigned, decision)
            }
            AuthOutcome::Pending(decision) => {
                let deadline = match &self.state {
                    State::AwaitingConnect { deadline } => *deadline,
                    _ => now,
                };
                self.state = State::Deciding {
                    deadline,
                    pending: Box::new(Deciding {
                        connect,
                        client_id,
                        assigned,
                        decision,
                        enhanced: None,
                        claimed: false,
                    }),
                };
                Ok(())
            }
        }
    }

    /// CONNECT's credentials were judged: accept, or refuse with the decision's code.
    fn decided(
        &mut self,
        now: Instant,
        connect: Connect,
        client_id: MqttString,
        assigned: Option<MqttString>,
        decision: AuthDecision,
    ) -> Result<(), CloseReason> {
        if decision != AuthDecision::Allow {
            // The authenticator logs failed logins, within a rate limit (a brute force
            // must not write a line per guess).
            tracing::debug!(peer = %self.peer, client_id = %client_id, ?decision, "connection refused by authentication");
            return self.refuse(connect.protocol, decision.reason_code());
        }
        self.accept(now, connect, client_id, assigned, None, false)
    }

    /// Where a CONNECT's enhanced authentication stands after one step of its exchange.
    fn connect_auth_step(
        &mut self,
        now: Instant,
        deadline: Instant,
        step: AuthStep,
        pending: Box<PendingConnect>,
    ) -> Result<(), CloseReason> {
        match step {
            AuthStep::Continue(data) => {
                let mut auth = Auth {
                    reason: ReasonCode::CONTINUE_AUTHENTICATION,
                    properties: Properties::default(),
                };
                auth.properties.authentication_method = Some(pending.method.clone());
                auth.properties.authentication_data = Some(data.into());
                self.write(&Packet::Auth(auth), ProtocolVersion::V5);
                self.state = State::Authenticating { deadline, pending };
                Ok(())
            }
            AuthStep::Success(data) => {
                // The client is the user the method proved, whatever its User Name field
                // says: a CONNECT naming someone else is refused rather than trusted.
                let proven = pending.exchange.user().map(str::to_owned);
                let PendingConnect {
                    mut connect,
                    client_id,
                    assigned,
                    method,
                    ..
                } = *pending;
                if let Some(user) = proven {
                    if connect
                        .username
                        .as_ref()
                        .is_some_and(|u| u.as_str() != user)
                    {
                        tracing::info!(peer = %self.peer, client_id = %client_id, %method, "connection refused: its User Name is not the user the authentication proved");
                        return self.refuse(ProtocolVersion::V5, ReasonCode::NOT_AUTHORIZED);
                    }
                    match MqttString::new(&user) {
                        Ok(user) => connect.username = Some(user),
                        Err(_) => {
                            return self.refuse(ProtocolVersion::V5, ReasonCode::NOT_AUTHORIZED)
                        }
                    }
                }
                tracing::debug!(peer = %self.peer, client_id = %client_id, %method, "enhanced authentication succeeded");
                self.accept(
                    now,
                    connect,
                    client_id,
                    assigned,
                    Some((method, data)),
                    false,
                )
            }
            AuthStep::Failure(code) => {
                tracing::debug!(peer = %self.peer, client_id = %pending.client_id, method = %pending.method, reason = ?code, "connection refused by enhanced authentication");
                let code = if code.is_error() {
                    code
                } else {
                    ReasonCode::NOT_AUTHORIZED
                };
                self.refuse(ProtocolVersion::V5, code)
            }
        }
    }

    /// A packet while the CONNECT's AUTH exchange runs: only AUTH (continue, same method)
    /// moves it on [MQTT-4.12.0-2]; DISCONNECT ends it.
    fn continue_connect_auth(&mut self, now: Instant, packet: Packet) -> Result<(), CloseReason> {
        let State::Authenticating { deadline, pending } =
            std::mem::replace(&mut self.state, State::Closed)
        else {
            return Err(CloseReason::IoError);
        };
        let mut pending = pending;
        match packet {
            Packet::Auth(auth) => {
                if auth.reason != ReasonCode::CONTINUE_AUTHENTICATION {
                    return Err(Violation::AuthReasonInvalid(auth.reason.0).into());
                }
                if auth.properties.authentication_method.as_ref() != Some(&pending.method) {
                    return Err(Violation::AuthMethodMismatch.into());
                }
                let data = auth
                    .properties
                    .authentication_data
                    .clone()
                    .unwrap_or_default();
                let step = pending.exchange.step(&data);
                self.connect_auth_step(now, deadline, step, pending)
            }
            Packet::Disconnect(_) => Err(CloseReason::Disconnect { with_will: false }),
            other => Err(Violation::NotAuthDuringExchange(other.name()).into()),
        }
    }

    /// AUTH from a connected client: re-authentication with the method it connected with
    /// (§4.12.1). Success is answered with AUTH 0x00; failure closes the connection.
    fn handle_reauth(&mut self, auth: Auth) -> Result<(), CloseReason> {
        let broker = self.broker.clone();
        let State::Connected(a) = &mut self.state else {
            return Err(CloseReason::IoError);
        };
        let Some(enhanced) = a.enhanced.as_mut() else {
            return Err(Violation::UnexpectedAuth.into());
        };
        if auth.properties.authentication_method.as_ref() != Some(&enhanced.method) {
            return Err(Violation::AuthMethodMismatch.into());
        }
        let data = auth
            .properties
            .authentication_data
            .clone()
            .unwrap_or_default();
        let step = match auth.reason {
            ReasonCode::REAUTHENTICATE => {
                let exchange = broker
                    .authenticator()
                    .enhanced()
                    .and_then(|e| e.start_exchange(&enhanced.method, &self.peer));
                let Some(exchange) = exchange else {
                    return Err(CloseReason::AuthenticationFailed);
                };
                enhanced.exchange.insert(exchange).step(&data)
            }
            ReasonCode::CONTINUE_AUTHENTICATION => match enhanced.exchange.as_mut() {
                Some(exchange) => exchange.step(&data),
                None => return Err(Violation::AuthReasonInvalid(auth.reason.0).into()),
            },
            other => return Err(Violation::AuthReasonInvalid(other.0).into()),
        };
        let method = enhanced.method.clone();
        let reply = match step {
            AuthStep::Continue(data) => (ReasonCode::CONTINUE_AUTHENTICATION, Some(data)),
            AuthStep::Success(data) => {
                // Re-authentication proves the same user again; it cannot become another.
                let proven = enhanced.exchange.as_ref().and_then(|e| e.user());
                if proven.is_some_and(|u| a.username.as_deref().map(|n| n.as_str()) != Some(u)) {
                    tracing::info!(client_id = %a.session.client_id, peer = %self.peer, "re-authentication proved another user");
                    return Err(CloseReason::AuthenticationFailed);
                }
                enhanced.exchange = None;
                (ReasonCode::SUCCESS, data)
            }
            AuthStep::Failure(code) => {
                tracing::info!(client_id = %a.session.client_id, peer = %self.peer, reason = ?code, "re-authentication failed");
                return Err(CloseReason::AuthenticationFailed);
            }
        };
        let mut packet = Auth {
            reason: reply.0,
            properties: Properties::default(),
        };
        packet.properties.authentication_method = Some(method);
        if let Some(data) = reply.1 {
            packet.properties.authentication_data = Some(data.into());
        }
        self.ack_when_durable(0, Packet::Auth(packet));
        Ok(())
    }

    /// The client is authenticated: attach its session and send CONNACK (with the enhanced
    /// method's final data, if one was used). In cluster mode the client id is first
    /// `claimed` from the other nodes, which may take a while (the state waits in
    /// `Deciding`).
    fn accept(
        &mut self,
        now: Instant,
        connect: Connect,
        client_id: MqttString,
        assigned: Option<MqttString>,
        enhanced: Option<(MqttString, Option<Vec<u8>>)>,
        claimed: bool,
    ) -> Result<(), CloseReason> {
        let login = Login {
            username: connect.username.as_ref().map(|u| u.to_string()),
            certificate: self.certificate_identity().map(str::to_owned),
        };
        let rules = self.broker.acl().filter(|_| !self.internal);
        let identity = Identity {
            client_id: &client_id,
            username: login.username.as_deref(),
            certificate: login.certificate.as_deref(),
        };
        // A client id the ACL binds to some logins is theirs alone: refused before anything
        // (a cluster claim included) touches its session. Its holders, and the broker's own
        // clients (a bridge's local side), may open its session whoever made it.
        let granted = match rules
            .as_ref()
            .and_then(|acl| acl.may_use_client_id(identity))
        {
            Some(false) => {
                tracing::debug!(peer = %self.peer, client_id = %client_id, "connection refused: the ACL binds this client id to other logins");
                return self.refuse(connect.protocol, ReasonCode::NOT_AUTHORIZED);
            }
            Some(true) => true,
            None => self.internal,
        };
        if !claimed && !self.internal {
            let claim = self
                .broker
                .fabric()
                .and_then(|f| f.claim(&client_id, connect.clean_start, &login, granted));
            if let Some(claim) = claim {
                self.state = State::Deciding {
                    deadline: now + CLAIM_LIMIT,
                    pending: Box::new(Deciding {
                        connect,
                        client_id,
                        assigned,
                        // Refused when the session belongs to another login.
                        decision: Box::pin(async move {
                            if claim.await {
                                AuthDecision::Allow
                            } else {
                                AuthDecision::NotAuthorized
                            }
                        }),
                        enhanced,
                        claimed: true,
                    }),
                };
                return Ok(());
            }
        }
        let version = connect.protocol;
        let limits = &self.broker.limits();

        // Topic authorization, compiled for this client. Its will is a message it publishes,
        // checked now rather than dropped silently when the connection ends.
        let acl_generation = self.broker.acl_generation();
        let acl = rules.as_ref().map(|acl| Arc::new(acl.for_client(identity)));
        if let Some(will) = connect.will.as_ref().filter(|w| is_sys(&w.topic)) {
            // `$SYS` is the broker's, ACL or not: a will there would spoof its figures.
            Stats::add(&self.broker.stats.denied_publish, 1);
            tracing::debug!(peer = %self.peer, client_id = %client_id, topic = %will.topic, "connection refused: a will under $SYS");
            return self.refuse(version, ReasonCode::NOT_AUTHORIZED);
        }
        if let (Some(acl), Some(will)) = (&acl, &connect.will) {
            if !acl.may_publish(&will.topic) {
                Stats::add(&self.broker.stats.denied_publish, 1);
                tracing::info!(peer = %self.peer, client_id = %client_id, "connection refused: the ACL does not allow its will topic");
                return self.refuse(version, ReasonCode::NOT_AUTHORIZED);
            }
        }

        // 3.x: Clean Session 0 keeps the session until a clean start. 5.0: the Session
        // Expiry Interval (absent means 0) [MQTT-3.1.2-23], capped by configuration.
        let mut properties = Properties::default();
        let session_expiry = if version.is_v5() {
            let asked = connect.properties.session_expiry_interval.unwrap_or(0);
            let granted = asked.min(limits.max_session_expiry);
            if granted != asked {
                properties.session_expiry_interval = Some(granted);
            }
            granted
        } else if connect.clean_start {
            0
        } else {
            NEVER_EXPIRES
        };
        let attach = match self.broker.attach(
            &client_id,
            connect.clean_start,
            session_expiry,
            self.id,
            &login,
            granted,
            now,
        ) {
            Ok(attach) => attach,
            Err(NotOwner) => {
                tracing::debug!(peer = %self.peer, client_id = %client_id, %login, "connection refused: the client id's session belongs to another login");
                return self.refuse(version, ReasonCode::NOT_AUTHORIZED);
            }
        };
        if attach.took_over {
            Stats::add(&self.broker.stats.takeovers, 1);
            tracing::info!(client_id = %client_id, peer = %self.peer, "session taken over by a new connection");
        }
        if let Some(waker) = attach.displaced {
            waker.wake();
        }

        let mut keep_alive = connect.keep_alive;
        let limits = &self.broker.limits();
        let client = &connect.properties;
        let mut egress = Egress::new(
            version,
            usize::from(limits.max_inflight)
                .min(usize::from(client.receive_maximum.unwrap_or(u16::MAX)))
                .max(1),
        );
        egress.acl = acl;
        if version.is_v5() {
            // Server Keep Alive (§3.2.2.3.14): the broker may impose a maximum.
            if limits.max_keepalive > 0 && (keep_alive == 0 || keep_alive > limits.max_keepalive) {
                keep_alive = limits.max_keepalive;
                properties.server_keep_alive = Some(keep_alive);
            }
            properties.assigned_client_identifier = assigned;
            properties.maximum_packet_size = Some(limits.max_packet_size);
            properties.receive_maximum = Some(limits.receive_maximum);
            if limits.topic_alias_maximum > 0 {
                properties.topic_alias_maximum = Some(limits.topic_alias_maximum);
            }
            if limits.maximum_qos < QoS::ExactlyOnce {
                properties.maximum_qos = Some(limits.maximum_qos as u8);
            }
            if !limits.retain_available {
                properties.retain_available = Some(0);
            }
            if !limits.wildcard_subscriptions {
                properties.wildcard_subscription_available = Some(0);
            }
            if !limits.subscription_identifiers {
                properties.subscription_identifier_available = Some(0);
            }
            if !limits.shared_subscriptions {
                properties.shared_subscription_available = Some(0);
            }
            if let Some((method, data)) = &enhanced {
                properties.authentication_method = Some(method.clone());
                properties.authentication_data = data.clone().map(Into::into);
            }
            if client.request_response_information == Some(1) {
                if let Some(prefix) = &limits.response_information {
                    properties.response_information =
                        MqttString::new(&format!("{prefix}{client_id}")).ok();
                }
            }
            egress.max_packet_size = client.maximum_packet_size.unwrap_or(u32::MAX);
            egress.aliases = TopicAliases::new(
                client
                    .topic_alias_maximum
                    .unwrap_or(0)
                    .min(limits.topic_alias_maximum),
            );
        }
        let connack = ConnAck {
            session_present: attach.session_present,
            reason: ReasonCode::SUCCESS,
            properties,
        };
        let mut pending = std::collections::VecDeque::new();
        if attach.written > self.broker.store().durable() {
            // A persistent session's record is not durable yet: the CONNACK (and all that
            // follows it) waits, so that a crash cannot lose a session the client was told
            // about.
            let mut frames = bytes::BytesMut::new();
            if let Err(e) = petrel_codec::encode(&Packet::ConnAck(connack), version, &mut frames) {
                tracing::error!(error = %e, "cannot encode CONNACK");
            }
            pending.push_back((attach.written, Pending::Frames(frames.freeze())));
        } else {
            self.write(&Packet::ConnAck(connack), version);
        }
        {
            let mut st = attach.session.lock();
            // A disconnect an operator asked of an earlier connection is not this one's.
            st.kick = false;
            st.slow_kick = false;
            st.client = Some(ClientInfo {
                peer: self.peer.clone(),
                version,
                keep_alive,
                connected_at_ms: self.broker.uptime_ms(),
            });
            if attach.session_present {
                let journal = Journal {
                    store: self.broker.store(),
                    client_id: &attach.session.client_id,
                };
                let mut held = Held::new(self.broker.store().durable(), !pending.is_empty());
                let resent =
                    st.resend_inflight(&mut egress, now, &mut self.out, &mut held, journal);
                let stats = &self.broker.stats;
                Stats::add(&stats.dropped_too_large, resent.too_large as u64);
                Stats::add(&stats.dropped_not_authorized, resent.denied as u64);
                if !held.frames.is_empty() {
                    pending.push_back((held.until, Pending::Frames(held.frames.freeze())));
                }
            }
        }
        Stats::add(&self.broker.stats.connections_current, 1);
        Stats::add(&self.broker.stats.connections_total, 1);
        Stats::add(
            &self.broker.stats.connections_by_version[version_index(version)],
            1,
        );
        tracing::debug!(client_id = %client_id, peer = %self.peer, %version, keep_alive, clean = connect.clean_start, session_expiry, "client connected");
        if let (Some(will), Some(fabric), false) =
            (&connect.will, self.broker.fabric(), self.internal)
        {
            // Should this node die, another publishes it.
            fabric.will(&client_id, self.id, Some(will));
        }
        self.state = State::Connected(Box::new(Attached {
            session: attach.session,
            egress,
            session_expiry,
            problem_info: connect.properties.request_problem_information != Some(0),
            bridge: connect.bridge,
            inbound_aliases: Vec::new(),
            idle_limit: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_received: now,
            will: connect.will.map(Box::new),
            pause: None,
            keeper: None,
            pending_acks: (!pending.is_empty()).then(|| Box::new(pending)),
            username: connect.username.clone().map(Box::new),
            allowance: Allowance::new(&self.broker.limits(), now),
            acl_generation,
            enhanced: enhanced.map(|(method, _)| {
                Box::new(Enhanced {
                    method,
                    exchange: None,
                })
            }),
        }));
        Ok(())
    }

    /// The topic of an inbound PUBLISH, resolving and recording v5 topic aliases
    /// (§3.3.2.3.4): an alias with a topic sets it, an alias with an empty topic uses it.
    fn resolve_topic(&mut self, publish: &Publish) -> Result<TopicName, CloseReason> {
        let Some(alias) = publish.properties.topic_alias else {
            return Ok(publish.topic.clone());
        };
        let max = self.broker.limits().topic_alias_maximum;
        let State::Connected(a) = &mut self.state else {
            return Err(CloseReason::IoError);
        };
        if alias == 0 || alias > max {
            return Err(Violation::TopicAliasInvalid(alias).into());
        }
        let slot = usize::from(alias) - 1;
        if publish.topic.is_empty() {
            return match a.inbound_aliases.get(slot).and_then(Option::as_ref) {
                Some(topic) => Ok(topic.clone()),
                None => Err(Violation::TopicAliasUnknown(alias).into()),
            };
        }
        if a.inbound_aliases.len() <= slot {
            a.inbound_aliases.resize(slot + 1, None);
        }
        // An owned copy, so the alias table does not pin the read buffer the topic came in.
        let owned = TopicName::new(&publish.topic).unwrap_or_else(|_| publish.topic.clone());
        a.inbound_aliases[slot] = Some(owned);
        Ok(publish.topic.clone())
    }

    fn handle_publish(&mut self, now: Instant, publish: Publish) -> Result<(), CloseReason> {
        self.refresh_acl();
        let a = self.attached()?;
        let (version, session) = (a.egress.version, a.session.clone());
        // After a takeover this connection may not publish in the session's name.
        if !session.is_owned_by(self.id) {
            return Err(CloseReason::TakenOver);
        }
        if !publish.properties.subscription_identifiers.is_empty() {
            return Err(Violation::SubscriptionIdFromClient.into());
        }
        // One load of the limits for the whole PUBLISH.
        let limits = self.broker.limits();
        let limits = &*limits;
        if publish.qos > limits.maximum_qos {
            return Err(Violation::QoSNotSupported(publish.qos as u8).into());
        }
        let mut retain = publish.retain;
        if retain && !limits.retain_available {
            if version.is_v5() {
                return Err(Violation::RetainNotSupported.into());
            }
            retain = false;
        }
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        // The alias is connection state: recorded even if the message itself is refused below.
        let topic = if version.is_v5() {
            self.resolve_topic(&publish)?
        } else {
            publish.topic.clone()
        };
        if limits.check_payload_format
            && publish.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            // Refused, not routed [MQTT-3.3.2-4]: an acknowledgement with 0x99 ends a QoS 1/2
            // exchange; a QoS 0 message has none, so the connection ends.
            let mut ack = match packet_id {
                Some(id) if version.is_v5() => {
                    PubAck::with_reason(id, ReasonCode::PAYLOAD_FORMAT_INVALID)
                }
                _ => return Err(Violation::PayloadFormatInvalid.into()),
            };
            if self.attached()?.problem_info {
                ack.properties.reason_string =
                    MqttString::new("payload marked UTF-8 is not valid UTF-8").ok();
            }
            let ack = if qos == QoS::ExactlyOnce {
                Packet::PubRec(ack)
            } else {
                Packet::PubAck(ack)
            };
            self.ack_when_durable(0, ack);
            return Ok(());
        }
        if !topic_within(limits, &topic) {
            Stats::add(&self.broker.stats.refused_topic_limits, 1);
            tracing::debug!(peer = %self.peer, "publish refused: topic longer or deeper than allowed");
            return self.refuse_publish(version, qos, packet_id, ReasonCode::TOPIC_NAME_INVALID);
        }
        let allowed = match &self.attached()?.egress.acl {
            Some(acl) => acl.may_publish(&topic),
            None => !is_sys(&topic),
        };
        if !allowed {
            Stats::add(&self.broker.stats.denied_publish, 1);
            tracing::debug!(peer = %self.peer, topic = %topic, "publish refused by the ACL");
            return self.refuse_publish(version, qos, packet_id, ReasonCode::NOT_AUTHORIZED);
        }
        // A new retained message must fit the broker's retained bounds; one that does not is
        // refused whole, so the publisher learns of it (v5) rather than the broker keeping
        // it unretained behind its back.
        let setter = (retain && !publish.payload.is_empty() && !self.internal)
            .then(|| self.retained_setter());
        if let Some(setter) = &setter {
            let full = !self
                .broker
                .retained_room(&topic, topic.len() + publish.payload.len());
            if full || !self.broker.retained_quota_allows(setter, &topic) {
                Stats::add(&self.broker.stats.refused_retained_quota, 1);
                tracing::debug!(peer = %self.peer, topic = %topic, full, "publish refused: past the retained message bounds");
                return self.refuse_publish(version, qos, packet_id, ReasonCode::QUOTA_EXCEEDED);
            }
        }
        // The inbound allowance: past it QoS 0 is dropped; QoS 1/2 is taken and the client
        // is not read from until it is even again.
        if let State::Connected(a) = &mut self.state {
            if let Some(allowance) = &mut a.allowance {
                allowance.refill(limits, now);
                if qos == QoS::AtMostOnce && !allowance.fits(limits, publish.payload.len()) {
                    Stats::add(&self.broker.stats.dropped_inbound_rate, 1);
                    return Ok(());
                }
                if let Some(wait) = allowance.take(limits, publish.payload.len()) {
                    allowance.throttled_until = Some(now + wait);
                    Stats::add(&self.broker.stats.inbound_throttles, 1);
                }
            }
        }
        let mut inbound_token = 0;
        let mut persistent_qos2 = None;
        if qos == QoS::ExactlyOnce {
            let Some(id) = packet_id else {
                return Err(Violation::Malformed(DecodeError::ZeroPacketId).into());
            };
            let receive_maximum = usize::from(limits.receive_maximum);
            let mut st = session.lock();
            if st.owner != Owner::Connection(self.id) {
                return Err(CloseReason::TakenOver);
            }
            // A repeat of a QoS 2 PUBLISH whose PUBREL has not arrived is acknowledged again
            // but not delivered again [MQTT-4.3.3-9].
            if st.inbound_qos2.contains(&id.get()) {
                drop(st);
                self.ack_when_durable(0, Packet::PubRec(PubAck::new(id)));
                return Ok(());
            }
            // The broker's Receive Maximum [MQTT-3.3.4-8]; 3.x clients are bounded by the
            // packet id space instead.
            if version.is_v5() && st.inbound_qos2.len() >= receive_maximum {
                return Err(Violation::ReceiveMaximumExceeded.into());
            }
            st.inbound_qos2.insert(id.get());
            persistent_qos2 = st.persistent().then_some(id);
        }
        let mut message = Message::from_publish(publish, topic, session.id, now);
        message.retain = retain;
        let broker = self.broker.clone();
        let publish_message = |inbound_token: u64, mut message: Message| {
            // Delivered to nobody before its packet id is durable.
            message.hold = inbound_token;
            let message = Arc::new(message);
            // Acknowledged once the retained change, too, is durable.
            let (retain_token, retain_forwarded) = if retain {
                let done = broker.retain(&message);
                if let Some(setter) = &setter {
                    broker.retained_set_by(setter, &message.topic);
                }
                done
            } else {
                (0, 0)
            };
            let mut routed = broker.route(&message);
            routed.forwarded = routed.forwarded.max(retain_forwarded);
            (message, retain_token, routed)
        };
        let (message, retain_token, mut routed) = match persistent_qos2 {
            // The packet id is durable before PUBREC, so that after a restart the repeat is
            // still recognised; and it lands with the message's queue entries (one group), so
            // a crash keeps both or neither: nothing acknowledged is lost, nothing sent twice.
            Some(id) => {
                let store = broker.store();
                let mut message = Some(message);
                let mut result = None;
                store.together(&mut || {
                    let Some(message) = message.take() else {
                        return;
                    };
                    inbound_token = store.inbound_qos2(&session.client_id, id.get(), true);
                    result = Some(publish_message(inbound_token, message));
                });
                result.expect("together runs its closure")
            }
            None => publish_message(0, message),
        };
        let stats = &self.broker.stats;
        Stats::add(&stats.messages_received, 1);
        Stats::add(&stats.publish_received[qos as usize], 1);
        Stats::add(
            &stats.payload_bytes_received[qos as usize],
            message.payload.len() as u64,
        );
        self.broker
            .activity
            .record(&message.topic, message.payload.len());
        if let (Some(keeper), State::Connected(a)) = (routed.keeper.take(), &mut self.state) {
            a.keeper = Some((keeper, now));
        }
        if let Some(subscriber) = routed.congested {
            // The message is queued (so it is acknowledged below), but this publisher reads
            // nothing more until the subscriber catches up. When another subscriber took the
            // message and keeps up, the wait holds that one back too: it is counted against
            // the slow one's hold time, and a subscriber out of hold time is a slow consumer
            // nobody waits for. When every subscriber is behind, the wait is plain back
            // pressure and lasts while the subscriber moves messages at all.
            // Also when this publisher lately fed, on another of its topics, a subscriber that
            // still keeps up: a trickling subscriber alone on one topic would otherwise hold
            // the publisher's other topics back for as long as it liked.
            let fed_other = matches!(&self.state, State::Connected(a) if a.keeper.as_ref().is_some_and(|(k, at)| {
                k.id != subscriber.id
                    && now.saturating_duration_since(*at) < limits.flow_control_window
                    && k.keeps_up(limits)
            }));
            let spends = routed.others_keep_up || fed_other;
            let (progress, left) = if spends {
                subscriber.start_hold(now, limits)
            } else {
                (subscriber.lock().drained, limits.flow_control_timeout)
            };
            if left.is_zero() {
                let _ = subscriber.check_hold(progress, now, limits, &self.broker.stats);
            } else if let State::Connected(a) = &mut self.state {
                Stats::add(&self.broker.stats.flow_control_pauses, 1);
                a.pause = Some(Pause {
                    on: PausedOn::Subscriber(subscriber),
                    progress,
                    spends,
                    check_at: now + left,
                });
            }
        } else if routed.fabric_congested {
            // The same for the queue to other nodes.
            Stats::add(&self.broker.stats.flow_control_pauses, 1);
            let progress = self.broker.fabric().map_or(0, |f| f.progress());
            if let State::Connected(a) = &mut self.state {
                a.pause = Some(Pause {
                    on: PausedOn::Fabric,
                    progress,
                    spends: false,
                    check_at: now + limits.flow_control_timeout,
                });
            }
        }
        let reason = if routed.matched == 0 && version.is_v5() {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        match (qos, packet_id) {
            // Acknowledged only once what it wrote to the store is durable.
            (QoS::AtLeastOnce, Some(id)) => self.ack_when_forwarded(
                routed.token.max(retain_token),
                routed.forwarded,
                Packet::PubAck(PubAck::with_reason(id, reason)),
            ),
            (QoS::ExactlyOnce, Some(id)) => self.ack_when_forwarded(
                routed.token.max(inbound_token).max(retain_token),
                routed.forwarded,
                Packet::PubRec(PubAck::with_reason(id, reason)),
            ),
            _ => {}
        }
        Ok(())
    }

    /// Runs `f` on the session state if this connection still owns it.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&mut crate::session::SessionState, Journal<'_>) -> T,
    ) -> Result<T, CloseReason> {
        let a = self.attached()?;
        let mut st = a.session.lock();
        if st.owner != Owner::Connection(self.id) {
            return Err(CloseReason::TakenOver);
        }
        let journal = Journal {
            store: self.broker.store(),
            client_id: &a.session.client_id,
        };
        Ok(f(&mut st, journal))
    }

    /// A PUBLISH not taken: v5 ends its QoS 1/2 exchange with `code`. 3.x has no way to
    /// refuse one, so the message is acknowledged as usual and dropped. QoS 0 is dropped
    /// either way.
    fn refuse_publish(
        &mut self,
        version: ProtocolVersion,
        qos: QoS,
        packet_id: Option<petrel_codec::PacketId>,
        code: ReasonCode,
    ) -> Result<(), CloseReason> {
        let Some(id) = packet_id else { return Ok(()) };
        let ack = if version.is_v5() {
            PubAck::with_reason(id, code)
        } else {
            PubAck::new(id)
        };
        let ack = if qos == QoS::ExactlyOnce {
            Packet::PubRec(ack)
        } else {
            Packet::PubAck(ack)
        };
        self.ack_when_durable(0, ack);
        Ok(())
    }

    /// Whom `max_retained_per_client` counts this client's retained messages against: its
    /// login (user name, else certificate identity), and an anonymous client by its address,
    /// never by a client id it could change at will.
    fn retained_setter(&self) -> String {
        let username = match &self.state {
            State::Connected(a) => a.username.as_deref().map(|u| u.to_string()),
            _ => None,
        };
        match (username, self.certificate_identity()) {
            (Some(user), _) => format!("user:{user}"),
            (None, Some(certificate)) => format!("certificate:{certificate}"),
            (None, None) => {
                let ip = self.peer.rsplit_once(':').map_or(&*self.peer, |(ip, _)| ip);
                format!("address:{ip}")
            }
        }
    }

    /// After the ACL was replaced (a reload), compiles this client's rules again. One atomic
    /// load when nothing changed.
    fn refresh_acl(&mut self) {
        let generation = self.broker.acl_generation();
        let State::Connected(a) = &mut self.state else {
            return;
        };
        if self.internal {
            return;
        }
        if a.acl_generation == generation {
            return;
        }
        a.acl_generation = generation;
        a.egress.acl = self.broker.acl().map(|acl| {
            Arc::new(acl.for_client(Identity {
                client_id: &a.session.client_id,
                username: a.username.as_ref().map(|u| u.as_str()),
                certificate: self.certificate.as_deref().map(String::as_str),
            }))
        });
    }

    /// Sends a PUBACK/PUBREC (or SUBACK, PUBREL, PUBCOMP) once the writes with durability
    /// `token` are durable, and after every acknowledgement held before it (they go out in
    /// the order the PUBLISH packets came [MQTT-4.6.0-2]). Replies that need nothing durable
    /// (token 0) come this way too, so that none overtakes a held CONNACK [MQTT-3.2.0-1].
    fn ack_when_durable(&mut self, token: u64, ack: Packet) {
        let durable = self.broker.store().durable();
        let State::Connected(a) = &mut self.state else {
            return;
        };
        if a.pending_acks.is_none() && token <= durable {
            self.send_within_limit(&ack);
        } else {
            a.pending_acks
                .get_or_insert_with(Default::default)
                .push_back((token, Pending::Ack(ack)));
        }
    }

    /// In cluster mode: like [`Self::ack_when_durable`], and the acknowledgement also waits
    /// for the fabric to acknowledge `forwarded` (the message's copies on other nodes).
    fn ack_when_forwarded(&mut self, token: u64, forwarded: u64, ack: Packet) {
        if forwarded == 0 {
            return self.ack_when_durable(token, ack);
        }
        let State::Connected(a) = &mut self.state else {
            return;
        };
        let pending = a.pending_acks.get_or_insert_with(Default::default);
        pending.push_back((token, Pending::Forwarded(forwarded)));
        pending.push_back((0, Pending::Ack(ack)));
    }

    /// Writes the held acknowledgements and deliveries that became durable. Returns whether
    /// it wrote any; registers `cx` with the store (or the fabric) while some still wait.
    fn flush_acks(&mut self, cx: &mut Context<'_>) -> bool {
        let broker = self.broker.clone();
        let store = broker.store();
        let fabric = broker.fabric();
        let State::Connected(a) = &mut self.state else {
            return false;
        };
        let Some(pending) = a.pending_acks.as_mut() else {
            return false;
        };
        let (version, max_packet_size) = (a.egress.version, a.egress.max_packet_size);
        let mut wrote = false;
        loop {
            let durable = store.durable();
            let forwarded = fabric.map_or(u64::MAX, |f| f.forwarded());
            while let Some((t, p)) = pending.front() {
                if *t > durable || matches!(p, Pending::Forwarded(f) if *f > forwarded) {
                    break;
                }
                match pending.pop_front() {
                    Some((_, Pending::Ack(ack))) => {
                        write_within(&mut self.out, &ack, version, max_packet_size);
                        wrote = true;
                    }
                    Some((_, Pending::Frames(frames))) => {
                        self.out.extend_from_slice(&frames);
                        wrote = true;
                    }
                    Some((_, Pending::Forwarded(_))) | None => {}
                }
            }
            match pending.front() {
                None => {
                    a.pending_acks = None;
                    return wrote;
                }
                // Registered: the store wakes us once it is durable.
                Some((token, _)) if *token > durable => {
                    if store.wait_durable(*token, cx.waker()) {
                        return wrote;
                    }
                }
                // Registered: the fabric wakes us once the copies are acknowledged.
                Some((_, Pending::Forwarded(f))) => {
                    if fabric.is_some_and(|fabric| fabric.wait_forwarded(*f, cx.waker())) {
                        return wrote;
                    }
                }
                // Became durable meanwhile: go round again.
                Some(_) => {}
            }
        }
    }

    fn handle_puback(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        // An unknown id is ignored: it may be a late duplicate after a resend.
        self.with_session(|st, journal| {
            if let Some(d) = st.acknowledge(ack.packet_id) {
                journal.dequeued(&d);
            }
        })?;
        Ok(())
    }

    fn handle_pubrec(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        let id = ack.packet_id;
        if ack.reason.is_error() {
            // v5: a failure PUBREC ends the exchange; no PUBREL follows (§4.3.3).
            self.with_session(|st, journal| {
                if let Some(i) = st.inflight.iter().position(|f| f.packet_id == id) {
                    if let Some(f) = st.inflight.remove(i) {
                        journal.dequeued(&f.delivery);
                    }
                }
            })?;
            return Ok(());
        }
        let known = self.with_session(|st, journal| match st.received(id) {
            Some(d) if d.seq != 0 => {
                Some(journal.store.released(journal.client_id, d.seq, id.get()))
            }
            Some(_) => Some(0),
            None => None,
        })?;
        let (token, reply) = match known {
            Some(token) => (token, PubAck::new(id)),
            None => (
                0,
                PubAck::with_reason(id, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND),
            ),
        };
        self.ack_when_durable(token, Packet::PubRel(reply));
        Ok(())
    }

    fn handle_pubrel(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        let id = ack.packet_id;
        let known = self.with_session(|st, journal| {
            let known = st.inbound_qos2.remove(&id.get());
            let token = if known && st.persistent() {
                journal
                    .store
                    .inbound_qos2(journal.client_id, id.get(), false)
            } else {
                0
            };
            known.then_some(token)
        })?;
        // PUBCOMP even for an unknown id: the client may be repeating PUBREL after we already
        // completed [MQTT-4.3.3-11].
        let (token, reply) = match known {
            Some(token) => (token, PubAck::new(id)),
            None => (
                0,
                PubAck::with_reason(id, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND),
            ),
        };
        self.ack_when_durable(token, Packet::PubComp(reply));
        Ok(())
    }

    fn handle_pubcomp(&mut self, ack: PubAck) -> Result<(), CloseReason> {
        self.with_session(|st, journal| {
            if let Some(d) = st.completed(ack.packet_id) {
                journal.dequeued(&d);
            }
        })?;
        Ok(())
    }

    fn handle_subscribe(&mut self, now: Instant, subscribe: Subscribe) -> Result<(), CloseReason> {
        self.refresh_acl();
        let a = self.attached()?;
        let (version, session, problem_info, bridge) = (
            a.egress.version,
            a.session.clone(),
            a.problem_info,
            a.bridge,
        );
        let acl = a.egress.acl.clone();
        let limits = &self.broker.limits();
        let subscription_id = match subscribe.properties.subscription_identifiers.first() {
            Some(_) if !limits.subscription_identifiers => {
                return Err(Violation::SubscriptionIdsNotSupported.into());
            }
            Some(&id) => id,
            None => 0,
        };
        // 3.x has a single failure code, 0x80.
        let failure = |code: ReasonCode| {
            if version.is_v5() {
                code
            } else {
                ReasonCode::UNSPECIFIED_ERROR
            }
        };
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut problem: Option<&'static str> = None;
        // SUBACK waits until a persistent session's new subscriptions are durable.
        let mut token = 0;
        let mut replay = Vec::new();
        for (filter, options) in &subscribe.filters {
            let mut options = *options;
            let (shared, topics) = match shared::parse(filter) {
                Ok(Some(s)) => (true, s.filter),
                Ok(None) => (false, filter.clone()),
                Err(_) => {
                    reasons.push(failure(ReasonCode::TOPIC_FILTER_INVALID));
                    problem.get_or_insert("malformed shared subscription filter");
                    continue;
                }
            };
            if shared && !limits.shared_subscriptions {
                reasons.push(failure(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED));
                problem.get_or_insert("shared subscriptions are disabled");
                continue;
            }
            // No Local on a shared subscription [MQTT-3.8.3-4] is refused by the decoder. A 3.x
            // bridge's own subscriptions are No Local (a shared one cannot loop back to it
            // alone, and stays as it is).
            if bridge && !shared {
                options.no_local = true;
            }
            if !limits.wildcard_subscriptions && filter.has_wildcards() {
                reasons.push(failure(ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED));
                problem.get_or_insert("wildcard subscriptions are disabled");
                continue;
            }
            if !topic_within(limits, filter) {
                Stats::add(&self.broker.stats.refused_topic_limits, 1);
                reasons.push(failure(ReasonCode::TOPIC_FILTER_INVALID));
                problem.get_or_insert("topic filter longer or deeper than allowed");
                continue;
            }
            let (held, exists) = {
                let st = session.lock();
                (
                    st.subscriptions.len(),
                    st.subscriptions.contains_key(filter),
                )
            };
            if !exists && held >= limits.max_subscriptions_per_client {
                Stats::add(&self.broker.stats.refused_subscription_quota, 1);
                reasons.push(failure(ReasonCode::QUOTA_EXCEEDED));
                problem.get_or_insert("too many subscriptions for one client");
                continue;
            }
            // Topic authorization: a filter the ACL covers is subscribed as it is; one it
            // allows in part is guarded (only allowed topics are delivered through it); a
            // shared subscription must be covered, since its messages go to one member.
            let guard = match acl.as_ref().map(|acl| acl.subscription(&topics)) {
                None | Some(Verdict::Allowed) => None,
                Some(Verdict::Guarded(guard)) if !shared => Some(guard),
                Some(_) => {
                    Stats::add(&self.broker.stats.denied_subscribe, 1);
                    tracing::debug!(peer = %self.peer, filter = %filter, "subscription refused by the ACL");
                    reasons.push(failure(ReasonCode::NOT_AUTHORIZED));
                    problem.get_or_insert("not authorized for this topic filter");
                    continue;
                }
            };
            // Granted at most the server's Maximum QoS [MQTT-3.2.2-9].
            options.qos = options.qos.min(limits.maximum_qos);
            let Some((existed, written)) = self.broker.subscribe(
                &session,
                self.id,
                filter,
                options,
                subscription_id,
                guard.clone(),
            ) else {
                return Err(CloseReason::TakenOver);
            };
            token = token.max(written);
            reasons.push(ReasonCode(options.qos as u8));
            // Retained messages are not sent for a shared subscription [MQTT-4.8.2-?].
            let send_retained = !shared
                && match options.retain_handling {
                    RetainHandling::OnSubscribe => true,
                    RetainHandling::OnNewSubscription => !existed,
                    RetainHandling::Never => false,
                };
            if send_retained {
                for message in self.broker.retained_matching(filter, now) {
                    if let Some(guard) = &guard {
                        if !guard.iter().any(|f| filter_matches(f, &message.topic)) {
                            continue;
                        }
                    }
                    let qos = message.qos.min(options.qos);
                    let mut d = Delivery::new(message, qos, true, 0);
                    if subscription_id != 0 {
                        d.extra = Some(Box::new(crate::session::DeliveryExtra {
                            subscription_ids: vec![subscription_id],
                            group: None,
                        }));
                    }
                    replay.push(d);
                }
            }
        }
        let mut properties = Properties::default();
        if let (Some(text), true) = (problem, problem_info && version.is_v5()) {
            properties.reason_string = MqttString::new(text).ok();
        }
        self.ack_when_durable(
            token,
            Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                properties,
                reasons,
            }),
        );
        if !replay.is_empty() {
            // Queued behind the SUBACK just written [MQTT-3.8.4-4], sent with RETAIN set.
            self.with_session(|st, _| {
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
        self.ack_when_durable(
            0,
            Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                properties: Properties::default(),
                reasons,
            }),
        );
        Ok(())
    }

    /// Moves queued messages into the output, within the in-flight window and the output
    /// high-water mark. `Ready(Ok)` when something was written; `Pending` with the waker
    /// registered when nothing can be sent until a publisher queues more; `Ready(Err)` when the
    /// session was taken over.
    pub fn poll_deliver(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
    ) -> Poll<Result<(), CloseReason>> {
        self.refresh_acl();
        // Acknowledgements the store has made durable since the last pass.
        let acked = self.flush_acks(cx);
        let State::Connected(a) = &mut self.state else {
            return Poll::Pending;
        };
        // Deliveries held for the store count against the output's bound (a QoS 0 stream
        // behind a held QoS 2 message is not bounded by the in-flight window), and keep the
        // ones after them behind them.
        let (holding, held_bytes) = a.pending_acks.as_ref().map_or((false, 0), |p| {
            p.iter().fold((false, 0), |(any, bytes), (_, p)| match p {
                Pending::Frames(f) => (true, bytes + f.len()),
                Pending::Ack(_) | Pending::Forwarded(_) => (any, bytes),
            })
        });
        if self.out.len() + held_bytes >= OUT_HIGH_WATER {
            // The driver polls again once the socket has taken some of the output, or the
            // store woke us for the held deliveries (`flush_acks` registered).
            return if acked {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let mut st = a.session.lock();
        if st.owner != Owner::Connection(self.id) {
            return Poll::Ready(Err(CloseReason::TakenOver));
        }
        if st.slow_kick {
            st.slow_kick = false;
            return Poll::Ready(Err(CloseReason::SlowConsumer));
        }
        if st.kick {
            st.kick = false;
            return Poll::Ready(Err(if self.broker.redirect().is_some() {
                CloseReason::Redirected
            } else {
                CloseReason::Administrative
            }));
        }
        let mut wake = Vec::new();
        let journal = Journal {
            store: self.broker.store(),
            client_id: &a.session.client_id,
        };
        let mut held = Held::new(self.broker.store().durable(), holding);
        let done = st.drain(
            &mut a.egress,
            now,
            &mut self.out,
            &mut held,
            OUT_HIGH_WATER - held_bytes,
            &self.broker.limits(),
            &mut wake,
            journal,
        );
        if !held.frames.is_empty() {
            // Written by `flush_acks` once durable: the caller polls again after a Ready.
            a.pending_acks
                .get_or_insert_with(Default::default)
                .push_back((held.until, Pending::Frames(held.frames.freeze())));
        }
        if done.sent + done.expired + done.too_large + done.denied > 0 {
            drop(st);
            wake.into_iter().for_each(std::task::Waker::wake);
            let stats = &self.broker.stats;
            Stats::add(&stats.messages_sent, done.sent as u64);
            for q in 0..3 {
                if done.sent_by_qos[q] > 0 {
                    Stats::add(&stats.publish_sent[q], u64::from(done.sent_by_qos[q]));
                    Stats::add(&stats.payload_bytes_sent[q], done.sent_payload_bytes[q]);
                }
            }
            if done.expired > 0 {
                Stats::add(&stats.messages_expired, done.expired as u64);
            }
            if done.too_large > 0 {
                Stats::add(&stats.dropped_too_large, done.too_large as u64);
            }
            if done.denied > 0 {
                Stats::add(&stats.dropped_not_authorized, done.denied as u64);
            }
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
        if acked {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    /// Ends the connection at `now`: tells a v5 client why when the server is the one
    /// closing, detaches from the session (a session with no expiry interval is discarded; one
    /// with an interval starts counting it) and publishes the will where the specification
    /// requires it, now or after its delay. Safe to call more than once.
    pub fn close(&mut self, reason: &CloseReason, now: Instant) {
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
        if a.egress.version.is_v5() {
            if let Some(code) = reason.disconnect_code() {
                let mut disconnect = Disconnect::with_reason(code);
                if let CloseReason::Redirected = reason {
                    disconnect.properties.server_reference = self.broker.redirect();
                }
                // The reason string is always allowed on DISCONNECT [MQTT-3.1.2-29].
                if let CloseReason::Violation(v) = reason {
                    disconnect.properties.reason_string = MqttString::new(&v.to_string()).ok();
                }
                // Written while still counted as this client's connection (max packet size).
                let max = a.egress.max_packet_size as usize;
                let start = self.out.len();
                self.write(&Packet::Disconnect(disconnect), a.egress.version);
                if self.out.len() - start > max {
                    self.out.truncate(start);
                    self.write(
                        &Packet::Disconnect(Disconnect::with_reason(code)),
                        a.egress.version,
                    );
                }
            }
        }
        match reason {
            CloseReason::Violation(v) => {
                tracing::info!(client_id = %a.session.client_id, peer = %self.peer, rule = %v, "closing connection: protocol violation");
            }
            CloseReason::KeepAliveTimeout => {
                tracing::info!(client_id = %a.session.client_id, peer = %self.peer, "closing connection: keepalive expired");
            }
            other => {
                tracing::debug!(client_id = %a.session.client_id, peer = %self.peer, reason = ?other, "connection closed");
            }
        }
        let had_will = a.will.is_some();
        let will = if reason.publishes_will() {
            a.will
        } else {
            None
        };
        self.broker.detach(&a.session, self.id, will, now);
        if let (true, Some(fabric)) = (had_will, self.broker.fabric()) {
            // Published or dropped here: no longer the cluster's to publish should this node
            // die.
            fabric.will(&a.session.client_id, self.id, None);
        }
        let stats = &self.broker.stats;
        stats
            .connections_current
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        stats.connections_by_version[version_index(a.egress.version)]
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if *reason == CloseReason::Administrative {
            Stats::add(&stats.admin_disconnects, 1);
            tracing::info!(client_id = %a.session.client_id, peer = %self.peer, "disconnected by an operator");
        }
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
            // The one place the engine reads the clock: there is no caller to ask.
            self.close(&CloseReason::IoError, Instant::now());
        }
    }
}

/// Writes a packet; if it exceeds the client's Maximum Packet Size, writes it again without
/// its properties (reason string, user properties), which the client may do without
/// [MQTT-3.1.2-24].
fn write_within(out: &mut BytesMut, packet: &Packet, version: ProtocolVersion, max: u32) {
    let start = out.len();
    if let Err(e) = petrel_codec::encode(packet, version, out) {
        tracing::error!(error = %e, packet = packet.name(), "cannot encode packet");
    }
    if out.len() - start <= max as usize {
        return;
    }
    out.truncate(start);
    let mut bare = packet.clone();
    match &mut bare {
        Packet::SubAck(p) => p.properties = Properties::default(),
        Packet::Disconnect(p) => p.properties = Properties::default(),
        Packet::PubAck(p) | Packet::PubRec(p) => p.properties = Properties::default(),
        _ => {}
    }
    if let Err(e) = petrel_codec::encode(&bare, version, out) {
        tracing::error!(error = %e, packet = packet.name(), "cannot encode packet");
    }
}

/// Whether a topic name or filter is within `max_topic_length` and `max_topic_levels`.
fn topic_within(limits: &Limits, topic: &str) -> bool {
    topic.len() <= limits.max_topic_length
        && topic.bytes().filter(|&b| b == b'/').count() < limits.max_topic_levels
}
