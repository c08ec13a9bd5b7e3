//! The engine's limits: every queue and buffer bound in one struct, filled from the server's
//! configuration. Defaults are what a broker on a small machine should run with.

use std::time::Duration;

use petrel_codec::QoS;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest packet accepted from a client, header included. Checked from the fixed header,
    /// before the body is buffered.
    pub max_packet_size: u32,
    /// Largest packet accepted before the client is authenticated (CONNECT, and AUTH during an
    /// exchange), header included; the lower of this and `max_packet_size` applies. Without
    /// it, every connection that has not yet proved anything could make the broker buffer a
    /// whole `max_packet_size` until its connect deadline.
    pub max_connect_size: u32,
    /// Bytes of incomplete packets all connections together may hold (the server's read
    /// buffers). Past it, connections that are not authenticated are closed rather than let
    /// grow; authenticated ones with keep alive 0 may take it to twice this, and are closed past
    /// that; those with a keep alive are counted but not refused.
    pub max_partial_input_total: usize,
    /// Outbound QoS 1/2 messages sent but not yet acknowledged, per connection. The window
    /// keeps a slow client from holding an unbounded retransmission set.
    pub max_inflight: u16,
    /// QoS 1/2 messages waiting per session (offline, or behind the in-flight window). For a
    /// connected subscriber this is where flow control starts: publishers that reach a full
    /// queue pause until it drains (see `flow_control_timeout`). For an offline session it is
    /// the bound: further messages are dropped and counted.
    pub max_queued_messages: usize,
    /// Payload bytes waiting per session, same policy.
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages waiting in all sessions together. Past it, messages for offline and
    /// stalled sessions are dropped (newest or oldest, as `drop_oldest` says) and counted;
    /// connected subscribers keep their own bounds and flow control. This is what bounds
    /// the memory of many offline sessions, each within its own bounds.
    pub max_queued_messages_total: usize,
    /// Payload bytes waiting in all sessions together, same policy.
    pub max_queued_bytes_total: usize,
    /// QoS 0 payload bytes waiting for one connection, same flow-control policy as the queue.
    /// This is what keeps a subscriber that stopped reading from growing the broker's memory.
    pub outbox_bytes: usize,
    /// How long, in total within `flow_control_window`, publishers wait, paused, for one
    /// subscriber whose queue is full, whether it reads nothing or only a little. After it the
    /// subscriber counts as stalled (a slow consumer): it no longer holds publishers up, and
    /// messages for it past its queue bounds are dropped and counted until it catches up.
    /// Zero: never pause, drop at once.
    pub flow_control_timeout: Duration,
    /// The window `flow_control_timeout` is a budget within: a subscriber may hold its
    /// publishers back for at most about `flow_control_timeout` in total per window, however
    /// it reads, before it is treated as a slow consumer (see `crate::hold`).
    pub flow_control_window: Duration,
    /// Disconnect a subscriber found slow (v5 DISCONNECT 0x97) instead of only dropping what
    /// its queue cannot hold.
    pub slow_consumer_disconnect: bool,
    /// Longest client identifier accepted.
    pub max_client_id_len: u16,
    /// Whether an empty client id with clean session gets a generated one [MQTT-3.1.3-6].
    pub allow_empty_client_id: bool,
    pub retain_available: bool,
    /// Upper bound on the keepalive a v5 client may choose (sent as Server Keep Alive); 0 = no
    /// cap.
    pub max_keepalive: u16,
    /// v5 Receive Maximum the broker announces: QoS 2 messages from one client whose
    /// exchange is not complete. A v5 client past it is disconnected with 0x93.
    pub receive_maximum: u16,
    /// v5 Topic Alias Maximum: aliases a client may use towards the broker, and the most
    /// the broker uses towards a client (never more than the client allows). 0 = none.
    pub topic_alias_maximum: u16,
    /// Highest QoS accepted from publishers and granted to subscriptions.
    pub maximum_qos: QoS,
    pub wildcard_subscriptions: bool,
    pub subscription_identifiers: bool,
    pub shared_subscriptions: bool,
    /// Longest v5 Session Expiry Interval granted, in seconds; `u32::MAX` = no cap.
    pub max_session_expiry: u32,
    /// Refuse (0x99) a v5 PUBLISH or will marked as UTF-8 text whose payload is not UTF-8.
    pub check_payload_format: bool,
    /// Prefix of the Response Information sent to a v5 client that asks for it (the client id
    /// follows); `None` = send none.
    pub response_information: Option<String>,
    /// MQTT 3.1 client ids at most 23 characters, as 3.1 requires.
    pub strict_v31_client_id: bool,
    /// When a session's queue is at its bounds and cannot overflow (offline, or stalled):
    /// drop its oldest queued QoS 1/2 message to make room (`true`) or the new one (`false`).
    pub drop_oldest: bool,
    /// Longest topic name or filter accepted, in bytes (the protocol allows 65,535).
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Subscriptions one session may hold; a SUBSCRIBE past it gets 0x97 (quota exceeded).
    pub max_subscriptions_per_client: usize,
    /// PUBLISH packets one client may send per second (0: no limit), with a burst of as many.
    /// Past it a QoS 0 message is dropped and counted; a QoS 1/2 message is taken, and the
    /// client is not read from until its allowance has caught up, so its acknowledgements
    /// come later and it slows down.
    pub max_inbound_messages_per_second: u32,
    /// Payload bytes one client may publish per second (0: no limit), same policy.
    pub max_inbound_bytes_per_second: u32,
    /// Retained messages the broker keeps (the broker's own `$SYS` figures not counted), and
    /// their topic and payload bytes together. A PUBLISH that would set a new retained
    /// message past either is refused whole (v5 PUBACK/PUBREC 0x97; 3.x acknowledged and
    /// dropped) and counted; replacing or clearing one always works.
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
    /// Retained messages one login (an anonymous client: its address) may have set (0: no
    /// limit), refused the same way.
    pub max_retained_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            max_connect_size: 64 * 1024,
            max_partial_input_total: 32 * 1024 * 1024,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_queued_messages_total: 10_000_000,
            max_queued_bytes_total: 4 * 1024 * 1024 * 1024,
            outbox_bytes: 1024 * 1024,
            flow_control_timeout: Duration::from_secs(5),
            flow_control_window: Duration::from_secs(60),
            slow_consumer_disconnect: false,
            max_client_id_len: u16::MAX,
            allow_empty_client_id: true,
            retain_available: true,
            max_keepalive: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            maximum_qos: QoS::ExactlyOnce,
            wildcard_subscriptions: true,
            subscription_identifiers: true,
            shared_subscriptions: true,
            max_session_expiry: u32::MAX,
            check_payload_format: true,
            response_information: Some("response/".to_string()),
            strict_v31_client_id: true,
            drop_oldest: false,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions_per_client: 10_000,
            max_inbound_messages_per_second: 0,
            max_inbound_bytes_per_second: 0,
            max_retained_messages: 100_000,
            max_retained_bytes: 128 * 1024 * 1024,
            max_retained_per_client: 0,
        }
    }
}
