//! Sessions, takeover, client ids, wills and redelivery, seen from a real third-party client
//! (rumqttc, MQTT 3.1.1). Where rumqttc cannot misbehave the way a test needs (stay silent past
//! its keepalive, send garbage, withhold an acknowledgement) a `RawClient` plays that client
//! and the exchange is written out as bytes.

#[path = "common/rumqttc_util.rs"]
mod rumqttc_util;

use std::time::Duration;

use petrel_engine::stats::Stats;
use petrel_tests::{hex, to_hex, RawClient, TestBroker};
use rumqttc::{LastWill, QoS};
use rumqttc_util::{eventually, options_with_will, Peer};

fn payload_str(p: &rumqttc::Publish) -> String {
    String::from_utf8(p.payload.to_vec()).expect("utf-8 payload")
}

/// A 3.1.1 CONNECT with Clean Session 1 and a will, as hex.
fn connect_with_will_hex(
    client_id: &str,
    keep_alive: u16,
    topic: &str,
    payload: &str,
    qos: u8,
    retain: bool,
) -> String {
    let mut body = hex("00 04 4d 51 54 54 04");
    body.push(0x02 | 0x04 | (qos << 3) | if retain { 0x20 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    for field in [client_id, topic, payload] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    to_hex(&packet)
}

/// A 3.1.1 SUBSCRIBE with packet id 1 for one filter, as hex.
fn subscribe_hex(filter: &str, qos: u8) -> String {
    let mut packet = vec![0x82, (2 + 2 + filter.len() + 1) as u8, 0x00, 0x01];
    packet.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    packet.extend_from_slice(filter.as_bytes());
    packet.push(qos);
    to_hex(&packet)
}

/// A client watching `will/#`, to see wills arrive.
async fn will_watcher(broker: &TestBroker) -> Peer {
    let mut w = Peer::connect(broker.addr, "will-watcher", true).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    w
}

// ---------------------------------------------------------------------------------------------
// Persistent and clean sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_receives_qos1_and_qos2_published_while_offline() {
    let broker = TestBroker::start().await;
    let mut sub = Peer::connect(broker.addr, "persist", false).await;
    assert!(!sub.session_present, "no stored session yet [MQTT-3.2.2-3]");
    sub.subscribe("off/#", QoS::ExactlyOnce).await;
    sub.disconnect().await;
    assert_eq!(
        broker.broker.session_count(),
        1,
        "Clean Session 0: the session outlives the connection"
    );
    assert_eq!(
        broker.broker.subscription_count(),
        1,
        "and keeps its subscription [MQTT-3.1.2-4]"
    );

    let mut publ = Peer::connect(broker.addr, "persist-pub", true).await;
    publ.publish_confirmed("off/q0", QoS::AtMostOnce, false, "q0")
        .await;
    publ.publish_confirmed("off/q1", QoS::AtLeastOnce, false, "q1")
        .await;
    publ.publish_confirmed("off/q2", QoS::ExactlyOnce, false, "q2")
        .await;
    // petrel does not queue QoS 0 for an offline session (§3.1.2.4 leaves it optional); it
    // counts the drop instead.
    assert_eq!(Stats::get(&broker.broker.stats.dropped_offline_qos0), 1);

    let mut back = Peer::connect(broker.addr, "persist", false).await;
    assert!(
        back.session_present,
        "stored session resumed: Session Present 1 [MQTT-3.2.2-2]"
    );
    // A live message after the reconnect marks the end of what was stored.
    publ.publish_confirmed("off/live", QoS::AtMostOnce, false, "live")
        .await;
    let got = back.publishes_until("off/live").await;
    let seen: Vec<(&str, QoS, String)> = got
        .iter()
        .map(|p| (p.topic.as_str(), p.qos, payload_str(p)))
        .collect();
    assert_eq!(
        seen,
        [
            ("off/q1", QoS::AtLeastOnce, "q1".to_string()),
            ("off/q2", QoS::ExactlyOnce, "q2".to_string()),
            ("off/live", QoS::AtMostOnce, "live".to_string()),
        ],
        "QoS 1 and 2 stored while offline are delivered in order [MQTT-3.1.2-5]; QoS 0 was not stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_session_discards_the_previous_session() {
    let broker = TestBroker::start().await;
    let mut old = Peer::connect(broker.addr, "cleaner", false).await;
    old.subscribe("cs/t", QoS::AtLeastOnce).await;
    old.disconnect().await;
    assert_eq!(broker.broker.subscription_count(), 1);

    let mut fresh = Peer::connect(broker.addr, "cleaner", true).await;
    assert!(
        !fresh.session_present,
        "Clean Session 1: Session Present 0 [MQTT-3.2.2-1]"
    );
    assert_eq!(
        broker.broker.subscription_count(),
        0,
        "the old session's subscriptions are discarded [MQTT-3.1.2-6]"
    );
    fresh.subscribe("cs/sentinel", QoS::AtLeastOnce).await;
    let mut publ = Peer::connect(broker.addr, "cleaner-pub", true).await;
    publ.publish_confirmed("cs/t", QoS::AtLeastOnce, false, "old subscription")
        .await;
    publ.publish_confirmed("cs/sentinel", QoS::AtLeastOnce, false, "end")
        .await;
    let got = fresh.publishes_until("cs/sentinel").await;
    assert_eq!(
        got.len(),
        1,
        "nothing delivered through the discarded subscription: {got:?}"
    );

    // The clean session ends with its connection, so nothing is left to resume.
    fresh.disconnect().await;
    publ.disconnect().await;
    eventually("clean sessions removed", || {
        broker.broker.session_count() == 0
    })
    .await;
    let again = Peer::connect(broker.addr, "cleaner", false).await;
    assert!(
        !again.session_present,
        "no session survives a clean one [MQTT-3.1.2-6] [MQTT-3.2.2-3]"
    );
}

// ---------------------------------------------------------------------------------------------
// Takeover and client ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_same_client_id_takes_over() {
    let broker = TestBroker::start().await;
    let mut first = Peer::connect(broker.addr, "twin", true).await;
    first.subscribe("twin/a", QoS::AtLeastOnce).await;

    let mut second = Peer::connect(broker.addr, "twin", true).await;
    let err = first.expect_dropped().await;
    eprintln!("first connection ended with: {err}");
    assert_eq!(
        Stats::get(&broker.broker.stats.takeovers),
        1,
        "the existing client is disconnected [MQTT-3.1.4-2]"
    );
    assert_eq!(
        broker.broker.session_count(),
        1,
        "one session per client id"
    );
    assert_eq!(
        broker.broker.subscription_count(),
        0,
        "Clean Session 1 discarded the first's subscription"
    );

    // The newcomer is fully functional.
    second.subscribe("twin/b", QoS::AtLeastOnce).await;
    let mut publ = Peer::connect(broker.addr, "twin-pub", true).await;
    publ.publish_confirmed("twin/b", QoS::AtLeastOnce, false, "to the second")
        .await;
    assert_eq!(payload_str(&second.next_publish().await), "to the second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_of_a_persistent_session_keeps_its_subscriptions() {
    let broker = TestBroker::start().await;
    let mut first = Peer::connect(broker.addr, "twin-p", false).await;
    first.subscribe("twinp/t", QoS::AtLeastOnce).await;

    let mut second = Peer::connect(broker.addr, "twin-p", false).await;
    assert!(
        second.session_present,
        "the session moves to the new connection [MQTT-3.2.2-2]"
    );
    first.expect_dropped().await;
    assert_eq!(
        Stats::get(&broker.broker.stats.takeovers),
        1,
        "[MQTT-3.1.4-2]"
    );

    let mut publ = Peer::connect(broker.addr, "twinp-pub", true).await;
    publ.publish_confirmed("twinp/t", QoS::AtLeastOnce, false, "kept")
        .await;
    assert_eq!(
        payload_str(&second.next_publish().await),
        "kept",
        "subscription survived the takeover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_with_clean_session_is_accepted_with_a_generated_id() {
    let broker = TestBroker::start().await;
    // rumqttc sends a zero-length client id as is; CONNACK must accept it [MQTT-3.1.3-6].
    let mut a = Peer::connect(broker.addr, "", true).await;
    let mut b = Peer::connect(broker.addr, "", true).await;
    assert_eq!(
        broker.broker.session_count(),
        2,
        "each anonymous client gets its own unique id [MQTT-3.1.3-6]"
    );
    assert_eq!(
        Stats::get(&broker.broker.stats.takeovers),
        0,
        "the generated ids do not collide"
    );

    a.subscribe("anon/t", QoS::AtLeastOnce).await;
    b.publish_confirmed("anon/t", QoS::AtLeastOnce, false, "hi")
        .await;
    assert_eq!(
        payload_str(&a.next_publish().await),
        "hi",
        "an anonymous client works normally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_with_persistent_session_is_refused() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect_v311(broker.addr, "", false, 60).await;
    // CONNACK 0x02 "identifier rejected", then the connection closes [MQTT-3.1.3-8].
    c.expect_hex("20 02 00 02").await;
    c.expect_closed().await;
    assert_eq!(broker.broker.session_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Wills

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_the_client_vanishes_without_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    let will = LastWill::new("will/drop", "gone", QoS::AtLeastOnce, false);
    let owner = Peer::connect_with(options_with_will(broker.addr, "will-drop", true, will)).await;

    owner.kill().await; // the socket closes with no DISCONNECT
    let got = watcher.next_publish().await;
    assert_eq!(
        (
            got.topic.as_str(),
            payload_str(&got).as_str(),
            got.qos,
            got.retain
        ),
        ("will/drop", "gone", QoS::AtLeastOnce, false),
        "will published when the connection closes without DISCONNECT [MQTT-3.1.2-8]"
    );
    assert_eq!(Stats::get(&broker.broker.stats.wills_published), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_keepalive_expires() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    // Keepalive 1 s, then silence: the broker closes after 1.5 s [MQTT-3.1.2-24].
    let mut owner = RawClient::connect(broker.addr).await;
    owner
        .send_hex(&connect_with_will_hex(
            "will-ka",
            1,
            "will/ka",
            "timed out",
            1,
            false,
        ))
        .await;
    owner.expect_hex("20 02 00 00").await;
    owner.expect_closed_within(Duration::from_secs(4)).await;
    assert_eq!(Stats::get(&broker.broker.stats.keepalive_timeouts), 1);

    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), payload_str(&got).as_str()),
        ("will/ka", "timed out"),
        "will published on keepalive expiry [MQTT-3.1.2-8]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_the_client_is_taken_over() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    let will = LastWill::new("will/take", "replaced", QoS::AtLeastOnce, false);
    let mut owner =
        Peer::connect_with(options_with_will(broker.addr, "will-take", true, will)).await;

    let _newcomer = Peer::connect(broker.addr, "will-take", true).await;
    owner.expect_dropped().await;
    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), payload_str(&got).as_str()),
        ("will/take", "replaced"),
        "the displaced connection ended without DISCONNECT, so its will is published [MQTT-3.1.2-8] [MQTT-3.1.4-2]"
    );
    assert_eq!(Stats::get(&broker.broker.stats.wills_published), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_the_client_breaks_the_protocol() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    let mut owner = RawClient::connect(broker.addr).await;
    owner
        .send_hex(&connect_with_will_hex(
            "will-bad", 60, "will/bad", "broke", 1, false,
        ))
        .await;
    owner.expect_hex("20 02 00 00").await;
    // PUBLISH with both QoS bits set: the server must close the connection [MQTT-3.3.1-4].
    owner.send_hex("36 07 00 03 61 2f 62 00 01").await;
    owner.expect_closed().await;
    assert!(Stats::get(&broker.broker.stats.protocol_errors) >= 1);

    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), payload_str(&got).as_str()),
        ("will/bad", "broke"),
        "will published when the server closes the connection for a protocol error [MQTT-3.1.2-8]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_not_published_after_a_clean_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    let will = LastWill::new("will/clean", "should not appear", QoS::AtLeastOnce, false);
    let owner = Peer::connect_with(options_with_will(broker.addr, "will-clean", true, will)).await;

    // Returns once the broker has closed the connection, i.e. after its will decision.
    owner.disconnect().await;
    let mut publ = Peer::connect(broker.addr, "will-clean-pub", true).await;
    publ.publish_confirmed("will/sentinel", QoS::AtLeastOnce, false, "end")
        .await;
    let got = watcher.publishes_until("will/sentinel").await;
    assert_eq!(
        got.len(),
        1,
        "DISCONNECT discards the will without publishing it [MQTT-3.1.2-10]: {got:?}"
    );
    assert_eq!(Stats::get(&broker.broker.stats.wills_published), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_with_retain_is_stored_as_a_retained_message() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(&broker).await;
    let will = LastWill::new("will/status", "offline", QoS::AtLeastOnce, true);
    let owner = Peer::connect_with(options_with_will(broker.addr, "will-ret", true, will)).await;
    owner.kill().await;

    let live = watcher.next_publish().await;
    assert_eq!(payload_str(&live), "offline");
    assert!(
        !live.retain,
        "to an established subscription RETAIN is 0 [MQTT-3.3.1-9]"
    );
    assert_eq!(
        broker.broker.retained_count(),
        1,
        "Will Retain 1: published as retained [MQTT-3.1.2-17]"
    );

    let mut late = Peer::connect(broker.addr, "will-late", true).await;
    late.subscribe("will/status", QoS::AtLeastOnce).await;
    let got = late.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), payload_str(&got).as_str(), got.retain),
        ("will/status", "offline", true),
        "a later subscriber gets the will as a retained message [MQTT-3.1.2-17] [MQTT-3.3.1-6]"
    );
}

// ---------------------------------------------------------------------------------------------
// Redelivery of unacknowledged messages on session resume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos1_is_resent_with_dup_and_the_same_packet_id() {
    let broker = TestBroker::start().await;
    let mut sub = RawClient::connect_v311(broker.addr, "resend1", false, 60).await;
    sub.expect_hex("20 02 00 00").await;
    sub.send_hex(&subscribe_hex("r/q1", 1)).await;
    sub.expect_hex("90 03 00 01 01").await;

    let mut publ = Peer::connect(broker.addr, "resend1-pub", true).await;
    publ.publish_confirmed("r/q1", QoS::AtLeastOnce, false, "hello")
        .await;

    // PUBLISH QoS 1 "r/q1" <id> "hello": 2 + 6 + 2 + 5 bytes.
    let first = sub
        .read_exact(15, petrel_tests::PROMPT)
        .await
        .expect("PUBLISH to the subscriber");
    assert_eq!(
        to_hex(&first[..8]),
        "32 0d 00 04 72 2f 71 31",
        "QoS 1 PUBLISH, DUP 0, topic r/q1"
    );
    assert_eq!(&first[10..], b"hello");
    let id = [first[8], first[9]];

    // No PUBACK: the socket just closes.
    drop(sub);
    eventually("the broker noticed the lost subscriber", || {
        Stats::get(&broker.broker.stats.connections_current) == 1
    })
    .await;

    let mut sub = RawClient::connect_v311(broker.addr, "resend1", false, 60).await;
    sub.expect_hex("20 02 01 00").await; // Session Present 1 [MQTT-3.2.2-2]
    let mut resent = first.clone();
    resent[0] = 0x3a; // DUP 1 [MQTT-3.3.1-1]
                      // The same PUBLISH, same packet id, DUP set [MQTT-4.4.0-1].
    sub.expect_hex(&to_hex(&resent)).await;

    // Once acknowledged it is not sent again: the next PUBLISH is a new message.
    sub.send_bytes(&[0x40, 0x02, id[0], id[1]]).await;
    publ.publish_confirmed("r/q1", QoS::AtLeastOnce, false, "next")
        .await;
    match sub.recv().await {
        petrel_codec::Packet::Publish(p) => {
            assert_eq!(
                p.payload.as_ref(),
                b"next",
                "acknowledged message not resent"
            );
            assert!(!p.dup);
        }
        other => panic!("expected the next PUBLISH, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos2_publish_then_pubrel_are_resent_on_resume() {
    let broker = TestBroker::start().await;
    let mut sub = RawClient::connect_v311(broker.addr, "resend2", false, 60).await;
    sub.expect_hex("20 02 00 00").await;
    sub.send_hex(&subscribe_hex("r/q2", 2)).await;
    sub.expect_hex("90 03 00 01 02").await;

    let mut publ = Peer::connect(broker.addr, "resend2-pub", true).await;
    publ.publish_confirmed("r/q2", QoS::ExactlyOnce, false, "twice")
        .await;

    // PUBLISH QoS 2 "r/q2" <id> "twice".
    let first = sub
        .read_exact(15, petrel_tests::PROMPT)
        .await
        .expect("PUBLISH to the subscriber");
    assert_eq!(
        to_hex(&first[..8]),
        "34 0d 00 04 72 2f 71 32",
        "QoS 2 PUBLISH, DUP 0, topic r/q2"
    );
    let id = [first[8], first[9]];
    let reconnect = |sub: RawClient| {
        let broker = &broker;
        async move {
            drop(sub);
            eventually("the broker noticed the lost subscriber", || {
                Stats::get(&broker.broker.stats.connections_current) == 1
            })
            .await;
            let mut sub = RawClient::connect_v311(broker.addr, "resend2", false, 60).await;
            sub.expect_hex("20 02 01 00").await;
            sub
        }
    };

    // Lost before PUBREC: the PUBLISH comes again with DUP 1 [MQTT-4.4.0-1] [MQTT-3.3.1-1].
    let mut sub = reconnect(sub).await;
    let mut resent = first.clone();
    resent[0] = 0x3c;
    sub.expect_hex(&to_hex(&resent)).await;

    // PUBREC → PUBREL; lost before PUBCOMP: the PUBREL comes again [MQTT-4.4.0-1].
    sub.send_bytes(&[0x50, 0x02, id[0], id[1]]).await;
    sub.expect_hex(&to_hex(&[0x62, 0x02, id[0], id[1]])).await;
    let mut sub = reconnect(sub).await;
    sub.expect_hex(&to_hex(&[0x62, 0x02, id[0], id[1]])).await;

    // PUBCOMP ends the flow; the next thing is a new message, not a repeat.
    sub.send_bytes(&[0x70, 0x02, id[0], id[1]]).await;
    publ.publish_confirmed("r/q2", QoS::AtLeastOnce, false, "next")
        .await;
    match sub.recv().await {
        petrel_codec::Packet::Publish(p) => {
            assert_eq!(
                p.payload.as_ref(),
                b"next",
                "completed QoS 2 message not resent"
            );
        }
        other => panic!("expected the next PUBLISH, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Resource accounting

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_subscription_counts_return_to_zero_after_clean_clients_leave() {
    const CLIENTS: usize = 10;
    let broker = TestBroker::start().await;
    let mut peers = Vec::new();
    for i in 0..CLIENTS {
        let mut p = Peer::connect(broker.addr, &format!("count-{i}"), true).await;
        p.subscribe(&format!("count/{i}"), QoS::AtLeastOnce).await;
        p.subscribe("count/all/#", QoS::AtMostOnce).await;
        peers.push(p);
    }
    assert_eq!(broker.broker.session_count(), CLIENTS);
    assert_eq!(broker.broker.subscription_count(), 2 * CLIENTS);

    // Half leave politely, half vanish.
    for (i, p) in peers.into_iter().enumerate() {
        if i % 2 == 0 {
            p.disconnect().await;
        } else {
            p.kill().await;
        }
    }
    eventually(
        "every clean session and its subscriptions are gone [MQTT-3.1.2-6]",
        || {
            broker.broker.session_count() == 0
                && broker.broker.subscription_count() == 0
                && Stats::get(&broker.broker.stats.connections_current) == 0
        },
    )
    .await;
}
