//! MQTT 5.0 features as byte transcripts over real sockets: what the broker advertises in
//! CONNACK, the properties it writes per delivery (topic alias, subscription identifier,
//! message expiry left), the reason codes it answers with, and the timers that run while no
//! client is active (session expiry, will delay). Each case names the statement it checks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use petrel_codec::{Packet, ProtocolVersion, ReasonCode};
use petrel_tests::{connect_v311_hex, field, frame, hex, RawClient, TestBroker};

const CLOSE_WAIT: Duration = Duration::from_secs(2);
const QUIET: Duration = Duration::from_millis(300);

/// A property block: its length (one byte: every block here is short) and the properties.
fn block(props: &str) -> Vec<u8> {
    let props = hex(props);
    assert!(props.len() < 128);
    let mut out = vec![props.len() as u8];
    out.extend(props);
    out
}

/// A v5 CONNECT, keepalive 60, with CONNECT properties and optionally a will
/// (topic, payload, will properties) at QoS 0.
fn connect5(client_id: &str, clean: bool, props: &str, will: Option<(&str, &str, &str)>) -> String {
    let mut flags = if clean { 0x02 } else { 0x00 };
    if will.is_some() {
        flags |= 0x04;
    }
    let mut body = hex("00 04 4d 51 54 54 05");
    body.push(flags);
    body.extend(hex("00 3c"));
    body.extend(block(props));
    body.extend(field(client_id.as_bytes()));
    if let Some((topic, payload, will_props)) = will {
        body.extend(block(will_props));
        body.extend(field(topic.as_bytes()));
        body.extend(field(payload.as_bytes()));
    }
    frame(0x10, &body)
}

/// A v5 PUBLISH.
fn publish5(topic: &str, qos: u8, packet_id: u16, props: &str, payload: &[u8]) -> String {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend(block(props));
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// A v5 SUBSCRIBE for one filter with the given options byte.
fn subscribe5(packet_id: u16, props: &str, filter: &str, options: u8) -> String {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend(block(props));
    body.extend(field(filter.as_bytes()));
    body.push(options);
    frame(0x82, &body)
}

async fn v5_client(addr: SocketAddr, connect: &str) -> RawClient {
    let mut c = RawClient::connect(addr).await;
    c.version = ProtocolVersion::V5;
    c.send_hex(connect).await;
    match c.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.reason, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

/// Subscribes and checks the SUBACK grants `options & 3`.
async fn subscribed(c: &mut RawClient, packet_id: u16, props: &str, filter: &str, options: u8) {
    c.send_hex(&subscribe5(packet_id, props, filter, options))
        .await;
    let id = packet_id.to_be_bytes();
    c.expect_hex(&format!(
        "90 04 {:02x} {:02x} 00 {:02x}",
        id[0],
        id[1],
        options & 3
    ))
    .await;
}

async fn v311_publisher(addr: SocketAddr) -> RawClient {
    let mut p = RawClient::connect(addr).await;
    p.send_hex(&connect_v311_hex("pub", true, 60)).await;
    p.expect_hex("20 02 00 00").await;
    p
}

async fn expect_disconnect(c: &mut RawClient, code: ReasonCode, case: &str) {
    match c.recv_within(CLOSE_WAIT).await {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.reason, code, "{case}"),
        other => panic!("{case}: expected DISCONNECT {code:?}, got {other:?}"),
    }
    c.expect_closed_within(CLOSE_WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_advertises_receive_maximum_topic_aliases_and_packet_size_mqtt_3_2_2_3() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_hex(&connect5("c", true, "", None)).await;
    // Receive Maximum 1024, Topic Alias Maximum 64, Maximum Packet Size 1 MiB; everything
    // else is at its default (available, QoS 2) and so not sent.
    c.expect_hex("20 0e 00 00 0b 21 04 00 22 00 40 27 00 10 00 00")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_topic_alias_is_set_once_then_used_alone_mqtt_3_3_2_12() {
    let broker = TestBroker::start().await;
    // Topic Alias Maximum 5 from the client: the broker may use aliases 1-5 towards it.
    let mut s = v5_client(broker.addr, &connect5("s", true, "22 00 05", None)).await;
    subscribed(&mut s, 1, "", "a/b", 0).await;
    let mut p = v311_publisher(broker.addr).await;
    for _ in 0..2 {
        p.send_hex("30 06 00 03 61 2f 62 78").await; // PUBLISH "a/b" "x"
    }
    // First: topic and Topic Alias 1. Then: empty topic, alias 1.
    s.expect_hex("30 0a 00 03 61 2f 62 03 23 00 01 78").await;
    s.expect_hex("30 07 00 00 03 23 00 01 78").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_topic_alias_then_alias_only_publish_mqtt_3_3_2_12() {
    let broker = TestBroker::start().await;
    let mut s = RawClient::connect(broker.addr).await;
    s.send_hex(&connect_v311_hex("s", true, 60)).await;
    s.expect_hex("20 02 00 00").await;
    s.send_hex("82 08 00 01 00 03 61 2f 62 00").await;
    s.expect_hex("90 03 00 01 00").await;

    let mut p = v5_client(broker.addr, &connect5("p", true, "", None)).await;
    p.send_hex(&publish5("a/b", 0, 0, "23 00 07", b"1")).await;
    p.send_hex(&publish5("", 0, 0, "23 00 07", b"2")).await;
    s.expect_hex("30 06 00 03 61 2f 62 31").await;
    s.expect_hex("30 06 00 03 61 2f 62 32").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifier_is_delivered_with_the_message_mqtt_3_3_4_3() {
    let broker = TestBroker::start().await;
    let mut s = v5_client(broker.addr, &connect5("s", true, "", None)).await;
    subscribed(&mut s, 1, "0b 05", "id/+", 0).await;
    let mut p = v311_publisher(broker.addr).await;
    p.send_hex("30 07 00 04 69 64 2f 31 78").await; // PUBLISH "id/1" "x"
    s.expect_hex("30 0a 00 04 69 64 2f 31 02 0b 05 78").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_interval_is_forwarded_mqtt_3_3_2_6() {
    let broker = TestBroker::start().await;
    let mut s = v5_client(broker.addr, &connect5("s", true, "", None)).await;
    subscribed(&mut s, 1, "", "e", 0).await;
    let mut p = v5_client(broker.addr, &connect5("p", true, "", None)).await;
    p.send_hex(&publish5("e", 0, 0, "02 00 00 00 3c", b"x"))
        .await;
    // Delivered at once: the whole 60 s are left.
    s.expect_hex("30 0a 00 01 65 05 02 00 00 00 3c 78").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expires_on_time_while_the_broker_is_idle_mqtt_3_1_2_23() {
    let broker = TestBroker::start().await;
    // Session Expiry Interval 1 s.
    let mut c = v5_client(broker.addr, &connect5("e", true, "11 00 00 00 01", None)).await;
    subscribed(&mut c, 1, "", "x", 1).await;
    drop(c);
    let closed = Instant::now();
    // Kept while the interval runs...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.broker.session_count(), 1);
    // ...and gone once it passed, with no client doing anything meanwhile.
    while broker.broker.session_count() > 0 {
        assert!(
            closed.elapsed() < Duration::from_secs(3),
            "session not removed after its expiry interval"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = closed.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "removed early: {took:?}"
    );
    assert_eq!(broker.broker.subscription_count(), 0);

    let mut again = RawClient::connect(broker.addr).await;
    again.send_hex(&connect5("e", false, "", None)).await;
    again.expect_hex("20 0e 00 00").await; // session present 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_sent_after_its_delay_mqtt_3_1_3_9() {
    let broker = TestBroker::start().await;
    let mut w = v5_client(broker.addr, &connect5("w", true, "", None)).await;
    subscribed(&mut w, 1, "", "will", 0).await;
    // Session Expiry 60 s, will "will" / "bye" with Will Delay Interval 1 s.
    let c = v5_client(
        broker.addr,
        &connect5(
            "c",
            true,
            "11 00 00 00 3c",
            Some(("will", "bye", "18 00 00 00 01")),
        ),
    )
    .await;
    drop(c);
    let lost = Instant::now();
    w.expect_silence(Duration::from_millis(600)).await;
    match w.recv_within(Duration::from_secs(3)).await {
        Ok(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"bye");
            assert_eq!(p.properties.will_delay_interval, None);
        }
        other => panic!("expected the will, got {other:?}"),
    }
    let took = lost.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "will after {took:?}, delay was 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_exceeded_gets_disconnect_0x93_mqtt_3_3_4_8() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 1).await;
    let mut p = RawClient::connect(broker.addr).await;
    p.version = ProtocolVersion::V5;
    p.send_hex(&connect5("p", true, "", None)).await;
    match p.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.properties.receive_maximum, Some(1)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    p.send_hex(&publish5("q", 2, 1, "", b"x")).await;
    p.expect_hex("50 03 00 01 10").await; // PUBREC, no matching subscribers
    p.send_hex(&publish5("q", 2, 2, "", b"y")).await;
    expect_disconnect(&mut p, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "second QoS 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_marked_utf8_that_is_not_gets_puback_0x99_mqtt_3_3_2_4() {
    let broker = TestBroker::start().await;
    let mut p = v5_client(broker.addr, &connect5("p", true, "", None)).await;
    p.send_hex(&publish5("f", 1, 9, "01 01", &[0xff])).await;
    // PUBACK 0x99 with a Reason String (0x1F): Request Problem Information defaults to 1.
    let text = b"payload marked UTF-8 is not valid UTF-8";
    let mut props = vec![0x1f];
    props.extend(field(text));
    let mut body = hex("00 09 99");
    body.push(props.len() as u8);
    body.extend(props);
    p.expect_hex(&frame(0x40, &body)).await;

    // With Request Problem Information 0 the reason string is left out [MQTT-3.1.2-29].
    let mut q = v5_client(broker.addr, &connect5("q", true, "17 00", None)).await;
    q.send_hex(&publish5("f", 1, 9, "01 01", &[0xff])).await;
    q.expect_hex("40 03 00 09 99").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packet_gets_disconnect_0x95() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 64).await;
    let mut p = v5_client(broker.addr, &connect5("p", true, "", None)).await;
    p.send_hex(&publish5("big", 0, 0, "", &[b'x'; 100])).await;
    expect_disconnect(&mut p, ReasonCode::PACKET_TOO_LARGE, "100-byte payload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_messages_between_members_also_for_v311_clients() {
    let broker = TestBroker::start().await;
    let mut members = Vec::new();
    for id in ["m1", "m2"] {
        let mut m = RawClient::connect(broker.addr).await;
        m.send_hex(&connect_v311_hex(id, true, 60)).await;
        m.expect_hex("20 02 00 00").await;
        // SUBSCRIBE "$share/g/s" QoS 0
        let mut body = hex("00 01");
        body.extend(field(b"$share/g/s"));
        body.push(0);
        m.send_hex(&frame(0x82, &body)).await;
        m.expect_hex("90 03 00 01 00").await;
        members.push(m);
    }
    let mut p = v311_publisher(broker.addr).await;
    for _ in 0..4 {
        p.send_hex("30 04 00 01 73 78").await; // PUBLISH "s" "x"
    }
    for m in &mut members {
        m.expect_hex("30 04 00 01 73 78").await;
        m.expect_hex("30 04 00 01 73 78").await;
        m.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_keeps_a_clients_own_messages_from_it_mqtt_3_8_3_3() {
    let broker = TestBroker::start().await;
    let mut c = v5_client(broker.addr, &connect5("c", true, "", None)).await;
    subscribed(&mut c, 1, "", "n", 0x04).await; // No Local, QoS 0
    c.send_hex(&publish5("n", 0, 0, "", b"mine")).await;
    c.expect_silence(QUIET).await;
    let mut p = v311_publisher(broker.addr).await;
    p.send_hex("30 04 00 01 6e 78").await;
    c.expect_hex("30 05 00 01 6e 00 78").await;
}

/// An AUTH packet with method SCRAM-SHA-256 and `data`.
fn auth_hex(reason: u8, data: &str) -> String {
    let mut props = vec![0x15];
    props.extend(field(b"SCRAM-SHA-256"));
    props.push(0x16);
    props.extend(field(data.as_bytes()));
    let mut body = vec![reason, props.len() as u8];
    body.extend(props);
    frame(0xf0, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha256_enhanced_authentication_over_a_socket_mqtt_4_12() {
    use petrel_engine::scram::client;
    let broker = TestBroker::start_toml(
        "[auth]\nallow_anonymous = false\n[[auth.users]]\nname = \"alice\"\npassword = \"wonderland\"\n",
    )
    .await;
    let mut c = RawClient::connect(broker.addr).await;
    c.version = ProtocolVersion::V5;
    // CONNECT with Authentication Method (0x15) and the client-first message (0x16).
    let first = client::first("alice", "rOprNGfwEbeRWgbNEkqO");
    let mut props = vec![0x15];
    props.extend(field(b"SCRAM-SHA-256"));
    props.push(0x16);
    props.extend(field(first.as_bytes()));
    let mut body = hex("00 04 4d 51 54 54 05 02 00 3c");
    body.push(props.len() as u8);
    body.extend(props);
    body.extend(field(b"scram-client"));
    c.send_hex(&frame(0x10, &body)).await;

    // AUTH 0x18 with the server-first message.
    let server_first = match c.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason, ReasonCode::CONTINUE_AUTHENTICATION);
            assert_eq!(
                a.properties.authentication_method.as_deref(),
                Some("SCRAM-SHA-256")
            );
            String::from_utf8(a.properties.authentication_data.clone().unwrap().to_vec()).unwrap()
        }
        other => panic!("expected AUTH, got {other:?}"),
    };
    assert!(server_first.starts_with("r=rOprNGfwEbeRWgbNEkqO"));
    let (last, server_signature) =
        client::last("alice", "rOprNGfwEbeRWgbNEkqO", "wonderland", &server_first);
    c.send_hex(&auth_hex(0x18, &last)).await;

    // CONNACK success, carrying the server's signature: the client can check the server too.
    match c.recv().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.reason, ReasonCode::SUCCESS);
            let data = ack.properties.authentication_data.clone().unwrap();
            assert_eq!(std::str::from_utf8(&data).unwrap(), server_signature);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.send_hex("c0 00").await;
    c.expect_hex("d0 00").await;

    // Anonymous clients are refused here (allow_anonymous = false): 0x87.
    let mut anon = RawClient::connect(broker.addr).await;
    anon.version = ProtocolVersion::V5;
    anon.send_hex(&connect5("anon", true, "", None)).await;
    match anon.recv().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED);
            assert_eq!(
                ack.properties.reason_string.as_deref(),
                Some("not authorized")
            );
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    anon.expect_closed_within(CLOSE_WAIT).await;
}
