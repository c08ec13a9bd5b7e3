//! The shared broker state and the routing façade: the session registry, the subscription
//! indexes (ordinary and shared), the retained store and the broker's timers. Every connection
//! task holds an `Arc<Broker>` and does its own routing: there is no router thread that
//! messages cross.
//!
//! Lock order (never acquire a lock to the left while holding one to its right):
//!
//! ```text
//! sessions (registry)  →  Session::state  →  index  →  shared groups  →  retained  →  timers
//! ```
//!
//! `route` takes the index read locks only to collect targets, releases them, then locks each
//! target session in turn, so publishers hold at most one lock at a time.

use std::cell::RefCell;
use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_codec::{
    LastWill, MqttString, PacketId, Properties, Publish, QoS, SubscriptionOptions, TopicFilter,
    TopicName,
};

use crate::acl::{is_sys, Acl};
use crate::activity::TopicActivity;
use crate::auth::{AllowAll, Authenticator, Login};
use crate::fabric::Fabric;
use crate::limits::Limits;
use crate::message::{Message, SessionId};
use crate::retained::RetainedTrie;
use crate::session::{
    Admitted, ClientInfo, Delivery, DeliveryExtra, Dropped, Inflight, InflightStage, Owner,
    PendingWill, QueueTotals, Session, SessionState, Subscription, NEVER_EXPIRES,
};
use crate::shared::{self, GroupKey, SharedGroup};
use crate::stats::Stats;
use crate::store::StoredStage;
use crate::store::{Store, Volatile};
use crate::topic_index::{filter_matches, SubscriptionIndex};

/// What the index stores per subscription: the session to deliver to, and the options.
#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    /// v5 Subscription Identifier; 0 for none.
    pub subscription_id: u32,
    /// For a wildcard subscription the ACL allows only in part: the allowed filters a
    /// message's topic must match to be delivered through it.
    pub guard: Option<Arc<[TopicFilter]>>,
}

pub struct Broker {
    /// Replaced on reload (`set_limits`); read with `limits()`.
    limits: arc_swap::ArcSwap<Limits>,
    pub stats: Stats,
    /// Replaced on reload; each CONNECT takes the one in service.
    authenticator: RwLock<Arc<dyn Authenticator>>,
    store: Box<dyn Store>,
    /// Topic authorization; `None`: every client may publish and subscribe to anything
    /// (but `$SYS`). Compiled per client at CONNECT; a reload bumps `acl_generation` and
    /// connected clients recompile theirs before their next check.
    acl: RwLock<Option<Arc<Acl>>>,
    acl_generation: AtomicU64,
    sessions: Mutex<HashMap<MqttString, Arc<Session>>>,
    index: RwLock<SubscriptionIndex<SessionId, Subscriber>>,
    /// Shared subscription groups by the filter they match; keyed by group.
    shared_index: RwLock<SubscriptionIndex<u64, Arc<SharedGroup>>>,
    /// The same groups by (share name, filter), to find a group on subscribe.
    shared_groups: Mutex<HashMap<GroupKey, Arc<SharedGroup>>>,
    /// Number of groups, so that routing skips the shared index (and its lock) while there
    /// are none.
    shared_group_count: std::sync::atomic::AtomicUsize,
    retained: RwLock<RetainedTrie<Arc<Message>>>,
    timers: Mutex<Timers>,
    next_session_id: AtomicU64,
    /// What all sessions' queues hold together, for the broker-wide bound.
    queue_totals: Arc<QueueTotals>,
    next_connection_id: AtomicU64,
    next_group_key: AtomicU64,
    /// Makes generated client ids unique across restarts as well as within one run.
    boot_nonce: u64,
    shutting_down: AtomicBool,
    drain_until: Mutex<Option<Instant>>,
    /// When the broker was made: uptime, and the clock of `ClientInfo::connected_at_ms`.
    started: Instant,
    /// Per-topic counts for operators, kept only while someone watches.
    pub activity: TopicActivity,
    /// `$SYS` topics among the retained messages.
    sys_retained: std::sync::atomic::AtomicUsize,
    /// Topic and payload bytes of the retained messages clients set (`$SYS` not counted):
    /// what `max_retained_bytes` bounds. Changed under the `retained` write lock.
    retained_bytes: std::sync::atomic::AtomicUsize,
    /// Who set each retained message, while `max_retained_per_client` is set. A leaf lock,
    /// taken under `retained`.
    retained_setters: Mutex<crate::retained_quota::Setters>,
    /// Other nodes of a cluster, when there are any.
    fabric: OnceLock<Arc<dyn Fabric>>,
    /// Where an operator sends clients instead of this server (v5 Server Reference).
    redirect: RwLock<Option<MqttString>>,
}

/// What an operator's request to disconnect a client or delete a session found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kicked {
    /// No session with that client id.
    NotFound,
    /// The session has no client connected (and was not to be deleted).
    NotConnected,
    /// The connected client is being disconnected (and its session ended, if asked).
    Disconnected,
    /// The offline session was deleted.
    Deleted,
}

/// A session as operators see it: a copy taken under its lock.
#[derive(Clone, Debug)]
pub struct SessionSummary {
    pub client_id: MqttString,
    pub connected: bool,
    /// The client connected now, or the last one.
    pub client: Option<ClientInfo>,
    /// Session Expiry Interval in seconds; `None`: never expires (3.x Clean Session 0).
    pub expiry_interval: Option<u32>,
    /// While offline: seconds until the session expires, if it does.
    pub expires_in: Option<u64>,
    pub inflight: usize,
    /// Messages waiting (all QoS).
    pub queued: usize,
    pub subscriptions: usize,
}

/// Result of attaching a connection to a session.
pub struct Attach {
    pub session: Arc<Session>,
    pub session_present: bool,
    /// The connection that held the session before, woken so it notices the takeover.
    pub displaced: Option<Waker>,
    pub took_over: bool,
    /// The store's durability token for a persistent session's record (0 for a session that
    /// ends with its connection): the CONNACK waits for it, so that a session the client was
    /// told about survives a crash.
    pub written: u64,
}

/// A CONNECT asked for a session that belongs to another login (see [`Broker::attach`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotOwner;

/// What routing one message did.
#[derive(Default)]
pub struct Routed {
    /// Sessions with a matching subscription, whether or not their queues had room.
    pub matched: usize,
    /// A subscriber (other than the publisher's own session) whose queue this message took
    /// past its bounds: the publisher should pause until it drains.
    pub congested: Option<Arc<Session>>,
    /// The durability token of the writes the message caused (0: none): the publisher's
    /// acknowledgement waits until the store says it is durable.
    pub token: u64,
    /// In cluster mode, the fabric's token for the copies sent to other nodes (0: none):
    /// the acknowledgement waits for it too.
    pub forwarded: u64,
    /// In cluster mode, the fabric's queue to other nodes is past its high-water mark: the
    /// publisher should pause until it drains ([`Fabric::wait_room`]).
    pub fabric_congested: bool,
    /// Another connected subscriber (not the publisher's own session) took the message within
    /// its bounds: it keeps up, so a pause for `congested` holds it back too, and spends the
    /// congested subscriber's hold time ([`crate::hold`]). When every subscriber is behind,
    /// the pause holds back no one who could go faster and costs nothing.
    pub others_keep_up: bool,
    /// One of those subscribers (the first), for the publisher to remember: a later wait on a
    /// slow subscriber of another of its topics holds this one back too.
    pub keeper: Option<Arc<Session>>,
}

impl Routed {
    /// Nothing routed.
    pub fn none() -> Routed {
        Routed::default()
    }
}

/// One delivery about to be offered: the session (its id first, for de-duplication), the
/// granted QoS, the retain flag to send, the subscription identifier (0: none) and, for a
/// shared subscription, the group.
struct Target {
    id: SessionId,
    session: Arc<Session>,
    qos: QoS,
    retain: bool,
    subscription_id: u32,
    group: Option<Arc<SharedGroup>>,
}

thread_local! {
    /// Per-thread scratch space for `route`, so matching allocates nothing per message.
    static TARGETS: RefCell<Vec<Target>> = const { RefCell::new(Vec::new()) };
}

/// Deadlines the broker keeps for sessions whose client is gone: session expiry and delayed
/// wills. An entry is a reminder to look at the session; what is due is decided from the
/// session's own state then, so a reconnect needs no cancellation here.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<TimerEntry>>,
    seq: u64,
    /// The housekeeping task, woken when a deadline earlier than all others is added.
    waker: Option<Waker>,
    /// When the next sweep of expired retained messages is due, if one is scheduled.
    retained_sweep: Option<Instant>,
}

struct TimerEntry {
    at: Instant,
    seq: u64,
    what: Reminder,
}

enum Reminder {
    /// Look at an offline session: expiry, delayed will.
    Session(Arc<Session>),
    /// Remove retained messages whose Message Expiry Interval passed.
    RetainedSweep,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock leaves the trie consistent (each operation is a single
    // insert or remove); serving on is better than taking the whole broker down.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn will_delay(will: &LastWill) -> u32 {
    will.properties.will_delay_interval.unwrap_or(0)
}

impl Broker {
    pub fn new(limits: Limits) -> Broker {
        Broker::with_parts(limits, Box::new(AllowAll), Box::new(Volatile))
    }

    pub fn with_parts(
        limits: Limits,
        authenticator: Box<dyn Authenticator>,
        store: Box<dyn Store>,
    ) -> Broker {
        Broker {
            limits: arc_swap::ArcSwap::from_pointee(limits),
            stats: Stats::default(),
            authenticator: RwLock::new(Arc::from(authenticator)),
            store,
            acl: RwLock::new(None),
            acl_generation: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            index: RwLock::new(SubscriptionIndex::new()),
            shared_index: RwLock::new(SubscriptionIndex::new()),
            shared_groups: Mutex::new(HashMap::new()),
            shared_group_count: std::sync::atomic::AtomicUsize::new(0),
            retained: RwLock::new(RetainedTrie::new()),
            timers: Mutex::new(Timers::default()),
            next_session_id: AtomicU64::new(1),
            queue_totals: Arc::default(),
            next_connection_id: AtomicU64::new(1),
            next_group_key: AtomicU64::new(1),
            boot_nonce: RandomState::new().hash_one(std::time::SystemTime::now()),
            shutting_down: AtomicBool::new(false),
            drain_until: Mutex::new(None),
            started: Instant::now(),
            activity: TopicActivity::default(),
            sys_retained: std::sync::atomic::AtomicUsize::new(0),
            retained_bytes: std::sync::atomic::AtomicUsize::new(0),
            retained_setters: Mutex::new(Default::default()),
            fabric: OnceLock::new(),
            redirect: RwLock::new(None),
        }
    }

    /// Makes this broker one node of a cluster: from now on messages, subscription interest
    /// and retained changes also go to `fabric`. The subscriptions already in place (restored
    /// from the store) are announced to it. Called once, before clients are served; false if
    /// a fabric was already set.
    pub fn set_fabric(&self, fabric: Arc<dyn Fabric>) -> bool {
        if self.fabric.set(fabric.clone()).is_err() {
            return false;
        }
        self.set_limits(Limits::clone(&self.limits()));
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        for session in sessions {
            let st = session.lock();
            for filter in st.subscriptions.keys() {
                if !matches!(shared::parse(filter), Ok(Some(_))) {
                    fabric.interest(filter, true);
                }
            }
        }
        for (name, filter) in lock(&self.shared_groups).keys() {
            fabric.group(name, filter, true);
        }
        true
    }

    /// Sends clients to another server (`Some`: its address, "host:port", as the v5 Server
    /// Reference), for an operator draining this one: new v5 CONNECTs are refused with 0x9C
    /// (3.x: server unavailable) and every connected client is closed (v5: DISCONNECT 0x9C).
    /// Their sessions stay; in cluster mode they follow the clients to the node they connect
    /// to. `None` serves clients again. Returns how many clients were told to move.
    pub fn set_redirect(&self, to: Option<MqttString>) -> usize {
        let on = to.is_some();
        *write(&self.redirect) = to;
        if !on {
            return 0;
        }
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        let mut moved = 0;
        for session in sessions {
            let mut st = session.lock();
            if let Owner::Connection(_) = st.owner {
                if session
                    .client_id
                    .starts_with(crate::connection::INTERNAL_CLIENT_PREFIX)
                {
                    continue;
                }
                st.kick = true;
                moved += 1;
                if let Some(w) = st.waker.take() {
                    drop(st);
                    w.wake();
                }
            }
        }
        moved
    }

    /// Where clients are being sent, while an operator drains this server.
    pub fn redirect(&self) -> Option<MqttString> {
        read(&self.redirect).clone()
    }

    /// The cluster fabric, in cluster mode.
    pub fn fabric(&self) -> Option<&Arc<dyn Fabric>> {
        self.fabric.get()
    }

    /// The limits in service.
    pub fn limits(&self) -> arc_swap::Guard<Arc<Limits>> {
        self.limits.load()
    }

    /// Puts other limits in service (a reload): new connections and new messages follow
    /// them; what a connection settled at CONNECT (its in-flight window) stays.
    pub fn set_limits(&self, mut limits: Limits) {
        if let Some(fabric) = self.fabric.get() {
            let most = fabric.max_packet_size();
            if limits.max_packet_size > most {
                tracing::warn!(
                    configured = limits.max_packet_size,
                    in_service = most,
                    "mqtt.max_packet_size is larger than the cluster fabric carries; lowered"
                );
                limits.max_packet_size = most;
            }
        }
        self.limits.store(Arc::new(limits));
    }

    pub fn authenticator(&self) -> Arc<dyn Authenticator> {
        read(&self.authenticator).clone()
    }

    /// Puts another authenticator in service (a reload): clients already connected stay.
    pub fn set_authenticator(&self, authenticator: Box<dyn Authenticator>) {
        *write(&self.authenticator) = Arc::from(authenticator);
    }

    /// Sets (or with `None` lifts) topic authorization, for new and connected clients.
    pub fn set_acl(&self, acl: Option<Acl>) {
        *write(&self.acl) = acl.map(Arc::new);
        self.acl_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn acl(&self) -> Option<Arc<Acl>> {
        read(&self.acl).clone()
    }

    /// Changes each time the ACL is set.
    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A client id for a client that sent an empty one [MQTT-3.1.3-6].
    pub(crate) fn generate_client_id(&self) -> String {
        let n = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        format!("petrel-{:012x}-{n}", self.boot_nonce & 0xffff_ffff_ffff)
    }

    /// Refuse new connections (CONNACK "server unavailable") from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuses new connections, and gives connected clients until `until` to receive what is
    /// queued for them (graceful drain); the server then closes them.
    pub fn begin_drain(&self, until: Instant) {
        *lock(&self.drain_until) = Some(until);
        self.begin_shutdown();
    }

    /// When a drain under way must end.
    pub fn drain_deadline(&self) -> Option<Instant> {
        *lock(&self.drain_until)
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Ordinary subscriptions plus shared subscription memberships.
    pub fn subscription_count(&self) -> usize {
        let shared: usize = lock(&self.shared_groups).values().map(|g| g.len()).sum();
        read(&self.index).len() + shared
    }

    /// Reminders the broker's timers hold (session expiry, delayed wills).
    pub fn pending_timers(&self) -> usize {
        lock(&self.timers).heap.len()
    }

    /// Retained messages clients published (the broker's own `$SYS` figures not counted).
    pub fn retained_count(&self) -> usize {
        read(&self.retained)
            .len()
            .saturating_sub(self.sys_retained.load(Ordering::Relaxed))
    }

    /// Topic and payload bytes of the retained messages clients published.
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes.load(Ordering::Relaxed)
    }

    /// Whether a retained message of `weight` bytes ([`Message::weight`]) on `topic` fits
    /// `max_retained_messages` and `max_retained_bytes`: one replacing a retained message
    /// counts only what it adds. Checked before the PUBLISH is taken, so concurrent
    /// publishers may pass the bounds by at most one message each.
    pub fn retained_room(&self, topic: &str, weight: usize) -> bool {
        let limits = self.limits();
        let retained = read(&self.retained);
        let (count, freed) = match retained.get(topic) {
            Some(old) => (0, old.weight()),
            None => (1, 0),
        };
        let held = retained
            .len()
            .saturating_sub(self.sys_retained.load(Ordering::Relaxed));
        held + count <= limits.max_retained_messages
            && self.retained_bytes().saturating_sub(freed) + weight <= limits.max_retained_bytes
    }

    /// Whether `client_id` may set a new retained message on `topic` under
    /// `max_retained_per_client` (see [`crate::retained_quota`]).
    pub fn retained_quota_allows(&self, client_id: &str, topic: &str) -> bool {
        let limit = self.limits().max_retained_per_client;
        limit == 0 || lock(&self.retained_setters).allows(client_id, topic, limit)
    }

    /// `client_id` set the retained message of `topic` (kept only while a per-client limit is
    /// set). Called after [`Broker::retain`].
    pub fn retained_set_by(&self, client_id: &str, topic: &str) {
        let mut setters = lock(&self.retained_setters);
        if self.limits().max_retained_per_client == 0 {
            if !setters.is_empty() {
                setters.clear();
            }
            return;
        }
        setters.note(topic, client_id);
    }

    /// Keeps `retained_bytes` true after a change to the retained trie (the caller holds its
    /// write lock): `added` went in, `removed` came out.
    fn retained_changed(&self, added: Option<&Message>, removed: Option<&Message>) {
        if let Some(topic) = added.or(removed).map(|m| &*m.topic) {
            let mut setters = lock(&self.retained_setters);
            if !setters.is_empty() {
                setters.forget(topic);
            }
        }
        let weigh =
            |m: Option<&Message>| m.filter(|m| !is_sys(&m.topic)).map_or(0, Message::weight);
        let (added, removed) = (weigh(added), weigh(removed));
        if added >= removed {
            self.retained_bytes
                .fetch_add(added - removed, Ordering::Relaxed);
        } else {
            self.retained_bytes
                .fetch_sub(removed - added, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the broker was made.
    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// QoS 1/2 messages and their payload bytes queued in all sessions together.
    pub fn queued_totals(&self) -> (usize, usize) {
        (self.queue_totals.messages(), self.queue_totals.bytes())
    }

    /// Sessions with a client connected, and without (offline, persistent). Reads no session
    /// lock: ownership is mirrored in an atomic.
    pub fn session_counts(&self) -> (usize, usize) {
        let sessions = lock(&self.sessions);
        let live = sessions.values().filter(|s| s.is_connected()).count();
        (live, sessions.len() - live)
    }

    /// Every session, for operators: the registry lock is held only to copy the `Arc`s.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions).values().cloned().collect()
    }

    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(client_id).cloned()
    }

    /// A copy of what operators see of `session`, at `now`.
    pub fn summarize(&self, session: &Session, now: Instant) -> SessionSummary {
        let st = session.lock();
        SessionSummary {
            client_id: session.client_id.clone(),
            connected: matches!(st.owner, Owner::Connection(_)),
            client: st.client.clone(),
            expiry_interval: (st.expiry_interval != NEVER_EXPIRES).then_some(st.expiry_interval),
            expires_in: st
                .expires_at
                .map(|at| at.saturating_duration_since(now).as_secs()),
            inflight: st.inflight.len(),
            queued: st.queue.len(),
            subscriptions: st.subscriptions.len(),
        }
    }

    /// Disconnects the client connected to `client_id`'s session (v5: DISCONNECT 0x98,
    /// administrative action; its will is published as for any close it did not ask for).
    /// With `end_session`, the session ends too: at once if offline, with the connection
    /// otherwise (its subscriptions and queue go, and its store records).
    pub fn kick(&self, client_id: &str, end_session: bool, now: Instant) -> Kicked {
        let mut sessions = lock(&self.sessions);
        let Some(session) = sessions.get(client_id).cloned() else {
            return Kicked::NotFound;
        };
        let mut st = session.lock();
        match st.owner {
            Owner::Connection(_) => {
                if end_session {
                    // Detaching a session with no expiry interval ends it.
                    st.expiry_interval = 0;
                }
                st.kick = true;
                let waker = st.waker.take();
                drop(st);
                drop(sessions);
                if let Some(w) = waker {
                    w.wake();
                }
                Kicked::Disconnected
            }
            Owner::Offline if end_session => {
                let will = self.end_session(&session, &mut st);
                drop(st);
                sessions.remove(client_id);
                drop(sessions);
                if let Some(will) = will {
                    self.publish_will(*will, session.id, now);
                }
                Kicked::Deleted
            }
            Owner::Offline => Kicked::NotConnected,
            Owner::Ended => Kicked::NotFound,
        }
    }

    /// Retained messages whose topics match `filter` (all of them, expired or not, up to
    /// `limit`), in no particular order.
    pub fn retained_list(&self, filter: &str, limit: usize) -> Vec<Arc<Message>> {
        let mut found = Vec::new();
        read(&self.retained).for_each_match(filter, |_, m| {
            if found.len() < limit {
                found.push(m.clone())
            }
        });
        found
    }

    /// Removes the retained messages whose topics match `filter`, from memory and the store;
    /// returns how many.
    pub fn retained_remove(&self, filter: &str) -> usize {
        let mut topics = Vec::new();
        read(&self.retained).for_each_match(filter, |topic, _| topics.push(topic.to_owned()));
        let mut retained = write(&self.retained);
        let mut removed = 0;
        for topic in &topics {
            if let Some(old) = retained.remove(topic) {
                self.retained_changed(None, Some(&old));
                removed += 1;
                if is_sys(topic) {
                    self.sys_retained.fetch_sub(1, Ordering::Relaxed);
                } else {
                    self.store.retained_cleared(topic);
                    if let (Some(fabric), Ok(topic)) = (self.fabric.get(), TopicName::new(topic)) {
                        let clear = Message::new(
                            topic,
                            Bytes::new(),
                            QoS::AtMostOnce,
                            true,
                            Properties::default(),
                            0,
                        );
                        fabric.retain(&Arc::new(clear));
                    }
                }
            }
        }
        removed
    }

    /// Publishes a broker status message (`$SYS/...`): retained, QoS 0, kept in memory only
    /// (the figures are published again after a restart).
    pub fn publish_sys(&self, topic: &str, payload: impl Into<Bytes>) {
        let Ok(topic) = TopicName::new(topic) else {
            return;
        };
        let message = Message::new(
            topic,
            payload.into(),
            QoS::AtMostOnce,
            true,
            Properties::default(),
            0,
        );
        let message = Arc::new(message);
        if write(&self.retained)
            .insert(&message.topic, message.clone())
            .is_none()
        {
            self.sys_retained.fetch_add(1, Ordering::Relaxed);
        }
        self.route(&message);
    }

    /// Binds connection `connection` to the session of `client_id` (§3.1.4 steps 3-4):
    /// resumes a stored session unless `clean_start`, otherwise starts a fresh one, and
    /// displaces any connection already using that client id [MQTT-3.1.4-2].
    /// `expiry_interval` is the session's new Session Expiry Interval (0: it ends with this
    /// connection; [`NEVER_EXPIRES`]: 3.x Clean Session 0).
    ///
    /// Resuming cancels a will still waiting for its delay [MQTT-3.1.3-9]; discarding the old
    /// session ends it, which publishes such a will now.
    ///
    /// A session belongs to the login that made it: `login` may resume, take over or discard
    /// only a session of its own, unless the ACL binds the client id to it (`granted`, see
    /// [`Acl::bind`]). Otherwise nothing is touched and [`NotOwner`] is returned: the
    /// CONNECT is refused (v5 0x87, 3.1.1 return code 5) and the session's client, if
    /// connected, stays.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        client_id: &MqttString,
        clean_start: bool,
        expiry_interval: u32,
        connection: u64,
        login: &Login,
        granted: bool,
        now: Instant,
    ) -> Result<Attach, NotOwner> {
        let mut sessions = lock(&self.sessions);
        let mut displaced = None;
        let mut took_over = false;
        let mut ended_will = None;
        if let Some(existing) = sessions.get(client_id).cloned() {
            let mut st = existing.lock();
            // A session whose expiry passed but whose timer has not fired yet is gone all the
            // same.
            let expired = st.owner == Owner::Offline && st.expires_at.is_some_and(|t| t <= now);
            if !expired && !granted && st.login.as_ref().is_some_and(|owner| owner != login) {
                return Err(NotOwner);
            }
            if let Owner::Connection(_) = st.owner {
                took_over = true;
                displaced = st.waker.take();
            }
            if !clean_start && st.persistent() && !expired {
                existing.set_owner(&mut st, Owner::Connection(connection));
                // A session kept from before owners were recorded is its first resumer's.
                let owner = st.login.get_or_insert_with(|| login.clone()).clone();
                st.expiry_interval = expiry_interval;
                st.expires_at = None;
                if st.pending_will.take().is_some() {
                    self.will_pending(client_id, None);
                }
                st.waker = None;
                st.release_blocked();
                drop(st);
                drop(sessions);
                let written = self
                    .store
                    .session_opened(client_id, expiry_interval, Some(&owner));
                let written = if expiry_interval > 0 { written } else { 0 };
                return Ok(Attach {
                    session: existing,
                    session_present: true,
                    displaced,
                    took_over,
                    written,
                });
            }
            // Discard the old session [MQTT-3.1.2-6]: it stops receiving, and its
            // subscriptions leave the index.
            ended_will = self.end_session(&existing, &mut st);
        }
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(
            id,
            client_id.clone(),
            Owner::Connection(connection),
            Some(login.clone()),
            expiry_interval,
            self.queue_totals.clone(),
        ));
        sessions.insert(client_id.clone(), session.clone());
        drop(sessions);
        let written = self
            .store
            .session_opened(client_id, expiry_interval, Some(login));
        let written = if expiry_interval > 0 { written } else { 0 };
        if let Some(will) = ended_will {
            self.publish_will(*will, id, now);
        }
        Ok(Attach {
            session,
            session_present: false,
            displaced,
            took_over,
            written,
        })
    }

    /// Puts back what a store kept across a restart: persistent sessions, offline, with their
    /// subscriptions and expiry (one whose expiry passed while the broker was down is dropped,
    /// and the store told), and retained messages (expired ones left out).
    pub fn restore(
        &self,
        sessions: Vec<crate::store::StoredSession>,
        retained: Vec<Message>,
        now: Instant,
    ) {
        let mut dropped_at_restore = 0u64;
        for stored in sessions {
            dropped_at_restore += self.restore_session(stored, now, false);
        }
        if dropped_at_restore > 0 {
            tracing::warn!(
                dropped = dropped_at_restore,
                "stored messages past the queue bounds now configured were dropped at start"
            );
        }
        for message in retained {
            if message.is_expired(now) {
                self.store.retained_cleared(&message.topic);
                continue;
            }
            let expires_at = message.expires_at;
            let topic = message.topic.clone();
            let message = Arc::new(message);
            let replaced = write(&self.retained).insert(&topic, message.clone());
            self.retained_changed(Some(&message), replaced.as_deref());
            if let Some(at) = expires_at {
                self.schedule_retained_sweep(at);
            }
        }
    }

    /// Puts back one stored session, offline (see [`Broker::restore`]); with `record`, the
    /// store is told about all of it (a session that came from another node, not from this
    /// store). Returns how many of its messages no longer fit the queue bounds.
    fn restore_session(
        &self,
        stored: crate::store::StoredSession,
        now: Instant,
        record: bool,
    ) -> u64 {
        let mut dropped = 0u64;
        if stored.expires_at.is_some_and(|at| at <= now) {
            self.store.session_removed(&stored.client_id);
            return 0;
        }
        let Ok(client_id) = MqttString::new(&stored.client_id) else {
            return 0;
        };
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(
            id,
            client_id.clone(),
            Owner::Offline,
            stored.login.clone(),
            stored.expiry_interval,
            self.queue_totals.clone(),
        ));
        let mut sessions = lock(&self.sessions);
        let mut st = session.lock();
        // A session whose client was connected when the broker stopped starts its
        // interval now.
        st.expires_at = match stored.expires_at {
            Some(at) => Some(at),
            None if stored.expiry_interval != NEVER_EXPIRES => {
                Some(now + Duration::from_secs(u64::from(stored.expiry_interval)))
            }
            None => None,
        };
        let store = &*self.store;
        if record {
            let login = stored.login.as_ref();
            store.session_opened(&stored.client_id, stored.expiry_interval, login);
            store.session_offline(
                &stored.client_id,
                stored.expiry_interval,
                st.expires_at,
                login,
            );
            for id in &stored.inbound_qos2 {
                store.inbound_qos2(&stored.client_id, *id, true);
            }
        }
        for (filter, sub) in stored.subscriptions {
            if record {
                store.subscription_added(&stored.client_id, &filter, sub);
            }
            st.subscriptions.insert(filter.clone(), sub);
            // Guards are the client's, set again when it subscribes; until then every
            // delivery is still checked against its ACL as it is written.
            self.add_to_index(&session, &filter, sub, None);
        }
        st.inbound_qos2.extend(stored.inbound_qos2);
        if let Some((at, will)) = stored.pending_will {
            st.pending_will = Some(PendingWill {
                at,
                will: Box::new(will),
            });
        }
        for d in stored.deliveries {
            st.next_seq = st.next_seq.max(d.seq + 1);
            let weight = u32::try_from(d.message.weight()).unwrap_or(u32::MAX);
            let mut delivery = Delivery::new(d.message, d.qos, d.retain, weight);
            delivery.seq = d.seq;
            if !d.subscription_ids.is_empty() {
                delivery.extra = Some(Box::new(DeliveryExtra {
                    subscription_ids: d.subscription_ids,
                    group: None,
                }));
            }
            if record && delivery.qos != QoS::AtMostOnce {
                store.enqueued(&stored.client_id, delivery.seq, &delivery);
                match d.stage {
                    StoredStage::Published(pid) if delivery.qos == QoS::ExactlyOnce => {
                        store.sent(&stored.client_id, delivery.seq, pid);
                    }
                    StoredStage::Released(pid) => {
                        store.released(&stored.client_id, delivery.seq, pid);
                    }
                    _ => {}
                }
            }
            let inflight = |packet_id: u16, stage| {
                PacketId::new(packet_id).map(|packet_id| Inflight {
                    packet_id,
                    delivery: delivery.clone(),
                    stage,
                    hold: 0,
                })
            };
            let restored = match d.stage {
                StoredStage::Queued => None,
                StoredStage::Published(pid) => inflight(pid, InflightStage::Published),
                StoredStage::Released(pid) => inflight(pid, InflightStage::Released),
            };
            match restored {
                Some(f) => st.inflight.push_back(f),
                None => {
                    let (seq, qos) = (delivery.seq, delivery.qos);
                    let message = delivery.message.clone();
                    if let Err(reason) = st.push(delivery, &self.limits()) {
                        // The bounds were lowered since the message was stored.
                        self.count_drop(reason);
                        dropped += 1;
                        self.store.dequeued(&stored.client_id, seq, &message, qos);
                    }
                }
            }
        }
        let next = [st.expires_at, st.pending_will.as_ref().map(|p| p.at)]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            self.schedule(&mut st, at, &session);
        }
        drop(st);
        sessions.insert(client_id, session);
        dropped
    }

    /// Cluster mode: whether [`Broker::hand_over`] would give `client_id`'s session to
    /// `login` (`granted`: the ACL binds the id to it), without touching anything: true when
    /// there is no such session, it expired, or it is `login`'s own (or has no recorded owner).
    pub fn may_hand_over(
        &self,
        client_id: &str,
        login: &Login,
        granted: bool,
        now: Instant,
    ) -> bool {
        let sessions = lock(&self.sessions);
        let Some(existing) = sessions.get(client_id) else {
            return true;
        };
        let st = existing.lock();
        let expired = st.owner == Owner::Offline && st.expires_at.is_some_and(|t| t <= now);
        granted || expired || st.login.as_ref().is_none_or(|owner| owner == login)
    }

    /// Cluster mode: gives this node's session of `client_id` to the node its client now
    /// connects to. A connected client is closed as taken over (v5: DISCONNECT 0x8E) and the
    /// session leaves this node. Returns what the other node continues the session with,
    /// unless `clean_start` or the session does not outlive its connection; `None` too when
    /// there is no such session here. The will of a connected client goes out as on a
    /// takeover; a delayed will of an offline session is cancelled when the session goes on,
    /// and published when it ends.
    ///
    /// `claimant` is the login asking for it and whether the ACL grants it the client id (as
    /// in [`Broker::attach`]): a session of another login stays here untouched, its client
    /// connected, and [`NotOwner`] is returned. `None`: no login to check (this node returning
    /// a session to where its client already is, or a node that does not send one).
    pub fn hand_over(
        &self,
        client_id: &str,
        clean_start: bool,
        claimant: Option<(&Login, bool)>,
        now: Instant,
    ) -> Result<Option<crate::store::StoredSession>, NotOwner> {
        let mut sessions = lock(&self.sessions);
        let Some(existing) = sessions.get(client_id).cloned() else {
            return Ok(None);
        };
        let mut st = existing.lock();
        let expired = st.owner == Owner::Offline && st.expires_at.is_some_and(|t| t <= now);
        if let Some((login, false)) = claimant {
            if !expired && st.login.as_ref().is_some_and(|owner| owner != login) {
                return Err(NotOwner);
            }
        }
        let displaced = match st.owner {
            Owner::Connection(_) => st.waker.take(),
            _ => None,
        };
        let state = (!clean_start && st.persistent() && !expired).then(|| {
            let mut deliveries = Vec::new();
            let stored = |d: &Delivery, stage| crate::store::StoredDelivery {
                seq: d.seq,
                message: d.message.clone(),
                qos: d.qos,
                retain: d.retain,
                subscription_ids: d.subscription_ids().to_vec(),
                stage,
            };
            for f in &st.inflight {
                let stage = match f.stage {
                    InflightStage::Published => StoredStage::Published(f.packet_id.get()),
                    InflightStage::Released => StoredStage::Released(f.packet_id.get()),
                };
                deliveries.push(stored(&f.delivery, stage));
            }
            for d in &st.queue {
                deliveries.push(stored(d, StoredStage::Queued));
            }
            crate::store::StoredSession {
                client_id: client_id.to_owned(),
                login: st.login.clone(),
                expiry_interval: st.expiry_interval,
                expires_at: None,
                subscriptions: st
                    .subscriptions
                    .iter()
                    .map(|(f, s)| (f.clone(), *s))
                    .collect(),
                deliveries,
                inbound_qos2: st.inbound_qos2.iter().copied().collect(),
                pending_will: None,
            }
        });
        st.moved = state.is_some();
        let pending_will = self.end_session(&existing, &mut st);
        drop(st);
        sessions.remove(client_id);
        drop(sessions);
        if let Some(waker) = displaced {
            Stats::add(&self.stats.takeovers, 1);
            waker.wake();
        }
        if let (Some(will), None) = (pending_will, &state) {
            self.publish_will(*will, existing.id, now);
        }
        Ok(state)
    }

    /// Cluster mode: continues a session another node handed over (see
    /// [`Broker::hand_over`]). It replaces any session of that client id here, starts
    /// offline, and is written to the store as if it had always been here.
    pub fn adopt(&self, stored: crate::store::StoredSession, now: Instant) {
        {
            let mut sessions = lock(&self.sessions);
            if let Some(existing) = sessions.remove(stored.client_id.as_str()) {
                let mut st = existing.lock();
                let _ = self.end_session(&existing, &mut st);
            }
        }
        let dropped = self.restore_session(stored, now, true);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "messages of a session from another node did not fit the queue bounds"
            );
        }
    }

    /// Adds a subscription of `session` (whose lock the caller holds) to the ordinary or the
    /// shared index.
    fn add_to_index(
        &self,
        session: &Arc<Session>,
        filter: &TopicFilter,
        sub: Subscription,
        guard: Option<Arc<[TopicFilter]>>,
    ) {
        let subscriber = Subscriber {
            session: session.clone(),
            options: sub.options,
            subscription_id: sub.id,
            guard,
        };
        match shared::parse(filter) {
            Ok(Some(sf)) => {
                let mut groups = lock(&self.shared_groups);
                let key: GroupKey = (sf.group.into(), sf.filter);
                let group = match groups.get(&key) {
                    Some(g) => g.clone(),
                    None => {
                        let group = Arc::new(SharedGroup::new(
                            self.next_group_key.fetch_add(1, Ordering::Relaxed),
                            sf.group,
                            key.1.clone(),
                        ));
                        write(&self.shared_index).insert(&group.filter, group.key, group.clone());
                        groups.insert(key, group.clone());
                        self.shared_group_count.fetch_add(1, Ordering::Release);
                        if let Some(fabric) = self.fabric.get() {
                            fabric.group(&group.name, &group.filter, true);
                        }
                        group
                    }
                };
                group.join(subscriber);
            }
            _ => {
                let replaced = write(&self.index).insert(filter, session.id, subscriber);
                if let (None, Some(fabric)) = (replaced, self.fabric.get()) {
                    fabric.interest(filter, true);
                }
            }
        }
    }

    /// Ends a session: it stops receiving, its subscriptions leave the indexes and what it
    /// held is dropped. The caller holds the registry lock and removes it from there. Returns
    /// a will that was waiting for its delay, to be published now that the session is over.
    fn end_session(&self, session: &Arc<Session>, st: &mut SessionState) -> Option<Box<LastWill>> {
        session.set_owner(st, Owner::Ended);
        st.waker = None;
        st.release_blocked();
        st.expires_at = None;
        let subscriptions: Vec<TopicFilter> = st.subscriptions.drain().map(|(f, _)| f).collect();
        st.clear_queue();
        st.inflight.clear();
        st.inbound_qos2.clear();
        for f in &subscriptions {
            self.remove_from_index(f, session.id);
        }
        self.store.session_removed(&session.client_id);
        let will = st.pending_will.take().map(|p| p.will);
        if let (Some(_), Some(fabric)) = (&will, self.fabric.get()) {
            // Published by the caller or gone with the session: no longer waiting.
            fabric.will_pending(&session.client_id, None);
        }
        will
    }

    /// An offline session's will starts or stops waiting for its delay: the store and, in
    /// cluster mode, the fabric (which publishes it should this node die) learn of it.
    fn will_pending(&self, client_id: &str, will: Option<(Instant, &LastWill)>) {
        self.store.will_pending(client_id, will);
        if let Some(fabric) = self.fabric.get() {
            fabric.will_pending(client_id, will);
        }
    }

    /// Cluster mode, at start: the offline sessions a store restored with a will waiting
    /// for its delay, as (client id, when due, will).
    pub fn pending_wills(&self) -> Vec<(String, Instant, LastWill)> {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        sessions
            .iter()
            .filter_map(|session| {
                let st = session.lock();
                let p = st.pending_will.as_ref()?;
                (st.owner == Owner::Offline)
                    .then(|| (session.client_id.to_string(), p.at, (*p.will).clone()))
            })
            .collect()
    }

    /// Cluster mode: the offline session of `client_id` no longer publishes its pending
    /// will (another node published it while this one was down). False if it had none.
    pub fn drop_pending_will(&self, client_id: &str) -> bool {
        let Some(session) = lock(&self.sessions).get(client_id).cloned() else {
            return false;
        };
        let mut st = session.lock();
        if st.owner != Owner::Offline || st.pending_will.take().is_none() {
            return false;
        }
        self.store.will_pending(client_id, None);
        true
    }

    /// Takes a subscription out of the ordinary or the shared index. The caller holds the
    /// session's lock.
    fn remove_from_index(&self, filter: &TopicFilter, session: SessionId) -> bool {
        match shared::parse(filter) {
            Ok(Some(sf)) => {
                let mut groups = lock(&self.shared_groups);
                let key: GroupKey = (sf.group.into(), sf.filter);
                let Some(group) = groups.get(&key).cloned() else {
                    return false;
                };
                let (was_member, empty) = group.leave(session);
                if empty {
                    groups.remove(&key);
                    write(&self.shared_index).remove(&group.filter, group.key);
                    self.shared_group_count.fetch_sub(1, Ordering::Release);
                    if let Some(fabric) = self.fabric.get() {
                        fabric.group(&group.name, &group.filter, false);
                    }
                }
                was_member
            }
            _ => {
                let removed = write(&self.index).remove(filter, session).is_some();
                if let (true, Some(fabric)) = (removed, self.fabric.get()) {
                    fabric.interest(filter, false);
                }
                removed
            }
        }
    }

    /// The connection ends (§4.1, §3.1.2.5). `will` is the client's will when the way it
    /// ended publishes one. A session with a Session Expiry Interval goes offline, keeps
    /// queueing QoS 1/2 and ends when the interval passes; one with 0 ends now. The will goes
    /// out now, or after its Will Delay Interval unless the client reconnects first, and at
    /// the latest when the session ends.
    ///
    /// Messages the client got through a shared subscription and has not acknowledged go to
    /// another member of the group.
    pub fn detach(
        &self,
        session: &Arc<Session>,
        connection: u64,
        will: Option<Box<LastWill>>,
        now: Instant,
    ) {
        let mut sessions = lock(&self.sessions);
        let mut st = session.lock();
        if st.owner != Owner::Connection(connection) {
            // Taken over. A new connection to the session within the will delay cancels the
            // will; with no delay, or when the new connection discarded the session, it goes
            // out now [MQTT-3.1.4-3].
            let ended = st.owner == Owner::Ended && !st.moved;
            drop(st);
            drop(sessions);
            if let Some(will) = will {
                if will_delay(&will) == 0 || ended {
                    self.publish_will(*will, session.id, now);
                }
            }
            return;
        }
        st.waker = None;
        st.release_blocked();
        let given_back = st.take_shared_deliveries();
        for d in &given_back {
            if d.seq != 0 {
                self.store
                    .dequeued(&session.client_id, d.seq, &d.message, d.qos);
            }
        }
        let mut will_now = None;
        if st.persistent() {
            session.set_owner(&mut st, Owner::Offline);
            st.discard_qos0();
            if st.expiry_interval != NEVER_EXPIRES {
                let at = now + Duration::from_secs(u64::from(st.expiry_interval));
                st.expires_at = Some(at);
                self.schedule(&mut st, at, session);
            }
            self.store.session_offline(
                &session.client_id,
                st.expiry_interval,
                st.expires_at,
                st.login.as_ref(),
            );
            if let Some(will) = will {
                match will_delay(&will) {
                    0 => will_now = Some(will),
                    delay => {
                        let at = now + Duration::from_secs(u64::from(delay));
                        self.will_pending(&session.client_id, Some((at, &will)));
                        st.pending_will = Some(PendingWill { at, will });
                        self.schedule(&mut st, at, session);
                    }
                }
            }
            drop(st);
            drop(sessions);
        } else {
            // Clean: the session ends with the connection [MQTT-3.1.2-6], and a delayed will
            // with it.
            will_now = will;
            if let Some(w) = self.end_session(session, &mut st) {
                will_now.get_or_insert(w);
            }
            drop(st);
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
            }
            drop(sessions);
        }
        self.give_back(session, given_back);
        if let Some(will) = will_now {
            self.publish_will(*will, session.id, now);
        }
    }

    /// Offers deliveries a shared subscription member did not complete to other members.
    /// Those no connected member can take stay with their session if it persists.
    fn give_back(&self, from: &Arc<Session>, deliveries: Vec<Delivery>) {
        let mut unplaced = Vec::new();
        for d in deliveries {
            let Some(group) = d.group().cloned() else {
                continue;
            };
            let Some(member) = group.pick(Some(from.id)) else {
                unplaced.push(d);
                continue;
            };
            let mut extra = DeliveryExtra {
                group: Some(group),
                ..DeliveryExtra::default()
            };
            if member.subscription_id != 0 {
                extra.subscription_ids.push(member.subscription_id);
            }
            let delivery = Delivery {
                qos: d.message.qos.min(member.options.qos),
                extra: Some(Box::new(extra)),
                // The receiving session stores it afresh if it is persistent.
                seq: 0,
                ..d
            };
            if let Err(reason) =
                member
                    .session
                    .offer(delivery, &self.limits(), &self.stats, &*self.store)
            {
                self.count_drop(reason);
            }
        }
        if unplaced.is_empty() {
            return;
        }
        let mut st = from.lock();
        if st.owner == Owner::Offline {
            for d in unplaced {
                if let Err(reason) = st.push(d, &self.limits()) {
                    self.count_drop(reason);
                }
            }
        }
    }

    /// Adds or replaces a subscription for the session `connection` owns. Returns whether it
    /// replaced one for the same filter [MQTT-3.8.4-3] and the store's durability token for
    /// it (0: nothing to wait for), or `None` if the session was taken over. A
    /// `$share/{group}/{filter}` filter (already validated) joins that group.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        connection: u64,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        subscription_id: u32,
        guard: Option<Arc<[TopicFilter]>>,
    ) -> Option<(bool, u64)> {
        // The index changes under the session lock so a concurrent takeover that clears the
        // session's subscriptions cannot miss this one (lock order: session → index).
        let mut st = session.lock();
        if st.owner != Owner::Connection(connection) {
            return None;
        }
        let existed = st
            .subscriptions
            .insert(
                filter.clone(),
                Subscription {
                    options,
                    id: subscription_id,
                },
            )
            .is_some();
        self.add_to_index(
            session,
            filter,
            Subscription {
                options,
                id: subscription_id,
            },
            guard,
        );
        let persistent = st.persistent();
        drop(st);
        let token = if persistent {
            self.store.subscription_added(
                &session.client_id,
                filter,
                Subscription {
                    options,
                    id: subscription_id,
                },
            )
        } else {
            0
        };
        Some((existed, token))
    }

    /// Removes a subscription; true if it existed.
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        connection: u64,
        filter: &TopicFilter,
    ) -> bool {
        let mut st = session.lock();
        let existed =
            st.owner == Owner::Connection(connection) && st.subscriptions.remove(filter).is_some();
        if existed {
            self.remove_from_index(filter, session.id);
        }
        let persistent = st.persistent();
        drop(st);
        if existed && persistent {
            self.store.subscription_removed(&session.client_id, filter);
        }
        existed
    }

    /// Stores, replaces or (empty payload) clears the retained message of its topic
    /// [MQTT-3.3.1-5] [MQTT-3.3.1-10] [MQTT-3.3.1-11], on this node and, in cluster mode,
    /// on every node. Returns the store's durability token and the fabric's token for the
    /// change: a QoS 1/2 publisher's acknowledgement waits for both.
    pub fn retain(&self, message: &Arc<Message>) -> (u64, u64) {
        let token = self.retain_remote(message);
        let forwarded = match self.fabric.get() {
            Some(fabric) if !is_sys(&message.topic) => fabric.retain(message),
            _ => 0,
        };
        (token, forwarded)
    }

    /// Applies a retained change on this node only: one made on another node, which the
    /// fabric passes on. Returns the store's durability token.
    pub fn retain_remote(&self, message: &Arc<Message>) -> u64 {
        if message.payload.is_empty() {
            let mut retained = write(&self.retained);
            let removed = retained.remove(&message.topic);
            self.retained_changed(None, removed.as_deref());
            drop(retained);
            self.store.retained_cleared(&message.topic)
        } else {
            let stored = Arc::new(message.compacted());
            let token = if is_sys(&stored.topic) {
                0
            } else {
                self.store.retained_set(&stored)
            };
            let topic = stored.topic.clone();
            let expires_at = stored.expires_at;
            let mut retained = write(&self.retained);
            let replaced = retained.insert(&topic, stored.clone());
            self.retained_changed(Some(&stored), replaced.as_deref());
            drop(retained);
            if let Some(at) = expires_at {
                self.schedule_retained_sweep(at);
            }
            token
        }
    }

    /// Retained messages matching `filter` whose expiry interval has not passed, for a new
    /// subscription [MQTT-3.3.2-5].
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut found = Vec::new();
        read(&self.retained).for_each_match(filter, |_, m| {
            if !m.is_expired(now) {
                found.push(m.clone())
            }
        });
        found
    }

    /// Delivers `message` to every session with a matching subscription, once per session at
    /// the highest QoS among its matching subscriptions [MQTT-3.3.5-1], with the identifiers
    /// of all of them [MQTT-3.3.4-3]; and to one member of each matching shared subscription
    /// group [MQTT-4.8.2-?]. Honours v5 No Local [MQTT-3.8.3-3] and Retain As Published
    /// [MQTT-3.3.1-12] [MQTT-3.3.1-13].
    ///
    /// The publisher's own session never counts as congested: a client cannot both be paused
    /// and read the acknowledgements that would drain its own queue.
    ///
    /// In cluster mode the message also goes to the fabric, which takes it to the other
    /// nodes with interest and balances shared groups across the cluster (`$SYS` topics stay
    /// on their node).
    pub fn route(&self, message: &Arc<Message>) -> Routed {
        let Some(fabric) = self.fabric.get() else {
            return self.route_local(message, true);
        };
        let mut routed = self.route_local(message, false);
        if !is_sys(&message.topic) {
            let forwarded = fabric.publish(message);
            routed.matched += forwarded.targets;
            routed.forwarded = forwarded.token;
            routed.fabric_congested = forwarded.congested;
        }
        routed
    }

    /// Routes a message another node forwarded to this node's ordinary subscribers (shared
    /// groups receive theirs through [`Broker::route_group`]).
    pub fn route_remote(&self, message: &Arc<Message>) -> Routed {
        self.route_local(message, false)
    }

    /// Gives a message the fabric chose this node for to one member of its shared group
    /// `share` on `filter`. `None` if this node has no such group (its last member left).
    pub fn route_group(
        &self,
        share: &str,
        filter: &TopicFilter,
        message: &Arc<Message>,
    ) -> Option<Routed> {
        let key: GroupKey = (share.into(), filter.clone());
        let group = lock(&self.shared_groups).get(&key).cloned()?;
        let sub = group.pick(None)?;
        let weight = u32::try_from(message.weight()).unwrap_or(u32::MAX);
        let mut delivery = Delivery::new(
            message.clone(),
            sub.options.qos.min(message.qos),
            sub.options.retain_as_published && message.retain,
            weight,
        );
        delivery.extra = Some(Box::new(DeliveryExtra {
            subscription_ids: if sub.subscription_id != 0 {
                vec![sub.subscription_id]
            } else {
                Vec::new()
            },
            group: Some(group.clone()),
        }));
        let limits = self.limits();
        let mut routed = Routed {
            matched: 1,
            congested: None,
            token: 0,
            forwarded: 0,
            fabric_congested: false,
            others_keep_up: false,
            keeper: None,
        };
        match sub
            .session
            .offer(delivery, &limits, &self.stats, &*self.store)
        {
            Ok((admitted, written)) => {
                routed.token = written;
                if admitted == Admitted::Congested {
                    routed.congested = Some(sub.session);
                }
            }
            Err(reason) => self.count_drop(reason),
        }
        Some(routed)
    }

    /// Cluster mode: delivers a message to one session only, as its matching ordinary
    /// subscriptions ask (highest QoS, every identifier, Retain As Published). The node a
    /// session moved away from forwards it what was still on its way there. `None` if
    /// there is no such session or none of its subscriptions matches.
    pub fn deliver_to(&self, client_id: &str, message: &Arc<Message>) -> Option<Routed> {
        let session = lock(&self.sessions).get(client_id).cloned()?;
        let (qos, retain, ids) = {
            let st = session.lock();
            let mut best: Option<(QoS, bool, Vec<u32>)> = None;
            for (filter, sub) in &st.subscriptions {
                if matches!(shared::parse(filter), Ok(Some(_)))
                    || !filter_matches(filter, &message.topic)
                {
                    continue;
                }
                let entry = best.get_or_insert((QoS::AtMostOnce, false, Vec::new()));
                entry.0 = entry.0.max(sub.options.qos);
                entry.1 |= sub.options.retain_as_published && message.retain;
                if sub.id != 0 && !entry.2.contains(&sub.id) {
                    entry.2.push(sub.id);
                }
            }
            best?
        };
        let weight = u32::try_from(message.weight()).unwrap_or(u32::MAX);
        let mut delivery = Delivery::new(message.clone(), qos.min(message.qos), retain, weight);
        if !ids.is_empty() {
            delivery.extra = Some(Box::new(DeliveryExtra {
                subscription_ids: ids,
                group: None,
            }));
        }
        let mut routed = Routed {
            matched: 1,
            congested: None,
            token: 0,
            forwarded: 0,
            fabric_congested: false,
            others_keep_up: false,
            keeper: None,
        };
        match session.offer(delivery, &self.limits(), &self.stats, &*self.store) {
            Ok((_, written)) => routed.token = written,
            Err(reason) => self.count_drop(reason),
        }
        Some(routed)
    }

    /// Routes to this node's subscribers, and to its shared groups when `groups`.
    fn route_local(&self, message: &Arc<Message>, groups: bool) -> Routed {
        TARGETS.with(|cell| {
            let mut targets = cell.borrow_mut();
            targets.clear();
            read(&self.index).for_each_match(&message.topic, |id, sub| {
                if sub.options.no_local && id == message.origin {
                    return;
                }
                if let Some(guard) = &sub.guard {
                    if !guard.iter().any(|f| filter_matches(f, &message.topic)) {
                        return;
                    }
                }
                targets.push(Target {
                    id,
                    session: sub.session.clone(),
                    qos: sub.options.qos,
                    retain: sub.options.retain_as_published && message.retain,
                    subscription_id: sub.subscription_id,
                    group: None,
                });
            });
            let ordinary = targets.len();
            let limits = self.limits();
            let mut groups_matched = 0;
            if groups && self.shared_group_count.load(Ordering::Acquire) > 0 {
                let shared = read(&self.shared_index);
                {
                    shared.for_each_match(&message.topic, |_, group| {
                        groups_matched += 1;
                        if let Some(sub) = group.pick(None) {
                            targets.push(Target {
                                id: sub.session.id,
                                session: sub.session,
                                qos: sub.options.qos,
                                retain: sub.options.retain_as_published && message.retain,
                                subscription_id: sub.subscription_id,
                                group: Some(group.clone()),
                            });
                        }
                    });
                }
            }
            let weight = u32::try_from(message.weight()).unwrap_or(u32::MAX);
            let mut matched = groups_matched;
            let mut congested = None;
            let mut token = 0;
            let mut others_keep_up = false;
            let mut keeper = None;
            let mut offer = |t: Target, ids: Vec<u32>, congested: &mut Option<Arc<Session>>| {
                let mut delivery =
                    Delivery::new(message.clone(), t.qos.min(message.qos), t.retain, weight);
                if !ids.is_empty() || t.group.is_some() {
                    delivery.extra = Some(Box::new(DeliveryExtra {
                        subscription_ids: ids,
                        group: t.group,
                    }));
                }
                match t
                    .session
                    .offer(delivery, &limits, &self.stats, &*self.store)
                {
                    Ok((admitted, written)) => {
                        token = token.max(written);
                        if admitted == Admitted::Congested
                            && congested.is_none()
                            && t.id != message.origin
                        {
                            *congested = Some(t.session);
                        } else if admitted == Admitted::Queued && t.id != message.origin {
                            others_keep_up = true;
                            if keeper.is_none() {
                                keeper = Some(t.session);
                            }
                        }
                    }
                    Err(reason) => self.count_drop(reason),
                }
            };
            let shared_targets = targets.split_off(ordinary);
            if targets.len() > 1 {
                // Overlapping subscriptions of one session: one delivery with the max QoS,
                // the retain flag if any asked for it, and every subscription identifier.
                targets.sort_unstable_by(|a, b| a.id.cmp(&b.id).then(b.qos.cmp(&a.qos)));
            }
            let mut iter = targets.drain(..).peekable();
            while let Some(mut first) = iter.next() {
                matched += 1;
                let mut ids = Vec::new();
                if first.subscription_id != 0 {
                    ids.push(first.subscription_id);
                }
                while let Some(next) = iter.next_if(|t| t.id == first.id) {
                    first.retain |= next.retain;
                    if next.subscription_id != 0 && !ids.contains(&next.subscription_id) {
                        ids.push(next.subscription_id);
                    }
                }
                offer(first, ids, &mut congested);
            }
            drop(iter);
            for t in shared_targets {
                let ids = if t.subscription_id != 0 {
                    vec![t.subscription_id]
                } else {
                    Vec::new()
                };
                offer(t, ids, &mut congested);
            }
            Routed {
                matched,
                congested,
                token,
                forwarded: 0,
                fabric_congested: false,
                others_keep_up,
                keeper,
            }
        })
    }

    fn count_drop(&self, reason: Dropped) {
        let counter = match reason {
            Dropped::OutboxFull => &self.stats.dropped_outbox_full,
            Dropped::QueueFull => &self.stats.dropped_queue_full,
            Dropped::BrokerQueueFull => &self.stats.dropped_broker_queue_full,
            Dropped::Offline => &self.stats.dropped_offline_qos0,
            Dropped::Ended => return,
        };
        Stats::add(counter, 1);
    }

    /// Cluster mode: publishes the will of a client whose node died (another node detected
    /// it), as that node would have.
    pub fn publish_orphaned_will(&self, will: LastWill, now: Instant) {
        self.publish_will(will, 0, now);
    }

    /// Publishes a client's will (§3.1.2.5) as if the client had sent it.
    pub(crate) fn publish_will(&self, will: LastWill, origin: SessionId, now: Instant) {
        let retain = will.retain && self.limits().retain_available;
        let publish = Publish {
            dup: false,
            // A 3.x client cannot be refused for its will's QoS; it goes out at most at ours.
            qos: will.qos.min(self.limits().maximum_qos),
            retain,
            topic: will.topic.clone(),
            packet_id: None,
            properties: will.properties,
            payload: will.payload,
        };
        let mut message = Message::from_publish(publish, will.topic, origin, now);
        // Will Delay Interval is connection metadata, not a message property.
        if message.properties.will_delay_interval.is_some() {
            message.properties.will_delay_interval = None;
        }
        let message = Arc::new(message);
        if retain {
            // A will has no acknowledgement to hold back. Past the retained bounds it still
            // goes to the subscribers, but is not kept: a client dropping its connection
            // again and again with a retained will must not grow the retained store.
            let empty = message.payload.is_empty();
            if empty || self.retained_room(&message.topic, message.weight()) {
                let _ = self.retain(&message);
            } else {
                Stats::add(&self.stats.refused_retained_quota, 1);
            }
        }
        self.route(&message);
        Stats::add(&self.stats.wills_published, 1);
    }

    /// Asks to look at `session` (whose state the caller holds as `st`) again at `at`. A
    /// session keeps at most one reminder that is not later than its next deadline: a client
    /// that reconnects and leaves over and over does not pile entries up.
    fn schedule(&self, st: &mut SessionState, at: Instant, session: &Arc<Session>) {
        if st.reminder.is_some_and(|r| r <= at) {
            return;
        }
        st.reminder = Some(at);
        let mut timers = lock(&self.timers);
        push_reminder(&mut timers, at, Reminder::Session(session.clone()));
    }

    /// Makes sure a sweep of expired retained messages runs by `at`.
    fn schedule_retained_sweep(&self, at: Instant) {
        let mut timers = lock(&self.timers);
        if timers.retained_sweep.is_some_and(|t| t <= at) {
            return;
        }
        timers.retained_sweep = Some(at);
        push_reminder(&mut timers, at, Reminder::RetainedSweep);
    }

    /// Removes retained messages whose expiry passed, and schedules the next sweep for the
    /// earliest expiry left.
    fn sweep_retained(&self, now: Instant) {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        let mut retained = write(&self.retained);
        retained.for_each(|topic, m| match m.expires_at {
            Some(at) if at <= now => expired.push(topic.to_owned()),
            Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
            None => {}
        });
        for topic in &expired {
            let removed = retained.remove(topic);
            self.retained_changed(None, removed.as_deref());
        }
        drop(retained);
        for topic in &expired {
            self.store.retained_cleared(topic);
        }
        if !expired.is_empty() {
            tracing::debug!(count = expired.len(), "expired retained messages removed");
        }
        if let Some(at) = next {
            self.schedule_retained_sweep(at);
        }
    }

    /// Runs what is due at `now` (sessions whose expiry passed end, delayed wills go out) and
    /// returns when to call again; the caller's task is woken if an earlier deadline is added
    /// meanwhile. The server's housekeeping task calls this.
    pub fn poll_timers(&self, cx: &mut Context<'_>, now: Instant) -> Option<Instant> {
        loop {
            let due = {
                let mut timers = lock(&self.timers);
                let mut due = Vec::new();
                while timers.heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
                    if let Some(Reverse(e)) = timers.heap.pop() {
                        if let Reminder::RetainedSweep = e.what {
                            if timers.retained_sweep.is_some_and(|t| t <= now) {
                                timers.retained_sweep = None;
                            }
                        }
                        due.push(e.what);
                    }
                }
                if due.is_empty() {
                    if !timers
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        timers.waker = Some(cx.waker().clone());
                    }
                    return timers.heap.peek().map(|Reverse(e)| e.at);
                }
                due
            };
            for what in due {
                match what {
                    Reminder::Session(session) => self.session_timer(&session, now),
                    Reminder::RetainedSweep => self.sweep_retained(now),
                }
            }
        }
    }

    /// A deadline of an offline session came: end it if its expiry passed, publish its will
    /// if the will's delay passed or the session ended.
    fn session_timer(&self, session: &Arc<Session>, now: Instant) {
        let mut sessions = lock(&self.sessions);
        let mut st = session.lock();
        if st.reminder.is_some_and(|r| r <= now) {
            st.reminder = None;
        }
        if st.owner != Owner::Offline {
            return; // resumed or already ended: whatever was due no longer is
        }
        let mut will = None;
        if st.pending_will.as_ref().is_some_and(|p| p.at <= now) {
            will = st.pending_will.take().map(|p| p.will);
            self.will_pending(&session.client_id, None);
        }
        if st.expires_at.is_some_and(|t| t <= now) {
            tracing::debug!(client_id = %session.client_id, "session expired");
            Stats::add(&self.stats.sessions_expired, 1);
            if let Some(w) = self.end_session(session, &mut st) {
                will = Some(w);
            }
            drop(st);
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
            }
        } else {
            // Still offline: remind again at its next deadline (the session may have been
            // resumed and left again since this reminder was set).
            let next = [st.expires_at, st.pending_will.as_ref().map(|p| p.at)]
                .into_iter()
                .flatten()
                .min();
            if let Some(at) = next {
                self.schedule(&mut st, at, session);
            }
            drop(st);
        }
        drop(sessions);
        if let Some(will) = will {
            self.publish_will(*will, session.id, now);
        }
    }
}

/// Adds a reminder, waking the housekeeping task if it is now the earliest.
fn push_reminder(timers: &mut Timers, at: Instant, what: Reminder) {
    let earliest = timers.heap.peek().map(|Reverse(e)| e.at);
    timers.seq += 1;
    let seq = timers.seq;
    timers.heap.push(Reverse(TimerEntry { at, seq, what }));
    if earliest.is_none_or_later(at) {
        if let Some(w) = timers.waker.take() {
            w.wake();
        }
    }
}

trait NoneOrLater {
    fn is_none_or_later(&self, at: Instant) -> bool;
}

impl NoneOrLater for Option<Instant> {
    fn is_none_or_later(&self, at: Instant) -> bool {
        match self {
            None => true,
            Some(t) => *t > at,
        }
    }
}
