//! The engine's side of the fabric: [`NatsFabric`] implements `petrel_engine::fabric::Fabric`.
//! Its calls come from publishers' and subscribers' threads and must not wait, so each one
//! decides what to send (from the interest table), queues a [`Command`] for the cluster task
//! and returns; tokens for QoS 1/2 copies and retained changes come back acknowledged through
//! [`Acks`].

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Waker;

use petrel_codec::{LastWill, QoS, TopicFilter};
use petrel_engine::auth::Login;
use petrel_engine::fabric::{Fabric, Forwarded, PendingClaim};
use petrel_engine::message::Message;
use tokio::sync::mpsc;

use crate::interest::{RemoteInterest, Targets};

/// Work for the cluster task, in the order the engine asked for it.
pub(crate) enum Command {
    /// A QoS 0 message for NATS subject interest (ordinary subscribers elsewhere, and
    /// shared groups through their queue groups).
    Core(Arc<Message>),
    /// A QoS 1/2 message for JetStream: one copy per node and per group; `token` is
    /// acknowledged once every copy is stored.
    Durable {
        token: u64,
        targets: Targets,
        message: Arc<Message>,
    },
    /// A retained message set or (empty payload) cleared.
    Retain { token: u64, message: Arc<Message> },
    /// A local ordinary subscription added or removed.
    Interest { filter: TopicFilter, added: bool },
    /// The last local subscription with this filter went a while ago: tell the other nodes.
    Withdraw(TopicFilter),
    /// A will to publish should this node die (`Some`), or no longer (`None`).
    Will {
        key: String,
        value: Option<bytes::Bytes>,
    },
    /// A local shared group began or ended.
    Group {
        share: Box<str>,
        filter: TopicFilter,
        present: bool,
    },
}

/// Counters for metrics and the admin API.
#[derive(Default)]
pub struct FabricStats {
    /// Messages sent to other nodes: QoS 0 on NATS, QoS 1/2 copies in JetStream.
    pub sent_core: AtomicU64,
    pub sent_durable: AtomicU64,
    /// Messages received from other nodes.
    pub received_core: AtomicU64,
    pub received_durable: AtomicU64,
    /// QoS 0 messages not sent: NATS was not keeping up (the queue to it was full).
    pub dropped_core: AtomicU64,
    /// QoS 1/2 copies not sent to other nodes: larger than a NATS message may be (only a
    /// message whose topic alias hid a long topic can be).
    pub dropped_too_large: AtomicU64,
    /// Publishes to NATS that failed and were tried again.
    pub retries: AtomicU64,
    /// Times the NATS client dropped QoS 0 messages from other nodes because this node did not
    /// take them fast enough (slow consumer events; each may be many messages).
    pub slow_consumer: AtomicU64,
    /// Retained changes sent and received.
    pub retained_sent: AtomicU64,
    pub retained_received: AtomicU64,
}

/// Acknowledged tokens: the watermark is the highest token with all before it acknowledged.
#[derive(Default)]
pub(crate) struct Acks {
    watermark: AtomicU64,
    inner: Mutex<AcksInner>,
}

#[derive(Default)]
struct AcksInner {
    done: BTreeSet<u64>,
    waiters: Vec<(u64, Waker)>,
}

impl Acks {
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    pub fn complete(&self, token: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut mark = self.watermark.load(Ordering::Acquire);
        inner.done.insert(token);
        while inner.done.remove(&(mark + 1)) {
            mark += 1;
        }
        self.watermark.store(mark, Ordering::Release);
        let mut woken = Vec::new();
        inner.waiters.retain(|(t, w)| {
            if *t <= mark {
                woken.push(w.clone());
                false
            } else {
                true
            }
        });
        drop(inner);
        woken.into_iter().for_each(Waker::wake);
    }

    fn wait(&self, token: u64, waker: &Waker) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if token <= self.watermark.load(Ordering::Acquire) {
            return false;
        }
        if let Some(w) = inner.waiters.iter_mut().find(|(_, w)| w.will_wake(waker)) {
            w.0 = w.0.max(token);
        } else {
            inner.waiters.push((token, waker.clone()));
        }
        true
    }
}

/// QoS 0 messages allowed to wait for NATS at once; past this they are dropped (counted).
const CORE_QUEUE_LIMIT: usize = 65_536;

/// Past this many QoS 0 messages waiting for NATS, a publisher whose message joined them
/// pauses (flow control across nodes, like a subscriber's full queue on one node)...
const CORE_HIGH: usize = 16_384;
/// ...until they are back under this.
const CORE_LOW: usize = 4_096;

/// Publishers paused because the queue to NATS passed [`CORE_HIGH`].
#[derive(Default)]
pub(crate) struct Room {
    /// How many wakers wait: the forwarder looks at this on every message it sends, the
    /// lock only when someone waits.
    paused: AtomicUsize,
    wakers: Mutex<Vec<Waker>>,
}

impl Room {
    fn wait(&self, queued: &AtomicUsize, waker: &Waker) -> bool {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        // Counted before the queue is read, and the forwarder reads the count after it
        // takes from the queue (both sequentially consistent): one of them sees the other.
        self.paused.fetch_add(1, Ordering::SeqCst);
        if queued.load(Ordering::SeqCst) <= CORE_LOW || wakers.iter().any(|w| w.will_wake(waker)) {
            self.paused.fetch_sub(1, Ordering::SeqCst);
            return queued.load(Ordering::SeqCst) > CORE_LOW;
        }
        wakers.push(waker.clone());
        true
    }

    /// The forwarder took from the queue: wakes the paused publishers once it is low.
    pub(crate) fn drained(&self, queued: &AtomicUsize) {
        if self.paused.load(Ordering::SeqCst) == 0 || queued.load(Ordering::SeqCst) > CORE_LOW {
            return;
        }
        let wakers = {
            let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            self.paused.store(0, Ordering::SeqCst);
            std::mem::take(&mut *wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

pub struct NatsFabric {
    pub(crate) node: Box<str>,
    pub(crate) interest: Arc<RwLock<RemoteInterest>>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) next_token: AtomicU64,
    pub(crate) acks: Arc<Acks>,
    pub(crate) core_queued: Arc<AtomicUsize>,
    pub(crate) room: Room,
    pub stats: Arc<FabricStats>,
    /// Client ids whose session this node owns (it claimed them, and no other node took them
    /// since): a client reconnecting to the same node costs no round trip.
    pub(crate) owned: Mutex<HashSet<String>>,
    /// The node's NATS side, which makes claims; set once it runs.
    pub(crate) runner: std::sync::OnceLock<std::sync::Weak<crate::node::Inner>>,
    /// The largest MQTT packet whose message fits in one NATS message (the servers'
    /// `max_payload` less room for the frame's header and the NATS headers).
    pub(crate) max_packet: u32,
}

impl NatsFabric {
    fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, command: Command) {
        // The task outlives the broker's clients; a send fails only during shutdown, when a
        // lost message is one its publisher was not acknowledged for.
        let _ = self.commands.send(command);
    }
}

impl Fabric for NatsFabric {
    fn max_packet_size(&self) -> u32 {
        self.max_packet
    }

    fn publish(&self, message: &Arc<Message>) -> Forwarded {
        let targets = self
            .interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .targets(&message.topic, &self.node);
        let count = targets.nodes.len() + targets.groups.len();
        if count == 0 {
            return Forwarded::default();
        }
        if message.qos == QoS::AtMostOnce {
            let queued = self.core_queued.fetch_add(1, Ordering::SeqCst);
            if queued >= CORE_QUEUE_LIMIT {
                self.core_queued.fetch_sub(1, Ordering::SeqCst);
                self.stats.dropped_core.fetch_add(1, Ordering::Relaxed);
            } else {
                self.send(Command::Core(message.clone()));
            }
            return Forwarded {
                targets: count,
                token: 0,
                congested: queued + 1 >= CORE_HIGH,
            };
        }
        let token = self.token();
        self.send(Command::Durable {
            token,
            targets,
            message: message.clone(),
        });
        Forwarded {
            targets: count,
            token,
            congested: false,
        }
    }

    fn retain(&self, message: &Arc<Message>) -> u64 {
        let token = self.token();
        self.send(Command::Retain {
            token,
            message: message.clone(),
        });
        token
    }

    fn interest(&self, filter: &TopicFilter, added: bool) {
        self.send(Command::Interest {
            filter: filter.clone(),
            added,
        });
    }

    fn group(&self, share: &str, filter: &TopicFilter, present: bool) {
        self.send(Command::Group {
            share: share.into(),
            filter: filter.clone(),
            present,
        });
    }

    fn forwarded(&self) -> u64 {
        self.acks.watermark()
    }

    fn wait_forwarded(&self, token: u64, waker: &Waker) -> bool {
        self.acks.wait(token, waker)
    }

    fn will(&self, client_id: &str, connection: u64, will: Option<&LastWill>) {
        self.send(Command::Will {
            key: crate::names::will_key(&self.node, client_id, connection),
            value: will.map(crate::wire::encode_will),
        });
    }

    fn will_pending(&self, client_id: &str, will: Option<(std::time::Instant, &LastWill)>) {
        self.send(Command::Will {
            key: crate::names::pending_will_key(&self.node, client_id),
            value: will.map(|(due, will)| crate::wire::encode_pending_will(due, will)),
        });
    }

    fn wait_room(&self, waker: &Waker) -> bool {
        self.room.wait(&self.core_queued, waker)
    }

    fn progress(&self) -> u64 {
        self.stats.sent_core.load(Ordering::Relaxed)
    }

    fn claim(
        &self,
        client_id: &str,
        clean_start: bool,
        login: &Login,
        granted: bool,
    ) -> Option<PendingClaim> {
        if self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(client_id)
        {
            return None;
        }
        let node = self.runner.get()?.upgrade()?;
        let (client_id, login) = (client_id.to_owned(), login.clone());
        Some(Box::pin(async move {
            node.claim(client_id, clean_start, login, granted).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_every_earlier_token() {
        let acks = Acks::default();
        acks.complete(2);
        acks.complete(3);
        assert_eq!(acks.watermark(), 0);
        acks.complete(1);
        assert_eq!(acks.watermark(), 3);
        acks.complete(5);
        assert_eq!(acks.watermark(), 3);
        acks.complete(4);
        assert_eq!(acks.watermark(), 5);
    }
}
