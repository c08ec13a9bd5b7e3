//! Bad input: each case sends bytes that break a rule, expects the connection closed (after
//! exactly the bytes named, usually none), the `protocol_errors` counter up by one, and the
//! clients that were already connected unaffected.
//!
//! All cases run against one broker, one after another, with the same two bystanders, so
//! damage from one case that only shows later is caught too. Every case runs in its own task
//! and failures are collected, so one run reports every broken case, not just the first.

use std::net::SocketAddr;
use std::time::Duration;

use petrel_codec::ProtocolVersion;
use petrel_engine::stats::Stats;
use petrel_tests::{connect_v311_hex, hex, to_hex, RawClient, TestBroker};

/// How long a misbehaving connection may take to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The broker's `mqtt.max_packet_size` in these tests.
const MAX_PACKET_SIZE: u32 = 1024;

/// What happens on the connection before the bad bytes.
#[derive(Clone, Copy, Debug)]
enum Before {
    /// The bad bytes are the first thing on the wire.
    Nothing,
    /// A 3.1.1 CONNECT, accepted.
    ConnectedV311,
    /// A 5.0 CONNECT, accepted.
    ConnectedV5,
}

struct Case {
    name: &'static str,
    before: Before,
    send: String,
    /// What the broker sends before closing, as hex; "" for nothing.
    answer: &'static str,
}

fn case(name: &'static str, before: Before, send: &str, answer: &'static str) -> Case {
    Case {
        name,
        before,
        send: send.to_string(),
        answer,
    }
}

fn cases() -> Vec<Case> {
    use Before::*;
    vec![
        case(
            "remaining length of 5 bytes [MQTT-1.5.5-1]",
            ConnectedV311,
            "30 ff ff ff ff 7f",
            "",
        ),
        case(
            "PINGREQ before CONNECT [MQTT-3.1.0-1]",
            Nothing,
            "c0 00",
            "",
        ),
        case(
            "PUBLISH before CONNECT [MQTT-3.1.0-1]",
            Nothing,
            "30 07 00 03 61 2f 62 68 69",
            "",
        ),
        case(
            "second CONNECT [MQTT-3.1.0-2]",
            ConnectedV311,
            &connect_v311_hex("again", true, 60),
            "",
        ),
        case(
            "PUBLISH to a/+ [MQTT-3.3.2-2]",
            ConnectedV311,
            "30 07 00 03 61 2f 2b 68 69",
            "",
        ),
        case(
            "PUBLISH to a/# [MQTT-3.3.2-2]",
            ConnectedV311,
            "30 07 00 03 61 2f 23 68 69",
            "",
        ),
        // Only the fixed header: the refusal must not wait for the 2000 declared bytes.
        case(
            "PUBLISH header declaring 2000 bytes over max_packet_size 1024",
            ConnectedV311,
            "30 d0 0f",
            "",
        ),
        case(
            "v5 PUBLISH header declaring 2000 bytes over max_packet_size 1024 → DISCONNECT 0x95",
            ConnectedV5,
            "30 d0 0f",
            "e0 01 95",
        ),
        case(
            "SUBSCRIBE with fixed header flags 0000 [MQTT-3.8.1-1]",
            ConnectedV311,
            "80 08 00 01 00 03 61 2f 62 00",
            "",
        ),
        case(
            "PUBLISH with QoS 3 [MQTT-3.3.1-4]",
            ConnectedV311,
            "36 09 00 03 61 2f 62 00 01 68 69",
            "",
        ),
        case(
            "PUBLISH topic with invalid UTF-8 (0xff) [MQTT-1.5.4-1]",
            ConnectedV311,
            "30 06 00 02 61 ff 68 69",
            "",
        ),
        case(
            "PUBLISH topic with an encoded surrogate U+D800 [MQTT-1.5.4-1]",
            ConnectedV311,
            "30 07 00 03 ed a0 80 68 69",
            "",
        ),
        case(
            "PUBLISH topic with U+0000 [MQTT-1.5.4-2]",
            ConnectedV311,
            "30 06 00 02 61 00 68 69",
            "",
        ),
        case(
            "SUBSCRIBE with packet id 0 [MQTT-2.3.1-1]",
            ConnectedV311,
            "82 08 00 00 00 03 61 2f 62 00",
            "",
        ),
        case(
            "SUBSCRIBE with no topic filters [MQTT-3.8.3-3]",
            ConnectedV311,
            "82 02 00 01",
            "",
        ),
        case(
            "SUBSCRIBE to a/#/b [MQTT-4.7.1-2]",
            ConnectedV311,
            "82 0a 00 01 00 05 61 2f 23 2f 62 00",
            "",
        ),
        case(
            "CONNECT with the reserved flag set [MQTT-3.1.2-3]",
            Nothing,
            "10 0d 00 04 4d 51 54 54 04 03 00 3c 00 01 61",
            "",
        ),
        case(
            "reserved packet type 0 (§2.2.1) [MQTT-4.8.0-1]",
            ConnectedV311,
            "00 00",
            "",
        ),
        case(
            "CONNACK sent by a client (§2.2.1: server to client only) [MQTT-4.8.0-1]",
            ConnectedV311,
            "20 02 00 00",
            "",
        ),
        case(
            "garbage \"GET / HTTP/1.1\" instead of CONNECT [MQTT-3.1.0-1]",
            Nothing,
            &to_hex(b"GET / HTTP/1.1\r\nHost: petrel\r\n\r\n"),
            "",
        ),
    ]
}

/// Connects the offending client, sends the case's bytes and checks what comes back. Panics
/// (caught by the caller) on any difference.
async fn run_case(addr: SocketAddr, index: usize, before: Before, send: String, answer: String) {
    let mut c = RawClient::connect(addr).await;
    let client_id = format!("victim-{index}");
    match before {
        Before::Nothing => {}
        Before::ConnectedV311 => {
            c.send_hex(&connect_v311_hex(&client_id, true, 60)).await;
            c.expect_hex("20 02 00 00").await;
        }
        Before::ConnectedV5 => {
            c.version = ProtocolVersion::V5;
            let mut body = hex("00 04 4d 51 54 54 05 02 00 3c 00");
            body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
            body.extend_from_slice(client_id.as_bytes());
            let mut connect = vec![0x10, body.len() as u8];
            connect.extend(body);
            c.send_bytes(&connect).await;
            match c.recv().await {
                petrel_codec::Packet::ConnAck(ack) => {
                    assert_eq!(ack.reason, petrel_codec::ReasonCode::SUCCESS, "v5 CONNACK")
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }
    }
    c.send_hex(&send).await;
    let got = c.expect_closed_within(CLOSE_WAIT).await;
    let want = hex(&answer);
    if let [0xe0, 0x01, code] = want[..] {
        // A v5 DISCONNECT: the reason code, then (optionally) a reason string naming the
        // rule; nothing after it.
        let mut buf = bytes::BytesMut::from(&got[..]);
        match petrel_codec::decode(&mut buf, petrel_codec::ProtocolVersion::V5, u32::MAX) {
            Ok(Some(petrel_codec::Packet::Disconnect(d))) => {
                assert_eq!(
                    d.reason.0,
                    code,
                    "DISCONNECT reason code ({})",
                    to_hex(&got)
                );
                assert!(
                    buf.is_empty(),
                    "bytes after the DISCONNECT: {}",
                    to_hex(&got)
                );
            }
            other => panic!(
                "expected DISCONNECT {code:#04x}, got {other:?} ({})",
                to_hex(&got)
            ),
        }
        return;
    }
    assert_eq!(
        to_hex(&got),
        to_hex(&want),
        "bytes the broker sent before closing"
    );
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_the_connection_and_spares_other_clients() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = MAX_PACKET_SIZE).await;

    // The bystanders: connected before any bad input, and checked after every case.
    let mut sub = RawClient::connect(broker.addr).await;
    sub.send_hex(&connect_v311_hex("bystander-sub", true, 60))
        .await;
    sub.expect_hex("20 02 00 00").await;
    sub.send_hex("82 09 00 01 00 04 6f 6b 2f 23 00").await; // SUBSCRIBE "ok/#" QoS 0
    sub.expect_hex("90 03 00 01 00").await;
    let mut publ = RawClient::connect(broker.addr).await;
    publ.send_hex(&connect_v311_hex("bystander-pub", true, 60))
        .await;
    publ.expect_hex("20 02 00 00").await;

    let stats = &broker.broker.stats;
    let mut failures = Vec::new();
    for (index, case) in cases().into_iter().enumerate() {
        let errors_before = Stats::get(&stats.protocol_errors);
        let outcome = tokio::spawn(run_case(
            broker.addr,
            index,
            case.before,
            case.send.clone(),
            case.answer.to_string(),
        ))
        .await;
        if let Err(e) = outcome {
            failures.push(format!("{}: {}", case.name, panic_message(e)));
        }

        let errors = Stats::get(&stats.protocol_errors) - errors_before;
        if errors != 1 {
            failures.push(format!(
                "{}: stats.protocol_errors rose by {errors}, expected 1",
                case.name
            ));
        }

        // Other clients unaffected: a PUBLISH on "ok/t" still reaches the subscriber.
        let publish = format!("30 07 00 04 6f 6b 2f 74 {index:02x}");
        publ.send_hex(&publish).await;
        match sub.read_exact(9, CLOSE_WAIT).await {
            Ok(got) => assert_eq!(
                to_hex(&got),
                to_hex(&hex(&publish)),
                "after {}: bystander got the wrong bytes",
                case.name
            ),
            Err(why) => panic!(
                "after {}: bystander round trip failed ({why:?}); failures so far: {failures:#?}",
                case.name
            ),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
