//! Flow control over real sockets: publishers faster than their subscriber are paused rather
//! than having acknowledged messages dropped, and a subscriber that stops reading does not
//! hold its publishers for longer than `flow_control_timeout`.
//!
//! Small queue bounds make every test pass through the paused state many times; the
//! `flow_control_pauses` counter proves that it did.

#[path = "common/rumqttc_util.rs"]
mod rumqttc_util;

use std::collections::HashMap;
use std::time::Duration;

use petrel_engine::stats::Stats;
use petrel_tests::{connect_v311_hex, RawClient, TestBroker};
use rumqttc::{Event, Incoming, Outgoing, QoS};
use rumqttc_util::Peer;

/// Publishers × messages each, for the fan-in tests.
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2_000;

/// Starts `PUBLISHERS` rumqttc clients, each publishing `PER_PUBLISHER` messages "p{i}-{n}" to
/// "fan/in" at `qos` and staying connected until every one of them is complete: written to the
/// socket (QoS 0) or acknowledged (QoS 1).
async fn run_publishers(broker: &TestBroker, qos: QoS) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..PUBLISHERS {
        let mut publ = Peer::connect(broker.addr, &format!("pub-{i}"), true).await;
        tasks.push(tokio::spawn(async move {
            let client = publ.client.clone();
            let sender = tokio::spawn(async move {
                for n in 0..PER_PUBLISHER {
                    client
                        .publish("fan/in", qos, false, format!("p{i}-{n}"))
                        .await
                        .expect("queue PUBLISH");
                }
            });
            for _ in 0..PER_PUBLISHER {
                publ.wait_for("completion of a PUBLISH", |e| match (qos, e) {
                    (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                    | (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_))) => Some(()),
                    _ => None,
                })
                .await;
            }
            sender.await.expect("sender task");
        }));
    }
    tasks
}

/// Checks that every publisher's messages arrived, each once and in order.
fn assert_complete_and_ordered(received: &[rumqttc::Publish]) {
    let mut next: HashMap<usize, usize> = HashMap::new();
    for p in received {
        let text = std::str::from_utf8(&p.payload).expect("utf-8 payload");
        let (who, n) = text[1..].split_once('-').expect("p{i}-{n}");
        let (who, n): (usize, usize) = (who.parse().unwrap(), n.parse().unwrap());
        let expected = next.entry(who).or_default();
        assert_eq!(n, *expected, "publisher {who}: out of order or duplicated");
        *expected += 1;
    }
    for i in 0..PUBLISHERS {
        assert_eq!(
            next.get(&i),
            Some(&PER_PUBLISHER),
            "publisher {i} incomplete"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_fan_in_past_the_queue_bound_loses_nothing() {
    // A queue of 10 and a window of 4: four publishers outrun one subscriber at once.
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_queued_messages = 10;
        c.mqtt.max_inflight = 4;
    })
    .await;
    let mut sub = Peer::connect(broker.addr, "sub", true).await;
    sub.subscribe("fan/in", QoS::AtLeastOnce).await;

    let publishers = run_publishers(&broker, QoS::AtLeastOnce).await;
    let received = sub
        .collect_publishes(PUBLISHERS * PER_PUBLISHER, Duration::from_secs(60))
        .await;
    for task in publishers {
        task.await.expect("publisher task");
    }
    assert_complete_and_ordered(&received);
    let stats = &broker.broker.stats;
    assert_eq!(
        Stats::get(&stats.dropped_queue_full),
        0,
        "acknowledged messages dropped"
    );
    assert!(
        Stats::get(&stats.flow_control_pauses) > 0,
        "the publishers were never paused: the test did not exercise flow control"
    );
    assert_eq!(Stats::get(&stats.stalled_subscribers), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_fan_in_to_a_reading_subscriber_loses_nothing() {
    // 2 KiB of QoS 0 may wait for the subscriber: a few dozen of these messages.
    let broker = TestBroker::start_with(|c| c.mqtt.outbox_bytes = 2048).await;
    let mut sub = Peer::connect(broker.addr, "sub", true).await;
    sub.subscribe("fan/in", QoS::AtMostOnce).await;

    let publishers = run_publishers(&broker, QoS::AtMostOnce).await;
    let received = sub
        .collect_publishes(PUBLISHERS * PER_PUBLISHER, Duration::from_secs(60))
        .await;
    for task in publishers {
        task.await.expect("publisher task");
    }
    assert_complete_and_ordered(&received);
    let stats = &broker.broker.stats;
    assert_eq!(Stats::get(&stats.dropped_outbox_full), 0);
    assert!(Stats::get(&stats.flow_control_pauses) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_holds_publishers_only_for_the_flow_control_timeout() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_queued_messages = 10;
        c.mqtt.flow_control_timeout = Duration::from_millis(300);
    })
    .await;

    // A subscriber that never reads and never acknowledges.
    let mut stalled = RawClient::connect(broker.addr).await;
    stalled
        .send_hex(&connect_v311_hex("stalled", true, 0))
        .await;
    stalled.expect_hex("20 02 00 00").await;
    stalled
        .send_hex("82 0b 00 01 00 06 66 61 6e 2f 69 6e 01")
        .await; // SUBSCRIBE "fan/in" QoS 1
    stalled.expect_hex("90 03 00 01 01").await;

    let mut healthy = Peer::connect(broker.addr, "healthy", true).await;
    healthy.subscribe("fan/in", QoS::AtLeastOnce).await;

    let publ = Peer::connect(broker.addr, "pub", true).await;
    let started = tokio::time::Instant::now();
    let total = 500;
    for n in 0..total {
        publ.publish("fan/in", QoS::AtLeastOnce, false, format!("m{n}"))
            .await;
    }
    let received = healthy
        .collect_publishes(total, Duration::from_secs(20))
        .await;
    let elapsed = started.elapsed();
    for (n, p) in received.iter().enumerate() {
        assert_eq!(&p.payload[..], format!("m{n}").as_bytes());
    }
    let stats = &broker.broker.stats;
    assert_eq!(Stats::get(&stats.stalled_subscribers), 1);
    assert!(
        Stats::get(&stats.dropped_queue_full) > 0,
        "what the stalled subscriber cannot take is dropped, not buffered"
    );
    // One wait of 300 ms for the stalled subscriber, then full speed; far below the 5 s a
    // pause per message would add up to.
    assert!(
        elapsed < Duration::from_secs(3),
        "the stalled subscriber held the publisher for {elapsed:?}"
    );
    drop(stalled);
}
