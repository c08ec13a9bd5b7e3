//! A session (§4.1): the state that outlives a network connection when Clean Session is 0.
//!
//! One `Session` is shared by `Arc` between the session registry, every subscription of it in
//! the index (so a publisher can reach its queue without a lookup) and the connection currently
//! attached to it. Its mutable state sits behind one `std::sync::Mutex`: every critical section
//! is a few pointer moves or one PUBLISH encode, never an await, so a blocking mutex is cheaper
//! than an async one and cannot be held across I/O.
//!
//! Ownership rule: only the connection whose id is in `owner` may change the state on behalf
//! of a client. A takeover writes the new connection's id there and wakes the old one, which
//! then finds it no longer owns the session and closes without touching it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use petrel_codec::{
    LastWill, MqttString, Packet, PacketId, ProtocolVersion, PubAck, QoS, SubscriptionOptions,
    TopicFilter, TopicName,
};

use crate::acl::ClientAcl;
use crate::auth::Login;
use crate::hold::HoldBudget;
use crate::limits::Limits;
use crate::message::{Message, SessionId};
use crate::shared::SharedGroup;
use crate::stats::Stats;
use crate::store::Store;

/// Session Expiry Interval meaning "never" [MQTT-3.1.2-?]: also what a 3.x Clean Session 0
/// session gets.
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// Which connection, if any, drives the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Persistent session with no client connected: messages queue up within limits.
    Offline,
    Connection(u64),
    /// Discarded (clean session ended, or replaced by a clean start). Nothing is delivered.
    Ended,
}

/// One message waiting for a subscriber.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// Granted QoS for this delivery: min(published, subscribed).
    pub qos: QoS,
    /// Retain flag to send: 1 only for retained messages sent because of a new subscription
    /// [MQTT-3.3.1-8] [MQTT-3.3.1-9].
    pub retain: bool,
    /// Bytes this delivery counts against the queue limits; 0 for retained messages replayed on
    /// subscribe, which already live in the retained store.
    pub weight: u32,
    /// What only some deliveries carry, boxed so the common one stays three words.
    pub extra: Option<Box<DeliveryExtra>>,
    /// Its place in a persistent session's queue as the durable store knows it; 0 when not
    /// stored (QoS 0, a session that ends with its connection, a retained replay).
    pub seq: u64,
}

/// The rarer parts of a delivery.
#[derive(Clone, Debug, Default)]
pub struct DeliveryExtra {
    /// Identifiers of the matching subscriptions that have one [MQTT-3.3.4-3].
    pub subscription_ids: Vec<u32>,
    /// The shared subscription group this delivery was chosen for: if the member goes away
    /// before acknowledging, the message is given to another member.
    pub group: Option<Arc<SharedGroup>>,
}

impl Delivery {
    pub fn new(message: Arc<Message>, qos: QoS, retain: bool, weight: u32) -> Delivery {
        Delivery {
            message,
            qos,
            retain,
            weight,
            extra: None,
            seq: 0,
        }
    }

    pub fn subscription_ids(&self) -> &[u32] {
        self.extra
            .as_deref()
            .map_or(&[][..], |e| &e.subscription_ids[..])
    }

    pub fn group(&self) -> Option<&Arc<SharedGroup>> {
        self.extra.as_deref().and_then(|e| e.group.as_ref())
    }
}

/// Unacknowledged messages a resumed session dropped instead of sending again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resent {
    /// Larger than the new connection's Maximum Packet Size.
    pub too_large: usize,
    /// On a topic its ACL does not let it receive.
    pub denied: usize,
}

/// A subscription as the session remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    /// v5 Subscription Identifier; 0 for none.
    pub id: u32,
}

/// A will waiting for its Will Delay Interval (§3.1.3.2.2), kept in the session: a reconnect
/// to the session before `at` cancels it, the session ending publishes it at once.
#[derive(Debug)]
pub struct PendingWill {
    pub at: Instant,
    pub will: Box<LastWill>,
}

/// How one connection writes PUBLISH packets: what its client accepts. Owned by the
/// connection; the session's `drain` writes through it.
#[derive(Debug)]
pub struct Egress {
    pub version: ProtocolVersion,
    /// Outbound in-flight window: our limit, lowered to the client's v5 Receive Maximum
    /// [MQTT-3.3.4-7].
    pub window: usize,
    /// The client's Maximum Packet Size; `u32::MAX` when it set none. Larger PUBLISH packets
    /// are not sent [MQTT-3.1.2-24] and count as delivered [MQTT-3.1.2-25].
    pub max_packet_size: u32,
    /// Topic aliases this connection has told the client (v5, Topic Alias Maximum > 0).
    pub aliases: TopicAliases,
    /// What this client may publish and receive, when topic authorization is configured.
    /// Every delivery is checked against it as it is written, whatever queued it: a
    /// subscription from before a restart or a reload, a retained message.
    pub acl: Option<Arc<ClientAcl>>,
}

impl Egress {
    pub fn new(version: ProtocolVersion, window: usize) -> Egress {
        Egress {
            version,
            window,
            max_packet_size: u32::MAX,
            aliases: TopicAliases::new(0),
            acl: None,
        }
    }
}

/// Outbound topic aliases of one connection (§3.3.2.3.4): keyed by topic name, numbered from
/// 1 up to the smaller of the client's Topic Alias Maximum and ours. Once all are taken, new
/// topics are sent in full.
#[derive(Debug, Default)]
pub struct TopicAliases {
    max: u16,
    /// Allocated with the first alias, so a connection that never gets one (every 3.x client,
    /// and idle ones) carries one pointer instead of an empty map's 48 bytes.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<TopicName, u16>>>,
}

impl TopicAliases {
    pub fn new(max: u16) -> TopicAliases {
        TopicAliases { max, map: None }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// The alias for `topic` and whether the receiver already knows it; `None` when no alias
    /// is free. A new alias is only taken by [`TopicAliases::commit`].
    pub fn lookup(&self, topic: &TopicName) -> Option<(u16, bool)> {
        let used = match &self.map {
            Some(map) => {
                if let Some(&alias) = map.get(topic) {
                    return Some((alias, true));
                }
                map.len()
            }
            None => 0,
        };
        let next = u16::try_from(used + 1).ok()?;
        (next <= self.max).then_some((next, false))
    }

    pub fn commit(&mut self, topic: &TopicName, alias: u16) {
        // An owned copy: the topic may be a slice of a large read buffer.
        let key = TopicName::new(topic).unwrap_or_else(|_| topic.clone());
        self.map
            .get_or_insert_with(Default::default)
            .insert(key, alias);
    }
}

/// A session's link to the durable store: what `drain` and the acknowledgement handlers
/// report their changes to.
#[derive(Clone, Copy)]
pub struct Journal<'a> {
    pub store: &'a dyn Store,
    pub client_id: &'a str,
}

impl Journal<'_> {
    /// A stored delivery left the session.
    pub fn dequeued(&self, d: &Delivery) {
        if d.seq != 0 {
            self.store
                .dequeued(self.client_id, d.seq, &d.message, d.qos);
        }
    }
}

/// What one `drain` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// PUBLISH packets written.
    pub sent: usize,
    /// Messages whose Message Expiry Interval passed while queued: not sent [MQTT-3.3.2-5].
    pub expired: usize,
    /// Messages larger than the client's Maximum Packet Size: not sent [MQTT-3.1.2-25].
    pub too_large: usize,
    /// Messages on topics the client may not receive: not sent.
    pub denied: usize,
    /// Of `sent`, how many at each QoS, and their payload bytes.
    pub sent_by_qos: [u32; 3],
    pub sent_payload_bytes: [u64; 3],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflightStage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP (QoS 2).
    Released,
}

#[derive(Clone, Debug)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub delivery: Delivery,
    pub stage: InflightStage,
    /// The durability token its PUBLISH waited for (see [`Held`]); a resend waits for it too.
    pub hold: u64,
}

/// Where `drain` writes PUBLISH packets that may not reach the client yet: a QoS 2 message
/// from a persistent publisher before its packet id is durable ([`Message::hold`]), and a
/// QoS 2 delivery to a persistent session before the packet id it goes out with is. Once one
/// is held, every later packet of the pass is held behind it, so the client still receives
/// them in order; the connection writes `frames` when `until` is durable.
#[derive(Debug, Default)]
pub struct Held {
    /// The store's durable token when the pass began.
    pub durable: u64,
    /// Earlier frames of this connection still wait: everything waits behind them.
    pub active: bool,
    pub frames: BytesMut,
    /// The token `frames` wait for.
    pub until: u64,
}

impl Held {
    pub fn new(durable: u64, active: bool) -> Held {
        Held {
            durable,
            active,
            frames: BytesMut::new(),
            until: 0,
        }
    }

    /// The buffer a packet that needs token `need` durable goes to.
    fn buffer<'a>(&'a mut self, out: &'a mut BytesMut, need: u64) -> &'a mut BytesMut {
        if self.active || need > self.durable {
            self.active = true;
            self.until = self.until.max(need);
            &mut self.frames
        } else {
            out
        }
    }
}

/// What became of an offered message that was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Queued within the bounds of a connected subscriber: one that keeps up.
    Queued,
    /// Queued within the bounds of a session with no connection.
    Offline,
    /// Queued past the session's bounds, in the overflow band a connected subscriber has so
    /// that no message is lost while its publishers pause: the publisher should stop sending
    /// until the queue drains (see [`Session::wait_for_room`]).
    Congested,
}

/// Why an offered message was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// QoS 0, and the connection's outbox is past its byte limit (and its overflow band, or
    /// the subscriber is stalled).
    OutboxFull,
    /// QoS 1/2, and the session's queue is past its bounds: offline, stalled, or past the
    /// overflow band.
    QueueFull,
    /// QoS 1/2 for an offline or stalled session, and the queues of all sessions together
    /// are at the broker-wide bound.
    BrokerQueueFull,
    /// QoS 0 to an offline session: not queued (§4.1 allows either; we keep memory for QoS 1/2).
    Offline,
    /// The session ended between matching and delivery.
    Ended,
}

/// Messages and payload bytes queued in all sessions of a broker (QoS 1/2, as counted
/// against each session's own bounds), for the broker-wide bound. Relaxed atomics: pushes on
/// different sessions may pass the check together and overshoot the bound by a few messages,
/// never by more than the number of threads routing at that moment.
#[derive(Debug, Default)]
pub struct QueueTotals {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// A drop at the bound was logged; cleared once a message fits again, so the log has one
    /// line per episode, not one per session.
    full_logged: AtomicBool,
}

impl QueueTotals {
    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn add(&self, messages: usize, bytes: usize) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, messages: usize, bytes: usize) {
        self.messages.fetch_sub(messages, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether one more message of `weight` bytes stays within the broker-wide bounds.
    fn admits(&self, weight: usize, limits: &Limits) -> bool {
        self.messages() < limits.max_queued_messages_total
            && self.bytes().saturating_add(weight) <= limits.max_queued_bytes_total
    }
}

pub struct SessionState {
    pub owner: Owner,
    /// Who the session belongs to: the login that made it. Only that login (or one an ACL
    /// binding lets use the client id) may resume or take it over. `None` only for a session
    /// restored from a record written before owners were kept.
    pub login: Option<Login>,
    /// Wakes the attached connection's task when a message is queued.
    pub waker: Option<Waker>,
    /// Session Expiry Interval in seconds: 0 ends the session with its connection,
    /// [`NEVER_EXPIRES`] keeps it until a clean start (3.x Clean Session 0).
    pub expiry_interval: u32,
    /// While offline with a finite expiry interval: when the session ends.
    pub expires_at: Option<Instant>,
    /// A will delayed by its Will Delay Interval.
    pub pending_will: Option<PendingWill>,
    /// The earliest time the broker's timers will look at this session again, if any.
    pub reminder: Option<Instant>,
    pub subscriptions: HashMap<TopicFilter, Subscription>,
    /// Messages not yet sent, oldest first. QoS 0, 1 and 2 share it so that messages on one
    /// topic leave in the order they arrived.
    pub queue: VecDeque<Delivery>,
    /// QoS 1/2 entries in `queue` and the weight of them.
    pub queued_messages: usize,
    pub queued_bytes: usize,
    /// The broker's totals, which `queued_messages` and `queued_bytes` are part of.
    totals: Arc<QueueTotals>,
    /// Weight of QoS 0 entries in `queue`.
    pub qos0_bytes: usize,
    /// Sent QoS 1/2 messages not yet fully acknowledged, in send order (resent in this order
    /// on reconnect [MQTT-4.6.0-1]).
    pub inflight: VecDeque<Inflight>,
    /// Incoming QoS 2 packet ids whose PUBREL has not arrived: a PUBLISH repeating one is not
    /// routed again (exactly once, §4.3.3).
    pub inbound_qos2: HashSet<u16>,
    next_packet_id: u16,
    /// Publishers paused because this queue is past its bounds; woken when it drains to half.
    blocked: Vec<Waker>,
    /// Messages moved from the queue to the wire so far: a paused publisher compares it to
    /// tell a slow subscriber (progress) from a stalled one (none).
    pub drained: u64,
    /// Out of hold time (see [`HoldBudget`]): it read nothing, or too little, while its
    /// publishers waited for `flow_control_timeout` (within `flow_control_window`).
    /// Publishers no longer wait, and messages past the bounds are dropped (the queue's
    /// overflow policy). Cleared when the queue drains to half.
    pub stalled: bool,
    /// How long publishers have waited on this subscriber lately.
    pub hold: HoldBudget,
    /// Found slow with `slow_consumer_disconnect` on: its connection closes with 0x97.
    pub slow_kick: bool,
    /// A drop was logged since the queue last drained, so a flood logs once.
    drop_logged: bool,
    /// The next delivery's place in the durable store (persistent sessions).
    pub next_seq: u64,
    /// The client connected now, or last (kept while the session is offline), for operators.
    pub client: Option<ClientInfo>,
    /// An operator asked for the connected client to be disconnected: its connection ends
    /// (v5: DISCONNECT 0x98, administrative action) the next time it looks at the session.
    pub kick: bool,
    /// Cluster mode: the session went on to another node (its client connected there). The
    /// connection it leaves behind treats that as a takeover by a new connection.
    pub moved: bool,
}

/// Who drives a session, as operators see it (admin API, dashboard).
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The client's address (`ip:port`, after a PROXY header or X-Forwarded-For).
    pub peer: Arc<str>,
    pub version: ProtocolVersion,
    /// The keep alive in force, in seconds (0: none).
    pub keep_alive: u16,
    /// When it connected: milliseconds since the broker started ([`Broker::uptime_ms`]).
    ///
    /// [`Broker::uptime_ms`]: crate::Broker::uptime_ms
    pub connected_at_ms: u64,
}

pub struct Session {
    pub id: SessionId,
    pub client_id: MqttString,
    /// Mirror of `SessionState::owner` as a connection id (0 = none), so the publish path can
    /// check ownership without taking the lock. Written only together with `owner`.
    owner_id: AtomicU64,
    state: Mutex<SessionState>,
}

impl Session {
    pub fn new(
        id: SessionId,
        client_id: MqttString,
        owner: Owner,
        login: Option<Login>,
        expiry_interval: u32,
        totals: Arc<QueueTotals>,
    ) -> Session {
        let owner_id = match owner {
            Owner::Connection(c) => c,
            _ => 0,
        };
        Session {
            id,
            client_id,
            owner_id: AtomicU64::new(owner_id),
            state: Mutex::new(SessionState {
                owner,
                login,
                waker: None,
                expiry_interval,
                expires_at: None,
                pending_will: None,
                reminder: None,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                queued_messages: 0,
                queued_bytes: 0,
                totals,
                qos0_bytes: 0,
                inflight: VecDeque::new(),
                inbound_qos2: HashSet::new(),
                next_packet_id: 1,
                blocked: Vec::new(),
                drained: 0,
                stalled: false,
                hold: HoldBudget::default(),
                slow_kick: false,
                drop_logged: false,
                next_seq: 1,
                client: None,
                kick: false,
                moved: false,
            }),
        }
    }

    /// Locks the state. A poisoned lock means a thread panicked while holding it; the state is
    /// still structurally valid (every mutation is a single step), so keep serving.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the owner; the caller holds the state lock (`st`).
    pub fn set_owner(&self, st: &mut SessionState, owner: Owner) {
        st.owner = owner;
        let id = match owner {
            Owner::Connection(c) => c,
            _ => 0,
        };
        self.owner_id.store(id, Ordering::Release);
    }

    /// Whether a client is connected to the session, without locking.
    pub fn is_connected(&self) -> bool {
        self.owner_id.load(Ordering::Acquire) != 0
    }

    /// Whether `connection` still owns the session, without locking.
    pub fn is_owned_by(&self, connection: u64) -> bool {
        self.owner_id.load(Ordering::Acquire) == connection
    }

    /// Offers a message from a publisher. Applies the queue bounds; wakes the attached
    /// connection when the message is queued.
    pub fn offer(
        &self,
        mut delivery: Delivery,
        limits: &Limits,
        stats: &Stats,
        store: &dyn Store,
    ) -> Result<(Admitted, u64), Dropped> {
        let (admitted, token, waker) = {
            let mut st = self.lock();
            // A QoS 1/2 message for a persistent session is written to the store, under the
            // session's lock so that the store sees each session's changes in order.
            let mut token = 0;
            if delivery.qos != QoS::AtMostOnce
                && delivery.weight > 0
                && st.persistent()
                && matches!(st.owner, Owner::Connection(_) | Owner::Offline)
            {
                delivery.seq = st.next_seq;
                st.next_seq += 1;
                token = store.enqueued(&self.client_id, delivery.seq, &delivery);
            }
            let (seq, qos) = (delivery.seq, delivery.qos);
            let message = (seq != 0).then(|| delivery.message.clone());
            if limits.drop_oldest {
                for old in st.make_room(&delivery, limits) {
                    Stats::add(&stats.dropped_queue_full, 1);
                    if old.seq != 0 {
                        store.dequeued(&self.client_id, old.seq, &old.message, old.qos);
                    }
                }
            }
            match st.push(delivery, limits) {
                Ok(Admitted::Queued) if !matches!(st.owner, Owner::Connection(_)) => {
                    (Admitted::Offline, token, st.waker.take())
                }
                Ok(admitted) => (admitted, token, st.waker.take()),
                Err(reason) => {
                    if let Some(message) = message {
                        store.dequeued(&self.client_id, seq, &message, qos);
                    }
                    if reason == Dropped::BrokerQueueFull {
                        if !st.totals.full_logged.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                queued = st.totals.messages(),
                                queued_bytes = st.totals.bytes(),
                                "broker-wide queue bound reached (max_queued_messages_total, \
                                 max_queued_bytes_total): dropping messages for offline and \
                                 stalled sessions"
                            );
                        }
                    } else if !st.drop_logged && reason != Dropped::Ended {
                        st.drop_logged = true;
                        let state = match st.owner {
                            Owner::Offline => "offline",
                            _ if st.stalled => "stalled",
                            _ => "connected",
                        };
                        tracing::warn!(client_id = %self.client_id, state, ?reason, "subscriber queue full: dropping messages for it until it drains");
                    }
                    return Err(reason);
                }
            }
        };
        stats.count_enqueued();
        if let Some(w) = waker {
            w.wake();
        }
        Ok((admitted, token))
    }

    /// A publisher paused on this session asks whether it may go on. `Ready` when the queue
    /// has drained to half its bounds, the subscriber is stalled or gone; otherwise the waker
    /// is kept and woken when one of those happens.
    pub fn wait_for_room(&self, cx: &mut std::task::Context<'_>, limits: &Limits) -> bool {
        let mut st = self.lock();
        if st.stalled || !matches!(st.owner, Owner::Connection(_)) {
            return true;
        }
        if !st.below_low_water(limits) {
            if !st.blocked.iter().any(|w| w.will_wake(cx.waker())) {
                st.blocked.push(cx.waker().clone());
            }
            return false;
        }
        true
    }

    /// A paused publisher's wait ran out with no progress since `seen` (a value of
    /// `drained`): marks the subscriber stalled and releases every publisher waiting on it.
    /// Returns the progress counter now, and whether the session was marked stalled.
    pub fn check_progress(&self, seen: u64, stats: &Stats) -> (u64, bool) {
        let mut st = self.lock();
        if st.drained != seen || !matches!(st.owner, Owner::Connection(_)) || st.stalled {
            return (st.drained, false);
        }
        st.stalled = true;
        Stats::add(&stats.stalled_subscribers, 1);
        tracing::warn!(client_id = %self.client_id, "subscriber read nothing with a full queue for the flow-control timeout: its publishers no longer wait for it");
        let blocked = std::mem::take(&mut st.blocked);
        drop(st);
        blocked.into_iter().for_each(Waker::wake);
        (seen, true)
    }

    /// Whether this subscriber keeps up now: connected, not stalled, and its queue and
    /// outbox within their bounds.
    pub fn keeps_up(&self, limits: &Limits) -> bool {
        let st = self.lock();
        matches!(st.owner, Owner::Connection(_))
            && !st.stalled
            && st.queued_messages <= limits.max_queued_messages
            && st.queued_bytes <= limits.max_queued_bytes
            && st.qos0_bytes <= limits.outbox_bytes
    }

    /// A publisher starts waiting on this subscriber (its message took the queue past its
    /// bounds): returns the `drained` counter and the hold time the subscriber has left. With
    /// none left the subscriber is found slow at once ([`Session::check_hold`]) and the
    /// publisher does not wait.
    pub fn start_hold(&self, now: Instant, limits: &Limits) -> (u64, Duration) {
        let mut st = self.lock();
        let (budget, window) = (limits.flow_control_timeout, limits.flow_control_window);
        (st.drained, st.hold.start(now, budget, window))
    }

    /// A paused publisher's wait ran out: `Some(left)` while the subscriber still has hold
    /// time (wait that much more), `None` when the publisher may go on. A subscriber out of
    /// hold time is marked stalled (a slow consumer: counted, logged at most once a window,
    /// disconnected with 0x97 if `slow_consumer_disconnect`), and every publisher waiting on
    /// it is released. `seen` is its `drained` counter when the wait began, to tell one that
    /// read nothing from one that read too little.
    pub fn check_hold(
        &self,
        seen: u64,
        now: Instant,
        limits: &Limits,
        stats: &Stats,
    ) -> Option<Duration> {
        let mut st = self.lock();
        if !matches!(st.owner, Owner::Connection(_)) || st.stalled {
            return None;
        }
        let (budget, window) = (limits.flow_control_timeout, limits.flow_control_window);
        let left = st.hold.left(now, budget, window);
        if !left.is_zero() {
            return Some(left);
        }
        st.stalled = true;
        st.hold.end(now, budget, window);
        let read_nothing = st.drained == seen;
        Stats::add(
            if read_nothing {
                &stats.stalled_subscribers
            } else {
                &stats.slow_consumers
            },
            1,
        );
        if st.hold.should_log(now, window) {
            let disconnect = limits.slow_consumer_disconnect;
            if read_nothing {
                tracing::warn!(client_id = %self.client_id, disconnect, "subscriber read nothing with a full queue for the flow-control timeout: its publishers no longer wait for it");
            } else {
                tracing::warn!(client_id = %self.client_id, disconnect, "subscriber too slow: it held its publishers for the flow-control timeout within the flow-control window; they no longer wait for it, and its queue drops what does not fit");
            }
        }
        let waker = if limits.slow_consumer_disconnect {
            st.slow_kick = true;
            st.waker.take()
        } else {
            None
        };
        let blocked = std::mem::take(&mut st.blocked);
        drop(st);
        blocked.into_iter().for_each(Waker::wake);
        if let Some(waker) = waker {
            waker.wake();
        }
        None
    }
}

impl SessionState {
    /// Whether the session outlives its connection.
    pub fn persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    /// Queues a delivery if the bounds allow it.
    ///
    /// Flow control: a connected subscriber's queue has an overflow band as large again as its
    /// bounds. A message that lands past the bounds is still queued and reported `Congested`,
    /// and its publisher pauses; only past the band (or once the subscriber is stalled, or
    /// for an offline session, which cannot make room by reading) is a message dropped.
    pub fn push(&mut self, delivery: Delivery, limits: &Limits) -> Result<Admitted, Dropped> {
        let weight = delivery.weight as usize;
        let may_overflow = matches!(self.owner, Owner::Connection(_))
            && !self.stalled
            && !limits.flow_control_timeout.is_zero();
        let admitted = match (self.owner, delivery.qos) {
            (Owner::Ended, _) => return Err(Dropped::Ended),
            (Owner::Offline, QoS::AtMostOnce) => return Err(Dropped::Offline),
            (_, QoS::AtMostOnce) => {
                let after = self.qos0_bytes + weight;
                let admitted = if after <= limits.outbox_bytes {
                    Admitted::Queued
                } else if may_overflow && after <= limits.outbox_bytes.saturating_mul(2) {
                    Admitted::Congested
                } else {
                    return Err(Dropped::OutboxFull);
                };
                self.qos0_bytes = after;
                admitted
            }
            _ => {
                let counted = weight > 0;
                let messages = self.queued_messages + usize::from(counted);
                let bytes = self.queued_bytes + weight;
                if counted && !may_overflow {
                    if !self.totals.admits(weight, limits) {
                        return Err(Dropped::BrokerQueueFull);
                    }
                    if self.totals.full_logged.load(Ordering::Relaxed) {
                        self.totals.full_logged.store(false, Ordering::Relaxed);
                    }
                }
                let admitted = if !counted
                    || (messages <= limits.max_queued_messages && bytes <= limits.max_queued_bytes)
                {
                    Admitted::Queued
                } else if may_overflow
                    && messages <= limits.max_queued_messages.saturating_mul(2)
                    && bytes <= limits.max_queued_bytes.saturating_mul(2)
                {
                    Admitted::Congested
                } else {
                    return Err(Dropped::QueueFull);
                };
                self.queued_messages = messages;
                self.queued_bytes = bytes;
                if counted {
                    self.totals.add(1, weight);
                }
                admitted
            }
        };
        self.queue.push_back(delivery);
        Ok(admitted)
    }

    /// With the drop-oldest policy: when `delivery` would not fit a queue that cannot
    /// overflow (offline or stalled), takes its oldest queued QoS 1/2 messages out until it
    /// does, and returns them (to be counted as dropped).
    fn make_room(&mut self, delivery: &Delivery, limits: &Limits) -> Vec<Delivery> {
        let may_overflow = matches!(self.owner, Owner::Connection(_))
            && !self.stalled
            && !limits.flow_control_timeout.is_zero();
        let weight = delivery.weight as usize;
        let mut evicted = Vec::new();
        if may_overflow || delivery.qos == QoS::AtMostOnce || weight == 0 {
            return evicted;
        }
        while self.queued_messages + 1 > limits.max_queued_messages
            || self.queued_bytes + weight > limits.max_queued_bytes
            || !self.totals.admits(weight, limits)
        {
            let Some(i) = self
                .queue
                .iter()
                .position(|d| d.qos != QoS::AtMostOnce && d.weight > 0)
            else {
                break;
            };
            let Some(old) = self.queue.remove(i) else {
                break;
            };
            self.unaccount(&old);
            evicted.push(old);
        }
        evicted
    }

    /// At or below half of every bound: where paused publishers resume and a stalled
    /// subscriber counts as caught up. Half, not the bound itself, so that a queue hovering
    /// at its limit does not wake its publishers once per message.
    fn below_low_water(&self, limits: &Limits) -> bool {
        self.queued_messages <= limits.max_queued_messages / 2
            && self.queued_bytes <= limits.max_queued_bytes / 2
            && self.qos0_bytes <= limits.outbox_bytes / 2
    }

    /// Wakes every publisher paused on this queue: the session is going away or offline.
    pub fn release_blocked(&mut self) {
        self.hold.cancel();
        self.blocked.drain(..).for_each(Waker::wake);
    }

    /// Queues without applying bounds: for retained messages replayed to a new subscription,
    /// whose memory already belongs to the retained store.
    pub fn push_retained(&mut self, delivery: Delivery) {
        debug_assert_eq!(delivery.weight, 0);
        if self.owner != Owner::Ended {
            self.queue.push_back(delivery);
        }
    }

    fn pop(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.drained += 1;
        self.unaccount(&d);
        Some(d)
    }

    /// Takes a delivery that leaves the queue off the queue's bounds.
    fn unaccount(&mut self, d: &Delivery) {
        let weight = d.weight as usize;
        if d.qos == QoS::AtMostOnce {
            self.qos0_bytes -= weight;
        } else if weight > 0 {
            self.queued_messages -= 1;
            self.queued_bytes -= weight;
            self.totals.sub(1, weight);
        }
    }

    /// Empties the queue (the session ended).
    pub fn clear_queue(&mut self) {
        self.queue.clear();
        self.totals.sub(self.queued_messages, self.queued_bytes);
        self.queued_messages = 0;
        self.queued_bytes = 0;
        self.qos0_bytes = 0;
    }

    /// Drops queued QoS 0 messages: they are not kept for an offline client.
    pub fn discard_qos0(&mut self) {
        self.queue.retain(|d| d.qos != QoS::AtMostOnce);
        self.qos0_bytes = 0;
    }

    /// Whether `drain` could write something now.
    pub fn has_sendable(&self, window: usize) -> bool {
        match self.queue.front() {
            None => false,
            Some(d) => d.qos == QoS::AtMostOnce || self.inflight.len() < window,
        }
    }

    /// The next free packet id, not yet taken: `drain` takes it only once the PUBLISH is
    /// written.
    fn peek_packet_id(&self) -> PacketId {
        // The in-flight window is at most 65,535 (config bound) and we only allocate while
        // below it, so a free id always exists and this loop ends.
        let mut candidate = self.next_packet_id;
        loop {
            if let Some(id) = NonZeroU16::new(candidate) {
                if !self.inflight.iter().any(|f| f.packet_id == id) {
                    return id;
                }
            }
            candidate = candidate.checked_add(1).unwrap_or(1);
        }
    }

    /// Moves queued messages to the wire: QoS 0 directly, QoS 1/2 while the in-flight window
    /// has room. Stops when `out` passes `max_out` bytes so a slow socket applies back-pressure
    /// to the queue (where the bounds live) rather than to an ever-growing write buffer.
    /// Returns the number of PUBLISH packets written. Publishers paused on this queue that may
    /// resume are moved to `wake`, to be woken once the lock is released.
    #[allow(clippy::too_many_arguments)]
    pub fn drain(
        &mut self,
        egress: &mut Egress,
        now: Instant,
        out: &mut BytesMut,
        held: &mut Held,
        max_out: usize,
        limits: &Limits,
        wake: &mut Vec<Waker>,
        journal: Journal<'_>,
    ) -> Drained {
        let mut done = Drained::default();
        let mut moved = false;
        while out.len() + held.frames.len() < max_out && self.has_sendable(egress.window) {
            let Some(d) = self.pop() else { break };
            moved = true;
            if d.message.is_expired(now) {
                journal.dequeued(&d);
                done.expired += 1;
                continue;
            }
            if egress
                .acl
                .as_ref()
                .is_some_and(|acl| !acl.may_receive(&d.message.topic))
            {
                journal.dequeued(&d);
                done.denied += 1;
                continue;
            }
            let packet_id = (d.qos != QoS::AtMostOnce).then(|| self.peek_packet_id());
            let (qos_index, payload_len) = (d.qos as usize, d.message.payload.len() as u64);
            let mut need = d.message.hold;
            // Only QoS 2 needs its packet id back after a restart (the client de-duplicates
            // by it); a QoS 1 message is simply sent again.
            if let Some(packet_id) = packet_id.filter(|_| d.seq != 0 && d.qos == QoS::ExactlyOnce) {
                need = need.max(
                    journal
                        .store
                        .sent(journal.client_id, d.seq, packet_id.get()),
                );
            }
            let written = d.message.write_delivery(
                egress,
                d.qos,
                packet_id,
                d.retain,
                false,
                d.subscription_ids(),
                now,
                held.buffer(out, need),
            );
            if written.is_err() {
                journal.dequeued(&d);
                done.too_large += 1;
                continue;
            }
            if let Some(packet_id) = packet_id {
                self.next_packet_id = packet_id.get().checked_add(1).unwrap_or(1);
                self.inflight.push_back(Inflight {
                    packet_id,
                    delivery: d,
                    stage: InflightStage::Published,
                    hold: need,
                });
            }
            done.sent += 1;
            done.sent_by_qos[qos_index] += 1;
            done.sent_payload_bytes[qos_index] += payload_len;
        }
        if moved && self.below_low_water(limits) {
            self.stalled = false;
            self.drop_logged = false;
            self.hold
                .end(now, limits.flow_control_timeout, limits.flow_control_window);
            wake.append(&mut self.blocked);
        }
        done
    }

    /// Writes every unacknowledged outbound message again, in order, for a resumed session:
    /// PUBLISH with DUP set, or PUBREL where PUBREC already arrived [MQTT-4.4.0-1]. A PUBLISH
    /// whose delivery has started is sent even if its message expired since; one whose first
    /// sending still waited for the store waits again (into `held`). One that the new
    /// connection's Maximum Packet Size no longer admits is dropped as delivered
    /// [MQTT-3.1.2-25], so it does not hold a window slot. One whose topic the connection's
    /// ACL does not let it receive (the rules changed, or another login the ACL lets use the
    /// client id resumed the session) is dropped unsent, as the queue's path does: a message
    /// goes only to a login allowed to read it. Returns how many were dropped for each reason.
    pub fn resend_inflight(
        &mut self,
        egress: &mut Egress,
        now: Instant,
        out: &mut BytesMut,
        held: &mut Held,
        journal: Journal<'_>,
    ) -> Resent {
        let mut resent = Resent::default();
        self.inflight.retain(|f| match f.stage {
            InflightStage::Published => {
                let d = &f.delivery;
                if egress
                    .acl
                    .as_ref()
                    .is_some_and(|acl| !acl.may_receive(&d.message.topic))
                {
                    journal.dequeued(d);
                    resent.denied += 1;
                    return false;
                }
                let written = d.message.write_delivery(
                    egress,
                    d.qos,
                    Some(f.packet_id),
                    d.retain,
                    true,
                    d.subscription_ids(),
                    now,
                    held.buffer(out, f.hold),
                );
                if written.is_err() {
                    journal.dequeued(d);
                    resent.too_large += 1;
                }
                written.is_ok()
            }
            InflightStage::Released => {
                let _ = petrel_codec::encode(
                    &Packet::PubRel(PubAck::new(f.packet_id)),
                    egress.version,
                    held.buffer(out, 0),
                );
                true
            }
        });
        resent
    }

    /// Takes every delivery made for a shared subscription that the client has not yet
    /// received: queued ones, and sent ones not acknowledged (QoS 2 past PUBREC is the
    /// client's already). Another member of the group gets them.
    pub fn take_shared_deliveries(&mut self) -> Vec<Delivery> {
        if !self.queue.iter().any(|d| d.extra.is_some())
            && !self.inflight.iter().any(|f| f.delivery.extra.is_some())
        {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.inflight.len());
        for f in self.inflight.drain(..) {
            if f.stage == InflightStage::Published && f.delivery.group().is_some() {
                taken.push(f.delivery);
            } else {
                kept.push_back(f);
            }
        }
        self.inflight = kept;
        let mut queue = VecDeque::with_capacity(self.queue.len());
        while let Some(d) = self.queue.pop_front() {
            if d.group().is_some() {
                self.unaccount(&d);
                taken.push(d);
            } else {
                queue.push_back(d);
            }
        }
        self.queue = queue;
        taken
    }

    fn position(&self, packet_id: PacketId) -> Option<usize> {
        // Acknowledgements mostly arrive in send order, so the match is usually at the front.
        self.inflight.iter().position(|f| f.packet_id == packet_id)
    }

    /// PUBACK for a QoS 1 delivery. Returns the delivery, or `None` if no such delivery was
    /// waiting.
    pub fn acknowledge(&mut self, packet_id: PacketId) -> Option<Delivery> {
        match self.position(packet_id) {
            Some(i)
                if self.inflight[i].delivery.qos == QoS::AtLeastOnce
                    && self.inflight[i].stage == InflightStage::Published =>
            {
                self.inflight.remove(i).map(|f| f.delivery)
            }
            _ => None,
        }
    }

    /// PUBREC for a QoS 2 delivery: the message is now the receiver's; keep only the id until
    /// PUBCOMP. Returns false if the id is unknown.
    pub fn received(&mut self, packet_id: PacketId) -> Option<&Delivery> {
        match self.position(packet_id) {
            Some(i) if self.inflight[i].delivery.qos == QoS::ExactlyOnce => {
                self.inflight[i].stage = InflightStage::Released;
                Some(&self.inflight[i].delivery)
            }
            _ => None,
        }
    }

    /// PUBCOMP for a QoS 2 delivery.
    pub fn completed(&mut self, packet_id: PacketId) -> Option<Delivery> {
        match self.position(packet_id) {
            Some(i) if self.inflight[i].stage == InflightStage::Released => {
                self.inflight.remove(i).map(|f| f.delivery)
            }
            _ => None,
        }
    }
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.totals.sub(self.queued_messages, self.queued_bytes);
    }
}
