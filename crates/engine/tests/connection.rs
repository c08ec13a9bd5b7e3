//! The connection state machine driven in memory with virtual time: timers, wills, QoS flows,
//! sessions and their bounds, takeover and CONNECT validation. Each test is a transcript: what
//! the client sends, what the broker writes back.
//!
//! Spec tags are MQTT 3.1.1 statement ids unless the test name says v5.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_codec::{ConnAck, Disconnect, Packet, Properties, QoS, ReasonCode, SubscriptionOptions};
use petrel_engine::stats::Stats;
use petrel_engine::{Broker, CloseReason, Limits, Violation};
use support::*;

fn default_broker() -> Arc<Broker> {
    broker(Limits::default())
}

/// A connected 3.1.1 client with a clean session and no keepalive.
fn client(broker: &Arc<Broker>, now: Instant, client_id: &str) -> Peer {
    Peer::connect(broker, now, connect(client_id, true, 0))
}

/// The CONNACK a v5 client was sent, checked to be the only packet written.
fn only_connack(peer: &mut Peer) -> ConnAck {
    match peer.written().as_slice() {
        [Packet::ConnAck(ack)] => ack.clone(),
        other => panic!("expected one CONNACK, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Connect timeout

#[test]
fn connect_timeout_is_the_only_deadline_before_connect() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = Peer::new(&broker, t0);

    assert_eq!(c.conn.deadline(), Some(t0 + CONNECT_TIMEOUT));
    assert_eq!(c.conn.handle_timeout(t0 + ms(9_900)), Ok(()));
    assert_eq!(
        c.conn.deadline(),
        Some(t0 + CONNECT_TIMEOUT),
        "time alone moves nothing"
    );
    assert_eq!(
        c.conn.handle_timeout(t0 + secs(10)),
        Err(CloseReason::ConnectTimeout)
    );
    assert_eq!(Stats::get(&broker.stats.connect_timeouts), 1);
    assert_eq!(
        c.close(&CloseReason::ConnectTimeout),
        [],
        "nothing to tell a silent client"
    );
}

#[test]
fn connect_just_before_the_connect_timeout_is_accepted() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = Peer::new(&broker, t0);

    assert_eq!(c.conn.handle_timeout(t0 + secs(9)), Ok(()));
    c.send_connect(t0 + secs(9), connect("c", true, 0))
        .expect("CONNECT at 9 s is in time");
    assert_eq!(c.written(), [connack(false)]);
    // Keepalive 0: the connect timeout is gone and nothing replaces it.
    assert_eq!(c.conn.deadline(), None);
    assert_eq!(c.conn.handle_timeout(t0 + secs(10)), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Keepalive

#[test]
fn keepalive_deadline_counts_from_the_last_packet_received_mqtt_3_1_2_24() {
    let t0 = Instant::now();
    let broker = default_broker();
    let t1 = t0 + secs(3);
    let mut sub = Peer::connect(&broker, t1, connect("sub", true, 10));
    assert_eq!(sub.conn.deadline(), Some(t1 + secs(15)), "1.5 × keepalive");
    sub.subscribe(t1, 1, "k/#", QoS::AtMostOnce);

    // An inbound PINGREQ moves the deadline.
    sub.send(t1 + secs(12), Packet::PingReq).unwrap();
    assert_eq!(sub.written(), [Packet::PingResp]);
    assert_eq!(sub.conn.deadline(), Some(t1 + secs(27)));
    assert_eq!(
        sub.conn.handle_timeout(t1 + secs(15)),
        Ok(()),
        "the old deadline is gone"
    );

    // A PUBLISH the broker sends to this client does not.
    let mut publ = client(&broker, t1 + secs(20), "pub");
    publ.send(t1 + secs(20), publish("k/a", "x", QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(sub.recv(), [publish("k/a", "x", QoS::AtMostOnce, 0)]);
    assert_eq!(
        sub.conn.deadline(),
        Some(t1 + secs(27)),
        "sending never moves it"
    );

    assert_eq!(sub.conn.handle_timeout(t1 + secs(27) - ms(1)), Ok(()));
    assert_eq!(
        sub.conn.handle_timeout(t1 + secs(27)),
        Err(CloseReason::KeepAliveTimeout)
    );
    assert_eq!(Stats::get(&broker.stats.keepalive_timeouts), 1);
}

#[test]
fn keepalive_zero_means_no_deadline() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = client(&broker, t0, "c");
    assert_eq!(c.conn.deadline(), None);
    c.send(t0 + secs(5), Packet::PingReq).unwrap();
    assert_eq!(c.conn.deadline(), None);
    assert_eq!(c.conn.handle_timeout(t0 + secs(86_400)), Ok(()));
}

#[test]
fn v5_server_keep_alive_caps_the_clients_keepalive() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_keepalive: 30,
        ..Default::default()
    });
    // (client's keepalive, Server Keep Alive sent back, seconds until the deadline)
    let cases = [(0, Some(30), 45), (60, Some(30), 45), (20, None, 30)];
    for (i, (asked, imposed, deadline)) in cases.into_iter().enumerate() {
        let mut c = Peer::new(&broker, t0);
        c.send_connect(t0, connect_v5(&format!("c{i}"), true, asked))
            .unwrap();
        let ack = only_connack(&mut c);
        assert_eq!(
            ack.properties.server_keep_alive, imposed,
            "keepalive {asked}"
        );
        assert_eq!(
            c.conn.deadline(),
            Some(t0 + secs(deadline)),
            "keepalive {asked}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Will

/// A 3.1.1 client "c" (clean session, keepalive 10) whose will is QoS 0 on "will/c".
fn client_with_will(broker: &Arc<Broker>, now: Instant, retain: bool) -> Peer {
    let mut c = connect("c", true, 10);
    c.will = Some(will("will/c", "gone", QoS::AtMostOnce, retain));
    Peer::connect(broker, now, c)
}

/// A subscriber to "will/#".
fn watcher(broker: &Arc<Broker>, now: Instant) -> Peer {
    let mut w = client(broker, now, "watcher");
    w.subscribe(now, 1, "will/#", QoS::AtMostOnce);
    w
}

fn will_message() -> Packet {
    publish("will/c", "gone", QoS::AtMostOnce, 0)
}

#[test]
fn will_is_published_on_keepalive_timeout_mqtt_3_1_2_8() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut c = client_with_will(&broker, t0, false);

    let reason = c.conn.handle_timeout(t0 + secs(15)).unwrap_err();
    assert_eq!(reason, CloseReason::KeepAliveTimeout);
    assert_eq!(c.close(&reason), [], "3.1.1 has no server DISCONNECT");

    assert_eq!(w.recv(), [will_message()]);
    assert_eq!(Stats::get(&broker.stats.wills_published), 1);
}

#[test]
fn will_is_not_published_after_disconnect_mqtt_3_1_2_10() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut c = client_with_will(&broker, t0, false);

    let reason = c
        .send(t0 + secs(1), Packet::Disconnect(Disconnect::default()))
        .unwrap_err();
    assert_eq!(reason, CloseReason::Disconnect { with_will: false });
    c.close(&reason);

    assert_eq!(w.recv(), []);
    assert_eq!(Stats::get(&broker.stats.wills_published), 0);
}

#[test]
fn v5_will_is_published_after_disconnect_with_will_message() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut connect = connect_v5("c", true, 0);
    connect.will = Some(will("will/c", "gone", QoS::AtMostOnce, false));
    let mut c = Peer::connect(&broker, t0, connect);

    let with_will = Disconnect::with_reason(ReasonCode::DISCONNECT_WITH_WILL);
    let reason = c
        .send(t0 + secs(1), Packet::Disconnect(with_will))
        .unwrap_err();
    assert_eq!(reason, CloseReason::Disconnect { with_will: true });
    assert_eq!(
        c.close(&reason),
        [],
        "the client closed: no DISCONNECT back"
    );

    assert_eq!(w.recv(), [will_message()]);
}

#[test]
fn will_is_published_when_the_session_is_taken_over() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut first = client_with_will(&broker, t0, false);

    let _second = client(&broker, t0 + secs(1), "c");
    let reason = first.deliver().unwrap_err();
    assert_eq!(reason, CloseReason::TakenOver);
    first.close(&reason);

    assert_eq!(w.recv(), [will_message()]);
}

#[test]
fn retained_will_is_stored_mqtt_3_1_2_17() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut c = client_with_will(&broker, t0, true);

    c.close(&CloseReason::PeerClosed);
    assert_eq!(broker.retained_count(), 1);
    // Live to the existing subscription: RETAIN clear [MQTT-3.3.1-9].
    assert_eq!(w.recv(), [will_message()]);

    // A later subscriber gets it as a retained message [MQTT-3.3.1-8].
    let mut late = client(&broker, t0 + secs(1), "late");
    late.subscribe(t0 + secs(1), 1, "will/+", QoS::AtMostOnce);
    assert_eq!(late.recv(), [retained(will_message())]);
}

// ---------------------------------------------------------------------------------------------
// QoS flows

#[test]
fn qos1_outbound_window_holds_back_publishes_until_puback() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_inflight: 2,
        ..Default::default()
    });
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    for i in 1..=5 {
        publ.send(t0, publish("q", &format!("m{i}"), QoS::AtLeastOnce, i))
            .unwrap();
        assert_eq!(publ.written(), [puback(i)]);
    }
    let m = |id| publish("q", &format!("m{id}"), QoS::AtLeastOnce, id);

    assert_eq!(sub.recv(), [m(1), m(2)]);
    assert_eq!(sub.recv(), [], "window of 2 is full");

    sub.send(t0, puback(1)).unwrap();
    assert_eq!(sub.recv(), [m(3)]);
    assert_eq!(sub.recv(), []);
    // Acknowledgements out of order free a slot just the same.
    sub.send(t0, puback(3)).unwrap();
    assert_eq!(sub.recv(), [m(4)]);
    sub.send(t0, puback(2)).unwrap();
    assert_eq!(sub.recv(), [m(5)]);
    sub.send(t0, puback(4)).unwrap();
    sub.send(t0, puback(5)).unwrap();
    assert_eq!(sub.recv(), []);
}

#[test]
fn v5_receive_maximum_lowers_the_window_mqtt_3_3_4_9() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut connect = connect_v5("sub", true, 0);
    connect.properties.receive_maximum = Some(1);
    let mut sub = Peer::connect(&broker, t0, connect);
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = Peer::connect(&broker, t0, connect_v5("pub", true, 0));
    for i in 1..=2 {
        publ.send(t0, publish("q", "m", QoS::AtLeastOnce, i))
            .unwrap();
    }

    assert_eq!(sub.recv(), [publish("q", "m", QoS::AtLeastOnce, 1)]);
    sub.send(t0, puback(1)).unwrap();
    assert_eq!(sub.recv(), [publish("q", "m", QoS::AtLeastOnce, 2)]);
}

/// §4.3.3, receiver side: PUBREC for every copy, route only the first until PUBREL.
#[test]
fn qos2_inbound_is_routed_exactly_once() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "x/#", QoS::AtMostOnce);
    let mut publ = client(&broker, t0, "pub");

    publ.send(t0, publish("x/1", "once", QoS::ExactlyOnce, 1))
        .unwrap();
    assert_eq!(publ.written(), [pubrec(1)]);
    assert_eq!(sub.recv(), [publish("x/1", "once", QoS::AtMostOnce, 0)]);

    // The client did not see the PUBREC and sends again: acknowledged, not routed again.
    publ.send(
        t0 + secs(1),
        dup(publish("x/1", "once", QoS::ExactlyOnce, 1)),
    )
    .unwrap();
    assert_eq!(publ.written(), [pubrec(1)]);
    assert_eq!(sub.recv(), []);

    publ.send(t0 + secs(2), pubrel(1)).unwrap();
    assert_eq!(publ.written(), [pubcomp(1)]);
    assert_eq!(sub.recv(), []);

    // After PUBCOMP the id is free: the same id is a new message.
    publ.send(t0 + secs(3), publish("x/1", "twice", QoS::ExactlyOnce, 1))
        .unwrap();
    assert_eq!(publ.written(), [pubrec(1)]);
    assert_eq!(sub.recv(), [publish("x/1", "twice", QoS::AtMostOnce, 0)]);
}

#[test]
fn qos2_outbound_holds_its_window_slot_until_pubcomp() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_inflight: 1,
        ..Default::default()
    });
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "y", QoS::ExactlyOnce);
    let mut publ = client(&broker, t0, "pub");
    publ.send(t0, publish("y", "a", QoS::ExactlyOnce, 1))
        .unwrap();
    publ.send(t0, publish("y", "b", QoS::ExactlyOnce, 2))
        .unwrap();

    assert_eq!(sub.recv(), [publish("y", "a", QoS::ExactlyOnce, 1)]);
    sub.send(t0, pubrec(1)).unwrap();
    assert_eq!(sub.recv(), [pubrel(1)], "PUBREC does not free the slot");
    sub.send(t0, pubcomp(1)).unwrap();
    assert_eq!(sub.recv(), [publish("y", "b", QoS::ExactlyOnce, 2)]);
}

// ---------------------------------------------------------------------------------------------
// Persistent sessions

/// Connects "sub" with clean session 0; returns the connection and what it was sent straight
/// after CONNECT.
fn reconnect(broker: &Arc<Broker>, now: Instant) -> (Peer, Vec<Packet>) {
    let mut p = Peer::new(broker, now);
    p.send_connect(now, connect("sub", false, 0))
        .expect("reconnect accepted");
    let written = p.written();
    (p, written)
}

#[test]
fn resumed_session_resends_unacknowledged_publish_with_dup_mqtt_4_4_0_1() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut sub = Peer::connect(&broker, t0, connect("sub", false, 0));
    sub.subscribe(t0, 1, "p", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    publ.send(t0, publish("p", "m", QoS::AtLeastOnce, 7))
        .unwrap();
    assert_eq!(sub.recv(), [publish("p", "m", QoS::AtLeastOnce, 1)]);

    // No PUBACK: the connection drops.
    assert_eq!(sub.close(&CloseReason::PeerClosed), []);
    assert_eq!(
        broker.session_count(),
        2,
        "the persistent session outlives it"
    );

    let (mut sub, written) = reconnect(&broker, t0 + secs(1));
    assert_eq!(
        written,
        [
            connack(true),                               // session present [MQTT-3.2.2-2]
            dup(publish("p", "m", QoS::AtLeastOnce, 1)), // same id, DUP [MQTT-3.3.1-1]
        ]
    );
    sub.send(t0 + secs(2), puback(1)).unwrap();
    assert_eq!(sub.recv(), []);
    sub.close(&CloseReason::PeerClosed);

    let (_sub, written) = reconnect(&broker, t0 + secs(3));
    assert_eq!(written, [connack(true)], "acknowledged: nothing to resend");
}

#[test]
fn resumed_session_resends_pubrel_after_pubrec_mqtt_4_4_0_1() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut sub = Peer::connect(&broker, t0, connect("sub", false, 0));
    sub.subscribe(t0, 1, "p", QoS::ExactlyOnce);
    let mut publ = client(&broker, t0, "pub");
    publ.send(t0, publish("p", "m", QoS::ExactlyOnce, 7))
        .unwrap();
    assert_eq!(sub.recv(), [publish("p", "m", QoS::ExactlyOnce, 1)]);
    sub.send(t0, pubrec(1)).unwrap();
    assert_eq!(sub.written(), [pubrel(1)]);

    // No PUBCOMP: the connection drops.
    sub.close(&CloseReason::PeerClosed);

    let (mut sub, written) = reconnect(&broker, t0 + secs(1));
    assert_eq!(
        written,
        [connack(true), pubrel(1)],
        "PUBREL, not the PUBLISH"
    );
    sub.send(t0 + secs(2), pubcomp(1)).unwrap();
    assert_eq!(sub.recv(), []);
    sub.close(&CloseReason::PeerClosed);

    let (_sub, written) = reconnect(&broker, t0 + secs(3));
    assert_eq!(written, [connack(true)], "completed: nothing to resend");
}

#[test]
fn offline_queue_keeps_the_first_messages_up_to_its_bound() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_queued_messages: 3,
        ..Default::default()
    });
    let mut sub = Peer::connect(&broker, t0, connect("sub", false, 0));
    sub.subscribe(t0, 1, "o", QoS::AtLeastOnce);
    sub.close(&CloseReason::PeerClosed);

    let mut publ = client(&broker, t0 + secs(1), "pub");
    for i in 1..=5 {
        publ.send(
            t0 + secs(1),
            publish("o", &format!("m{i}"), QoS::AtLeastOnce, i),
        )
        .unwrap();
        assert_eq!(publ.written(), [puback(i)]);
    }
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 2);

    let (mut sub, written) = reconnect(&broker, t0 + secs(2));
    assert_eq!(written, [connack(true)]);
    let m = |id| publish("o", &format!("m{id}"), QoS::AtLeastOnce, id);
    assert_eq!(sub.recv(), [m(1), m(2), m(3)]);
}

/// Offline persistent subscribers to "t/<id>", one per id.
fn offline_subscribers(broker: &Arc<Broker>, now: Instant, ids: &[&str]) {
    for id in ids {
        let mut s = Peer::connect(broker, now, connect(id, false, 0));
        s.subscribe(now, 1, &format!("t/{id}"), QoS::AtLeastOnce);
        s.close(&CloseReason::PeerClosed);
    }
}

/// The payloads of the PUBLISH packets among `packets`.
fn payloads(packets: Vec<Packet>) -> Vec<String> {
    packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn offline_queues_together_stay_within_the_broker_wide_bound() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_queued_messages: 10,
        max_queued_messages_total: 15,
        ..Default::default()
    });
    offline_subscribers(&broker, t0, &["a", "b", "c"]);
    let mut publ = client(&broker, t0, "pub");
    let mut packet_id = 0;
    let mut publish_to = |publ: &mut Peer, id: &str, n: usize| {
        for i in 0..n {
            packet_id += 1;
            publ.send(
                t0,
                publish(
                    &format!("t/{id}"),
                    &format!("{id}{i}"),
                    QoS::AtLeastOnce,
                    packet_id,
                ),
            )
            .unwrap();
            // Acknowledged: dropping at a bound is the broker's decision, counted below.
            assert_eq!(publ.written(), [puback(packet_id)]);
        }
    };
    for id in ["a", "b", "c"] {
        publish_to(&mut publ, id, 10);
    }
    // a fills its own bound (10), b gets the 5 the broker has left, c none.
    assert_eq!(Stats::get(&broker.stats.dropped_broker_queue_full), 15);
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 0);

    let mut b = Peer::new(&broker, t0);
    b.send_connect(t0, connect("b", false, 0)).unwrap();
    assert_eq!(b.written().len(), 1, "CONNACK");
    let got = payloads(b.recv());
    assert_eq!(got, ["b0", "b1", "b2", "b3", "b4"]);

    // Sent to b, its messages left the queues: room for 5 more; a's 10 stay queued.
    publish_to(&mut publ, "c", 10);
    assert_eq!(Stats::get(&broker.stats.dropped_broker_queue_full), 20);
    let mut c = Peer::new(&broker, t0);
    c.send_connect(t0, connect("c", false, 0)).unwrap();
    assert_eq!(c.written().len(), 1, "CONNACK");
    assert_eq!(payloads(c.recv()), ["c0", "c1", "c2", "c3", "c4"]);

    // An ended session gives its room back: a starts clean, its 10 are gone.
    let mut a = Peer::new(&broker, t0);
    a.send_connect(t0, connect("a", true, 0)).unwrap();
    assert_eq!(a.written().len(), 1, "CONNACK");
    assert_eq!(payloads(a.recv()), Vec::<String>::new());
    a.close(&CloseReason::PeerClosed);
    offline_subscribers(&broker, t0, &["d"]);
    publish_to(&mut publ, "d", 10);
    assert_eq!(Stats::get(&broker.stats.dropped_broker_queue_full), 20);
}

#[test]
fn the_broker_wide_byte_bound_with_drop_oldest_keeps_each_sessions_latest() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_queued_bytes_total: 5 * 13,
        drop_oldest: true,
        ..Default::default()
    });
    offline_subscribers(&broker, t0, &["a", "b"]);
    let mut publ = client(&broker, t0, "pub");
    // 13 bytes each (payload and topic): the broker holds 5.
    for (i, id) in ["a", "a", "a", "b", "b", "b"].iter().enumerate() {
        let packet_id = u16::try_from(i + 1).unwrap();
        let payload = format!("{id}-{i:08}");
        publ.send(
            t0,
            publish(&format!("t/{id}"), &payload, QoS::AtLeastOnce, packet_id),
        )
        .unwrap();
        assert_eq!(publ.written(), [puback(packet_id)]);
    }
    // b's third message found the broker full: b's own oldest made room (a's are a's).
    let mut a = Peer::new(&broker, t0);
    a.send_connect(t0, connect("a", false, 0)).unwrap();
    assert_eq!(a.written().len(), 1, "CONNACK");
    assert_eq!(
        payloads(a.recv()),
        ["a-00000000", "a-00000001", "a-00000002"]
    );
    let mut b = Peer::new(&broker, t0);
    b.send_connect(t0, connect("b", false, 0)).unwrap();
    assert_eq!(b.written().len(), 1, "CONNACK");
    assert_eq!(payloads(b.recv()), ["b-00000004", "b-00000005"]);
}

#[test]
fn offline_queue_with_drop_oldest_keeps_the_latest_messages() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_queued_messages: 3,
        drop_oldest: true,
        ..Default::default()
    });
    let mut sub = Peer::connect(&broker, t0, connect("sub", false, 0));
    sub.subscribe(t0, 1, "o", QoS::AtLeastOnce);
    sub.close(&CloseReason::PeerClosed);

    let mut publ = client(&broker, t0 + secs(1), "pub");
    for i in 1..=5 {
        publ.send(
            t0 + secs(1),
            publish("o", &format!("m{i}"), QoS::AtLeastOnce, i),
        )
        .unwrap();
        assert_eq!(publ.written(), [puback(i)]);
    }
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 2);

    let (mut sub, written) = reconnect(&broker, t0 + secs(2));
    assert_eq!(written, [connack(true)]);
    // The subscriber's own packet ids start at 1 whatever messages they carry.
    let got: Vec<String> = sub
        .recv()
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => String::from_utf8_lossy(&p.payload).into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["m3", "m4", "m5"]);
}

#[test]
fn qos0_outbox_bound_drops_the_excess_when_flow_control_is_off() {
    let t0 = Instant::now();
    // Each message below weighs 10 bytes (topic 1 + payload 9): 10 fit in 100.
    let broker = broker(Limits {
        outbox_bytes: 100,
        flow_control_timeout: Duration::ZERO,
        ..Default::default()
    });
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "z", QoS::AtMostOnce);
    let mut publ = client(&broker, t0, "pub");
    let m = |i| publish("z", &format!("msg-{i:05}"), QoS::AtMostOnce, 0);
    for i in 0..25 {
        publ.send(t0, m(i)).unwrap();
        assert!(!publ.conn.is_paused(), "flow control is off");
    }
    assert_eq!(Stats::get(&broker.stats.dropped_outbox_full), 15);

    let fitted: Vec<Packet> = (0..10).map(m).collect();
    assert_eq!(sub.recv(), fitted);
}

// ---------------------------------------------------------------------------------------------
// Flow control: a full subscriber queue pauses its publishers instead of losing messages

/// Limits for the flow-control tests: a queue of 4 QoS 1/2 messages, an in-flight window of 2,
/// and a 5 s wait for a stalled subscriber.
fn flow_limits() -> Limits {
    Limits {
        max_queued_messages: 4,
        max_inflight: 2,
        flow_control_timeout: secs(5),
        ..Default::default()
    }
}

/// Publishes QoS 1 messages `first..` on "q" until the broker pauses the publisher, checking
/// each is acknowledged (it was queued, so the PUBACK is owed). Returns the last id sent.
fn publish_until_paused(publ: &mut Peer, now: Instant, first: u16) -> u16 {
    for id in first..first + 100 {
        publ.send(now, publish("q", &format!("m{id}"), QoS::AtLeastOnce, id))
            .unwrap();
        assert_eq!(publ.written(), [puback(id)], "queued, so acknowledged");
        if publ.conn.is_paused() {
            return id;
        }
    }
    panic!("the publisher was never paused");
}

#[test]
fn full_subscriber_queue_pauses_the_publisher_until_it_drains_with_no_loss() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");

    // The 5th message passes the bound of 4: it is still queued, and the publisher pauses.
    assert_eq!(publish_until_paused(&mut publ, t0, 1), 5);
    assert_eq!(Stats::get(&broker.stats.flow_control_pauses), 1);
    assert_eq!(
        publ.conn.deadline(),
        Some(t0 + secs(5)),
        "only the stall check is due"
    );
    assert!(!publ.resume(t0), "nothing drained yet");
    let wakes = publ.wakes();

    // The subscriber takes 2 (its window): 3 still queued, above half of 4.
    let m = |id: u16| publish("q", &format!("m{id}"), QoS::AtLeastOnce, id);
    assert_eq!(sub.recv(), [m(1), m(2)]);
    assert!(!publ.resume(t0));
    sub.send(t0, puback(1)).unwrap();
    sub.send(t0, puback(2)).unwrap();
    // Two more leave the queue: 1 left, at most half: the publisher is woken and goes on.
    assert_eq!(sub.recv(), [m(3), m(4)]);
    assert!(publ.wakes() > wakes, "the paused publisher is woken");
    assert!(publ.resume(t0 + secs(1)));
    assert!(!publ.conn.is_paused());

    sub.send(t0, puback(3)).unwrap();
    sub.send(t0, puback(4)).unwrap();
    assert_eq!(sub.recv(), [m(5)]);
    assert_eq!(
        Stats::get(&broker.stats.dropped_queue_full),
        0,
        "nothing lost"
    );
}

#[test]
fn stalled_subscriber_stops_holding_publishers_after_the_flow_control_timeout() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    assert_eq!(publish_until_paused(&mut publ, t0, 1), 5);

    // 5 s with no progress: the subscriber is stalled and the publisher goes on.
    publ.conn.handle_timeout(t0 + ms(4_999)).unwrap();
    assert!(publ.conn.is_paused());
    publ.conn.handle_timeout(t0 + secs(5)).unwrap();
    assert!(!publ.conn.is_paused());
    assert_eq!(Stats::get(&broker.stats.stalled_subscribers), 1);

    // Past the bound, messages for the stalled subscriber are dropped and counted, and the
    // publisher is no longer paused for it.
    for id in 6..=8 {
        publ.send(t0 + secs(5), publish("q", "late", QoS::AtLeastOnce, id))
            .unwrap();
        assert_eq!(publ.written(), [puback(id)]);
        assert!(!publ.conn.is_paused());
    }
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 3);

    // Once it catches up (queue at half or less) it is flow-controlled again.
    let got = sub.recv();
    assert_eq!(got.len(), 2);
    for id in 1..=2 {
        sub.send(t0 + secs(6), puback(id)).unwrap();
    }
    assert_eq!(sub.recv().len(), 2);
    assert_eq!(publish_until_paused(&mut publ, t0 + secs(7), 9), 12);
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 3);
}

#[test]
fn slow_subscriber_that_makes_progress_keeps_its_publishers_paced() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    assert_eq!(publish_until_paused(&mut publ, t0, 1), 5);

    // Progress within the wait (two messages sent), though not down to half.
    assert_eq!(sub.recv().len(), 2);
    publ.conn.handle_timeout(t0 + secs(5)).unwrap();
    assert!(
        publ.conn.is_paused(),
        "a subscriber that moves is slow, not stalled"
    );
    assert_eq!(publ.conn.deadline(), Some(t0 + secs(10)));
    assert_eq!(Stats::get(&broker.stats.stalled_subscribers), 0);
    // No progress in the next wait: now it is stalled.
    publ.conn.handle_timeout(t0 + secs(10)).unwrap();
    assert!(!publ.conn.is_paused());
    assert_eq!(Stats::get(&broker.stats.stalled_subscribers), 1);
}

/// A subscriber that reads a little, beside one that keeps up, holds their publisher for at
/// most `flow_control_timeout` (issue 20: one that read a message every 2 s kept its publisher
/// paused for good, and the other subscriber starved). Then it is a slow consumer: the
/// publisher goes on, and the slow one's queue drops what it cannot hold.
#[test]
fn a_slow_subscriber_beside_one_that_keeps_up_holds_them_for_the_timeout_in_total() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut slow = client(&broker, t0, "slow");
    slow.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut fast = client(&broker, t0, "fast");
    fast.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    // The fast one reads and acknowledges every message as it comes.
    let keep_up = |fast: &mut Peer| {
        for p in fast.recv() {
            if let Packet::Publish(p) = p {
                fast.send(
                    t0,
                    Packet::PubAck(petrel_codec::PubAck::new(p.packet_id.unwrap())),
                )
                .unwrap();
            }
        }
    };
    let mut id = 0;
    while !publ.conn.is_paused() {
        id += 1;
        assert!(id < 100, "never paused");
        publ.send(t0, publish("q", "x", QoS::AtLeastOnce, id))
            .unwrap();
        let _ = publ.written();
        keep_up(&mut fast);
    }
    // Progress within the wait (two messages sent), though not down to half.
    assert_eq!(slow.recv().len(), 2);
    publ.conn.handle_timeout(t0 + secs(5)).unwrap();
    assert!(
        !publ.conn.is_paused(),
        "the hold time is spent: the publisher goes on"
    );
    assert_eq!(Stats::get(&broker.stats.slow_consumers), 1);
    assert_eq!(Stats::get(&broker.stats.stalled_subscribers), 0);
    // Found slow, its queue no longer overflows: what does not fit is dropped, the publisher
    // is not paused again, and the fast one gets everything.
    let before = Stats::get(&broker.stats.dropped_queue_full);
    for _ in 0..4 {
        id += 1;
        publ.send(t0 + secs(5), publish("q", "x", QoS::AtLeastOnce, id))
            .unwrap();
        assert!(!publ.conn.is_paused());
        keep_up(&mut fast);
    }
    assert!(Stats::get(&broker.stats.dropped_queue_full) > before);
}

#[test]
fn paused_publisher_is_not_closed_for_keepalive_it_could_not_show() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    // Keepalive 2 s: closed after 3 s of silence, but while paused the broker reads nothing.
    let mut publ = Peer::connect(&broker, t0, connect("pub", true, 2));
    assert_eq!(publish_until_paused(&mut publ, t0, 1), 5);
    assert_eq!(publ.conn.handle_timeout(t0 + secs(4)), Ok(()));
    // Drained at 4 s: reading resumes, and the keepalive counts from there.
    assert_eq!(sub.recv().len(), 2);
    for id in 1..=2 {
        sub.send(t0 + secs(4), puback(id)).unwrap();
    }
    assert_eq!(sub.recv().len(), 2);
    assert!(publ.resume(t0 + secs(4)));
    assert_eq!(publ.conn.deadline(), Some(t0 + secs(7)));
}

#[test]
fn publisher_is_never_paused_by_its_own_subscription() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    // It could not read the acknowledgements that would drain its own queue.
    let mut both = client(&broker, t0, "both");
    both.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    for id in 1..=8 {
        both.send(t0, publish("q", "x", QoS::AtLeastOnce, id))
            .unwrap();
        assert!(!both.conn.is_paused());
    }
    assert_eq!(
        Stats::get(&broker.stats.dropped_queue_full),
        0,
        "the overflow band took them"
    );
}

#[test]
fn qos0_flow_control_pauses_on_the_outbox_bound() {
    let t0 = Instant::now();
    // 10-byte messages, 100-byte outbox.
    let broker = broker(Limits {
        outbox_bytes: 100,
        ..Default::default()
    });
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "z", QoS::AtMostOnce);
    let mut publ = client(&broker, t0, "pub");
    let m = |i| publish("z", &format!("msg-{i:05}"), QoS::AtMostOnce, 0);
    let mut sent = 0;
    while !publ.conn.is_paused() {
        publ.send(t0, m(sent)).unwrap();
        sent += 1;
    }
    assert_eq!(sent, 11, "the 11th message passes 100 bytes");
    assert_eq!(sub.recv(), (0..11).map(m).collect::<Vec<_>>());
    assert!(publ.resume(t0));
    assert_eq!(Stats::get(&broker.stats.dropped_outbox_full), 0);
}

#[test]
fn offline_session_never_pauses_publishers() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = Peer::connect(&broker, t0, connect("sub", false, 0));
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    sub.close(&CloseReason::PeerClosed);
    let mut publ = client(&broker, t0, "pub");
    for id in 1..=6 {
        publ.send(t0, publish("q", "x", QoS::AtLeastOnce, id))
            .unwrap();
        assert!(!publ.conn.is_paused(), "an absent client cannot make room");
    }
    assert_eq!(Stats::get(&broker.stats.dropped_queue_full), 2);
}

#[test]
fn paused_publisher_resumes_when_its_subscriber_disconnects() {
    let t0 = Instant::now();
    let broker = broker(flow_limits());
    let mut sub = client(&broker, t0, "sub");
    sub.subscribe(t0, 1, "q", QoS::AtLeastOnce);
    let mut publ = client(&broker, t0, "pub");
    publish_until_paused(&mut publ, t0, 1);
    assert!(!publ.resume(t0));
    let wakes = publ.wakes();
    sub.close(&CloseReason::PeerClosed);
    assert!(publ.wakes() > wakes);
    assert!(publ.resume(t0));
}

// ---------------------------------------------------------------------------------------------
// Takeover and session lifetime

#[test]
fn second_connection_with_the_same_client_id_takes_over_mqtt_3_1_4_2() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut first = Peer::connect(&broker, t0, connect("c", false, 0));
    first.subscribe(t0, 1, "t", QoS::AtLeastOnce);
    first.deliver().unwrap(); // idle: the task's waker is now registered with the session
    let wakes = first.wakes();

    let mut second = Peer::new(&broker, t0 + secs(1));
    second
        .send_connect(t0 + secs(1), connect("c", false, 0))
        .unwrap();
    assert_eq!(second.written(), [connack(true)]);
    assert_eq!(Stats::get(&broker.stats.takeovers), 1);

    assert!(first.wakes() > wakes, "the displaced connection is woken");
    assert_eq!(first.deliver(), Err(CloseReason::TakenOver));
    assert_eq!(
        first.send(t0 + secs(1), puback(1)),
        Err(CloseReason::TakenOver),
        "the old connection may no longer change the session"
    );
    assert_eq!(
        first.close(&CloseReason::TakenOver),
        [],
        "3.1.1 has no server DISCONNECT"
    );
    assert_eq!(broker.session_count(), 1);
    assert_eq!(
        broker.subscription_count(),
        1,
        "the session's subscription survives"
    );

    // The second connection works.
    let mut publ = client(&broker, t0 + secs(2), "pub");
    publ.send(t0 + secs(2), publish("t", "hi", QoS::AtLeastOnce, 1))
        .unwrap();
    assert_eq!(second.recv(), [publish("t", "hi", QoS::AtLeastOnce, 1)]);
    second.send(t0 + secs(3), Packet::PingReq).unwrap();
    assert_eq!(second.written(), [Packet::PingResp]);
}

#[test]
fn v5_taken_over_connection_is_sent_disconnect_session_taken_over_mqtt_3_1_4_3() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut first = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    let _second = Peer::connect(&broker, t0 + secs(1), connect_v5("c", true, 0));

    let reason = first.deliver().unwrap_err();
    assert_eq!(reason, CloseReason::TakenOver);
    let taken_over = Disconnect::with_reason(ReasonCode::SESSION_TAKEN_OVER);
    assert_eq!(first.close(&reason), [Packet::Disconnect(taken_over)]);
    assert_eq!(Stats::get(&broker.stats.takeovers), 1);
}

#[test]
fn clean_session_is_discarded_on_close_mqtt_3_1_2_6() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = client(&broker, t0, "c");
    c.subscribe(t0, 1, "a/#", QoS::AtLeastOnce);
    c.subscribe(t0, 2, "b", QoS::AtMostOnce);
    assert_eq!(broker.session_count(), 1);
    assert_eq!(broker.subscription_count(), 2);

    c.close(&CloseReason::PeerClosed);
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.subscription_count(), 0);

    let mut again = Peer::new(&broker, t0 + secs(1));
    again
        .send_connect(t0 + secs(1), connect("c", false, 0))
        .unwrap();
    assert_eq!(again.written(), [connack(false)], "nothing was kept");
}

#[test]
fn dropping_a_connection_without_close_detaches_it() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = client(&broker, t0, "c");
    c.subscribe(t0, 1, "a", QoS::AtMostOnce);
    drop(c);
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.subscription_count(), 0);
    assert_eq!(Stats::get(&broker.stats.connections_current), 0);
}

// ---------------------------------------------------------------------------------------------
// CONNECT validation

#[test]
fn empty_client_id_with_clean_session_gets_one_assigned_mqtt_3_1_3_6() {
    let t0 = Instant::now();
    let broker = default_broker();
    let c = client(&broker, t0, "");
    assert!(c.conn.client_id().is_some_and(|id| !id.is_empty()));
    assert_eq!(broker.session_count(), 1);
}

#[test]
fn empty_client_id_without_clean_session_is_refused_mqtt_3_1_3_8() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = Peer::new(&broker, t0);
    assert_eq!(
        c.send_connect(t0, connect("", false, 0)),
        Err(CloseReason::Refused(
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
        ))
    );
    // CONNACK return code 2, "identifier rejected".
    assert_eq!(&c.conn.output()[..], [0x20, 0x02, 0x00, 0x02]);
    let refusal = ConnAck {
        session_present: false,
        reason: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        properties: Properties::default(),
    };
    assert_eq!(c.written(), [Packet::ConnAck(refusal)]);
    assert_eq!(c.conn.deadline(), None, "refused: no timer left to run");
    assert_eq!(broker.session_count(), 0);
}

#[test]
fn v5_empty_client_id_gets_an_assigned_client_identifier_mqtt_3_2_2_16() {
    let t0 = Instant::now();
    let broker = default_broker();
    // Both stay connected: the ids must differ while both are in use.
    let mut peers = Vec::new();
    let mut assigned = Vec::new();
    for _ in 0..2 {
        let mut c = Peer::new(&broker, t0);
        c.send_connect(t0, connect_v5("", true, 0)).unwrap();
        let ack = only_connack(&mut c);
        assert_eq!(ack.reason, ReasonCode::SUCCESS);
        let id = ack
            .properties
            .assigned_client_identifier
            .clone()
            .expect("Assigned Client Identifier");
        assert!(!id.is_empty());
        assert_eq!(c.conn.client_id(), Some(id.as_str()));
        assigned.push(id);
        peers.push(c);
    }
    assert_ne!(assigned[0], assigned[1]);
}

#[test]
fn first_packet_must_be_connect_mqtt_3_1_0_1() {
    let t0 = Instant::now();
    let broker = default_broker();
    let cases = [
        (Packet::PingReq, "PINGREQ"),
        (publish("a", "x", QoS::AtMostOnce, 0), "PUBLISH"),
        (subscribe(1, "a", QoS::AtMostOnce), "SUBSCRIBE"),
        (Packet::Disconnect(Disconnect::default()), "DISCONNECT"),
    ];
    for (packet, name) in cases {
        let mut c = Peer::new(&broker, t0);
        assert_eq!(
            c.send(t0, packet),
            Err(CloseReason::Violation(Violation::FirstPacketNotConnect(
                name
            )))
        );
        assert_eq!(c.written(), [], "{name}: nothing is written before CONNECT");
    }
}

#[test]
fn second_connect_is_a_protocol_violation_mqtt_3_1_0_2() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = client(&broker, t0, "c");
    assert_eq!(
        c.send_connect(t0 + secs(1), connect("c", true, 0)),
        Err(CloseReason::Violation(Violation::SecondConnect))
    );
    assert_eq!(c.written(), [], "no second CONNACK");
}

// ---------------------------------------------------------------------------------------------
// Retained messages and v5 subscription options

#[test]
fn retained_message_follows_the_suback_with_retain_set_mqtt_3_3_1_8() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut publ = client(&broker, t0, "pub");
    publ.send(t0, retained(publish("r/a", "old", QoS::AtLeastOnce, 1)))
        .unwrap();
    assert_eq!(publ.written(), [puback(1)]);
    assert_eq!(broker.retained_count(), 1);

    let mut sub = client(&broker, t0 + secs(1), "sub");
    sub.send(t0 + secs(1), subscribe(1, "r/#", QoS::AtLeastOnce))
        .unwrap();
    assert_eq!(
        sub.recv(),
        [
            suback(1, &[ReasonCode::GRANTED_QOS_1]),
            retained(publish("r/a", "old", QoS::AtLeastOnce, 1)),
        ]
    );
    sub.send(t0 + secs(1), puback(1)).unwrap();

    // Matching an established subscription: RETAIN clear [MQTT-3.3.1-9].
    publ.send(
        t0 + secs(2),
        retained(publish("r/a", "new", QoS::AtLeastOnce, 2)),
    )
    .unwrap();
    assert_eq!(sub.recv(), [publish("r/a", "new", QoS::AtLeastOnce, 2)]);
}

#[test]
fn v5_retain_as_published_keeps_the_retain_flag_mqtt_3_3_1_13() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut sub = Peer::connect(&broker, t0, connect_v5("sub", true, 0));
    let options = SubscriptionOptions {
        retain_as_published: true,
        ..SubscriptionOptions::new(QoS::AtMostOnce)
    };
    sub.subscribe_with(t0, 1, "rap", options);
    let mut publ = Peer::connect(&broker, t0, connect_v5("pub", true, 0));

    publ.send(t0, retained(publish("rap", "x", QoS::AtMostOnce, 0)))
        .unwrap();
    assert_eq!(
        sub.recv(),
        [retained(publish("rap", "x", QoS::AtMostOnce, 0))]
    );
}

#[test]
fn v5_no_local_does_not_deliver_a_clients_own_messages_mqtt_3_8_3_3() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    let options = SubscriptionOptions {
        no_local: true,
        ..SubscriptionOptions::new(QoS::AtMostOnce)
    };
    c.subscribe_with(t0, 1, "n", options);
    let mut other = Peer::connect(&broker, t0, connect_v5("other", true, 0));
    other.subscribe(t0, 1, "n", QoS::AtMostOnce);

    c.send(t0, publish("n", "mine", QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(c.recv(), [], "not forwarded back to its publisher");
    assert_eq!(other.recv(), [publish("n", "mine", QoS::AtMostOnce, 0)]);
}

#[test]
fn v5_session_without_expiry_interval_ends_with_the_connection_mqtt_3_1_2_23() {
    let t0 = Instant::now();
    let broker = default_broker();
    // Clean Start 0 but no Session Expiry Interval: the interval is 0, so the session ends
    // when the network connection closes (v5 §3.1.2.11.2).
    let mut c = Peer::connect(&broker, t0, connect_v5("c", false, 0));
    c.subscribe(t0, 1, "a", QoS::AtLeastOnce);
    c.close(&CloseReason::PeerClosed);
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.subscription_count(), 0);

    let mut again = Peer::new(&broker, t0 + secs(1));
    again
        .send_connect(t0 + secs(1), connect_v5("c", false, 0))
        .unwrap();
    assert!(!only_connack(&mut again).session_present, "[MQTT-3.2.2-3]");
}

// ---------------------------------------------------------------------------------------------
// Operators and shutdown

/// A v5 client "c" with a persistent session (expiry 300 s) and a QoS 0 will on "will/c".
fn v5_client_with_will(broker: &Arc<Broker>, now: Instant) -> Peer {
    let mut connect = connect_v5("c", true, 0);
    connect.properties.session_expiry_interval = Some(300);
    connect.will = Some(will("will/c", "gone", QoS::AtMostOnce, false));
    let mut c = Peer::connect(broker, now, connect);
    c.subscribe(now, 1, "c/inbox", QoS::AtLeastOnce);
    c
}

#[test]
fn an_operator_disconnect_sends_0x98_publishes_the_will_and_keeps_the_session() {
    use petrel_engine::broker::Kicked;
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut c = v5_client_with_will(&broker, t0);

    c.deliver().unwrap();
    let wakes = c.wakes();
    assert_eq!(broker.kick("c", false, t0 + secs(1)), Kicked::Disconnected);
    assert_eq!(c.wakes(), wakes + 1, "the connection's task is woken");
    let reason = c.deliver().unwrap_err();
    assert_eq!(reason, CloseReason::Administrative);
    assert_eq!(
        c.close(&reason),
        [Packet::Disconnect(Disconnect::with_reason(
            ReasonCode::ADMINISTRATIVE_ACTION
        ))]
    );
    assert_eq!(
        w.recv(),
        [will_message()],
        "the client did not ask to leave"
    );
    assert_eq!(Stats::get(&broker.stats.admin_disconnects), 1);
    // The persistent session stays, offline, with its subscription.
    let session = broker.session("c").expect("the session stays");
    assert!(!session.is_connected());
    assert_eq!(broker.subscription_count(), 2, "c/inbox and the watcher's");
    assert_eq!(broker.kick("c", false, t0 + secs(2)), Kicked::NotConnected);
    assert_eq!(broker.kick("nobody", false, t0 + secs(2)), Kicked::NotFound);
}

#[test]
fn deleting_a_session_ends_it_offline_or_with_its_connection() {
    use petrel_engine::broker::Kicked;
    let t0 = Instant::now();
    let broker = default_broker();
    let _w = watcher(&broker, t0);

    // Offline: ended at once.
    let mut c = v5_client_with_will(&broker, t0);
    let reason = c
        .send(t0 + secs(1), Packet::Disconnect(Disconnect::default()))
        .unwrap_err();
    c.close(&reason);
    assert!(broker.session("c").is_some());
    assert_eq!(broker.kick("c", true, t0 + secs(2)), Kicked::Deleted);
    assert!(broker.session("c").is_none());
    assert_eq!(broker.subscription_count(), 1, "only the watcher's is left");

    // Connected: disconnected, and the session ends with the connection.
    let mut c = v5_client_with_will(&broker, t0 + secs(3));
    assert_eq!(broker.kick("c", true, t0 + secs(4)), Kicked::Disconnected);
    let reason = c.deliver().unwrap_err();
    c.close(&reason);
    assert!(broker.session("c").is_none());
    assert_eq!(broker.subscription_count(), 1);
}

#[test]
fn a_server_shutdown_sends_0x8b_and_publishes_the_will_mqtt_3_1_2_8() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = watcher(&broker, t0);
    let mut c = v5_client_with_will(&broker, t0);
    assert_eq!(
        c.close(&CloseReason::ServerShutdown),
        [Packet::Disconnect(Disconnect::with_reason(
            ReasonCode::SERVER_SHUTTING_DOWN
        ))]
    );
    assert_eq!(w.recv(), [will_message()]);
}

#[test]
fn an_operator_disconnect_does_not_carry_over_to_the_next_connection() {
    use petrel_engine::broker::Kicked;
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client_with_will(&broker, t0);
    assert_eq!(broker.kick("c", false, t0 + secs(1)), Kicked::Disconnected);
    // The client leaves on its own before its connection looks at the session.
    let reason = c
        .send(t0 + secs(1), Packet::Disconnect(Disconnect::default()))
        .unwrap_err();
    c.close(&reason);
    let mut connect = connect_v5("c", false, 0);
    connect.properties.session_expiry_interval = Some(300);
    let mut again = Peer::connect(&broker, t0 + secs(2), connect);
    assert_eq!(again.deliver(), Ok(()), "the new connection stays");
}
