//! MQTT 5.0 features driven in memory with virtual time: session expiry, will delay, message
//! expiry, receive maximum, maximum packet size, topic aliases, subscription identifiers,
//! shared subscriptions, the server's advertised capabilities, payload format checks, and
//! MQTT 3.1's client id rule. Spec tags are MQTT 5.0 statement ids.

mod support;

use std::sync::Arc;
use std::time::Instant;

use petrel_codec::{
    ConnAck, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, SubscriptionOptions,
};
use petrel_engine::stats::Stats;
use petrel_engine::{Broker, CloseReason, Limits, Violation};
use support::*;

fn default_broker() -> Arc<Broker> {
    broker(Limits::default())
}

fn only_connack(peer: &mut Peer) -> ConnAck {
    match peer.written().as_slice() {
        [Packet::ConnAck(ack)] => ack.clone(),
        other => panic!("expected one CONNACK, got {other:?}"),
    }
}

fn only_suback(peer: &mut Peer) -> petrel_codec::SubAck {
    match peer.written().as_slice() {
        [Packet::SubAck(ack)] => ack.clone(),
        other => panic!("expected one SUBACK, got {other:?}"),
    }
}

/// A v5 client with a Session Expiry Interval (seconds) and clean start as given.
fn v5_client(broker: &Arc<Broker>, now: Instant, id: &str, clean: bool, expiry: u32) -> Peer {
    let mut c = connect_v5(id, clean, 0);
    if expiry > 0 {
        c.properties.session_expiry_interval = Some(expiry);
    }
    Peer::connect(broker, now, c)
}

/// Reconnects client `id` with Clean Start 0 at `now`; whether its session was present.
fn resumes(broker: &Arc<Broker>, now: Instant, id: &str) -> bool {
    let mut p = Peer::new(broker, now);
    p.send_connect(now, connect_v5(id, false, 0)).unwrap();
    only_connack(&mut p).session_present
}

fn v5_connack(broker: &Arc<Broker>, now: Instant, connect: petrel_codec::Connect) -> ConnAck {
    let mut p = Peer::new(broker, now);
    let _ = p.send_connect(now, connect);
    only_connack(&mut p)
}

/// The PUBLISH packets among `packets`.
fn publishes(packets: Vec<Packet>) -> Vec<Publish> {
    packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn disconnect_code(packets: &[Packet]) -> Option<ReasonCode> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    })
}

/// Sends `packet`, expects the connection to end, closes it like the driver and returns the
/// DISCONNECT reason code the client was sent.
fn violation(peer: &mut Peer, now: Instant, packet: Packet) -> (Violation, Option<ReasonCode>) {
    let reason = peer.send(now, packet).expect_err("connection must close");
    let CloseReason::Violation(v) = reason.clone() else {
        panic!("expected a protocol violation, got {reason:?}");
    };
    let written = peer.close(&reason);
    (v, disconnect_code(&written))
}

// ---------------------------------------------------------------------------------------------
// Session Expiry Interval

#[test]
fn session_is_kept_for_its_expiry_interval_then_removed_mqtt_3_1_2_23() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client(&broker, t0, "c", true, 10);
    c.subscribe(t0, 1, "s", QoS::AtLeastOnce);
    c.close_at(&CloseReason::PeerClosed, t0 + secs(1));
    assert_eq!(broker.session_count(), 1);

    // Nine seconds after the close the session is still there; at ten it is gone, with its
    // subscription, even though no client did anything.
    assert_eq!(run_timers(&broker, t0 + secs(10)), Some(t0 + secs(11)));
    assert_eq!(broker.session_count(), 1);
    assert_eq!(run_timers(&broker, t0 + secs(11)), None);
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.subscription_count(), 0);
    assert_eq!(Stats::get(&broker.stats.sessions_expired), 1);

    assert!(!resumes(&broker, t0 + secs(12), "c"));
}

#[test]
fn reconnect_within_the_expiry_interval_resumes_the_session_mqtt_3_2_2_2() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client(&broker, t0, "c", true, 10);
    c.subscribe(t0, 1, "s", QoS::AtLeastOnce);
    c.close(&CloseReason::PeerClosed);

    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(
        t0 + secs(2),
        publish("s", "while away", QoS::AtLeastOnce, 1),
    )
    .unwrap();

    let mut again = Peer::new(&broker, t0 + secs(9));
    again
        .send_connect(t0 + secs(9), {
            let mut c = connect_v5("c", false, 0);
            c.properties.session_expiry_interval = Some(10);
            c
        })
        .unwrap();
    assert!(only_connack(&mut again).session_present);
    let got = publishes(again.recv());
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"while away");

    // The old deadline no longer applies to the resumed session.
    run_timers(&broker, t0 + secs(20));
    assert_eq!(broker.session_count(), 2);
}

#[test]
fn session_expiry_is_judged_at_reconnect_even_before_the_timer_ran() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client(&broker, t0, "c", true, 5);
    c.close(&CloseReason::PeerClosed);
    assert!(!resumes(&broker, t0 + secs(6), "c"));
}

#[test]
fn disconnect_may_change_the_expiry_interval_mqtt_3_14_2_2() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client(&broker, t0, "c", true, 100);
    let mut d = Disconnect::default();
    d.properties.session_expiry_interval = Some(0);
    let reason = c.send(t0, Packet::Disconnect(d)).unwrap_err();
    c.close(&reason);
    assert_eq!(
        broker.session_count(),
        0,
        "interval 0 from DISCONNECT ends it now"
    );

    // A session that was to end with its connection may not be extended by DISCONNECT.
    let mut c = v5_client(&broker, t0, "z", true, 0);
    let mut d = Disconnect::default();
    d.properties.session_expiry_interval = Some(60);
    let (v, code) = violation(&mut c, t0, Packet::Disconnect(d));
    assert_eq!(v, Violation::SessionExpiryAfterZero);
    assert_eq!(code, Some(ReasonCode::PROTOCOL_ERROR));
}

#[test]
fn reconnecting_over_and_over_keeps_one_timer_per_session() {
    let t0 = Instant::now();
    let broker = default_broker();
    for i in 0..1000 {
        let now = t0 + ms(i * 10);
        let mut c = v5_client(&broker, now, "flappy", false, 60);
        c.close_at(&CloseReason::PeerClosed, now);
    }
    assert_eq!(broker.pending_timers(), 1);
    let last_close = t0 + ms(999 * 10);
    // The first reminder comes 60 s after the first close; the session lives on until 60 s
    // after the last one.
    run_timers(&broker, t0 + secs(60));
    assert_eq!(broker.session_count(), 1);
    assert_eq!(broker.pending_timers(), 1);
    run_timers(&broker, last_close + secs(60));
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.pending_timers(), 0);
}

#[test]
fn server_caps_the_session_expiry_interval_and_tells_the_client() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_session_expiry: 30,
        ..Limits::default()
    });
    let mut c = connect_v5("c", true, 0);
    c.properties.session_expiry_interval = Some(3600);
    let ack = v5_connack(&broker, t0, c);
    assert_eq!(ack.properties.session_expiry_interval, Some(30));
}

// ---------------------------------------------------------------------------------------------
// Will Delay Interval

fn will_watcher(broker: &Arc<Broker>, now: Instant) -> Peer {
    let mut w = v5_client(broker, now, "watcher", true, 0);
    w.subscribe(now, 1, "will/#", QoS::AtMostOnce);
    w
}

/// A v5 client "c" whose will on "will/c" waits `delay` seconds, with the given session expiry.
fn client_with_delayed_will(broker: &Arc<Broker>, now: Instant, delay: u32, expiry: u32) -> Peer {
    let mut c = connect_v5("c", true, 0);
    c.properties.session_expiry_interval = Some(expiry);
    let mut w = will("will/c", "gone", QoS::AtMostOnce, false);
    w.properties.will_delay_interval = Some(delay);
    c.will = Some(w);
    Peer::connect(broker, now, c)
}

fn will_payloads(w: &mut Peer, now: Instant) -> Vec<String> {
    publishes(w.recv_at(now))
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[test]
fn will_waits_for_its_delay_mqtt_3_1_3_9() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = client_with_delayed_will(&broker, t0, 5, 60);
    c.close_at(&CloseReason::PeerClosed, t0);

    run_timers(&broker, t0 + secs(4));
    assert_eq!(will_payloads(&mut w, t0 + secs(4)), Vec::<String>::new());
    run_timers(&broker, t0 + secs(5));
    assert_eq!(will_payloads(&mut w, t0 + secs(5)), ["gone"]);
    // The will went out; the session itself stays for its own interval.
    assert_eq!(broker.session_count(), 2);
}

#[test]
fn reconnecting_within_the_will_delay_cancels_the_will_mqtt_3_1_3_9() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = client_with_delayed_will(&broker, t0, 5, 60);
    c.close_at(&CloseReason::PeerClosed, t0);

    let _back = v5_client(&broker, t0 + secs(2), "c", false, 60);
    run_timers(&broker, t0 + secs(10));
    assert_eq!(will_payloads(&mut w, t0 + secs(10)), Vec::<String>::new());
    assert_eq!(Stats::get(&broker.stats.wills_published), 0);
}

#[test]
fn will_goes_out_when_the_session_ends_before_its_delay() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = client_with_delayed_will(&broker, t0, 30, 2);
    c.close_at(&CloseReason::PeerClosed, t0);
    run_timers(&broker, t0 + secs(2));
    assert_eq!(will_payloads(&mut w, t0 + secs(2)), ["gone"]);
    assert_eq!(
        broker.session_count(),
        1,
        "only the watcher's session is left"
    );
}

#[test]
fn will_with_delay_on_a_session_without_expiry_goes_out_at_close() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = client_with_delayed_will(&broker, t0, 30, 0);
    c.close_at(&CloseReason::PeerClosed, t0);
    assert_eq!(will_payloads(&mut w, t0), ["gone"]);
}

#[test]
fn clean_start_reconnect_ends_the_old_session_and_sends_its_pending_will() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = client_with_delayed_will(&broker, t0, 30, 60);
    c.close_at(&CloseReason::PeerClosed, t0);
    let _new = v5_client(&broker, t0 + secs(1), "c", true, 0);
    assert_eq!(will_payloads(&mut w, t0 + secs(1)), ["gone"]);
}

#[test]
fn takeover_with_a_will_delay_does_not_send_the_will() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut first = client_with_delayed_will(&broker, t0, 30, 60);
    let _second = v5_client(&broker, t0 + secs(1), "c", false, 60);
    let reason = first.deliver().unwrap_err();
    assert_eq!(reason, CloseReason::TakenOver);
    assert_eq!(
        disconnect_code(&first.close(&reason)),
        Some(ReasonCode::SESSION_TAKEN_OVER)
    );
    run_timers(&broker, t0 + secs(40));
    assert_eq!(will_payloads(&mut w, t0 + secs(40)), Vec::<String>::new());
}

#[test]
fn will_properties_travel_with_the_will_but_not_its_delay() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut w = will_watcher(&broker, t0);
    let mut c = connect_v5("c", true, 0);
    let mut lw = will("will/c", "gone", QoS::AtMostOnce, false);
    lw.properties.will_delay_interval = Some(0);
    lw.properties.content_type = Some(petrel_codec::MqttString::new("text/plain").unwrap());
    lw.properties.user_properties.push((
        petrel_codec::MqttString::new("k").unwrap(),
        petrel_codec::MqttString::new("v").unwrap(),
    ));
    c.will = Some(lw);
    let mut c = Peer::connect(&broker, t0, c);
    c.close(&CloseReason::PeerClosed);
    let got = publishes(w.recv());
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(got[0].properties.user_properties.len(), 1);
    assert_eq!(got[0].properties.will_delay_interval, None);
}

// ---------------------------------------------------------------------------------------------
// Message Expiry Interval

fn expiring(topic_name: &str, payload: &str, qos: QoS, id: u16, secs: u32) -> Packet {
    publish_props(
        topic_name,
        payload.as_bytes(),
        qos,
        id,
        props(|p| p.message_expiry_interval = Some(secs)),
    )
}

#[test]
fn expired_messages_are_not_delivered_and_the_rest_carry_the_time_left_mqtt_3_3_2_5() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut sub = v5_client(&broker, t0, "sub", true, 100);
    sub.subscribe(t0, 1, "e", QoS::AtLeastOnce);
    sub.close(&CloseReason::PeerClosed);

    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, expiring("e", "short", QoS::AtLeastOnce, 1, 2))
        .unwrap();
    p.send(t0, expiring("e", "long", QoS::AtLeastOnce, 2, 10))
        .unwrap();
    p.send(t0, publish("e", "forever", QoS::AtLeastOnce, 3))
        .unwrap();

    let mut back = v5_client(&broker, t0 + secs(3), "sub", false, 100);
    let got = publishes(back.recv_at(t0 + secs(3)));
    let summary: Vec<(String, Option<u32>)> = got
        .iter()
        .map(|p| {
            (
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.properties.message_expiry_interval,
            )
        })
        .collect();
    // [MQTT-3.3.2-6]: the interval forwarded is what was left: 10 - 3.
    assert_eq!(
        summary,
        [("long".to_owned(), Some(7)), ("forever".to_owned(), None)]
    );
    assert_eq!(Stats::get(&broker.stats.messages_expired), 1);
}

#[test]
fn expired_retained_message_is_not_sent_to_new_subscribers() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(
        t0,
        retained(expiring("r", "soon gone", QoS::AtMostOnce, 0, 5)),
    )
    .unwrap();

    let mut early = v5_client(&broker, t0 + secs(2), "early", true, 0);
    early.subscribe(t0 + secs(2), 1, "r", QoS::AtMostOnce);
    let got = publishes(early.recv_at(t0 + secs(2)));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].properties.message_expiry_interval, Some(3));

    let mut late = v5_client(&broker, t0 + secs(6), "late", true, 0);
    late.subscribe(t0 + secs(6), 1, "r", QoS::AtMostOnce);
    assert_eq!(publishes(late.recv_at(t0 + secs(6))), []);
}

#[test]
fn expired_retained_messages_leave_the_store_on_time() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, retained(expiring("r/a", "a", QoS::AtMostOnce, 0, 5)))
        .unwrap();
    p.send(t0, retained(expiring("r/b", "b", QoS::AtMostOnce, 0, 9)))
        .unwrap();
    p.send(t0, retained(publish("r/c", "c", QoS::AtMostOnce, 0)))
        .unwrap();
    assert_eq!(broker.retained_count(), 3);
    assert_eq!(run_timers(&broker, t0 + secs(4)), Some(t0 + secs(5)));
    assert_eq!(run_timers(&broker, t0 + secs(5)), Some(t0 + secs(9)));
    assert_eq!(broker.retained_count(), 2);
    assert_eq!(run_timers(&broker, t0 + secs(9)), None);
    assert_eq!(broker.retained_count(), 1, "the one without expiry stays");
}

// ---------------------------------------------------------------------------------------------
// Receive Maximum

#[test]
fn client_exceeding_the_servers_receive_maximum_is_disconnected_mqtt_3_3_4_8() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        receive_maximum: 2,
        ..Limits::default()
    });
    let mut p = Peer::new(&broker, t0);
    p.send_connect(t0, connect_v5("p", true, 0)).unwrap();
    assert_eq!(only_connack(&mut p).properties.receive_maximum, Some(2));
    for id in 1..=2 {
        p.send(t0, publish("q", "x", QoS::ExactlyOnce, id)).unwrap();
    }
    assert_eq!(p.written().len(), 2, "two PUBRECs");
    let (v, code) = violation(&mut p, t0, publish("q", "x", QoS::ExactlyOnce, 3));
    assert_eq!(v, Violation::ReceiveMaximumExceeded);
    assert_eq!(code, Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
}

#[test]
fn completed_qos2_exchanges_free_receive_maximum_slots() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        receive_maximum: 1,
        ..Limits::default()
    });
    let mut p = v5_client(&broker, t0, "p", true, 0);
    for id in 1..=5 {
        p.send(t0, publish("q", "x", QoS::ExactlyOnce, id)).unwrap();
        p.send(t0, pubrel(id)).unwrap();
    }
    assert_eq!(p.written().len(), 10);
}

#[test]
fn broker_never_exceeds_the_clients_receive_maximum_mqtt_3_3_4_9() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = connect_v5("s", true, 0);
    c.properties.receive_maximum = Some(3);
    let mut s = Peer::connect(&broker, t0, c);
    s.subscribe(t0, 1, "w", QoS::AtLeastOnce);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    for id in 1..=10 {
        p.send(t0, publish("w", "m", QoS::AtLeastOnce, id)).unwrap();
    }
    let first = publishes(s.recv());
    assert_eq!(first.len(), 3);
    s.send(t0, puback(first[0].packet_id.unwrap().get()))
        .unwrap();
    assert_eq!(publishes(s.recv()).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Maximum Packet Size

#[test]
fn messages_larger_than_the_clients_maximum_packet_size_are_not_sent_mqtt_3_1_2_25() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = connect_v5("s", true, 0);
    c.properties.maximum_packet_size = Some(64);
    let mut s = Peer::connect(&broker, t0, c);
    s.subscribe(t0, 1, "big/#", QoS::AtLeastOnce);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    let large = "x".repeat(100);
    p.send(t0, publish("big/0", &large, QoS::AtMostOnce, 0))
        .unwrap();
    p.send(t0, publish("big/1", &large, QoS::AtLeastOnce, 1))
        .unwrap();
    p.send(t0, publish("big/2", "small", QoS::AtLeastOnce, 2))
        .unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"small");
    assert_eq!(Stats::get(&broker.stats.dropped_too_large), 2);
    // The dropped QoS 1 message does not hold a window slot: it counts as delivered.
    s.send(t0, puback(got[0].packet_id.unwrap().get())).unwrap();
    for id in 3..=40 {
        p.send(t0, publish("big/3", "small", QoS::AtLeastOnce, id))
            .unwrap();
        let got = publishes(s.recv());
        assert_eq!(got.len(), 1);
        s.send(t0, puback(got[0].packet_id.unwrap().get())).unwrap();
    }
}

#[test]
fn oversized_inbound_packet_gets_disconnect_packet_too_large() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = v5_client(&broker, t0, "c", true, 0);
    let reason = c
        .conn
        .handle_decode_error(petrel_codec::DecodeError::PacketTooLarge {
            size: 2_000_000,
            max: 1024 * 1024,
        });
    assert_eq!(
        disconnect_code(&c.close(&reason)),
        Some(ReasonCode::PACKET_TOO_LARGE)
    );
}

// ---------------------------------------------------------------------------------------------
// Topic aliases

fn aliased(topic_name: &str, payload: &str, alias: u16) -> Packet {
    publish_props(
        topic_name,
        payload.as_bytes(),
        QoS::AtMostOnce,
        0,
        props(|p| p.topic_alias = Some(alias)),
    )
}

#[test]
fn inbound_topic_alias_is_set_then_used_mqtt_3_3_2_12() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.subscribe(t0, 1, "long/topic/name", QoS::AtMostOnce);
    let mut p = Peer::new(&broker, t0);
    p.send_connect(t0, connect_v5("p", true, 0)).unwrap();
    assert_eq!(
        only_connack(&mut p).properties.topic_alias_maximum,
        Some(64)
    );

    p.send(t0, aliased("long/topic/name", "one", 3)).unwrap();
    p.send(t0, aliased("", "two", 3)).unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 2);
    for m in &got {
        assert_eq!(m.topic.as_str(), "long/topic/name");
        assert_eq!(m.properties.topic_alias, None, "aliases are per connection");
    }
}

#[test]
fn topic_alias_above_the_maximum_is_disconnected_with_0x94_mqtt_3_3_2_9() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    let (v, code) = violation(&mut p, t0, aliased("t", "x", 65));
    assert_eq!(v, Violation::TopicAliasInvalid(65));
    assert_eq!(code, Some(ReasonCode::TOPIC_ALIAS_INVALID));

    let off = broker_with(|l| l.topic_alias_maximum = 0);
    let mut p = Peer::new(&off, t0);
    p.send_connect(t0, connect_v5("p", true, 0)).unwrap();
    assert_eq!(only_connack(&mut p).properties.topic_alias_maximum, None);
    let (_, code) = violation(&mut p, t0, aliased("t", "x", 1));
    assert_eq!(code, Some(ReasonCode::TOPIC_ALIAS_INVALID));
}

#[test]
fn unknown_topic_alias_is_a_protocol_error() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    let (v, code) = violation(&mut p, t0, aliased("", "x", 2));
    assert_eq!(v, Violation::TopicAliasUnknown(2));
    assert_eq!(code, Some(ReasonCode::PROTOCOL_ERROR));
}

#[test]
fn broker_assigns_outbound_aliases_by_topic_within_the_clients_maximum() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = connect_v5("s", true, 0);
    c.properties.topic_alias_maximum = Some(2);
    let mut s = Peer::connect(&broker, t0, c);
    s.subscribe(t0, 1, "a/#", QoS::AtMostOnce);
    let mut old = Peer::connect(&broker, t0, connect("old", true, 0));
    old.subscribe(t0, 1, "a/#", QoS::AtMostOnce);

    let mut p = v5_client(&broker, t0, "p", true, 0);
    for t in ["a/x", "a/x", "a/y", "a/z", "a/y"] {
        p.send(t0, publish(t, "m", QoS::AtMostOnce, 0)).unwrap();
    }
    let got: Vec<(String, Option<u16>)> = publishes(s.recv())
        .into_iter()
        .map(|p| (p.topic.as_str().to_owned(), p.properties.topic_alias))
        .collect();
    assert_eq!(
        got,
        [
            ("a/x".to_owned(), Some(1)),
            (String::new(), Some(1)),
            ("a/y".to_owned(), Some(2)),
            ("a/z".to_owned(), None),
            (String::new(), Some(2)),
        ]
    );
    // A 3.1.1 subscriber to the same messages gets plain topics.
    let plain: Vec<String> = publishes(old.recv())
        .into_iter()
        .map(|p| p.topic.as_str().to_owned())
        .collect();
    assert_eq!(plain, ["a/x", "a/x", "a/y", "a/z", "a/y"]);
}

// ---------------------------------------------------------------------------------------------
// Subscription identifiers

fn subscribe_id(packet_id: u16, filter: &str, qos: QoS, id: u32) -> Packet {
    let mut packet = subscribe(packet_id, filter, qos);
    if let Packet::Subscribe(s) = &mut packet {
        s.properties.subscription_identifiers.push(id);
    }
    packet
}

#[test]
fn one_publish_carries_every_matching_subscription_identifier_mqtt_3_3_4_3() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.send(t0, subscribe_id(1, "a/+", QoS::AtMostOnce, 7))
        .unwrap();
    s.send(t0, subscribe_id(2, "a/b", QoS::AtLeastOnce, 9))
        .unwrap();
    s.send(t0, subscribe(3, "#", QoS::AtMostOnce)).unwrap();
    assert_eq!(s.written().len(), 3);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, publish("a/b", "m", QoS::AtLeastOnce, 1))
        .unwrap();
    p.send(t0, publish("a/c", "n", QoS::AtLeastOnce, 2))
        .unwrap();
    p.send(t0, publish("z", "o", QoS::AtLeastOnce, 3)).unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 3, "one copy per message [MQTT-3.3.4-2]");
    let mut ids = got[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, [7, 9]);
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "highest granted QoS");
    assert_eq!(got[1].properties.subscription_identifiers, [7]);
    assert!(got[2].properties.subscription_identifiers.is_empty());
}

#[test]
fn retained_replay_carries_the_subscription_identifier() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, retained(publish("r/1", "kept", QoS::AtMostOnce, 0)))
        .unwrap();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.send(t0, subscribe_id(1, "r/#", QoS::AtMostOnce, 42))
        .unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].properties.subscription_identifiers, [42]);
}

#[test]
fn subscription_identifiers_can_be_turned_off() {
    let t0 = Instant::now();
    let broker = broker_with(|l| l.subscription_identifiers = false);
    let mut s = Peer::new(&broker, t0);
    s.send_connect(t0, connect_v5("s", true, 0)).unwrap();
    assert_eq!(
        only_connack(&mut s)
            .properties
            .subscription_identifier_available,
        Some(0)
    );
    let (_, code) = violation(&mut s, t0, subscribe_id(1, "a", QoS::AtMostOnce, 1));
    assert_eq!(
        code,
        Some(ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED)
    );
}

// ---------------------------------------------------------------------------------------------
// Shared subscriptions

fn member(broker: &Arc<Broker>, now: Instant, id: &str, qos: QoS) -> Peer {
    let mut m = v5_client(broker, now, id, true, 0);
    m.subscribe(now, 1, "$share/g/jobs/+", qos);
    m
}

#[test]
fn each_message_goes_to_one_member_of_a_share_group_in_turn_mqtt_4_8_2() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut a = member(&broker, t0, "a", QoS::AtLeastOnce);
    let mut b = member(&broker, t0, "b", QoS::AtLeastOnce);
    let mut other_group = v5_client(&broker, t0, "o", true, 0);
    other_group.subscribe(t0, 1, "$share/h/jobs/#", QoS::AtMostOnce);
    let mut plain = v5_client(&broker, t0, "plain", true, 0);
    plain.subscribe(t0, 1, "jobs/+", QoS::AtMostOnce);

    let mut p = v5_client(&broker, t0, "p", true, 0);
    for i in 0..10 {
        p.send(t0, publish("jobs/1", &format!("{i}"), QoS::AtMostOnce, 0))
            .unwrap();
    }
    let got_a = publishes(a.recv());
    let got_b = publishes(b.recv());
    assert_eq!((got_a.len(), got_b.len()), (5, 5), "balanced");
    let mut all: Vec<String> = got_a
        .iter()
        .chain(&got_b)
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(
        publishes(other_group.recv()).len(),
        10,
        "every group gets each message"
    );
    assert_eq!(
        publishes(plain.recv()).len(),
        10,
        "ordinary subscribers are unaffected"
    );
}

#[test]
fn shared_subscribe_gets_no_retained_messages() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, retained(publish("jobs/1", "old", QoS::AtMostOnce, 0)))
        .unwrap();
    let mut a = member(&broker, t0, "a", QoS::AtMostOnce);
    assert_eq!(a.recv(), []);
}

#[test]
fn unacknowledged_messages_of_a_member_that_leaves_go_to_another_member() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut c = connect_v5("a", true, 0);
    c.properties.receive_maximum = Some(2);
    let mut a = Peer::connect(&broker, t0, c);
    a.subscribe(t0, 1, "$share/g/jobs/+", QoS::AtLeastOnce);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    // With only `a` in the group it gets all six: two in flight, four queued.
    for i in 1..=6 {
        p.send(t0, publish("jobs/1", &format!("{i}"), QoS::AtLeastOnce, i))
            .unwrap();
    }
    let sent = publishes(a.recv());
    assert_eq!(sent.len(), 2);
    a.send(t0, puback(sent[0].packet_id.unwrap().get()))
        .unwrap();

    let mut b = member(&broker, t0, "b", QoS::AtLeastOnce);
    a.close(&CloseReason::PeerClosed);
    let mut got: Vec<String> = publishes(b.recv())
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        ["2", "3", "4", "5", "6"],
        "all but the acknowledged one"
    );
}

#[test]
fn unsubscribing_leaves_the_group() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut a = member(&broker, t0, "a", QoS::AtMostOnce);
    let mut b = member(&broker, t0, "b", QoS::AtMostOnce);
    b.send(
        t0,
        Packet::Unsubscribe(petrel_codec::Unsubscribe {
            packet_id: pid(2),
            properties: Properties::default(),
            filters: vec![petrel_codec::TopicFilter::new("$share/g/jobs/+").unwrap()],
        }),
    )
    .unwrap();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    for _ in 0..4 {
        p.send(t0, publish("jobs/x", "m", QoS::AtMostOnce, 0))
            .unwrap();
    }
    assert_eq!(publishes(a.recv()).len(), 4);
    assert_eq!(publishes(b.recv()).len(), 0);
}

#[test]
fn malformed_or_disabled_shared_subscriptions_are_refused_in_the_suback() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.send(t0, subscribe(1, "$share/g", QoS::AtMostOnce))
        .unwrap();
    let ack = only_suback(&mut s);
    assert_eq!(ack.reasons, [ReasonCode::TOPIC_FILTER_INVALID]);
    assert!(
        ack.properties.reason_string.is_some(),
        "problem information is on by default"
    );

    let off = broker_with(|l| l.shared_subscriptions = false);
    let mut s = Peer::new(&off, t0);
    let mut c = connect_v5("s", true, 0);
    c.properties.request_problem_information = Some(0);
    s.send_connect(t0, c).unwrap();
    assert_eq!(
        only_connack(&mut s)
            .properties
            .shared_subscription_available,
        Some(0)
    );
    s.send(t0, subscribe(1, "$share/g/a", QoS::AtMostOnce))
        .unwrap();
    let ack = only_suback(&mut s);
    assert_eq!(
        ack.reasons,
        [ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED]
    );
    assert_eq!(
        ack.properties.reason_string, None,
        "Request Problem Information 0 [MQTT-3.1.2-29]"
    );
}

#[test]
fn shared_subscription_with_no_local_is_a_protocol_error_mqtt_3_8_3_4() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    let mut options = SubscriptionOptions::new(QoS::AtMostOnce);
    options.no_local = true;
    // The codec refuses it while decoding; the connection answers the decode error.
    let mut wire = bytes::BytesMut::new();
    petrel_codec::encode(
        &subscribe_with(1, "$share/g/a", options),
        ProtocolVersion::V5,
        &mut wire,
    )
    .unwrap();
    let error = petrel_codec::decode(&mut wire, ProtocolVersion::V5, u32::MAX).unwrap_err();
    assert_eq!(error, petrel_codec::DecodeError::SharedNoLocal);
    let reason = s.conn.handle_decode_error(error);
    assert_eq!(
        disconnect_code(&s.close(&reason)),
        Some(ReasonCode::PROTOCOL_ERROR)
    );
}

// ---------------------------------------------------------------------------------------------
// Capabilities the server advertises, and enforces

fn broker_with(f: impl FnOnce(&mut Limits)) -> Arc<Broker> {
    let mut limits = Limits::default();
    f(&mut limits);
    broker(limits)
}

#[test]
fn maximum_qos_is_advertised_granted_and_enforced_mqtt_3_2_2_9() {
    let t0 = Instant::now();
    let broker = broker_with(|l| l.maximum_qos = QoS::AtLeastOnce);
    let mut s = Peer::new(&broker, t0);
    s.send_connect(t0, connect_v5("s", true, 0)).unwrap();
    assert_eq!(only_connack(&mut s).properties.maximum_qos, Some(1));
    s.send(t0, subscribe(1, "q", QoS::ExactlyOnce)).unwrap();
    assert_eq!(s.written(), [suback(1, &[ReasonCode::GRANTED_QOS_1])]);

    let (v, code) = violation(&mut s, t0, publish("q", "x", QoS::ExactlyOnce, 1));
    assert_eq!(v, Violation::QoSNotSupported(2));
    assert_eq!(code, Some(ReasonCode::QOS_NOT_SUPPORTED));

    let mut c = connect_v5("w", true, 0);
    c.will = Some(will("w", "x", QoS::ExactlyOnce, false));
    assert_eq!(
        v5_connack(&broker, t0, c).reason,
        ReasonCode::QOS_NOT_SUPPORTED,
        "[MQTT-3.2.2-12]"
    );
}

#[test]
fn retain_unavailable_refuses_a_retained_will_mqtt_3_2_2_13() {
    let t0 = Instant::now();
    let broker = broker_with(|l| l.retain_available = false);
    let mut c = connect_v5("w", true, 0);
    c.will = Some(will("w", "x", QoS::AtMostOnce, true));
    let ack = v5_connack(&broker, t0, c);
    assert_eq!(ack.reason, ReasonCode::RETAIN_NOT_SUPPORTED);
}

#[test]
fn wildcard_subscriptions_can_be_turned_off() {
    let t0 = Instant::now();
    let broker = broker_with(|l| l.wildcard_subscriptions = false);
    let mut s = Peer::new(&broker, t0);
    s.send_connect(t0, connect_v5("s", true, 0)).unwrap();
    assert_eq!(
        only_connack(&mut s)
            .properties
            .wildcard_subscription_available,
        Some(0)
    );
    s.send(t0, subscribe(1, "a/+", QoS::AtMostOnce)).unwrap();
    let ack = only_suback(&mut s);
    assert_eq!(
        ack.reasons,
        [ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED]
    );
    s.subscribe(t0, 2, "a/b", QoS::AtMostOnce);
}

#[test]
fn default_connack_advertises_the_servers_limits() {
    let t0 = Instant::now();
    let broker = default_broker();
    let ack = v5_connack(&broker, t0, connect_v5("c", true, 0));
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_packet_size, Some(1024 * 1024));
    assert_eq!(p.topic_alias_maximum, Some(64));
    // Absent means available / QoS 2 [MQTT-3.2.2-?]: nothing is said for what is on.
    assert_eq!(p.maximum_qos, None);
    assert_eq!(p.retain_available, None);
    assert_eq!(p.wildcard_subscription_available, None);
    assert_eq!(p.subscription_identifier_available, None);
    assert_eq!(p.shared_subscription_available, None);
}

#[test]
fn response_information_is_sent_only_on_request() {
    let t0 = Instant::now();
    let broker = default_broker();
    let ack = v5_connack(&broker, t0, connect_v5("c", true, 0));
    assert_eq!(ack.properties.response_information, None);
    let mut c = connect_v5("d", true, 0);
    c.properties.request_response_information = Some(1);
    let ack = v5_connack(&broker, t0, c);
    assert_eq!(
        ack.properties.response_information.as_deref(),
        Some("response/d")
    );
}

#[test]
fn disconnect_for_a_violation_carries_a_reason_string() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    let reason = p.send(t0, aliased("", "x", 9)).unwrap_err();
    let written = p.close(&reason);
    let [Packet::Disconnect(d)] = written.as_slice() else {
        panic!("expected DISCONNECT, got {written:?}");
    };
    assert!(d
        .properties
        .reason_string
        .as_deref()
        .is_some_and(|s| s.contains("alias 9")));
}

// ---------------------------------------------------------------------------------------------
// Payload Format Indicator

fn utf8_marked(payload: &[u8], qos: QoS, id: u16) -> Packet {
    publish_props(
        "f",
        payload,
        qos,
        id,
        props(|p| p.payload_format_indicator = Some(1)),
    )
}

#[test]
fn payload_marked_utf8_that_is_not_is_refused_with_0x99_mqtt_3_3_2_4() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.subscribe(t0, 1, "f", QoS::AtLeastOnce);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, utf8_marked(&[0xff, 0xfe], QoS::AtLeastOnce, 1))
        .unwrap();
    let written = p.written();
    let [Packet::PubAck(ack)] = written.as_slice() else {
        panic!("expected one PUBACK, got {written:?}");
    };
    assert_eq!(
        (ack.packet_id, ack.reason),
        (pid(1), ReasonCode::PAYLOAD_FORMAT_INVALID)
    );
    assert!(
        ack.properties.reason_string.is_some(),
        "problem information allowed by default"
    );
    p.send(t0, utf8_marked("ünïcode".as_bytes(), QoS::AtLeastOnce, 2))
        .unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 1, "only the valid one is routed");
    assert_eq!(got[0].properties.payload_format_indicator, Some(1));

    let (v, code) = violation(&mut p, t0, utf8_marked(&[0xc3], QoS::AtMostOnce, 0));
    assert_eq!(v, Violation::PayloadFormatInvalid);
    assert_eq!(code, Some(ReasonCode::PAYLOAD_FORMAT_INVALID));

    let unchecked = broker_with(|l| l.check_payload_format = false);
    let mut p = v5_client(&unchecked, t0, "p", true, 0);
    p.send(t0, utf8_marked(&[0xff], QoS::AtMostOnce, 0))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Request/response properties pass through untouched

#[test]
fn request_response_properties_pass_through() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    s.subscribe(t0, 1, "req", QoS::AtMostOnce);
    let mut p = v5_client(&broker, t0, "p", true, 0);
    let sent = props(|p| {
        p.response_topic = Some(petrel_codec::MqttString::new("resp/p").unwrap());
        p.correlation_data = Some(bytes::Bytes::from_static(b"\x00\x01corr"));
        p.content_type = Some(petrel_codec::MqttString::new("application/json").unwrap());
        p.payload_format_indicator = Some(1);
        p.user_properties.push((
            petrel_codec::MqttString::new("a").unwrap(),
            petrel_codec::MqttString::new("1").unwrap(),
        ));
        p.user_properties.push((
            petrel_codec::MqttString::new("a").unwrap(),
            petrel_codec::MqttString::new("2").unwrap(),
        ));
    });
    p.send(
        t0,
        publish_props("req", b"{}", QoS::AtMostOnce, 0, sent.clone()),
    )
    .unwrap();
    let got = publishes(s.recv());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].properties, sent, "every property, in order");
}

// ---------------------------------------------------------------------------------------------
// Mixed versions

#[test]
fn v311_publisher_and_v5_subscriber_and_the_reverse_each_see_their_own_version() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut v5 = v5_client(&broker, t0, "five", true, 0);
    v5.subscribe(t0, 1, "mix/#", QoS::AtLeastOnce);
    let mut v3 = Peer::connect(&broker, t0, connect("three", true, 0));
    v3.subscribe(t0, 1, "mix/#", QoS::AtLeastOnce);

    v3.send(t0, publish("mix/from3", "a", QoS::AtLeastOnce, 1))
        .unwrap();
    v5.send(
        t0,
        publish_props(
            "mix/from5",
            b"b",
            QoS::AtLeastOnce,
            1,
            props(|p| p.content_type = Some(petrel_codec::MqttString::new("t").unwrap())),
        ),
    )
    .unwrap();
    // Each side's decoder (its own version) must accept every packet it is sent.
    let to5 = publishes(v5.recv());
    let to3 = publishes(v3.recv());
    assert_eq!(to5.len(), 2);
    assert_eq!(to3.len(), 2);
    assert!(
        to3.iter().all(|p| p.properties.is_empty()),
        "3.1.1 has no properties"
    );
    assert_eq!(
        to5.iter()
            .find(|p| p.topic.as_str() == "mix/from5")
            .unwrap()
            .properties
            .content_type
            .as_deref(),
        Some("t")
    );
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1

#[test]
fn mqtt31_client_ids_longer_than_23_characters_are_refused_in_strict_mode() {
    let t0 = Instant::now();
    let broker = default_broker();
    let refused = |broker: &Arc<Broker>, id: &str| {
        let mut p = Peer::new(broker, t0);
        let _ = p.send_connect(t0, connect_version(ProtocolVersion::V3_1, id, true, 0));
        only_connack(&mut p).reason
    };
    assert_eq!(refused(&broker, &"a".repeat(23)), ReasonCode::SUCCESS);
    assert_eq!(
        refused(&broker, &"b".repeat(24)),
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
    );
    let lenient = broker_with(|l| l.strict_v31_client_id = false);
    assert_eq!(refused(&lenient, &"c".repeat(24)), ReasonCode::SUCCESS);
    // 3.1.1 never had the rule.
    let mut p = Peer::new(&broker, t0);
    p.send_connect(t0, connect(&"d".repeat(40), true, 0))
        .unwrap();
    assert_eq!(only_connack(&mut p).reason, ReasonCode::SUCCESS);
}

#[test]
fn retain_handling_options_mqtt_3_3_1_9_to_11() {
    let t0 = Instant::now();
    let broker = default_broker();
    let mut p = v5_client(&broker, t0, "p", true, 0);
    p.send(t0, retained(publish("rh", "kept", QoS::AtMostOnce, 0)))
        .unwrap();
    let mut s = v5_client(&broker, t0, "s", true, 0);
    let with = |rh| {
        let mut o = SubscriptionOptions::new(QoS::AtMostOnce);
        o.retain_handling = rh;
        o
    };
    s.subscribe_with(t0, 1, "rh", with(RetainHandling::OnNewSubscription));
    assert_eq!(publishes(s.recv()).len(), 1, "new subscription: sent");
    s.subscribe_with(t0, 2, "rh", with(RetainHandling::OnNewSubscription));
    assert_eq!(
        publishes(s.recv()).len(),
        0,
        "existing subscription: not sent"
    );
    s.subscribe_with(t0, 3, "rh", with(RetainHandling::OnSubscribe));
    assert_eq!(publishes(s.recv()).len(), 1, "0: sent on every subscribe");
    s.subscribe_with(t0, 4, "rh", with(RetainHandling::Never));
    assert_eq!(publishes(s.recv()).len(), 0, "2: never sent");
}

// ---------------------------------------------------------------------------------------------
// Enhanced authentication: SCRAM-SHA-256 through AUTH packets (§4.12)

mod enhanced_auth {
    use super::*;
    use petrel_codec::{Auth, MqttString};
    use petrel_engine::auth::UserStore;
    use petrel_engine::scram::{client, ScramCredentials};
    use petrel_engine::store::Volatile;

    fn scram_broker(allow_anonymous: bool) -> Arc<Broker> {
        let mut users = std::collections::HashMap::new();
        users.insert(
            "alice".to_owned(),
            ScramCredentials::from_password(b"wonderland", b"some salt bytes!", 4096),
        );
        Arc::new(Broker::with_parts(
            Limits::default(),
            Box::new(UserStore::new(users, allow_anonymous, [0; 32])),
            Box::new(Volatile),
        ))
    }

    fn scram_connect(id: &str, data: &str) -> petrel_codec::Connect {
        let mut c = connect_v5(id, true, 0);
        c.properties.authentication_method = Some(MqttString::new("SCRAM-SHA-256").unwrap());
        c.properties.authentication_data = Some(bytes::Bytes::from(data.to_owned()));
        c
    }

    fn auth(reason: ReasonCode, data: &str) -> Packet {
        let mut a = Auth {
            reason,
            properties: Properties::default(),
        };
        a.properties.authentication_method = Some(MqttString::new("SCRAM-SHA-256").unwrap());
        a.properties.authentication_data = Some(bytes::Bytes::from(data.to_owned()));
        Packet::Auth(a)
    }

    /// The AUTH the broker wrote: its reason code and data as text.
    fn only_auth(peer: &mut Peer) -> (ReasonCode, String) {
        match peer.written().as_slice() {
            [Packet::Auth(a)] => {
                assert_eq!(
                    a.properties.authentication_method.as_deref(),
                    Some("SCRAM-SHA-256")
                );
                let data = a.properties.authentication_data.clone().unwrap_or_default();
                (a.reason, String::from_utf8(data.to_vec()).unwrap())
            }
            other => panic!("expected one AUTH, got {other:?}"),
        }
    }

    /// Runs CONNECT + AUTH with `password`; returns the peer and what ended the exchange.
    fn scram_login(broker: &Arc<Broker>, t0: Instant, password: &str) -> (Peer, ConnAck) {
        let mut p = Peer::new(broker, t0);
        p.version = ProtocolVersion::V5;
        p.send_connect(t0, scram_connect("c", &client::first("alice", "cnonce")))
            .unwrap();
        let (code, server_first) = only_auth(&mut p);
        assert_eq!(code, ReasonCode::CONTINUE_AUTHENTICATION, "[MQTT-4.12.0-1]");
        assert!(!p.conn.is_connected());
        let (last, _) = client::last("alice", "cnonce", password, &server_first);
        let _ = p.send(
            t0 + ms(10),
            auth(ReasonCode::CONTINUE_AUTHENTICATION, &last),
        );
        let ack = only_connack(&mut p);
        (p, ack)
    }

    #[test]
    fn scram_exchange_authenticates_and_proves_the_server_mqtt_4_12_0_1() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let (mut p, ack) = scram_login(&broker, t0, "wonderland");
        assert_eq!(ack.reason, ReasonCode::SUCCESS);
        assert_eq!(
            ack.properties.authentication_method.as_deref(),
            Some("SCRAM-SHA-256")
        );
        let server_final =
            String::from_utf8(ack.properties.authentication_data.clone().unwrap().to_vec())
                .unwrap();
        assert!(
            server_final.starts_with("v="),
            "the server signature: {server_final}"
        );
        assert!(p.conn.is_connected());
        p.subscribe(t0, 1, "t", QoS::AtMostOnce);
    }

    #[test]
    fn wrong_password_is_refused_with_0x86() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let (p, ack) = scram_login(&broker, t0, "looking glass");
        assert_eq!(ack.reason, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
        assert!(!p.conn.is_connected());
        assert_eq!(
            broker.session_count(),
            0,
            "no session before authentication"
        );
    }

    #[test]
    fn unknown_method_is_refused_with_0x8c() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let mut c = connect_v5("c", true, 0);
        c.properties.authentication_method = Some(MqttString::new("KERBEROS").unwrap());
        assert_eq!(
            v5_connack(&broker, t0, c).reason,
            ReasonCode::BAD_AUTHENTICATION_METHOD
        );
        // The default broker offers no method at all.
        let c = scram_connect("c", &client::first("alice", "n"));
        assert_eq!(
            v5_connack(&default_broker(), t0, c).reason,
            ReasonCode::BAD_AUTHENTICATION_METHOD
        );
    }

    #[test]
    fn authentication_data_without_a_method_is_a_protocol_error() {
        let t0 = Instant::now();
        let mut c = connect_v5("c", true, 0);
        c.properties.authentication_data = Some(bytes::Bytes::from_static(b"x"));
        let ack = v5_connack(&scram_broker(true), t0, c);
        assert_eq!(ack.reason, ReasonCode::PROTOCOL_ERROR);
    }

    #[test]
    fn only_auth_may_follow_connect_during_the_exchange() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let mut p = Peer::new(&broker, t0);
        p.version = ProtocolVersion::V5;
        p.send_connect(t0, scram_connect("c", &client::first("alice", "x")))
            .unwrap();
        only_auth(&mut p);
        let reason = p.send(t0, Packet::PingReq).unwrap_err();
        assert_eq!(
            reason,
            CloseReason::Violation(Violation::NotAuthDuringExchange("PINGREQ"))
        );
    }

    #[test]
    fn the_connect_deadline_covers_the_whole_exchange() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let mut p = Peer::new(&broker, t0);
        p.version = ProtocolVersion::V5;
        p.send_connect(
            t0 + secs(2),
            scram_connect("c", &client::first("alice", "x")),
        )
        .unwrap();
        only_auth(&mut p);
        // Counted from accept, not from the last AUTH.
        assert_eq!(p.conn.deadline(), Some(t0 + CONNECT_TIMEOUT));
        assert_eq!(
            p.conn.handle_timeout(t0 + CONNECT_TIMEOUT),
            Err(CloseReason::ConnectTimeout)
        );
    }

    #[test]
    fn auth_with_another_method_is_a_protocol_error_mqtt_4_12_0_5() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let mut p = Peer::new(&broker, t0);
        p.version = ProtocolVersion::V5;
        p.send_connect(t0, scram_connect("c", &client::first("alice", "x")))
            .unwrap();
        only_auth(&mut p);
        let mut other = Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties::default(),
        };
        other.properties.authentication_method = Some(MqttString::new("PLAIN").unwrap());
        assert_eq!(
            p.send(t0, Packet::Auth(other)).unwrap_err(),
            CloseReason::Violation(Violation::AuthMethodMismatch)
        );
    }

    #[test]
    fn reauthentication_succeeds_with_auth_0x00_and_fails_with_disconnect_0x87_mqtt_4_12_1() {
        let t0 = Instant::now();
        let broker = scram_broker(true);
        let (mut p, ack) = scram_login(&broker, t0, "wonderland");
        assert_eq!(ack.reason, ReasonCode::SUCCESS);

        p.send(
            t0 + secs(1),
            auth(ReasonCode::REAUTHENTICATE, &client::first("alice", "again")),
        )
        .unwrap();
        let (code, server_first) = only_auth(&mut p);
        assert_eq!(code, ReasonCode::CONTINUE_AUTHENTICATION);
        let (last, want) = client::last("alice", "again", "wonderland", &server_first);
        p.send(
            t0 + secs(1),
            auth(ReasonCode::CONTINUE_AUTHENTICATION, &last),
        )
        .unwrap();
        assert_eq!(only_auth(&mut p), (ReasonCode::SUCCESS, want));
        assert!(p.conn.is_connected(), "the connection goes on");

        p.send(
            t0 + secs(2),
            auth(ReasonCode::REAUTHENTICATE, &client::first("alice", "third")),
        )
        .unwrap();
        let (_, server_first) = only_auth(&mut p);
        let (last, _) = client::last("alice", "third", "forgotten", &server_first);
        let reason = p
            .send(
                t0 + secs(2),
                auth(ReasonCode::CONTINUE_AUTHENTICATION, &last),
            )
            .unwrap_err();
        assert_eq!(reason, CloseReason::AuthenticationFailed);
        assert_eq!(
            disconnect_code(&p.close(&reason)),
            Some(ReasonCode::NOT_AUTHORIZED)
        );
    }

    #[test]
    fn connect_password_is_checked_against_the_same_users() {
        let t0 = Instant::now();
        let broker = scram_broker(false);
        let login = |user: Option<&str>, password: &str| {
            let mut c = connect("c", true, 0);
            c.username = user.map(|u| MqttString::new(u).unwrap());
            if user.is_some() {
                c.password = Some(bytes::Bytes::from(password.to_owned()));
            }
            let mut p = Peer::new(&broker, t0);
            let _ = p.send_connect(t0, c);
            match p.written().as_slice() {
                [Packet::ConnAck(a)] => a.reason,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(login(Some("alice"), "wonderland"), ReasonCode::SUCCESS);
        // 3.1.1 return code 4 and 5.
        assert_eq!(
            login(Some("alice"), "nope"),
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        );
        assert_eq!(
            login(Some("bob"), "wonderland"),
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        );
        assert_eq!(
            login(None, ""),
            ReasonCode::NOT_AUTHORIZED,
            "anonymous not allowed"
        );
    }
}
