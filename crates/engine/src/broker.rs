//! The shared broker state and the routing façade: the session registry, the subscription
//! index and the retained store. Every connection task holds an `Arc<Broker>` and does its own
//! routing: there is no router thread that messages cross.
//!
//! Lock order (never acquire a lock to the left while holding one to its right):
//!
//! ```text
//! sessions (registry)  →  Session::state  →  index  →  retained
//! ```
//!
//! `route` takes the index read lock only to collect targets, releases it, then locks each
//! target session in turn, so publishers hold at most one lock at a time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::Waker;

use petrel_codec::{MqttString, QoS, SubscriptionOptions, TopicFilter};

use crate::auth::{AllowAll, Authenticator};
use crate::limits::Limits;
use crate::message::{Message, SessionId};
use crate::retained::RetainedTrie;
use crate::session::{Admitted, Delivery, Dropped, Owner, Session};
use crate::stats::Stats;
use crate::store::{Store, Volatile};
use crate::topic_index::SubscriptionIndex;

/// What the index stores per subscription: the session to deliver to, and the options.
#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
}

pub struct Broker {
    pub limits: Limits,
    pub stats: Stats,
    authenticator: Box<dyn Authenticator>,
    store: Box<dyn Store>,
    sessions: Mutex<HashMap<MqttString, Arc<Session>>>,
    index: RwLock<SubscriptionIndex<SessionId, Subscriber>>,
    retained: RwLock<RetainedTrie<Arc<Message>>>,
    next_session_id: AtomicU64,
    next_connection_id: AtomicU64,
    /// Makes generated client ids unique across restarts as well as within one run.
    boot_nonce: u64,
    shutting_down: AtomicBool,
}

/// Result of attaching a connection to a session.
pub struct Attach {
    pub session: Arc<Session>,
    pub session_present: bool,
    /// The connection that held the session before, woken so it notices the takeover.
    pub displaced: Option<Waker>,
    pub took_over: bool,
}

/// What routing one message did.
pub struct Routed {
    /// Sessions with a matching subscription, whether or not their queues had room.
    pub matched: usize,
    /// A subscriber (other than the publisher's own session) whose queue this message took
    /// past its bounds: the publisher should pause until it drains.
    pub congested: Option<Arc<Session>>,
}

/// One session a message is about to be delivered to: its id (for de-duplication), the
/// session, the granted QoS and the retain flag to send.
type Target = (SessionId, Arc<Session>, QoS, bool);

thread_local! {
    /// Per-thread scratch space for `route`, so matching allocates nothing per message.
    static TARGETS: RefCell<Vec<Target>> = const { RefCell::new(Vec::new()) };
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
            limits,
            stats: Stats::default(),
            authenticator,
            store,
            sessions: Mutex::new(HashMap::new()),
            index: RwLock::new(SubscriptionIndex::new()),
            retained: RwLock::new(RetainedTrie::new()),
            next_session_id: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
            boot_nonce: RandomState::new().hash_one(std::time::SystemTime::now()),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn authenticator(&self) -> &dyn Authenticator {
        &*self.authenticator
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

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn subscription_count(&self) -> usize {
        read(&self.index).len()
    }

    pub fn retained_count(&self) -> usize {
        read(&self.retained).len()
    }

    /// Binds connection `connection` to the session of `client_id` (§3.1.4 steps 3-4):
    /// resumes a stored session unless `clean_start`, otherwise starts a fresh one, and
    /// displaces any connection already using that client id [MQTT-3.1.4-2]. `persistent`
    /// says whether the session outlives this connection (3.1.1 Clean Session 0; v5 Session
    /// Expiry Interval > 0).
    pub fn attach(
        &self,
        client_id: &MqttString,
        clean_start: bool,
        persistent: bool,
        connection: u64,
    ) -> Attach {
        let mut sessions = lock(&self.sessions);
        let mut displaced = None;
        let mut took_over = false;
        if let Some(existing) = sessions.get(client_id).cloned() {
            let mut st = existing.lock();
            if let Owner::Connection(_) = st.owner {
                took_over = true;
                displaced = st.waker.take();
            }
            if !clean_start && st.persistent {
                existing.set_owner(&mut st, Owner::Connection(connection));
                st.persistent = persistent;
                st.waker = None;
                st.release_blocked();
                drop(st);
                drop(sessions);
                self.store.session_opened(client_id, persistent);
                return Attach {
                    session: existing,
                    session_present: true,
                    displaced,
                    took_over,
                };
            }
            // Discard the old session [MQTT-3.1.2-6]: it stops receiving, and its
            // subscriptions leave the index.
            existing.set_owner(&mut st, Owner::Ended);
            st.release_blocked();
            let filters: Vec<TopicFilter> = st.subscriptions.drain().map(|(f, _)| f).collect();
            st.queue.clear();
            st.inflight.clear();
            let mut index = write(&self.index);
            for f in &filters {
                index.remove(f, existing.id);
            }
            drop(index);
            drop(st);
        }
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(
            id,
            client_id.clone(),
            Owner::Connection(connection),
            persistent,
        ));
        sessions.insert(client_id.clone(), session.clone());
        drop(sessions);
        self.store.session_opened(client_id, persistent);
        Attach {
            session,
            session_present: false,
            displaced,
            took_over,
        }
    }

    /// The connection ends. A persistent session goes offline and keeps queueing QoS 1/2; a
    /// clean one is discarded with its subscriptions [MQTT-3.1.2-6].
    pub fn detach(&self, session: &Arc<Session>, connection: u64) {
        let mut sessions = lock(&self.sessions);
        let mut st = session.lock();
        if st.owner != Owner::Connection(connection) {
            return; // taken over: the session is no longer ours to change
        }
        st.waker = None;
        st.release_blocked();
        if st.persistent {
            session.set_owner(&mut st, Owner::Offline);
            st.discard_qos0();
            return;
        }
        session.set_owner(&mut st, Owner::Ended);
        let filters: Vec<TopicFilter> = st.subscriptions.drain().map(|(f, _)| f).collect();
        st.queue.clear();
        st.inflight.clear();
        drop(st);
        if sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.client_id);
        }
        drop(sessions);
        let mut index = write(&self.index);
        for f in &filters {
            index.remove(f, session.id);
        }
        drop(index);
        self.store.session_removed(&session.client_id);
    }

    /// Adds or replaces a subscription for the session `connection` owns. Returns whether it
    /// replaced one for the same filter [MQTT-3.8.4-3], or `None` if the session was taken over.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        connection: u64,
        filter: &TopicFilter,
        options: SubscriptionOptions,
    ) -> Option<bool> {
        // The index changes under the session lock so a concurrent takeover that clears the
        // session's subscriptions cannot miss this one (lock order: session → index).
        let mut st = session.lock();
        if st.owner != Owner::Connection(connection) {
            return None;
        }
        let existed = st.subscriptions.insert(filter.clone(), options).is_some();
        write(&self.index).insert(
            filter,
            session.id,
            Subscriber {
                session: session.clone(),
                options,
            },
        );
        drop(st);
        self.store
            .subscription_added(&session.client_id, filter, options);
        Some(existed)
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
            write(&self.index).remove(filter, session.id);
        }
        drop(st);
        if existed {
            self.store.subscription_removed(&session.client_id, filter);
        }
        existed
    }

    /// Stores, replaces or (empty payload) clears the retained message of its topic
    /// [MQTT-3.3.1-5] [MQTT-3.3.1-10] [MQTT-3.3.1-11].
    pub fn retain(&self, message: &Arc<Message>) {
        if message.payload.is_empty() {
            write(&self.retained).remove(&message.topic);
            self.store.retained_cleared(&message.topic);
        } else {
            let stored = Arc::new(message.compacted());
            self.store.retained_set(&stored);
            let topic = stored.topic.clone();
            write(&self.retained).insert(&topic, stored);
        }
    }

    /// Retained messages matching `filter`, for a new subscription.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut found = Vec::new();
        read(&self.retained).for_each_match(filter, |_, m| found.push(m.clone()));
        found
    }

    /// Delivers `message` to every session with a matching subscription, once per session at
    /// the highest QoS among its matching subscriptions [MQTT-3.3.5-1]. Honours v5 No Local
    /// [MQTT-3.8.3-3] and Retain As Published [MQTT-3.3.1-12] [MQTT-3.3.1-13].
    ///
    /// The publisher's own session never counts as congested: a client cannot both be paused
    /// and read the acknowledgements that would drain its own queue.
    pub fn route(&self, message: &Arc<Message>) -> Routed {
        TARGETS.with(|cell| {
            let mut targets = cell.borrow_mut();
            targets.clear();
            read(&self.index).for_each_match(&message.topic, |id, sub| {
                if sub.options.no_local && id == message.origin {
                    return;
                }
                let retain = sub.options.retain_as_published && message.retain;
                targets.push((id, sub.session.clone(), sub.options.qos, retain));
            });
            if targets.len() > 1 {
                // Overlapping subscriptions of one session: one entry with the max QoS, keeping
                // the retain flag if any of them asked for it.
                targets.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
                targets.dedup_by(|later, kept| {
                    let same = later.0 == kept.0;
                    if same {
                        kept.3 |= later.3;
                    }
                    same
                });
            }
            let weight = u32::try_from(message.weight()).unwrap_or(u32::MAX);
            let matched = targets.len();
            let mut congested = None;
            for (id, session, granted, retain) in targets.drain(..) {
                let delivery = Delivery {
                    message: message.clone(),
                    qos: granted.min(message.qos),
                    retain,
                    weight,
                };
                match session.offer(delivery, &self.limits, &self.stats) {
                    Ok(Admitted::Queued) => {}
                    Ok(Admitted::Congested) => {
                        if congested.is_none() && id != message.origin {
                            congested = Some(session);
                        }
                    }
                    Err(reason) => self.count_drop(reason),
                }
            }
            Routed { matched, congested }
        })
    }

    fn count_drop(&self, reason: Dropped) {
        let counter = match reason {
            Dropped::OutboxFull => &self.stats.dropped_outbox_full,
            Dropped::QueueFull => &self.stats.dropped_queue_full,
            Dropped::Offline => &self.stats.dropped_offline_qos0,
            Dropped::Ended => return,
        };
        Stats::add(counter, 1);
    }
}
