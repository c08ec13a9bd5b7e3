//! Protocol transcripts: send these bytes, expect those bytes (or a close). Each case names the
//! normative statement it checks; MQTT 3.1.1 unless the name says otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use petrel_codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use petrel_engine::auth::{AuthDecision, Authenticator, Credentials};
use petrel_server::{Config, Server};
use petrel_tests::{connect_v311_hex, field, frame, hex, to_hex, RawClient, TestBroker};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// How long a refused or misbehaving connection may take to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Private helpers: packets built from parts, for cases a literal would obscure.

/// A 3.1.1 CONNECT with user name and password.
fn connect_login_hex(client_id: &str, clean: bool, user: &str, password: &str) -> String {
    let mut body = hex("00 04 4d 51 54 54 04");
    body.push(0x80 | 0x40 | if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend(field(client_id.as_bytes()));
    body.extend(field(user.as_bytes()));
    body.extend(field(password.as_bytes()));
    frame(0x10, &body)
}

/// An MQTT 3.1 CONNECT (protocol name "MQIsdp", level 3), clean session, keepalive 60.
fn connect_v31_hex(client_id: &str) -> String {
    let mut body = hex("00 06 4d 51 49 73 64 70 03 02 00 3c");
    body.extend(field(client_id.as_bytes()));
    frame(0x10, &body)
}

/// A 3.1.1 PUBLISH.
fn publish_hex(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> String {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// Connects a 3.1.1 client with clean session and asserts CONNACK accepted, session absent.
async fn connected(addr: SocketAddr, client_id: &str) -> RawClient {
    let mut c = RawClient::connect(addr).await;
    c.send_hex(&connect_v311_hex(client_id, true, 60)).await;
    c.expect_hex("20 02 00 00").await;
    c
}

/// Asserts the broker closes the connection having sent nothing more.
async fn expect_closed_quietly(c: &mut RawClient, case: &str) {
    let extra = c.expect_closed_within(CLOSE_WAIT).await;
    assert!(
        extra.is_empty(),
        "{case}: broker sent {} before closing",
        to_hex(&extra)
    );
}

/// Sends PINGREQ and expects PINGRESP: everything sent before it has been processed.
async fn sync(c: &mut RawClient) {
    c.send_hex("c0 00").await;
    c.expect_hex("d0 00").await;
}

// ---------------------------------------------------------------------------------------------
// CONNACK

struct ConnackCase {
    name: &'static str,
    connect: String,
    connack: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_return_codes() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_client_id_len = 23).await;
    let cases = [
        ConnackCase {
            name: "0 accepted [MQTT-3.2.2-1]",
            connect: connect_v311_hex("ok", true, 60),
            connack: "20 02 00 00",
        },
        ConnackCase {
            name: "1 for protocol level 6 [MQTT-3.1.2-2]",
            connect: "10 0d 00 04 4d 51 54 54 06 02 00 3c 00 01 61".into(),
            connack: "20 02 00 01",
        },
        ConnackCase {
            name: "2 for an empty client id with clean session 0 [MQTT-3.1.3-8]",
            connect: connect_v311_hex("", false, 60),
            connack: "20 02 00 02",
        },
        ConnackCase {
            name: "0 for an empty client id with clean session 1 [MQTT-3.1.3-6]",
            connect: connect_v311_hex("", true, 60),
            connack: "20 02 00 00",
        },
        ConnackCase {
            name: "2 for a client id longer than max_client_id_len [MQTT-3.1.3-9]",
            connect: connect_v311_hex(&"x".repeat(24), true, 60),
            connack: "20 02 00 02",
        },
        ConnackCase {
            name: "0 for a client id of exactly max_client_id_len [MQTT-3.1.3-5]",
            connect: connect_v311_hex(&"y".repeat(23), true, 60),
            connack: "20 02 00 00",
        },
        ConnackCase {
            name: "2 for an empty client id in MQTT 3.1 (3.1 §3.1: 1-23 characters)",
            connect: connect_v31_hex(""),
            connack: "20 02 00 02",
        },
    ];
    for case in &cases {
        let mut c = RawClient::connect(broker.addr).await;
        c.send_hex(&case.connect).await;
        let got = c
            .read_exact(4, CLOSE_WAIT)
            .await
            .unwrap_or_else(|why| panic!("{}: no CONNACK ({why:?})", case.name));
        assert_eq!(to_hex(&got), to_hex(&hex(case.connack)), "{}", case.name);
        if case.connack.ends_with("00 00") {
            // Accepted: the connection stays usable.
            c.send_hex("c0 00").await;
            let pong = c.read_exact(2, CLOSE_WAIT).await;
            assert_eq!(pong, Ok(hex("d0 00")), "{}: no PINGRESP", case.name);
        } else {
            // Refused: closed right after the CONNACK [MQTT-3.2.2-5].
            expect_closed_quietly(&mut c, case.name).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_3_server_unavailable_while_shutting_down_and_session_present_0() {
    let broker = TestBroker::start().await;
    // A stored session for "p", so that Session Present 0 below is a real choice.
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_v311_hex("p", false, 60)).await;
    c.expect_hex("20 02 00 00").await;
    c.send_hex("e0 00").await;
    expect_closed_quietly(&mut c, "DISCONNECT").await;

    broker.broker.begin_shutdown();
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_v311_hex("p", false, 60)).await;
    // Return code 3, Session Present 0 [MQTT-3.2.2-4], then close [MQTT-3.2.2-5].
    c.expect_hex("20 02 00 03").await;
    expect_closed_quietly(&mut c, "server unavailable [MQTT-3.2.2-5]").await;
}

/// Refuses password "wrong" and user "banned"; everyone else is let in.
struct MyAuth;

impl Authenticator for MyAuth {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        if credentials.password == Some(&b"wrong"[..]) {
            AuthDecision::BadCredentials
        } else if credentials.username.map(|u| u.as_str()) == Some("banned") {
            AuthDecision::NotAuthorized
        } else {
            AuthDecision::Allow
        }
    }
}

async fn broker_with_auth() -> TestBroker {
    let mut config = Config::default();
    config.storage.mode = petrel_server::config::StorageMode::Memory;
    for l in &mut config.listeners {
        l.bind = "127.0.0.1:0".parse().expect("literal address");
    }
    let server = Server::bind_with(&config, Box::new(MyAuth))
        .await
        .expect("bind test broker");
    TestBroker::serve(server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_4_and_5_from_the_authenticator() {
    let broker = broker_with_auth().await;
    let cases = [
        ConnackCase {
            name: "0 for good credentials",
            connect: connect_login_hex("a1", true, "alice", "secret"),
            connack: "20 02 00 00",
        },
        ConnackCase {
            name: "4 bad user name or password [MQTT-3.2.2-5]",
            connect: connect_login_hex("a2", true, "alice", "wrong"),
            connack: "20 02 00 04",
        },
        ConnackCase {
            name: "5 not authorized [MQTT-3.2.2-5]",
            connect: connect_login_hex("a3", true, "banned", "secret"),
            connack: "20 02 00 05",
        },
    ];
    for case in &cases {
        let mut c = RawClient::connect(broker.addr).await;
        c.send_hex(&case.connect).await;
        let got = c
            .read_exact(4, CLOSE_WAIT)
            .await
            .unwrap_or_else(|why| panic!("{}: no CONNACK ({why:?})", case.name));
        assert_eq!(to_hex(&got), to_hex(&hex(case.connack)), "{}", case.name);
        if case.connack.ends_with("00 00") {
            c.send_hex("c0 00").await;
            assert_eq!(
                c.read_exact(2, CLOSE_WAIT).await,
                Ok(hex("d0 00")),
                "{}",
                case.name
            );
        } else {
            expect_closed_quietly(&mut c, case.name).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_has_session_present_0_even_with_a_stored_session() {
    let broker = broker_with_auth().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_login_hex("dev", false, "alice", "secret"))
        .await;
    c.expect_hex("20 02 00 00").await;
    c.send_hex("e0 00").await;
    expect_closed_quietly(&mut c, "DISCONNECT").await;

    // Session "dev" is stored, but a refusal says Session Present 0 [MQTT-3.2.2-4].
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_login_hex("dev", false, "alice", "wrong"))
        .await;
    c.expect_hex("20 02 00 04").await;
    expect_closed_quietly(&mut c, "refused [MQTT-3.2.2-5]").await;

    // The session really was there (and the refused attempt did not touch it) [MQTT-3.2.2-2].
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_login_hex("dev", false, "alice", "secret"))
        .await;
    c.expect_hex("20 02 01 00").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_present_flag() {
    let broker = TestBroker::start().await;
    // (clean session, expected CONNACK), in order, for the same client id.
    let steps = [
        (
            false,
            "20 02 00 00",
            "clean 0, no stored session → 0 [MQTT-3.2.2-3]",
        ),
        (
            false,
            "20 02 01 00",
            "clean 0, stored session → 1 [MQTT-3.2.2-2]",
        ),
        (
            true,
            "20 02 00 00",
            "clean 1 discards the session → 0 [MQTT-3.2.2-1]",
        ),
        (
            false,
            "20 02 00 00",
            "clean 0 after a clean 1 → 0 [MQTT-3.2.2-3]",
        ),
    ];
    for (clean, connack, name) in steps {
        let mut c = RawClient::connect(broker.addr).await;
        c.send_hex(&connect_v311_hex("sp", clean, 60)).await;
        let got = c.read_exact(4, CLOSE_WAIT).await;
        assert_eq!(got, Ok(hex(connack)), "{name}");
        c.send_hex("e0 00").await;
        expect_closed_quietly(&mut c, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_0_is_accepted() {
    // Keep Alive 0 turns the mechanism off (§3.1.2.10); it is not a reason to refuse.
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect_v311_hex("ka0", true, 0)).await;
    c.expect_hex("20 02 00 00").await;
    sync(&mut c).await;
    c.expect_silence(QUIET).await;
}

// ---------------------------------------------------------------------------------------------
// PINGREQ, PUBLISH and the QoS flows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingreq_gets_pingresp() {
    let broker = TestBroker::start().await;
    let mut c = connected(broker.addr, "ping").await;
    c.send_hex("c0 00").await; // PINGREQ
    c.expect_hex("d0 00").await; // PINGRESP [MQTT-3.12.4-1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publish_gets_puback_with_the_same_id() {
    let broker = TestBroker::start().await;
    let mut c = connected(broker.addr, "q1").await;
    c.send_hex("32 09 00 03 61 2f 62 00 05 68 69").await; // PUBLISH QoS 1 "a/b" id 5 "hi"
    c.expect_hex("40 02 00 05").await; // PUBACK 5 [MQTT-4.3.2-2]
    c.send_hex("32 09 00 03 61 2f 62 12 34 68 69").await; // id 0x1234
    c.expect_hex("40 02 12 34").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_inbound_exactly_once_mqtt_4_3_3_2() {
    let broker = TestBroker::start().await;
    let mut sub = connected(broker.addr, "q2-sub").await;
    sub.send_hex("82 08 00 01 00 03 71 2f 32 00").await; // SUBSCRIBE "q/2" QoS 0
    sub.expect_hex("90 03 00 01 00").await;
    let mut publ = connected(broker.addr, "q2-pub").await;

    publ.send_hex("34 09 00 03 71 2f 32 00 07 68 69").await; // PUBLISH QoS 2 id 7 "hi"
    publ.expect_hex("50 02 00 07").await; // PUBREC 7
    sub.expect_hex("30 07 00 03 71 2f 32 68 69").await;

    // The same PUBLISH again, DUP set, before PUBREL: PUBREC again, no second delivery.
    publ.send_hex("3c 09 00 03 71 2f 32 00 07 68 69").await;
    publ.expect_hex("50 02 00 07").await;
    sub.expect_silence(QUIET).await;

    publ.send_hex("62 02 00 07").await; // PUBREL 7
    publ.expect_hex("70 02 00 07").await; // PUBCOMP 7
    sub.expect_silence(QUIET).await;

    // After PUBCOMP id 7 names a new message, which is delivered.
    publ.send_hex("34 09 00 03 71 2f 32 00 07 68 6f").await; // "ho"
    publ.expect_hex("50 02 00 07").await;
    sub.expect_hex("30 07 00 03 71 2f 32 68 6f").await;
    publ.send_hex("62 02 00 07").await;
    publ.expect_hex("70 02 00 07").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_outbound_to_a_raw_subscriber_mqtt_4_3_3_1() {
    let broker = TestBroker::start().await;
    let mut sub = connected(broker.addr, "o2-sub").await;
    sub.send_hex("82 08 00 01 00 03 6f 2f 32 02").await; // SUBSCRIBE "o/2" QoS 2
    sub.expect_hex("90 03 00 01 02").await;
    let mut publ = connected(broker.addr, "o2-pub").await;
    publ.send_hex("34 09 00 03 6f 2f 32 00 09 68 69").await;
    publ.expect_hex("50 02 00 09").await;
    publ.send_hex("62 02 00 09").await;
    publ.expect_hex("70 02 00 09").await;

    // PUBLISH QoS 2, DUP 0, with an id of the broker's choosing.
    let got = sub.read_exact(11, CLOSE_WAIT).await.expect("PUBLISH QoS 2");
    let id = to_hex(&got[7..9]);
    assert_eq!(to_hex(&got), format!("34 09 00 03 6f 2f 32 {id} 68 69"));
    assert_ne!(id, "00 00", "packet id 0 [MQTT-2.3.1-1]");
    sub.send_hex(&format!("50 02 {id}")).await; // PUBREC
    sub.expect_hex(&format!("62 02 {id}")).await; // PUBREL
    sub.send_hex(&format!("70 02 {id}")).await; // PUBCOMP
    sub.expect_silence(QUIET).await;

    // The flow is complete: the next message flows too.
    publ.send_hex("34 09 00 03 6f 2f 32 00 0a 68 6f").await;
    publ.expect_hex("50 02 00 0a").await;
    let got = sub
        .read_exact(11, CLOSE_WAIT)
        .await
        .expect("second PUBLISH QoS 2");
    assert_eq!(to_hex(&got[..7]), "34 09 00 03 6f 2f 32");
    assert_eq!(to_hex(&got[9..]), "68 6f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_codes_in_order_and_delivery_at_min_qos() {
    let broker = TestBroker::start().await;
    let mut sub = connected(broker.addr, "g-sub").await;
    // SUBSCRIBE id 10: "g/0" QoS 0, "g/1" QoS 1, "g/2" QoS 2.
    sub.send_hex("82 14 00 0a 00 03 67 2f 30 00 00 03 67 2f 31 01 00 03 67 2f 32 02")
        .await;
    // One code per filter, in order [MQTT-3.8.4-5] [MQTT-3.9.3-1].
    sub.expect_hex("90 05 00 0a 00 01 02").await;

    let mut publ = connected(broker.addr, "g-pub").await;
    let mut id = 0u16;
    for published in 0..=2u8 {
        for subscribed in 0..=2u8 {
            id += 1;
            let topic = format!("g/{subscribed}");
            let payload = [b'0' + published, b'0' + subscribed];
            publ.send_hex(&publish_hex(&topic, published, id, &payload))
                .await;
            match published {
                1 => {
                    publ.expect_hex(&format!("40 02 {}", to_hex(&id.to_be_bytes())))
                        .await
                }
                2 => {
                    let id = to_hex(&id.to_be_bytes());
                    publ.expect_hex(&format!("50 02 {id}")).await;
                    publ.send_hex(&format!("62 02 {id}")).await;
                    publ.expect_hex(&format!("70 02 {id}")).await;
                }
                _ => {}
            }

            let case =
                format!("published QoS {published}, subscribed QoS {subscribed} [MQTT-3.8.4-6]");
            let Packet::Publish(p) = sub.recv().await else {
                panic!("{case}: expected PUBLISH");
            };
            let want = QoS::from_u8(published.min(subscribed)).expect("0..=2");
            assert_eq!(p.qos, want, "{case}");
            assert_eq!(p.topic.as_str(), topic, "{case}");
            assert_eq!(&p.payload[..], &payload[..], "{case}");
            assert!(
                !p.retain && !p.dup,
                "{case}: retain/dup set on a live delivery"
            );
            let pid = p.packet_id.map(|i| to_hex(&i.get().to_be_bytes()));
            match (want, pid) {
                (QoS::AtMostOnce, None) => {}
                (QoS::AtLeastOnce, Some(pid)) => sub.send_hex(&format!("40 02 {pid}")).await,
                (QoS::ExactlyOnce, Some(pid)) => {
                    sub.send_hex(&format!("50 02 {pid}")).await;
                    sub.expect_hex(&format!("62 02 {pid}")).await;
                    sub.send_hex(&format!("70 02 {pid}")).await;
                }
                (qos, pid) => panic!("{case}: QoS {qos:?} with packet id {pid:?}"),
            }
        }
    }
    sub.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_on_subscribe_has_retain_set_live_has_it_clear() {
    let broker = TestBroker::start().await;
    let mut publ = connected(broker.addr, "r-pub").await;
    publ.send_hex("31 06 00 03 72 2f 31 78").await; // PUBLISH QoS 0 RETAIN "r/1" "x"
    sync(&mut publ).await;

    let mut sub = connected(broker.addr, "r-sub").await;
    sub.send_hex("82 08 00 01 00 03 72 2f 2b 00").await; // SUBSCRIBE "r/+" QoS 0
    sub.expect_hex("90 03 00 01 00").await;
    sub.expect_hex("31 06 00 03 72 2f 31 78").await; // RETAIN 1 [MQTT-3.3.1-6] [MQTT-3.3.1-8]

    publ.send_hex("31 06 00 03 72 2f 31 79").await; // RETAIN "y", live
    sub.expect_hex("30 06 00 03 72 2f 31 79").await; // RETAIN 0 [MQTT-3.3.1-9]
    publ.send_hex("30 06 00 03 72 2f 31 7a").await; // not retained
    sub.expect_hex("30 06 00 03 72 2f 31 7a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_gets_unsuback_and_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut sub = connected(broker.addr, "u-sub").await;
    sub.send_hex("82 08 00 01 00 03 61 2f 62 00").await; // SUBSCRIBE "a/b" QoS 0
    sub.expect_hex("90 03 00 01 00").await;
    sub.send_hex("a2 07 00 05 00 03 61 2f 62").await; // UNSUBSCRIBE id 5 "a/b"
    sub.expect_hex("b0 02 00 05").await; // UNSUBACK 5 [MQTT-3.10.4-4]

    let mut publ = connected(broker.addr, "u-pub").await;
    publ.send_hex("30 07 00 03 61 2f 62 68 69").await;
    sync(&mut publ).await;
    sub.expect_silence(QUIET).await; // the subscription is gone [MQTT-3.10.4-1]

    // Even when nothing was subscribed [MQTT-3.10.4-5].
    sub.send_hex("a2 07 00 06 00 03 7a 2f 7a").await; // UNSUBSCRIBE id 6 "z/z"
    sub.expect_hex("b0 02 00 06").await;
}

// ---------------------------------------------------------------------------------------------
// DISCONNECT and the will

/// CONNECT "w", clean, keepalive 60, will QoS 0 on "will/t" with payload "bye".
const CONNECT_WITH_WILL: &str =
    "10 1a 00 04 4d 51 54 54 04 06 00 3c 00 01 77 00 06 77 69 6c 6c 2f 74 00 03 62 79 65";
/// The will as a QoS 0 subscriber receives it.
const WILL_DELIVERED: &str = "30 0b 00 06 77 69 6c 6c 2f 74 62 79 65";

async fn will_watcher(addr: SocketAddr) -> RawClient {
    let mut w = connected(addr, "watcher").await;
    w.send_hex("82 0b 00 01 00 06 77 69 6c 6c 2f 23 00").await; // SUBSCRIBE "will/#" QoS 0
    w.expect_hex("90 03 00 01 00").await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_and_discards_the_will_mqtt_3_14_4_3() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(CONNECT_WITH_WILL).await;
    c.expect_hex("20 02 00 00").await;
    c.send_hex("e0 00").await; // DISCONNECT
    expect_closed_quietly(&mut c, "DISCONNECT").await;
    watcher.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_publishes_the_will_mqtt_3_1_2_8() {
    // The control for the case above: the same will is published when the client just goes.
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(CONNECT_WITH_WILL).await;
    c.expect_hex("20 02 00 00").await;
    drop(c);
    watcher.expect_hex(WILL_DELIVERED).await;
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_connect_and_pub_sub() {
    let broker = TestBroker::start().await;
    let mut sub = RawClient::connect(broker.addr).await;
    sub.version = ProtocolVersion::V3_1;
    sub.send_hex(&connect_v31_hex("c31")).await;
    sub.expect_hex("20 02 00 00").await;
    sub.send_hex("82 09 00 01 00 04 76 2f 33 31 01").await; // SUBSCRIBE "v/31" QoS 1
    sub.expect_hex("90 03 00 01 01").await;

    let mut publ = RawClient::connect(broker.addr).await;
    publ.version = ProtocolVersion::V3_1;
    publ.send_hex(&connect_v31_hex("c32")).await;
    publ.expect_hex("20 02 00 00").await;

    publ.send_hex("30 08 00 04 76 2f 33 31 68 69").await; // QoS 0 "hi"
    sub.expect_hex("30 08 00 04 76 2f 33 31 68 69").await;

    publ.send_hex("32 0a 00 04 76 2f 33 31 00 02 68 6f").await; // QoS 1 id 2 "ho"
    publ.expect_hex("40 02 00 02").await;
    let got = sub.read_exact(12, CLOSE_WAIT).await.expect("PUBLISH QoS 1");
    let id = to_hex(&got[8..10]);
    assert_eq!(to_hex(&got), format!("32 0a 00 04 76 2f 33 31 {id} 68 6f"));
    sub.send_hex(&format!("40 02 {id}")).await;
    sync(&mut sub).await;
}

// ---------------------------------------------------------------------------------------------
// MQTT 5.0

async fn connect_v5(addr: SocketAddr, connect: &str) -> (RawClient, petrel_codec::ConnAck) {
    let mut c = RawClient::connect(addr).await;
    c.version = ProtocolVersion::V5;
    c.send_hex(connect).await;
    match c.recv().await {
        Packet::ConnAck(ack) => (c, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// v5 CONNECT, clean start, keepalive 60, no properties, client id "v".
const CONNECT_V5: &str = "10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 76";
/// The same with an empty client id.
const CONNECT_V5_EMPTY_ID: &str = "10 0d 00 04 4d 51 54 54 05 02 00 3c 00 00 00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_reason_and_assigned_client_identifier() {
    let broker = TestBroker::start().await;

    let (_c, ack) = connect_v5(broker.addr, CONNECT_V5).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
    assert_eq!(
        ack.properties.assigned_client_identifier, None,
        "client chose its id"
    );

    let (_c, ack) = connect_v5(broker.addr, CONNECT_V5_EMPTY_ID).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    // [MQTT-3.1.3-7] [MQTT-3.2.2-16]
    let assigned = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("Assigned Client Identifier for an empty client id [MQTT-3.2.2-16]");
    assert!(!assigned.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_malformed_packet_gets_disconnect_then_close_mqtt_4_13_1_1() {
    let broker = TestBroker::start().await;
    let cases = [
        ("PINGREQ with a body (§3.12: no payload)", "c0 01 00"),
        (
            "SUBSCRIBE with packet id 0 [MQTT-2.2.1-3]",
            "82 09 00 00 00 00 03 61 2f 62 00",
        ),
        (
            "PUBLISH topic not UTF-8 [MQTT-1.5.4-1]",
            "30 07 00 02 61 ff 00 68 69",
        ),
        (
            "PUBLISH QoS 0 with DUP [MQTT-3.3.1-2]",
            "38 07 00 03 61 2f 62 00 78",
        ),
    ];
    for (name, bytes) in cases {
        let (mut c, ack) = connect_v5(broker.addr, CONNECT_V5).await;
        assert_eq!(ack.reason, ReasonCode::SUCCESS, "{name}");
        c.send_hex(bytes).await;
        match c.recv_within(CLOSE_WAIT).await {
            Ok(Packet::Disconnect(d)) => assert!(
                d.reason == ReasonCode::MALFORMED_PACKET || d.reason == ReasonCode::PROTOCOL_ERROR,
                "{name}: DISCONNECT reason {:?}, expected 0x81 or 0x82",
                d.reason
            ),
            other => panic!("{name}: expected DISCONNECT, got {other:?}"),
        }
        expect_closed_quietly(&mut c, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_topic_alias_with_maximum_0_gets_disconnect_0x94_mqtt_3_3_2_9() {
    let broker = TestBroker::start_with(|c| c.mqtt.topic_alias_maximum = 0).await;
    let (mut c, ack) = connect_v5(broker.addr, CONNECT_V5).await;
    // Absent Topic Alias Maximum means 0: the client may send no alias.
    assert_eq!(ack.properties.topic_alias_maximum.unwrap_or(0), 0);
    c.send_hex("30 08 00 01 74 03 23 00 01 78").await; // PUBLISH "t", Topic Alias 1, "x"
    match c.recv_within(CLOSE_WAIT).await {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::TOPIC_ALIAS_INVALID),
        other => panic!("expected DISCONNECT 0x94, got {other:?}"),
    }
    expect_closed_quietly(&mut c, "topic alias").await;
}
