//! Broker-wide counters. Relaxed atomics: each is an independent tally read for reporting, so
//! no ordering between them is needed and the hot path pays one uncontended add.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use petrel_codec::{ProtocolVersion, ReasonCode};

#[derive(Default, Debug)]
pub struct Stats {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_enqueued: AtomicU64,
    pub dropped_outbox_full: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    /// QoS 1/2 messages for offline or stalled sessions dropped at the broker-wide queue
    /// bound (`max_queued_messages_total`, `max_queued_bytes_total`).
    pub dropped_broker_queue_full: AtomicU64,
    pub dropped_offline_qos0: AtomicU64,
    /// Times a publisher was paused because a subscriber's queue was full.
    pub flow_control_pauses: AtomicU64,
    /// Times a subscriber was found stalled: a full queue and nothing read for
    /// `flow_control_timeout`.
    pub stalled_subscribers: AtomicU64,
    /// Times a subscriber that kept reading was still too slow: its publishers had waited
    /// for it `flow_control_timeout` within `flow_control_window`.
    pub slow_consumers: AtomicU64,
    pub connect_timeouts: AtomicU64,
    /// Connections that failed before MQTT began: PROXY header, TLS handshake, WebSocket
    /// upgrade (including those that ran out of time there).
    pub handshake_failures: AtomicU64,
    /// Connections not yet authenticated closed because the partial-input budget
    /// (`max_partial_input_total`) was spent.
    pub partial_input_shed: AtomicU64,
    /// Connections refused by a listener's per-address connection rate limit.
    pub rate_limited: AtomicU64,
    /// Connections refused by a listener's `max_connections_per_ip`.
    pub refused_connections_per_ip: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub takeovers: AtomicU64,
    pub wills_published: AtomicU64,
    /// Offline sessions removed because their Session Expiry Interval passed.
    pub sessions_expired: AtomicU64,
    /// Messages not sent because their Message Expiry Interval passed while queued.
    pub messages_expired: AtomicU64,
    /// Messages not sent because they exceed the subscriber's Maximum Packet Size.
    pub dropped_too_large: AtomicU64,
    /// PUBLISH packets (and wills) the ACL refused.
    pub denied_publish: AtomicU64,
    /// SUBSCRIBE filters the ACL refused.
    pub denied_subscribe: AtomicU64,
    /// PUBLISH packets or subscriptions refused for a topic longer or deeper than allowed.
    pub refused_topic_limits: AtomicU64,
    /// SUBSCRIBE filters refused at `max_subscriptions_per_client`.
    pub refused_subscription_quota: AtomicU64,
    /// PUBLISH packets refused because their retained message would pass
    /// `max_retained_messages` or `max_retained_bytes`.
    pub refused_retained_quota: AtomicU64,
    /// QoS 0 messages dropped past a client's inbound rate.
    pub dropped_inbound_rate: AtomicU64,
    /// Times a client was not read from until its inbound allowance caught up.
    pub inbound_throttles: AtomicU64,
    /// Queued messages not sent because the ACL does not let the subscriber receive them
    /// (a guarded wildcard subscription, or rules changed since they were queued).
    pub dropped_not_authorized: AtomicU64,
    /// Bytes read from and written to client sockets (MQTT bytes, after TLS and WebSocket
    /// framing are removed), counted by the transport once per read or write.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// PUBLISH packets received and sent, and their payload bytes, by QoS (index 0, 1, 2).
    pub publish_received: [AtomicU64; 3],
    pub publish_sent: [AtomicU64; 3],
    pub payload_bytes_received: [AtomicU64; 3],
    pub payload_bytes_sent: [AtomicU64; 3],
    /// Clients connected now, by protocol version: 3.1, 3.1.1, 5.0.
    pub connections_by_version: [AtomicU64; 3],
    /// CONNECTs refused with a CONNACK, by reason ([`Refusal`]).
    pub refused: [AtomicU64; Refusal::ALL.len()],
    /// Connections closed by an operator (admin API).
    pub admin_disconnects: AtomicU64,
}

/// Why a CONNECT was refused, for counting: the CONNACK reason codes the broker sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnsupportedProtocolVersion,
    ClientIdNotValid,
    BadCredentials,
    NotAuthorized,
    ServerUnavailable,
    BadAuthenticationMethod,
    /// The will asks for what the server does not offer (QoS, retain, payload format).
    WillNotSupported,
    ProtocolError,
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::UnsupportedProtocolVersion,
        Refusal::ClientIdNotValid,
        Refusal::BadCredentials,
        Refusal::NotAuthorized,
        Refusal::ServerUnavailable,
        Refusal::BadAuthenticationMethod,
        Refusal::WillNotSupported,
        Refusal::ProtocolError,
        Refusal::Other,
    ];

    pub fn from_reason(code: ReasonCode) -> Refusal {
        match code {
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => Refusal::UnsupportedProtocolVersion,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => Refusal::ClientIdNotValid,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD => Refusal::BadCredentials,
            ReasonCode::NOT_AUTHORIZED => Refusal::NotAuthorized,
            ReasonCode::SERVER_UNAVAILABLE | ReasonCode::SERVER_BUSY => Refusal::ServerUnavailable,
            ReasonCode::BAD_AUTHENTICATION_METHOD => Refusal::BadAuthenticationMethod,
            ReasonCode::QOS_NOT_SUPPORTED
            | ReasonCode::RETAIN_NOT_SUPPORTED
            | ReasonCode::PAYLOAD_FORMAT_INVALID => Refusal::WillNotSupported,
            ReasonCode::PROTOCOL_ERROR => Refusal::ProtocolError,
            _ => Refusal::Other,
        }
    }

    /// The label metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::UnsupportedProtocolVersion => "unsupported_protocol_version",
            Refusal::ClientIdNotValid => "client_id_not_valid",
            Refusal::BadCredentials => "bad_user_name_or_password",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::ServerUnavailable => "server_unavailable",
            Refusal::BadAuthenticationMethod => "bad_authentication_method",
            Refusal::WillNotSupported => "will_not_supported",
            Refusal::ProtocolError => "protocol_error",
            Refusal::Other => "other",
        }
    }
}

/// The index of a protocol version in per-version counters.
pub fn version_index(version: ProtocolVersion) -> usize {
    match version {
        ProtocolVersion::V3_1 => 0,
        ProtocolVersion::V3_1_1 => 1,
        ProtocolVersion::V5 => 2,
    }
}

impl Stats {
    pub(crate) fn count_enqueued(&self) {
        self.messages_enqueued.fetch_add(1, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn count_refusal(&self, reason: ReasonCode) {
        let kind = Refusal::from_reason(reason);
        let i = Refusal::ALL.iter().position(|r| *r == kind).unwrap_or(0);
        self.refused[i].fetch_add(1, Relaxed);
    }
}
