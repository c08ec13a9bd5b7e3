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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::BytesMut;
use petrel_codec::{
    MqttString, Packet, PacketId, ProtocolVersion, PubAck, QoS, SubscriptionOptions, TopicFilter,
};

use crate::limits::Limits;
use crate::message::{Message, SessionId};
use crate::stats::Stats;

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
}

/// What became of an offered message that was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    Queued,
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
    /// QoS 0 to an offline session: not queued (§4.1 allows either; we keep memory for QoS 1/2).
    Offline,
    /// The session ended between matching and delivery.
    Ended,
}

pub struct SessionState {
    pub owner: Owner,
    /// Wakes the attached connection's task when a message is queued.
    pub waker: Option<Waker>,
    /// Clean Session 0: the session survives the connection.
    pub persistent: bool,
    pub subscriptions: HashMap<TopicFilter, SubscriptionOptions>,
    /// Messages not yet sent, oldest first. QoS 0, 1 and 2 share it so that messages on one
    /// topic leave in the order they arrived.
    pub queue: VecDeque<Delivery>,
    /// QoS 1/2 entries in `queue` and the weight of them.
    pub queued_messages: usize,
    pub queued_bytes: usize,
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
    /// No progress for a whole `flow_control_timeout` with the queue full: publishers no
    /// longer wait, and messages past the bounds are dropped. Cleared when the queue drains.
    pub stalled: bool,
    /// A drop was logged since the queue last drained, so a flood logs once.
    drop_logged: bool,
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
    pub fn new(id: SessionId, client_id: MqttString, owner: Owner, persistent: bool) -> Session {
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
                waker: None,
                persistent,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                queued_messages: 0,
                queued_bytes: 0,
                qos0_bytes: 0,
                inflight: VecDeque::new(),
                inbound_qos2: HashSet::new(),
                next_packet_id: 1,
                blocked: Vec::new(),
                drained: 0,
                stalled: false,
                drop_logged: false,
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

    /// Whether `connection` still owns the session, without locking.
    pub fn is_owned_by(&self, connection: u64) -> bool {
        self.owner_id.load(Ordering::Acquire) == connection
    }

    /// Offers a message from a publisher. Applies the queue bounds; wakes the attached
    /// connection when the message is queued.
    pub fn offer(
        &self,
        delivery: Delivery,
        limits: &Limits,
        stats: &Stats,
    ) -> Result<Admitted, Dropped> {
        let (admitted, waker) = {
            let mut st = self.lock();
            match st.push(delivery, limits) {
                Ok(admitted) => (admitted, st.waker.take()),
                Err(reason) => {
                    if !st.drop_logged && reason != Dropped::Ended {
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
        Ok(admitted)
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
}

impl SessionState {
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
                admitted
            }
        };
        self.queue.push_back(delivery);
        Ok(admitted)
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
        let weight = d.weight as usize;
        if d.qos == QoS::AtMostOnce {
            self.qos0_bytes -= weight;
        } else if weight > 0 {
            self.queued_messages -= 1;
            self.queued_bytes -= weight;
        }
        Some(d)
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

    fn allocate_packet_id(&mut self) -> PacketId {
        // The in-flight window is at most 65,535 (config bound) and we only allocate while
        // below it, so a free id always exists and this loop ends.
        loop {
            let candidate = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            let Some(id) = NonZeroU16::new(candidate) else {
                continue;
            };
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Moves queued messages to the wire: QoS 0 directly, QoS 1/2 while the in-flight window
    /// has room. Stops when `out` passes `max_out` bytes so a slow socket applies back-pressure
    /// to the queue (where the bounds live) rather than to an ever-growing write buffer.
    /// Returns the number of PUBLISH packets written. Publishers paused on this queue that may
    /// resume are moved to `wake`, to be woken once the lock is released.
    pub fn drain(
        &mut self,
        version: ProtocolVersion,
        window: usize,
        out: &mut BytesMut,
        max_out: usize,
        limits: &Limits,
        wake: &mut Vec<Waker>,
    ) -> usize {
        let mut sent = 0;
        while out.len() < max_out && self.has_sendable(window) {
            let Some(d) = self.pop() else { break };
            if d.qos == QoS::AtMostOnce {
                d.message
                    .encode_into(version, d.qos, None, d.retain, false, out);
            } else {
                let packet_id = self.allocate_packet_id();
                d.message
                    .encode_into(version, d.qos, Some(packet_id), d.retain, false, out);
                self.inflight.push_back(Inflight {
                    packet_id,
                    delivery: d,
                    stage: InflightStage::Published,
                });
            }
            sent += 1;
        }
        if sent > 0 && self.below_low_water(limits) {
            self.stalled = false;
            self.drop_logged = false;
            wake.append(&mut self.blocked);
        }
        sent
    }

    /// Writes every unacknowledged outbound message again, in order, for a resumed session:
    /// PUBLISH with DUP set, or PUBREL where PUBREC already arrived [MQTT-4.4.0-1].
    pub fn resend_inflight(&self, version: ProtocolVersion, out: &mut BytesMut) {
        for f in &self.inflight {
            match f.stage {
                InflightStage::Published => f.delivery.message.encode_into(
                    version,
                    f.delivery.qos,
                    Some(f.packet_id),
                    f.delivery.retain,
                    true,
                    out,
                ),
                InflightStage::Released => {
                    let _ = petrel_codec::encode(
                        &Packet::PubRel(PubAck::new(f.packet_id)),
                        version,
                        out,
                    );
                }
            }
        }
    }

    fn position(&self, packet_id: PacketId) -> Option<usize> {
        // Acknowledgements mostly arrive in send order, so the match is usually at the front.
        self.inflight.iter().position(|f| f.packet_id == packet_id)
    }

    /// PUBACK for a QoS 1 delivery. Returns false if no such delivery was waiting.
    pub fn acknowledge(&mut self, packet_id: PacketId) -> bool {
        match self.position(packet_id) {
            Some(i)
                if self.inflight[i].delivery.qos == QoS::AtLeastOnce
                    && self.inflight[i].stage == InflightStage::Published =>
            {
                self.inflight.remove(i);
                true
            }
            _ => false,
        }
    }

    /// PUBREC for a QoS 2 delivery: the message is now the receiver's; keep only the id until
    /// PUBCOMP. Returns false if the id is unknown.
    pub fn received(&mut self, packet_id: PacketId) -> bool {
        match self.position(packet_id) {
            Some(i) if self.inflight[i].delivery.qos == QoS::ExactlyOnce => {
                self.inflight[i].stage = InflightStage::Released;
                true
            }
            _ => false,
        }
    }

    /// PUBCOMP for a QoS 2 delivery.
    pub fn completed(&mut self, packet_id: PacketId) -> bool {
        match self.position(packet_id) {
            Some(i) if self.inflight[i].stage == InflightStage::Released => {
                self.inflight.remove(i);
                true
            }
            _ => false,
        }
    }
}
