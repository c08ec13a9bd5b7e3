//! Where durable state goes. The engine keeps its live state in memory and reports every change
//! that must survive a restart to a [`Store`]; the disk store (`petrel-store`) writes them
//! through, and [`Volatile`] — the in-memory mode — keeps nothing beyond the engine's own
//! structures, so a restart starts empty. At start the server reads what the store holds and
//! hands it to [`crate::Broker::restore`].
//!
//! Only persistent sessions (3.x Clean Session 0, v5 Session Expiry Interval > 0) are reported:
//! a session that ends with its connection has nothing to survive a restart. The hooks are
//! called after the change is made in memory, some of them under a session's lock: a store
//! must not call back into the broker.

use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use petrel_codec::{LastWill, QoS, TopicFilter};

use crate::auth::Login;
use crate::message::Message;
use crate::session::{Delivery, Subscription};

pub trait Store: Send + Sync + 'static {
    /// A session was created or resumed with this Session Expiry Interval; 0 means it ends
    /// with its connection, and a store forgets any earlier record of it. `login` is who owns
    /// it (`None`: not known, a session from a store written before owners were kept).
    /// Returns the write's durability token: the CONNACK of a persistent session waits for it.
    fn session_opened(&self, client_id: &str, expiry_interval: u32, login: Option<&Login>) -> u64;
    /// A persistent session's client left: the session (with this Session Expiry Interval)
    /// ends at `expires_at` (`None`: never) unless it is resumed first.
    fn session_offline(
        &self,
        client_id: &str,
        expiry_interval: u32,
        expires_at: Option<Instant>,
        login: Option<&Login>,
    );
    /// The session ended; its subscriptions go with it.
    fn session_removed(&self, client_id: &str);
    /// Returns the write's durability token: SUBACK waits for it, so that a client told it is
    /// subscribed stays subscribed across a crash.
    fn subscription_added(
        &self,
        client_id: &str,
        filter: &TopicFilter,
        subscription: Subscription,
    ) -> u64;
    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter);
    /// A retained message was stored or replaced. Returns the write's durability token: the
    /// publisher's acknowledgement waits for it.
    fn retained_set(&self, message: &Message) -> u64;
    /// A retained message was removed. Returns the write's durability token.
    fn retained_cleared(&self, topic: &str) -> u64;

    /// A QoS 1/2 message was queued for a persistent session at `seq` (its place in that
    /// session's queue). Returns the write's durability token.
    fn enqueued(&self, client_id: &str, seq: u64, delivery: &Delivery) -> u64;
    /// It is being sent to the client with `packet_id` (only QoS 2 deliveries report this).
    /// Returns the write's durability token: the PUBLISH is written to the client only once
    /// it is durable, so that after a crash the message goes out again with the same packet
    /// id, which the client recognises, and not as a new message.
    fn sent(&self, client_id: &str, seq: u64, packet_id: u16) -> u64;
    /// PUBREC arrived for it (sent with `packet_id`): only the PUBREL/PUBCOMP exchange
    /// remains. Returns the write's durability token: PUBREL waits for it, so that a crash
    /// cannot bring back a PUBLISH the client has already released and forgotten.
    fn released(&self, client_id: &str, seq: u64, packet_id: u16) -> u64;
    /// It left the session: delivered (PUBACK, PUBCOMP), dropped or given to another member.
    /// `qos` is the delivery's (only QoS 2 deliveries report `sent`).
    fn dequeued(&self, client_id: &str, seq: u64, message: &Message, qos: QoS);
    /// An inbound QoS 2 packet id awaiting PUBREL was recorded (`present`) or released.
    /// Returns the write's durability token: PUBREC waits for the record, PUBCOMP for its
    /// removal (after PUBCOMP the client may use the id for a new message, which a record
    /// brought back by a crash would take for a repeat).
    fn inbound_qos2(&self, client_id: &str, packet_id: u16, present: bool) -> u64;
    /// A will waiting for its Will Delay Interval (`Some`: until the instant given), or no
    /// longer waiting (`None`: sent, cancelled by a reconnect).
    fn will_pending(&self, client_id: &str, will: Option<(Instant, &LastWill)>);
    /// Runs `f` so that the changes it reports become durable together (one group): a QoS 2
    /// PUBLISH records its packet id and routes in one, so a crash keeps both or neither.
    /// Runs `f` exactly once; `f` must not call `together` again.
    fn together(&self, f: &mut dyn FnMut()) {
        f();
    }
    /// The highest durability token whose write is durable under the store's policy.
    fn durable(&self) -> u64;
    /// Asks for `waker` to be woken once `token` is durable; false if it already is.
    fn wait_durable(&self, token: u64, waker: &Waker) -> bool;
    /// Blocks until every change reported so far is on disk, whatever the fsync policy:
    /// called once the broker has stopped.
    fn flush(&self) {}
    /// What the store has done so far, for metrics; `None` for a store that keeps nothing.
    fn metrics(&self) -> Option<StoreMetrics> {
        None
    }
}

/// A durable store's figures, read for metrics.
#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    /// Bytes the store takes on disk.
    pub disk_bytes: u64,
    /// Deliveries queued for persistent sessions, and how many of them were written (the
    /// rest were acknowledged before their turn came).
    pub enqueued: u64,
    pub queue_writes: u64,
    /// Write rounds (one batch, at most one sync each) and how long each took, write and
    /// sync together, in seconds: the count in each bucket by its upper bound (not
    /// cumulative; the last bound is infinity).
    pub rounds: u64,
    pub round_seconds_sum: f64,
    pub round_seconds_buckets: Vec<(f64, u64)>,
}

/// The in-memory mode: state lives only in the engine.
pub struct Volatile;

impl Store for Volatile {
    fn session_opened(&self, _: &str, _: u32, _: Option<&Login>) -> u64 {
        0
    }
    fn session_offline(&self, _: &str, _: u32, _: Option<Instant>, _: Option<&Login>) {}
    fn session_removed(&self, _: &str) {}
    fn subscription_added(&self, _: &str, _: &TopicFilter, _: Subscription) -> u64 {
        0
    }
    fn subscription_removed(&self, _: &str, _: &TopicFilter) {}
    fn retained_set(&self, _: &Message) -> u64 {
        0
    }
    fn retained_cleared(&self, _: &str) -> u64 {
        0
    }
    fn enqueued(&self, _: &str, _: u64, _: &Delivery) -> u64 {
        0
    }
    fn sent(&self, _: &str, _: u64, _: u16) -> u64 {
        0
    }
    fn released(&self, _: &str, _: u64, _: u16) -> u64 {
        0
    }
    fn dequeued(&self, _: &str, _: u64, _: &Message, _: QoS) {}
    fn inbound_qos2(&self, _: &str, _: u16, _: bool) -> u64 {
        0
    }
    fn will_pending(&self, _: &str, _: Option<(Instant, &LastWill)>) {}
    fn durable(&self) -> u64 {
        u64::MAX
    }
    fn wait_durable(&self, _: u64, _: &Waker) -> bool {
        false
    }
}

/// Where a stored delivery stood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredStage {
    /// Not yet sent.
    Queued,
    /// Sent with this packet id, not acknowledged.
    Published(u16),
    /// QoS 2, PUBREC received for this packet id; PUBREL sent or to be sent.
    Released(u16),
}

/// A delivery of a persistent session as the store gives it back.
#[derive(Clone, Debug)]
pub struct StoredDelivery {
    pub seq: u64,
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub stage: StoredStage,
}

/// A persistent session as a store gives it back at start.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub client_id: String,
    /// Who owns it; `None` in a record written before owners were kept (the first login to
    /// resume it becomes its owner).
    pub login: Option<Login>,
    pub expiry_interval: u32,
    /// When the offline session ends; `None`: never (or it was connected when the broker
    /// stopped, and its interval starts now).
    pub expires_at: Option<Instant>,
    pub subscriptions: Vec<(TopicFilter, Subscription)>,
    /// Queued and in-flight deliveries, in queue order.
    pub deliveries: Vec<StoredDelivery>,
    /// Inbound QoS 2 packet ids whose PUBREL has not arrived.
    pub inbound_qos2: Vec<u16>,
    /// A will waiting for its delay, and when it is due.
    pub pending_will: Option<(Instant, LastWill)>,
}
