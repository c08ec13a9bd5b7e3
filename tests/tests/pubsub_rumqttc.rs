//! Publish/subscribe through petrel with a real third-party client (rumqttc, MQTT 3.1.1):
//! QoS downgrade, topic wildcards, unsubscribe, overlapping subscriptions, retained messages,
//! ordering, the publisher's acknowledgement flows and fan-out.
//!
//! "Nothing else arrived" is proved with a sentinel message published after the one under test
//! on the same connection: petrel keeps one queue per session, so once the sentinel arrives
//! everything published before it has too.

#[path = "common/rumqttc_util.rs"]
mod rumqttc_util;

use std::time::Duration;

use petrel_engine::stats::Stats;
use petrel_tests::TestBroker;
use rumqttc::{Event, Incoming, Outgoing, QoS};
use rumqttc_util::{min_qos, qos, Peer};

/// Long enough for a few thousand messages over loopback, short enough to fail fast.
const BULK: Duration = Duration::from_secs(10);

fn payload_str(p: &rumqttc::Publish) -> String {
    String::from_utf8(p.payload.to_vec()).expect("utf-8 payload")
}

// ---------------------------------------------------------------------------------------------
// QoS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_min_of_published_and_granted_for_all_nine_combinations() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "qos-sub", true).await;
    let mut publ = Peer::connect(broker.addr, "qos-pub", true).await;

    // (published QoS, subscribed QoS) → delivered QoS = min [MQTT-3.8.4-6].
    for p in 0..=2u8 {
        for s in 0..=2u8 {
            let topic = format!("qos/pub{p}/sub{s}");
            let granted = sub.subscribe(&topic, qos(s)).await;
            assert_eq!(
                granted,
                qos(s),
                "petrel grants the requested QoS {s} in SUBACK"
            );

            // Binary payload with a zero byte and high bytes: delivered unchanged.
            let payload = vec![p, s, 0x00, 0xff, b'x', 0x80];
            publ.publish_confirmed(&topic, qos(p), false, payload.clone())
                .await;

            let got = sub.next_publish().await;
            assert_eq!(got.topic, topic, "topic intact (pub {p}, sub {s})");
            assert_eq!(
                got.payload.as_ref(),
                payload.as_slice(),
                "payload intact (pub {p}, sub {s})"
            );
            assert_eq!(
                got.qos,
                min_qos(qos(p), qos(s)),
                "published QoS {p}, subscribed QoS {s}: delivered at the minimum [MQTT-3.8.4-6]"
            );
            assert!(!got.retain, "live delivery has RETAIN 0 [MQTT-3.3.1-9]");
            assert!(!got.dup, "first delivery attempt has DUP 0 (§3.3.1.1)");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wildcards

/// (filter, topic, delivered?): the examples of §4.7.1.2 and §4.7.1.3, and the `$` rule.
const WILDCARDS: &[(&str, &str, bool)] = &[
    ("sport/tennis/player1/#", "sport/tennis/player1", true),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/ranking",
        true,
    ),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/score/wimbledon",
        true,
    ),
    ("sport/#", "sport", true), // `#` includes the parent level (§4.7.1.2)
    ("#", "a/b/c", true),
    ("sport/tennis/+", "sport/tennis/player1", true),
    ("sport/tennis/+", "sport/tennis/player1/ranking", false),
    ("sport/+/player1", "sport/tennis/player1", true),
    ("sport/+/player1", "sport/tennis/player2", false),
    ("sport/+", "sport", false),
    ("sport/+", "sport/", true),
    ("+", "a", true),
    ("+", "a/b", false), // `+` matches exactly one level (§4.7.1.3)
    ("+/+", "/finance", true),
    ("/+", "/finance", true),
    ("+", "/finance", false),
    ("+/tennis/#", "sport/tennis/player1/ranking", true),
    ("Sport/#", "sport/tennis", false), // case sensitive, no normalisation [MQTT-4.7.3-4]
    // Filters starting with a wildcard do not match topics starting with `$` [MQTT-4.7.2-1].
    // (`$app`, not `$SYS`: clients may not publish under the broker's own `$SYS`.)
    ("#", "$app/x", false),
    ("+/x", "$app/x", false),
    ("+/monitor/Clients", "$app/monitor/Clients", false),
    ("$app/#", "$app/x", true),
    ("$app/monitor/+", "$app/monitor/Clients", true),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_filters_match_per_spec_table() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "wild-pub", true).await;
    let mut failures = Vec::new();
    for (i, &(filter, topic, expected)) in WILDCARDS.iter().enumerate() {
        let mut sub = Peer::connect(broker.addr, &format!("wild-sub-{i}"), true).await;
        sub.subscribe(filter, QoS::AtLeastOnce).await;
        let sentinel = format!("sentinel/{i}");
        sub.subscribe(&sentinel, QoS::AtLeastOnce).await;

        publ.publish_confirmed(topic, QoS::AtLeastOnce, false, "case")
            .await;
        publ.publish_confirmed(&sentinel, QoS::AtLeastOnce, false, "end")
            .await;

        let got = sub.publishes_until(&sentinel).await;
        let delivered = got.iter().filter(|p| p.topic == topic).count();
        if delivered != usize::from(expected) {
            failures.push(format!(
                "filter {filter:?} topic {topic:?}: expected {} deliveries, got {delivered}",
                usize::from(expected)
            ));
        }
        sub.disconnect().await;
    }
    assert!(
        failures.is_empty(),
        "wildcard mismatches:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Unsubscribe and overlapping subscriptions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "unsub-sub", true).await;
    let mut publ = Peer::connect(broker.addr, "unsub-pub", true).await;
    sub.subscribe("unsub/t", QoS::AtLeastOnce).await;
    sub.subscribe("unsub/sentinel", QoS::AtLeastOnce).await;

    publ.publish_confirmed("unsub/t", QoS::AtLeastOnce, false, "before")
        .await;
    assert_eq!(payload_str(&sub.next_publish().await), "before");

    // UNSUBACK arrives [MQTT-3.10.4-4]; after it the filter delivers nothing [MQTT-3.10.4-2].
    sub.unsubscribe("unsub/t").await;
    assert_eq!(
        broker.broker.subscription_count(),
        1,
        "only the sentinel subscription is left"
    );
    publ.publish_confirmed("unsub/t", QoS::AtLeastOnce, false, "after")
        .await;
    publ.publish_confirmed("unsub/sentinel", QoS::AtLeastOnce, false, "end")
        .await;

    let got = sub.publishes_until("unsub/sentinel").await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["unsub/sentinel"],
        "nothing delivered on the unsubscribed topic [MQTT-3.10.4-2]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "overlap-sub", true).await;
    let mut publ = Peer::connect(broker.addr, "overlap-pub", true).await;
    assert_eq!(sub.subscribe("a/#", QoS::AtMostOnce).await, QoS::AtMostOnce);
    assert_eq!(
        sub.subscribe("a/b", QoS::ExactlyOnce).await,
        QoS::ExactlyOnce
    );

    publ.publish_confirmed("a/b", QoS::ExactlyOnce, false, "both match")
        .await;
    // Matched by `a/#` only: the sentinel.
    publ.publish_confirmed("a/end", QoS::AtMostOnce, false, "end")
        .await;

    let got = sub.publishes_until("a/end").await;
    let on_ab: Vec<_> = got.iter().filter(|p| p.topic == "a/b").collect();
    assert_eq!(
        on_ab.len(),
        1,
        "petrel delivers a message matched by two subscriptions of one client once: {got:?}"
    );
    assert_eq!(
        on_ab[0].qos,
        QoS::ExactlyOnce,
        "at the maximum QoS of the matching subscriptions [MQTT-3.3.5-1]"
    );
    assert_eq!(payload_str(on_ab[0]), "both match");
}

// ---------------------------------------------------------------------------------------------
// Retained messages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_sent_to_a_new_subscriber_with_retain_set() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "ret-pub", true).await;
    publ.publish_confirmed("ret/set", QoS::AtLeastOnce, true, "kept")
        .await;
    assert_eq!(broker.broker.retained_count(), 1, "stored [MQTT-3.3.1-5]");

    let mut sub = Peer::connect(broker.addr, "ret-sub", true).await;
    sub.subscribe("ret/set", QoS::ExactlyOnce).await;
    let got = sub.next_publish().await;
    assert_eq!(got.topic, "ret/set");
    assert_eq!(payload_str(&got), "kept");
    assert!(
        got.retain,
        "retained message sent on subscribe has RETAIN 1 [MQTT-3.3.1-8]"
    );
    assert_eq!(
        got.qos,
        QoS::AtLeastOnce,
        "sent on subscribe [MQTT-3.3.1-6] at min(stored QoS 1, granted QoS 2) [MQTT-3.8.4-6]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_replaced_by_the_latest() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "repl-pub", true).await;
    publ.publish_confirmed("ret/repl", QoS::AtLeastOnce, true, "v1")
        .await;
    publ.publish_confirmed("ret/repl", QoS::AtLeastOnce, true, "v2")
        .await;
    assert_eq!(
        broker.broker.retained_count(),
        1,
        "one retained message per topic [MQTT-3.3.1-5]"
    );

    let mut sub = Peer::connect(broker.addr, "repl-sub", true).await;
    sub.subscribe("ret/repl", QoS::AtLeastOnce).await;
    // A live message after the SUBACK: retained replay comes first, so it ends the replay.
    publ.publish_confirmed("ret/repl", QoS::AtLeastOnce, false, "live")
        .await;

    let got = sub.collect_publishes(2, rumqttc_util::QUIET * 10).await;
    let seen: Vec<(String, bool)> = got.iter().map(|p| (payload_str(p), p.retain)).collect();
    assert_eq!(
        seen,
        [("v2".to_string(), true), ("live".to_string(), false)],
        "only the latest retained message [MQTT-3.3.1-5], then the live one with RETAIN 0 [MQTT-3.3.1-9]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_deleted_by_an_empty_retained_publish() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "del-pub", true).await;
    let mut existing = Peer::connect(broker.addr, "del-existing", true).await;
    existing.subscribe("ret/del", QoS::AtLeastOnce).await;

    publ.publish_confirmed("ret/del", QoS::AtLeastOnce, true, "doomed")
        .await;
    assert_eq!(payload_str(&existing.next_publish().await), "doomed");
    publ.publish_confirmed("ret/del", QoS::AtLeastOnce, true, Vec::new())
        .await;
    assert_eq!(
        broker.broker.retained_count(),
        0,
        "empty retained PUBLISH clears the topic [MQTT-3.3.1-10]"
    );

    // The zero-byte message itself is delivered to current subscribers as normal [MQTT-3.3.1-10].
    let deletion = existing.next_publish().await;
    assert_eq!(deletion.topic, "ret/del");
    assert!(
        deletion.payload.is_empty(),
        "zero-byte payload delivered [MQTT-3.3.1-10]"
    );

    // A new subscriber gets nothing for that topic [MQTT-3.3.1-11].
    let mut sub = Peer::connect(broker.addr, "del-sub", true).await;
    sub.subscribe("ret/del", QoS::AtLeastOnce).await;
    sub.subscribe("ret/sentinel", QoS::AtLeastOnce).await;
    publ.publish_confirmed("ret/sentinel", QoS::AtLeastOnce, false, "end")
        .await;
    let got = sub.publishes_until("ret/sentinel").await;
    assert_eq!(
        got.len(),
        1,
        "no retained message after deletion [MQTT-3.3.1-11]: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_matched_by_wildcard_subscriptions() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "rw-pub", true).await;
    for (topic, payload) in [
        ("rw/a/1", "a1"),
        ("rw/b/1", "b1"),
        ("rw/a/2", "a2"),
        ("rw", "root"),
        ("$app/rw", "sys"),
    ] {
        publ.publish_confirmed(topic, QoS::AtLeastOnce, true, payload)
            .await;
    }
    assert_eq!(broker.broker.retained_count(), 5);

    // (filter, retained payloads it must replay, in any order)
    let cases: &[(&str, &[&str])] = &[
        ("rw/+/1", &["a1", "b1"]),
        ("rw/#", &["a1", "a2", "b1", "root"]),
        ("rw/a/+", &["a1", "a2"]),
        ("+/a/2", &["a2"]),
        ("#", &["a1", "a2", "b1", "root"]), // not "sys" [MQTT-4.7.2-1]
        ("$app/#", &["sys"]),
        ("rw/c/#", &[]),
    ];
    for (i, &(filter, expected)) in cases.iter().enumerate() {
        let mut sub = Peer::connect(broker.addr, &format!("rw-sub-{i}"), true).await;
        let sentinel = format!("sentinel/rw/{i}");
        sub.subscribe(&sentinel, QoS::AtLeastOnce).await;
        sub.subscribe(filter, QoS::AtLeastOnce).await;
        publ.publish_confirmed(&sentinel, QoS::AtLeastOnce, false, "end")
            .await;

        let got = sub.publishes_until(&sentinel).await;
        let mut replayed: Vec<String> = got
            .iter()
            .filter(|p| p.topic != sentinel)
            .map(|p| {
                assert!(
                    p.retain,
                    "replayed message has RETAIN 1 [MQTT-3.3.1-8]: {p:?}"
                );
                payload_str(p)
            })
            .collect();
        replayed.sort();
        assert_eq!(
            replayed, expected,
            "retained messages replayed for filter {filter:?}"
        );
        sub.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publish_reaches_existing_subscriber_with_retain_clear() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "live-sub", true).await;
    sub.subscribe("ret/live/#", QoS::AtLeastOnce).await;
    let mut publ = Peer::connect(broker.addr, "live-pub", true).await;
    publ.publish_confirmed("ret/live/x", QoS::AtLeastOnce, true, "now")
        .await;

    let got = sub.next_publish().await;
    assert_eq!(payload_str(&got), "now");
    assert!(
        !got.retain,
        "a retained PUBLISH forwarded to an established subscription has RETAIN 0 [MQTT-3.3.1-9]"
    );
}

// ---------------------------------------------------------------------------------------------
// Ordering

/// Publishes `n` sequence-numbered messages from one client on one topic and returns the
/// sequence numbers as received by one subscriber (waiting for all of them when `expect_all`).
async fn sequence_through_broker(q: QoS, n: usize, expect_all: bool) -> Vec<usize> {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "seq-sub", true).await;
    sub.subscribe("seq/t", q).await;
    sub.subscribe("seq/end", QoS::AtLeastOnce).await;
    let mut publ = Peer::connect(broker.addr, "seq-pub", true).await;
    for i in 0..n {
        publ.publish("seq/t", q, false, i.to_string()).await;
    }
    let got = if expect_all {
        sub.collect_publishes(n, BULK).await
    } else {
        // QoS 0 may lose messages; the sentinel marks the end of the run.
        publ.publish_confirmed("seq/end", QoS::AtLeastOnce, false, "end")
            .await;
        tokio::time::timeout(BULK, sub.publishes_until("seq/end"))
            .await
            .expect("sentinel after the QoS 0 run")
    };
    got.iter()
        .filter(|p| p.topic == "seq/t")
        .map(|p| {
            assert_eq!(p.qos, q, "delivered at the subscribed QoS");
            payload_str(p).parse().expect("sequence number")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_on_one_topic_arrive_in_order_and_none_lost() {
    let got = sequence_through_broker(QoS::AtLeastOnce, 1000, true).await;
    let want: Vec<usize> = (0..1000).collect();
    assert_eq!(
        got, want,
        "ordered topic: same order as published [MQTT-4.6.0-6]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_messages_on_one_topic_arrive_in_order_and_none_lost() {
    let got = sequence_through_broker(QoS::ExactlyOnce, 300, true).await;
    let want: Vec<usize> = (0..300).collect();
    assert_eq!(
        got, want,
        "ordered topic: same order as published, each once [MQTT-4.6.0-6]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_messages_on_one_topic_arrive_in_order() {
    let got = sequence_through_broker(QoS::AtMostOnce, 1000, false).await;
    assert!(!got.is_empty(), "some QoS 0 messages arrive over loopback");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "QoS 0 messages that arrive do so in publish order, without duplicates [MQTT-4.6.0-6]: {got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The publisher's side of the QoS flows

/// The events of a publisher's QoS flow, pings left out.
async fn publisher_flow(publ: &mut Peer, q: QoS, last: fn(&Event) -> bool) -> Vec<Event> {
    let mut flow = Vec::new();
    publ.publish("flow/t", q, false, "x").await;
    publ.wait_for("end of the publish flow", |e| {
        flow.push(e.clone());
        last(e).then_some(())
    })
    .await;
    flow.retain(|e| {
        !matches!(
            e,
            Event::Outgoing(Outgoing::PingReq) | Event::Incoming(Incoming::PingResp)
        )
    });
    flow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publisher_gets_puback_with_its_packet_id() {
    let broker = TestBroker::start().await;
    let mut publ = Peer::connect(broker.addr, "flow1-pub", true).await;
    let flow = publisher_flow(&mut publ, QoS::AtLeastOnce, |e| {
        matches!(e, Event::Incoming(Incoming::PubAck(_)))
    })
    .await;
    match flow.as_slice() {
        [Event::Outgoing(Outgoing::Publish(id)), Event::Incoming(Incoming::PubAck(ack))] => {
            assert_eq!(
                ack.pkid, *id,
                "PUBACK carries the PUBLISH's packet id [MQTT-2.3.1-6]"
            );
        }
        other => panic!("expected PUBLISH → PUBACK [MQTT-4.3.2-2], got {other:?}"),
    }
    assert_eq!(Stats::get(&broker.broker.stats.messages_received), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publisher_flow_completes_with_pubrec_pubrel_pubcomp_and_delivers_once() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "flow2-sub", true).await;
    sub.subscribe("flow/#", QoS::ExactlyOnce).await;
    let mut publ = Peer::connect(broker.addr, "flow2-pub", true).await;
    let flow = publisher_flow(&mut publ, QoS::ExactlyOnce, |e| {
        matches!(e, Event::Incoming(Incoming::PubComp(_)))
    })
    .await;
    match flow.as_slice() {
        [Event::Outgoing(Outgoing::Publish(id)), Event::Incoming(Incoming::PubRec(rec)), Event::Outgoing(Outgoing::PubRel(rel)), Event::Incoming(Incoming::PubComp(comp))] =>
        {
            assert_eq!(
                (rec.pkid, *rel, comp.pkid),
                (*id, *id, *id),
                "one packet id for the whole flow [MQTT-2.3.1-6]"
            );
        }
        other => {
            panic!("expected PUBLISH → PUBREC → PUBREL → PUBCOMP [MQTT-4.3.3-2], got {other:?}")
        }
    }

    // Exactly once to the subscriber: the message, then nothing more before a sentinel.
    publ.publish_confirmed("flow/end", QoS::AtLeastOnce, false, "end")
        .await;
    let got = sub.publishes_until("flow/end").await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["flow/t", "flow/end"],
        "QoS 2 message delivered exactly once"
    );
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
}

// ---------------------------------------------------------------------------------------------
// Fan-out

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_subscribers_each_receive_all_hundred_qos1_messages_in_order() {
    const SUBSCRIBERS: usize = 20;
    const MESSAGES: usize = 100;
    let broker = TestBroker::start().await;
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut s = Peer::connect(broker.addr, &format!("fan-sub-{i}"), true).await;
        s.subscribe("fan/t", QoS::AtLeastOnce).await;
        subs.push(s);
    }
    assert_eq!(broker.broker.subscription_count(), SUBSCRIBERS);

    let publ = Peer::connect(broker.addr, "fan-pub", true).await;
    for i in 0..MESSAGES {
        publ.publish("fan/t", QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    // Every subscriber's event loop runs in its own task, so reading them one after the other
    // does not hold the others back.
    let want: Vec<String> = (0..MESSAGES).map(|i| i.to_string()).collect();
    for s in &mut subs {
        let got = s.collect_publishes(MESSAGES, BULK).await;
        let payloads: Vec<String> = got.iter().map(payload_str).collect();
        assert_eq!(
            payloads, want,
            "{} received every message once, in order",
            s.name
        );
        assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    }
    assert_eq!(
        Stats::get(&broker.broker.stats.messages_sent),
        (SUBSCRIBERS * MESSAGES) as u64,
        "one PUBLISH per subscriber per message"
    );
}
