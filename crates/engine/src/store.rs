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

use std::time::Instant;

use petrel_codec::TopicFilter;

use crate::message::Message;
use crate::session::Subscription;

pub trait Store: Send + Sync + 'static {
    /// A session was created or resumed with this Session Expiry Interval; 0 means it ends
    /// with its connection, and a store forgets any earlier record of it.
    fn session_opened(&self, client_id: &str, expiry_interval: u32);
    /// A persistent session's client left: the session ends at `expires_at` (`None`: never)
    /// unless it is resumed first.
    fn session_offline(&self, client_id: &str, expires_at: Option<Instant>);
    /// The session ended; its subscriptions go with it.
    fn session_removed(&self, client_id: &str);
    fn subscription_added(&self, client_id: &str, filter: &TopicFilter, subscription: Subscription);
    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter);
    fn retained_set(&self, message: &Message);
    fn retained_cleared(&self, topic: &str);
}

/// The in-memory mode: state lives only in the engine.
pub struct Volatile;

impl Store for Volatile {
    fn session_opened(&self, _: &str, _: u32) {}
    fn session_offline(&self, _: &str, _: Option<Instant>) {}
    fn session_removed(&self, _: &str) {}
    fn subscription_added(&self, _: &str, _: &TopicFilter, _: Subscription) {}
    fn subscription_removed(&self, _: &str, _: &TopicFilter) {}
    fn retained_set(&self, _: &Message) {}
    fn retained_cleared(&self, _: &str) {}
}

/// A persistent session as a store gives it back at start.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub client_id: String,
    pub expiry_interval: u32,
    /// When the offline session ends; `None`: never (or it was connected when the broker
    /// stopped, and its interval starts now).
    pub expires_at: Option<Instant>,
    pub subscriptions: Vec<(TopicFilter, Subscription)>,
}
