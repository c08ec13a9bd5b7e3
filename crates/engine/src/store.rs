//! Where durable state goes. The engine keeps its live state in memory and reports every change
//! that must survive a restart to a [`Store`]; a disk-backed store (a later milestone) writes
//! them through, and [`Volatile`] — the in-memory mode — keeps nothing beyond the engine's own
//! structures, so a restart starts empty.
//!
//! The hooks are called outside the engine's locks, after the change is made in memory.

use petrel_codec::{SubscriptionOptions, TopicFilter};

use crate::message::Message;

pub trait Store: Send + Sync + 'static {
    /// A persistent session was created or resumed by `client_id`.
    fn session_opened(&self, client_id: &str, persistent: bool);
    /// The session ended and its state was discarded.
    fn session_removed(&self, client_id: &str);
    fn subscription_added(
        &self,
        client_id: &str,
        filter: &TopicFilter,
        options: SubscriptionOptions,
    );
    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter);
    fn retained_set(&self, message: &Message);
    fn retained_cleared(&self, topic: &str);
}

/// The in-memory mode: state lives only in the engine.
pub struct Volatile;

impl Store for Volatile {
    fn session_opened(&self, _: &str, _: bool) {}
    fn session_removed(&self, _: &str) {}
    fn subscription_added(&self, _: &str, _: &TopicFilter, _: SubscriptionOptions) {}
    fn subscription_removed(&self, _: &str, _: &TopicFilter) {}
    fn retained_set(&self, _: &Message) {}
    fn retained_cleared(&self, _: &str) {}
}
