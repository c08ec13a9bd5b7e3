//! Broker-wide counters. Relaxed atomics: each is an independent tally read for reporting, so
//! no ordering between them is needed and the hot path pays one uncontended add.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    pub connect_timeouts: AtomicU64,
    /// Connections that failed before MQTT began: PROXY header, TLS handshake, WebSocket
    /// upgrade (including those that ran out of time there).
    pub handshake_failures: AtomicU64,
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
    /// QoS 0 messages dropped past a client's inbound rate.
    pub dropped_inbound_rate: AtomicU64,
    /// Times a client was not read from until its inbound allowance caught up.
    pub inbound_throttles: AtomicU64,
    /// Queued messages not sent because the ACL does not let the subscriber receive them
    /// (a guarded wildcard subscription, or rules changed since they were queued).
    pub dropped_not_authorized: AtomicU64,
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
}
