//! The seam where other broker nodes attach: a [`Fabric`] carries this node's messages, its
//! subscription interest and its retained changes to the rest of a cluster, and gives
//! messages from other nodes back through [`crate::Broker::route_remote`],
//! [`crate::Broker::route_group`] and [`crate::Broker::retain_remote`].
//!
//! The engine knows nothing of how the fabric works (the server's cluster mode puts NATS
//! behind it); without one, a broker is a single node and nothing here is called.
//!
//! Like the [`crate::store::Store`] hooks, fabric calls are made from publishers' and
//! subscribers' threads, some under broker locks: an implementation queues the work and
//! returns at once, and never calls back into the broker from them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use petrel_codec::{LastWill, TopicFilter};

use crate::auth::Login;
use crate::message::Message;

/// Taking a client id's session over from another node: done when the other node has closed
/// its client and, where the session goes on, this node holds it ([`crate::Broker::adopt`]).
/// `false`: the session there belongs to another login, and nothing was touched (the CONNECT
/// is refused, as [`crate::Broker::attach`] refuses it on one node).
pub type PendingClaim = Pin<Box<dyn Future<Output = bool> + Send>>;

/// What forwarding a message to other nodes did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Nodes and shared groups elsewhere the message was sent to (0: none had interest).
    pub targets: usize,
    /// The fabric's acknowledgement token (0: nothing to wait for): a QoS 1/2 publisher's
    /// PUBACK/PUBREC waits until [`Fabric::forwarded`] reaches it, so that an acknowledged
    /// message survives this node.
    pub token: u64,
    /// The fabric's queue to other nodes is past its high-water mark: the publisher pauses,
    /// as for a subscriber whose queue it filled, until [`Fabric::wait_room`] says it drained.
    pub congested: bool,
}

pub trait Fabric: Send + Sync + 'static {
    /// A message published on this node (by a client, a bridge or a will), already routed to
    /// this node's ordinary subscribers. The fabric sends it to every other node with a
    /// matching ordinary subscription and to one member of each matching shared group
    /// anywhere, this node's groups included: in cluster mode shared groups are the
    /// fabric's to balance.
    fn publish(&self, message: &Arc<Message>) -> Forwarded;
    /// A retained message was set (or, with an empty payload, cleared) on this node. Returns
    /// the token its acknowledgement waits for.
    fn retain(&self, message: &Arc<Message>) -> u64;
    /// A local ordinary subscription with `filter` was added (`true`) or removed. Called once
    /// per subscription: the fabric counts them, and its interest in a filter lasts while
    /// the count is above zero.
    fn interest(&self, filter: &TopicFilter, added: bool);
    /// This node's shared group `share` on `filter` came into being (its first member here)
    /// or ended (its last member here left).
    fn group(&self, share: &str, filter: &TopicFilter, present: bool);
    /// The highest token such that it and every token before it are acknowledged.
    fn forwarded(&self) -> u64;
    /// Asks for `waker` to be woken once `token` is acknowledged; false if it already is.
    fn wait_forwarded(&self, token: u64, waker: &Waker) -> bool;
    /// A client authenticated with `client_id` and is about to attach to its session here.
    /// Client ids are unique cluster-wide: if another node may hold the session or a
    /// connection with that id, returns the claim to wait for before attaching. `None`: this
    /// node already owns it. `login` is who connects, `granted` whether the ACL binds the
    /// client id to it: the node holding the session hands it over only to its owner or to a
    /// granted login.
    fn claim(
        &self,
        client_id: &str,
        clean_start: bool,
        login: &Login,
        granted: bool,
    ) -> Option<PendingClaim>;
    /// Connection `connection` of `client_id` attached here with a will (`Some`), or it
    /// ended (`None`): its will was published or dropped by this node. Between the two, if
    /// this node dies, another node publishes the will, once.
    fn will(&self, client_id: &str, connection: u64, will: Option<&LastWill>);
    /// The largest MQTT packet whose message the fabric can carry to other nodes: the
    /// broker's `max_packet_size` is held at most at this, so that every message it accepts
    /// can be forwarded.
    fn max_packet_size(&self) -> u32 {
        u32::MAX
    }
    /// The offline session of `client_id` waits to publish `will` at the given time (its
    /// Will Delay Interval), or (`None`) no longer does: published, cancelled by a resume,
    /// or gone with its session. Between the two, if this node dies, another publishes it
    /// when due, once. Not called for the wills of sessions a store restored at start: the
    /// fabric reconciles those itself ([`Broker::pending_wills`](crate::Broker::pending_wills)).
    fn will_pending(&self, client_id: &str, will: Option<(Instant, &LastWill)>) {
        let _ = (client_id, will);
    }
    /// After a congested publish: asks for `waker` to be woken once the queue to other
    /// nodes drained below its low-water mark; false if it already has.
    fn wait_room(&self, waker: &Waker) -> bool {
        let _ = waker;
        false
    }
    /// Messages sent to other nodes so far: a paused publisher keeps waiting while this
    /// moves, and goes on (its messages then dropped, counted) when the fabric is stuck.
    fn progress(&self) -> u64 {
        0
    }
}
