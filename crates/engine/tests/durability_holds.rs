//! QoS 2 with persistent sessions: nothing goes out before the record that lets the broker
//! repeat it correctly after a crash is durable. A store whose durable token the test moves by
//! hand shows each hold in isolation (the SIGKILL test in `crates/server/tests/crash.rs` shows
//! them together against the real disk store).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use petrel_codec::{Connect, LastWill, Packet, QoS, ReasonCode, TopicFilter};
use petrel_engine::auth::Login;
use petrel_engine::message::Message;
use petrel_engine::session::{Delivery, Subscription};
use petrel_engine::store::Store;
use petrel_engine::{Broker, Limits};
use support::*;

/// Hands out a token per change; durable only up to what the test allows.
#[derive(Default)]
struct Manual {
    written: AtomicU64,
    durable: AtomicU64,
}

impl Manual {
    fn change(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Everything recorded so far becomes durable.
    fn land(&self) {
        self.durable
            .store(self.written.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

struct ManualStore(Arc<Manual>);

impl Store for ManualStore {
    fn session_opened(&self, _: &str, _: u32, _: Option<&Login>) -> u64 {
        self.0.change()
    }
    fn session_offline(&self, _: &str, _: u32, _: Option<Instant>, _: Option<&Login>) {
        self.0.change();
    }
    fn session_removed(&self, _: &str) {
        self.0.change();
    }
    fn subscription_added(&self, _: &str, _: &TopicFilter, _: Subscription) -> u64 {
        self.0.change()
    }
    fn subscription_removed(&self, _: &str, _: &TopicFilter) {
        self.0.change();
    }
    fn retained_set(&self, _: &Message) -> u64 {
        self.0.change()
    }
    fn retained_cleared(&self, _: &str) -> u64 {
        self.0.change()
    }
    fn enqueued(&self, _: &str, _: u64, _: &Delivery) -> u64 {
        self.0.change()
    }
    fn sent(&self, _: &str, _: u64, _: u16) -> u64 {
        self.0.change()
    }
    fn released(&self, _: &str, _: u64, _: u16) -> u64 {
        self.0.change()
    }
    fn dequeued(&self, _: &str, _: u64, _: &Message, _: QoS) {
        self.0.change();
    }
    fn inbound_qos2(&self, _: &str, _: u16, _: bool) -> u64 {
        self.0.change()
    }
    fn will_pending(&self, _: &str, _: Option<(Instant, &LastWill)>) {
        self.0.change();
    }
    fn durable(&self) -> u64 {
        self.0.durable.load(Ordering::SeqCst)
    }
    fn wait_durable(&self, token: u64, _: &Waker) -> bool {
        self.durable() < token
    }
}

fn setup() -> (Arc<Broker>, Arc<Manual>) {
    let manual = Arc::new(Manual::default());
    let broker = Arc::new(Broker::with_parts(
        Limits::default(),
        Box::new(petrel_engine::auth::AllowAll),
        Box::new(ManualStore(manual.clone())),
    ));
    (broker, manual)
}

/// A connection whose CONNACK came: a persistent session's waits for its record to land.
fn connected(broker: &Arc<Broker>, store: &Manual, now: Instant, c: Connect) -> Peer {
    let mut peer = Peer::new(broker, now);
    peer.send_connect(now, c).expect("CONNECT accepted");
    store.land();
    match peer.recv().as_slice() {
        [Packet::ConnAck(ack)] if ack.reason == ReasonCode::SUCCESS => {}
        other => panic!("expected one successful CONNACK, got {other:?}"),
    }
    peer
}

#[test]
fn the_connack_of_a_persistent_session_waits_for_its_record() {
    let t0 = Instant::now();
    let (broker, store) = setup();
    let mut peer = Peer::new(&broker, t0);
    peer.send_connect(t0, connect("keep", false, 60)).unwrap();
    // The client may send before it has the CONNACK; nothing overtakes it.
    peer.send(t0, Packet::PingReq).unwrap();
    assert_eq!(
        peer.recv(),
        [],
        "CONNACK before the session's record was durable: a crash would lose a session the \
         client was told about"
    );
    store.land();
    assert_eq!(peer.recv(), [connack(false), Packet::PingResp]);

    // A session that ends with its connection has nothing to keep: no wait.
    let mut clean = Peer::new(&broker, t0);
    clean.send_connect(t0, connect("gone", true, 60)).unwrap();
    assert_eq!(clean.written(), [connack(false)]);

    // Resuming records the session again (its expiry may have changed): the same wait.
    let _ = peer.close(&petrel_engine::CloseReason::Disconnect { with_will: false });
    let mut again = Peer::new(&broker, t0);
    again.send_connect(t0, connect("keep", false, 60)).unwrap();
    assert_eq!(again.recv(), []);
    store.land();
    assert_eq!(again.recv(), [connack(true)]);
}

#[test]
fn a_qos2_message_from_a_persistent_publisher_reaches_nobody_before_its_packet_id_is_durable() {
    let t0 = Instant::now();
    let (broker, store) = setup();
    let mut sub = Peer::connect(&broker, t0, connect("sub", true, 60));
    sub.subscribe(t0, 1, "t", QoS::ExactlyOnce);
    let mut publ = connected(&broker, &store, t0, connect("pub", false, 60));

    publ.send(t0, publish("t", "m", QoS::ExactlyOnce, 7))
        .unwrap();
    // Delivered now, a crash could make the unacknowledged publisher send it again as new.
    assert_eq!(sub.recv(), [], "delivered before the packet id was durable");
    assert_eq!(publ.recv(), [], "PUBREC before the packet id was durable");

    store.land();
    assert_eq!(publ.recv(), [pubrec(7)]);
    match sub.recv().as_slice() {
        [Packet::Publish(p)] => assert_eq!(&p.payload[..], b"m"),
        other => panic!("expected the PUBLISH, got {other:?}"),
    }

    // PUBCOMP waits for the id's removal: after it the publisher may reuse the id.
    publ.send(t0, pubrel(7)).unwrap();
    assert_eq!(
        publ.recv(),
        [],
        "PUBCOMP before the id's removal was durable"
    );
    store.land();
    assert_eq!(publ.recv(), [pubcomp(7)]);
}

#[test]
fn a_non_persistent_publisher_is_not_held() {
    let t0 = Instant::now();
    let (broker, _store) = setup();
    let mut sub = Peer::connect(&broker, t0, connect("sub", true, 60));
    sub.subscribe(t0, 1, "t", QoS::ExactlyOnce);
    let mut publ = Peer::connect(&broker, t0, connect("pub", true, 60));
    publ.send(t0, publish("t", "m", QoS::ExactlyOnce, 7))
        .unwrap();
    assert_eq!(publ.recv(), [pubrec(7)]);
    assert_eq!(sub.recv().len(), 1, "a clean session's message is not held");
}

#[test]
fn a_qos2_delivery_to_a_persistent_session_waits_for_its_packet_id_and_pubrel_for_pubrec() {
    let t0 = Instant::now();
    let (broker, store) = setup();
    let mut sub = connected(&broker, &store, t0, connect("sub", false, 60));
    sub.send(t0, subscribe(1, "t", QoS::ExactlyOnce)).unwrap();
    store.land(); // SUBACK waits for the subscription to be durable
    assert_eq!(sub.recv(), [suback(1, &[petrel_codec::ReasonCode(2)])]);
    let mut publ = Peer::connect(&broker, t0, connect("pub", true, 60));

    publ.send(t0, publish("t", "a", QoS::ExactlyOnce, 1))
        .unwrap();
    publ.send(t0, publish("t", "b", QoS::AtMostOnce, 0))
        .unwrap();
    // The QoS 2 delivery's packet id is not durable: neither it nor what follows it goes out
    // (the client would otherwise see them out of order).
    assert_eq!(
        sub.recv(),
        [],
        "a QoS 2 PUBLISH before its packet id was durable"
    );
    store.land();
    let got = sub.recv();
    let payloads: Vec<&[u8]> = got
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => &p.payload[..],
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect();
    assert_eq!(payloads, [&b"a"[..], &b"b"[..]], "both, in order");
    let id = match &got[0] {
        Packet::Publish(p) => p.packet_id.expect("QoS 2").get(),
        _ => unreachable!(),
    };

    // PUBREL waits for the PUBREC record: a crash must not bring back a PUBLISH the client has
    // released and forgotten.
    sub.send(t0, pubrec(id)).unwrap();
    assert_eq!(
        sub.recv(),
        [],
        "PUBREL before the PUBREC record was durable"
    );
    store.land();
    assert_eq!(sub.recv(), [pubrel(id)]);
}
