//! Per-client limits: topic length and depth, subscriptions per client, and the inbound
//! message and byte rates (QoS 0 past them dropped, QoS 1/2 slowed by not reading the client).
//! Each one counted when it fires.

mod support;

use std::time::Instant;

use petrel_codec::{Packet, PubAck, QoS, ReasonCode};
use petrel_engine::stats::Stats;
use petrel_engine::Limits;
use support::*;

fn suback_reasons(packets: Vec<Packet>) -> Vec<ReasonCode> {
    match packets.as_slice() {
        [Packet::SubAck(ack)] => ack.reasons.clone(),
        other => panic!("expected one SUBACK, got {other:?}"),
    }
}

#[test]
fn topics_past_the_length_or_depth_limit_are_refused() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_topic_length: 10,
        max_topic_levels: 3,
        ..Default::default()
    });
    let mut w = Peer::connect(&broker, t0, connect("w", true, 0));
    w.subscribe(t0, 1, "#", QoS::AtMostOnce);
    let mut c = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    c.send(t0, publish("a/b/c", "ok", QoS::AtLeastOnce, 1))
        .unwrap();
    c.send(t0, publish("a/b/c/d", "deep", QoS::AtLeastOnce, 2))
        .unwrap();
    c.send(t0, publish("abcdefghijk", "long", QoS::AtLeastOnce, 3))
        .unwrap();
    assert_eq!(
        c.written(),
        [
            puback(1),
            Packet::PubAck(PubAck::with_reason(pid(2), ReasonCode::TOPIC_NAME_INVALID)),
            Packet::PubAck(PubAck::with_reason(pid(3), ReasonCode::TOPIC_NAME_INVALID)),
        ]
    );
    c.send(t0, subscribe(4, "a/b/c/#", QoS::AtMostOnce))
        .unwrap();
    assert_eq!(
        suback_reasons(c.written()),
        [ReasonCode::TOPIC_FILTER_INVALID]
    );
    let got = w.recv();
    assert_eq!(got.len(), 1, "only a/b/c was routed: {got:?}");
    assert_eq!(Stats::get(&broker.stats.refused_topic_limits), 3);
}

#[test]
fn subscriptions_past_the_quota_get_0x97_and_replacing_one_is_not_a_new_one() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_subscriptions_per_client: 2,
        ..Default::default()
    });
    let mut c = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    c.subscribe(t0, 1, "a", QoS::AtMostOnce);
    c.subscribe(t0, 2, "b", QoS::AtMostOnce);
    c.send(t0, subscribe(3, "c", QoS::AtMostOnce)).unwrap();
    assert_eq!(suback_reasons(c.written()), [ReasonCode::QUOTA_EXCEEDED]);
    c.subscribe(t0, 4, "a", QoS::AtLeastOnce);
    assert_eq!(Stats::get(&broker.stats.refused_subscription_quota), 1);
    // 3.1.1 has one failure code.
    let mut old = Peer::connect(&broker, t0, connect("old", true, 0));
    old.subscribe(t0, 1, "a", QoS::AtMostOnce);
    old.subscribe(t0, 2, "b", QoS::AtMostOnce);
    old.send(t0, subscribe(3, "c", QoS::AtMostOnce)).unwrap();
    assert_eq!(
        suback_reasons(old.written()),
        [ReasonCode::UNSPECIFIED_ERROR]
    );
}

#[test]
fn past_the_message_rate_qos_0_is_dropped_and_qos_1_waits_for_the_allowance() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_inbound_messages_per_second: 10,
        ..Default::default()
    });
    let mut w = Peer::connect(&broker, t0, connect("w", true, 0));
    w.subscribe(t0, 1, "#", QoS::AtLeastOnce);
    let mut c = Peer::connect(&broker, t0, connect("c", true, 0));
    for i in 0..12 {
        c.send(t0, publish("t", &format!("{i}"), QoS::AtMostOnce, 0))
            .unwrap();
    }
    assert_eq!(Stats::get(&broker.stats.dropped_inbound_rate), 2);
    assert!(
        !c.conn.is_paused(),
        "QoS 0 past the rate is dropped, not waited for"
    );
    // A second later the allowance is full again. A QoS 1 message past it is taken (and
    // acknowledged) but the client is not read from until it is even.
    let t1 = t0 + secs(1);
    for i in 1..=11u16 {
        c.send(t1, publish("t", "q1", QoS::AtLeastOnce, i)).unwrap();
    }
    assert_eq!(c.written().len(), 11, "every QoS 1 message acknowledged");
    assert!(c.conn.is_paused());
    let until = c.conn.deadline().expect("a resume time");
    assert_eq!(until, t1 + ms(100), "one message over at 10/s: 100 ms");
    assert_eq!(c.conn.handle_timeout(until - ms(1)), Ok(()));
    assert!(c.conn.is_paused());
    assert_eq!(c.conn.handle_timeout(until), Ok(()));
    assert!(!c.conn.is_paused(), "reading resumes");
    assert_eq!(Stats::get(&broker.stats.inbound_throttles), 1);
    assert_eq!(w.recv().len(), 10 + 11);
}

#[test]
fn the_byte_rate_counts_payload_bytes() {
    let t0 = Instant::now();
    let broker = broker(Limits {
        max_inbound_bytes_per_second: 100,
        ..Default::default()
    });
    let mut c = Peer::connect(&broker, t0, connect("c", true, 0));
    let fifty = "x".repeat(50);
    c.send(t0, publish("t", &fifty, QoS::AtMostOnce, 0))
        .unwrap();
    c.send(t0, publish("t", &fifty, QoS::AtMostOnce, 0))
        .unwrap();
    c.send(t0, publish("t", &fifty, QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(Stats::get(&broker.stats.dropped_inbound_rate), 1);
    c.send(t0 + ms(500), publish("t", &fifty, QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(
        Stats::get(&broker.stats.dropped_inbound_rate),
        1,
        "half a second refilled 50 bytes"
    );
}
