//! Property tests of the codec's contract, for every packet type in every protocol version:
//!
//! * encode → decode gives back an equal packet, consuming exactly `encoded_len` bytes;
//! * every strict prefix of an encoding is "need more bytes" (`Ok(None)`) and leaves the buffer
//!   as it was;
//! * a stream of several packets, arriving in arbitrary chunks, decodes to the same packets in
//!   order;
//! * no byte sequence makes `decode` panic, and whatever it accepts survives a second round
//!   trip (the same oracle as the fuzz target in `fuzz/`).
//!
//! The generators only build packets the version can carry: properties only in 5.0 and only
//! those §2.2.2.2 allows in that packet (the table is written out again below rather than
//! borrowed from the codec, so a mistake in one shows up against the other), reason codes only
//! from each packet's list, and 3.1/3.1.1 codes only where they map back to themselves.

use std::collections::HashSet;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use petrel_codec::{
    decode, encode, encoded_len, Auth, ConnAck, Connect, DecodeError, Disconnect, LastWill,
    MqttString, Packet, PacketId, PacketType, Properties, ProtocolVersion, PubAck, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, SubscriptionOptions, TopicFilter, TopicName,
    UnsubAck, Unsubscribe,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::{Union, ValueTree};
use proptest::test_runner::TestRunner;

use ProtocolVersion::{V3_1, V3_1_1, V5};

/// No limit: these tests are about framing, not the size check.
const NO_LIMIT: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------
// Strings and topics
// ---------------------------------------------------------------------------------------------

/// Text a UTF-8 string field may hold: any scalar value but U+0000 [MQTT-1.5.4-2] (a Rust
/// `char` is never a surrogate, [MQTT-1.5.4-1]). Half the time plain ASCII, which keeps
/// failures readable.
fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[a-z0-9/ ]{{0,{max}}}")).unwrap(),
        proptest::string::string_regex(&format!("[^\\x00]{{0,{max}}}")).unwrap(),
    ]
    .boxed()
}

fn string(max: usize) -> BoxedStrategy<MqttString> {
    text(max)
        .prop_map(|s| MqttString::new(&s).expect("generated text is a valid MQTT string"))
        .boxed()
}

/// One topic level: no separator, no wildcard.
fn level() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9$]{0,6}",
        proptest::string::string_regex("[^\\x00+#/]{0,6}").unwrap(),
    ]
    .boxed()
}

/// A non-empty topic name without wildcards [MQTT-3.3.2-2] [MQTT-4.7.3-1].
fn topic_name() -> BoxedStrategy<TopicName> {
    vec(level(), 1..4)
        .prop_map(|levels| {
            let mut s = levels.join("/");
            if s.is_empty() {
                s.push('t');
            }
            TopicName::new(&s).expect("generated topic name is valid")
        })
        .boxed()
}

/// A valid topic filter: wildcards on whole levels, `#` only last [MQTT-4.7.1-2]
/// [MQTT-4.7.1-3]; sometimes a shared subscription.
fn topic_filter() -> BoxedStrategy<TopicFilter> {
    let filter_level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (
        vec(filter_level, 1..4),
        any::<bool>(),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(mut levels, multi, shared)| {
            if multi {
                levels.push("#".to_string());
            }
            let mut s = levels.join("/");
            if s.is_empty() {
                s.push('#');
            }
            if shared {
                s = format!("$share/group/{s}");
            }
            TopicFilter::new(&s).expect("generated topic filter is valid")
        })
        .boxed()
}

fn bytes(max: usize) -> BoxedStrategy<Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from).boxed()
}

fn packet_id() -> BoxedStrategy<PacketId> {
    prop_oneof![
        Just(NonZeroU16::MIN),
        Just(NonZeroU16::MAX),
        (1u16..).prop_map(|v| NonZeroU16::new(v).expect("range starts at 1")),
    ]
    .boxed()
}

fn qos() -> BoxedStrategy<QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
    .boxed()
}

fn reason(codes: &'static [u8]) -> BoxedStrategy<ReasonCode> {
    select(codes).prop_map(ReasonCode).boxed()
}

// ---------------------------------------------------------------------------------------------
// Properties (v5 only)
// ---------------------------------------------------------------------------------------------

/// Where a property block sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

/// §2.2.2.2: the property identifiers each packet may carry.
fn allowed(ctx: Ctx) -> &'static [u8] {
    match ctx {
        Ctx::Connect => &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27],
        Ctx::ConnAck => &[
            0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27,
            0x28, 0x29, 0x2A,
        ],
        Ctx::Publish => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26],
        Ctx::Will => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26],
        Ctx::Ack | Ctx::SubAck | Ctx::UnsubAck => &[0x1F, 0x26],
        Ctx::Subscribe => &[0x0B, 0x26],
        Ctx::Unsubscribe => &[0x26],
        Ctx::Disconnect => &[0x11, 0x1C, 0x1F, 0x26],
        Ctx::Auth => &[0x15, 0x16, 0x1F, 0x26],
    }
}

/// A property value, by wire type.
#[derive(Clone, Debug)]
enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(MqttString),
    Bin(Bytes),
    Pair(MqttString, MqttString),
}

/// Values the decoder accepts for property `id`: flags are 0 or 1, Receive Maximum, Topic
/// Alias, Maximum Packet Size and Subscription Identifier are non-zero, a Response Topic is a
/// topic name.
fn value(id: u8) -> BoxedStrategy<Value> {
    match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
            (0u8..=1).prop_map(Value::Byte).boxed()
        }
        0x02 | 0x11 | 0x18 => any::<u32>().prop_map(Value::U32).boxed(),
        0x27 => (1u32..).prop_map(Value::U32).boxed(),
        0x13 | 0x22 => any::<u16>().prop_map(Value::U16).boxed(),
        0x21 | 0x23 => (1u16..).prop_map(Value::U16).boxed(),
        // One range per encoded length of a variable byte integer.
        0x0B => prop_oneof![
            1u32..=127,
            128u32..=16_383,
            16_384u32..=2_097_151,
            2_097_152u32..=268_435_455,
        ]
        .prop_map(Value::VarInt)
        .boxed(),
        0x08 => topic_name()
            .prop_map(|t| Value::Str(t.as_mqtt_string().clone()))
            .boxed(),
        0x09 | 0x16 => bytes(24).prop_map(Value::Bin).boxed(),
        0x26 => (string(8), string(8))
            .prop_map(|(k, v)| Value::Pair(k, v))
            .boxed(),
        _ => string(16).prop_map(Value::Str).boxed(),
    }
}

fn set(p: &mut Properties, id: u8, value: Value) {
    use Value::*;
    match (id, value) {
        (0x01, Byte(v)) => p.payload_format_indicator = Some(v),
        (0x02, U32(v)) => p.message_expiry_interval = Some(v),
        (0x03, Str(v)) => p.content_type = Some(v),
        (0x08, Str(v)) => p.response_topic = Some(v),
        (0x09, Bin(v)) => p.correlation_data = Some(v),
        (0x0B, VarInt(v)) => p.subscription_identifiers.push(v),
        (0x11, U32(v)) => p.session_expiry_interval = Some(v),
        (0x12, Str(v)) => p.assigned_client_identifier = Some(v),
        (0x13, U16(v)) => p.server_keep_alive = Some(v),
        (0x15, Str(v)) => p.authentication_method = Some(v),
        (0x16, Bin(v)) => p.authentication_data = Some(v),
        (0x17, Byte(v)) => p.request_problem_information = Some(v),
        (0x18, U32(v)) => p.will_delay_interval = Some(v),
        (0x19, Byte(v)) => p.request_response_information = Some(v),
        (0x1A, Str(v)) => p.response_information = Some(v),
        (0x1C, Str(v)) => p.server_reference = Some(v),
        (0x1F, Str(v)) => p.reason_string = Some(v),
        (0x21, U16(v)) => p.receive_maximum = Some(v),
        (0x22, U16(v)) => p.topic_alias_maximum = Some(v),
        (0x23, U16(v)) => p.topic_alias = Some(v),
        (0x24, Byte(v)) => p.maximum_qos = Some(v),
        (0x25, Byte(v)) => p.retain_available = Some(v),
        (0x26, Pair(k, v)) => p.user_properties.push((k, v)),
        (0x27, U32(v)) => p.maximum_packet_size = Some(v),
        (0x28, Byte(v)) => p.wildcard_subscription_available = Some(v),
        (0x29, Byte(v)) => p.subscription_identifier_available = Some(v),
        (0x2A, Byte(v)) => p.shared_subscription_available = Some(v),
        (id, value) => unreachable!("value {value:?} generated for property {id:#04x}"),
    }
}

/// A property block for `ctx`. A property drawn twice keeps its last value (only User Property
/// and a server's Subscription Identifiers repeat on the wire).
fn properties(ctx: Ctx) -> BoxedStrategy<Properties> {
    let items: Vec<BoxedStrategy<(u8, Value)>> = allowed(ctx)
        .iter()
        .map(|&id| value(id).prop_map(move |v| (id, v)).boxed())
        .collect();
    vec(Union::new(items), 0..6)
        .prop_map(move |items| {
            let mut p = Properties::default();
            for (id, v) in items {
                set(&mut p, id, v);
            }
            if ctx == Ctx::Subscribe {
                // A client's SUBSCRIBE carries at most one [MQTT-3.8.2.1.2].
                p.subscription_identifiers.truncate(1);
            }
            p
        })
        .boxed()
}

/// Properties in 5.0; none before, where the wire has no place for them.
fn props(v: ProtocolVersion, ctx: Ctx) -> BoxedStrategy<Properties> {
    if v.is_v5() {
        properties(ctx)
    } else {
        Just(Properties::default()).boxed()
    }
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

const V5_CONNACK: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
/// The v5 codes whose 3.1.1 return code maps back to the same v5 code.
const V3_CONNACK: &[u8] = &[0x00, 0x84, 0x85, 0x86, 0x87, 0x88];
const V5_PUBACK_PUBREC: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const V5_PUBREL_PUBCOMP: &[u8] = &[0x00, 0x92];
const V5_SUBACK: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const V3_SUBACK: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const V5_UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const V5_DISCONNECT: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH: &[u8] = &[0x00, 0x18, 0x19];
const SUCCESS_ONLY: &[u8] = &[0x00];

fn connect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let will = (
        topic_name(),
        bytes(32),
        qos(),
        any::<bool>(),
        props(v, Ctx::Will),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        props(v, Ctx::Connect),
        string(23),
        proptest::option::of(will),
        proptest::option::of(string(12)),
        proptest::option::of(bytes(16)),
    )
        .prop_map(
            move |(clean_start, keep_alive, properties, client_id, will, username, password)| {
                // Before 5.0 a password needs a user name [MQTT-3.1.2-22].
                let password = if v.is_v5() || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    properties,
                    client_id,
                    will,
                    username,
                    password,
                    // The bridge bit exists before 5.0 only.
                    bridge: !v.is_v5() && keep_alive % 2 == 1,
                }))
            },
        )
        .boxed()
}

fn connack(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let codes = if v.is_v5() { V5_CONNACK } else { V3_CONNACK };
    (any::<bool>(), reason(codes), props(v, Ctx::ConnAck))
        .prop_map(move |(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck {
                // 3.1 has no Session Present flag.
                session_present: session_present && v != V3_1,
                reason,
                properties,
            })
        })
        .boxed()
}

fn publish(v: ProtocolVersion, max_payload: usize) -> BoxedStrategy<Packet> {
    (
        (qos(), any::<bool>(), any::<bool>()),
        topic_name(),
        packet_id(),
        props(v, Ctx::Publish),
        bytes(max_payload),
        proptest::bool::weighted(0.2),
        1u16..,
    )
        .prop_map(
            move |((qos, dup, retain), topic, id, mut properties, payload, alias_only, alias)| {
                // A v5 PUBLISH may name its topic by alias alone (§3.3.2.3.4).
                let topic = if v.is_v5() && alias_only {
                    properties.topic_alias.get_or_insert(alias);
                    TopicName::default()
                } else {
                    topic
                };
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    // [MQTT-3.3.1-2]
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    // [MQTT-2.3.1-5]
                    packet_id: (!qos0).then_some(id),
                    properties,
                    payload,
                })
            },
        )
        .boxed()
}

fn ack(v: ProtocolVersion, kind: PacketType) -> BoxedStrategy<Packet> {
    let codes = match kind {
        _ if !v.is_v5() => SUCCESS_ONLY,
        PacketType::PubAck | PacketType::PubRec => V5_PUBACK_PUBREC,
        _ => V5_PUBREL_PUBCOMP,
    };
    (packet_id(), reason(codes), props(v, Ctx::Ack))
        .prop_map(move |(packet_id, reason, properties)| {
            let a = PubAck {
                packet_id,
                reason,
                properties,
            };
            match kind {
                PacketType::PubAck => Packet::PubAck(a),
                PacketType::PubRec => Packet::PubRec(a),
                PacketType::PubRel => Packet::PubRel(a),
                _ => Packet::PubComp(a),
            }
        })
        .boxed()
}

fn sub_options(v: ProtocolVersion) -> BoxedStrategy<SubscriptionOptions> {
    if !v.is_v5() {
        return qos().prop_map(SubscriptionOptions::new).boxed();
    }
    let handling = prop_oneof![
        Just(RetainHandling::OnSubscribe),
        Just(RetainHandling::OnNewSubscription),
        Just(RetainHandling::Never),
    ];
    (qos(), any::<bool>(), any::<bool>(), handling)
        .prop_map(
            |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
        )
        .boxed()
}

fn subscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (
        packet_id(),
        props(v, Ctx::Subscribe),
        vec((topic_filter(), sub_options(v)), 1..5),
    )
        .prop_map(|(packet_id, properties, mut filters)| {
            for (filter, options) in &mut filters {
                // No Local on a shared subscription is a protocol error [MQTT-3.8.3-4].
                if filter.starts_with("$share/") {
                    options.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn suback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let codes = if v.is_v5() { V5_SUBACK } else { V3_SUBACK };
    (packet_id(), props(v, Ctx::SubAck), vec(reason(codes), 1..5))
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        })
        .boxed()
}

fn unsubscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (
        packet_id(),
        props(v, Ctx::Unsubscribe),
        vec(topic_filter(), 1..5),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn unsuback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    // 3.1/3.1.1 UNSUBACK has no payload.
    let count = if v.is_v5() { 0..5 } else { 0..1 };
    (
        packet_id(),
        props(v, Ctx::UnsubAck),
        vec(reason(V5_UNSUBACK), count),
    )
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons,
            })
        })
        .boxed()
}

fn disconnect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let codes = if v.is_v5() {
        V5_DISCONNECT
    } else {
        SUCCESS_ONLY
    };
    (reason(codes), props(v, Ctx::Disconnect))
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
        .boxed()
}

fn auth() -> BoxedStrategy<Packet> {
    (reason(AUTH), properties(Ctx::Auth))
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
        .boxed()
}

/// Any packet `v` can carry, each type equally likely.
fn packet_with_payload(v: ProtocolVersion, max_payload: usize) -> BoxedStrategy<Packet> {
    let mut arms = vec![
        connect(v),
        connack(v),
        publish(v, max_payload),
        ack(v, PacketType::PubAck),
        ack(v, PacketType::PubRec),
        ack(v, PacketType::PubRel),
        ack(v, PacketType::PubComp),
        subscribe(v),
        suback(v),
        unsubscribe(v),
        unsuback(v),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v),
    ];
    if v.is_v5() {
        // AUTH exists only in 5.0.
        arms.push(auth());
    }
    Union::new(arms).boxed()
}

fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    // Up to 300 bytes so that two-byte remaining lengths are common.
    packet_with_payload(v, 300)
}

fn version() -> BoxedStrategy<ProtocolVersion> {
    prop_oneof![Just(V3_1), Just(V3_1_1), Just(V5)].boxed()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn encode_one(p: &Packet, v: ProtocolVersion) -> Result<Bytes, TestCaseError> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    Ok(buf.freeze())
}

/// The single-packet contract, in full.
fn check_roundtrip(v: ProtocolVersion, p: &Packet) -> Result<(), TestCaseError> {
    let wire = encode_one(p, v)?;
    prop_assert_eq!(
        wire.len(),
        encoded_len(p, v),
        "encoded_len disagrees with encode"
    );

    // Followed by a PINGREQ: exactly the packet's bytes are consumed.
    let mut buf = BytesMut::from(&wire[..]);
    buf.extend_from_slice(&[0xC0, 0x00]);
    let got = decode(&mut buf, v, NO_LIMIT);
    prop_assert_eq!(got, Ok(Some(p.clone())));
    prop_assert_eq!(
        &buf[..],
        &[0xC0, 0x00][..],
        "decode consumed the wrong number of bytes"
    );

    // Every strict prefix is "need more bytes" and leaves the buffer alone. Truncating one
    // buffer downwards avoids copying each prefix.
    let mut buf = BytesMut::from(&wire[..]);
    for len in (0..wire.len()).rev() {
        buf.truncate(len);
        let got = decode(&mut buf, v, NO_LIMIT);
        prop_assert_eq!(got, Ok(None), "prefix of {} of {} bytes", len, wire.len());
        prop_assert_eq!(&buf[..], &wire[..len], "Ok(None) must not consume");
    }

    // The size limit is inclusive: a packet of exactly the maximum passes, one byte less fails.
    let size = wire.len() as u32;
    let mut buf = BytesMut::from(&wire[..]);
    prop_assert_eq!(decode(&mut buf, v, size), Ok(Some(p.clone())));
    let mut buf = BytesMut::from(&wire[..]);
    prop_assert_eq!(
        decode(&mut buf, v, size - 1),
        Err(DecodeError::PacketTooLarge {
            size: wire.len(),
            max: size - 1
        })
    );
    Ok(())
}

/// Feeds `bytes` to `decode` until it stops. Must never panic; `Ok(None)` must leave the buffer
/// as it was; anything accepted must encode and decode back to itself.
fn decode_all(v: ProtocolVersion, bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.clone();
        match decode(&mut buf, v, 1 << 16) {
            Ok(Some(p)) => {
                prop_assert!(buf.len() < before.len(), "Ok(Some) consumed nothing");
                let wire = encode_one(&p, v)?;
                let mut again = BytesMut::from(&wire[..]);
                prop_assert_eq!(
                    decode(&mut again, v, NO_LIMIT),
                    Ok(Some(p)),
                    "accepted packet does not survive a second round trip"
                );
                prop_assert!(again.is_empty());
            }
            Ok(None) => {
                prop_assert_eq!(buf, before, "Ok(None) must not consume");
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
    }
}

/// Random bytes behind a plausible fixed header, so the body parsers see most of the input
/// rather than the header check refusing it.
fn framed_garbage() -> BoxedStrategy<Vec<u8>> {
    (any::<u8>(), vec(any::<u8>(), 0..64))
        .prop_map(|(first, body)| {
            let mut out = vec![first, body.len() as u8];
            out.extend_from_slice(&body);
            out
        })
        .boxed()
}

/// A valid packet with one byte overwritten: close to valid, which is where asymmetries
/// between encoder and decoder hide.
fn mutated(v: ProtocolVersion) -> BoxedStrategy<Vec<u8>> {
    (packet(v), any::<proptest::sample::Index>(), any::<u8>())
        .prop_map(move |(p, at, byte)| {
            let mut wire = BytesMut::new();
            encode(&p, v, &mut wire).expect("generated packets encode");
            let i = at.index(wire.len());
            wire[i] = byte;
            wire.to_vec()
        })
        .boxed()
}

/// How many leading bytes of a packet get every one of their bits flipped: the headers and
/// fixed fields live there; flipping payload bits finds nothing new.
const FLIP_BYTES: usize = 48;

proptest! {
    #[test]
    fn roundtrip_v3_1(p in packet(V3_1)) {
        check_roundtrip(V3_1, &p)?;
    }

    #[test]
    fn roundtrip_v3_1_1(p in packet(V3_1_1)) {
        check_roundtrip(V3_1_1, &p)?;
    }

    #[test]
    fn roundtrip_v5(p in packet(V5)) {
        check_roundtrip(V5, &p)?;
    }

    /// Several packets back to back, arriving in chunks of arbitrary size, come out whole and
    /// in order.
    #[test]
    fn stream_of_packets_decodes_in_order(
        (v, packets) in version().prop_flat_map(|v| (Just(v), vec(packet(v), 1..8))),
        chunk in 1usize..80,
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, v, &mut wire).expect("generated packets encode");
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(p) = decode(&mut buf, v, NO_LIMIT).map_err(|e| {
                TestCaseError::fail(format!("decode: {e}"))
            })? {
                got.push(p);
            }
        }
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn random_bytes_never_panic(v in version(), bytes in vec(any::<u8>(), 0..256)) {
        decode_all(v, &bytes)?;
    }

    #[test]
    fn framed_random_bytes_never_panic(v in version(), bytes in framed_garbage()) {
        decode_all(v, &bytes)?;
    }

    #[test]
    fn mutated_packets_never_panic(
        (v, bytes) in version().prop_flat_map(|v| (Just(v), mutated(v))),
    ) {
        decode_all(v, &bytes)?;
    }

    /// Every single-bit flip near the front of a valid packet, exhaustively: a flag the
    /// decoder reads but the encoder never writes shows up here, where random mutation would
    /// rarely land on it.
    #[test]
    fn bit_flipped_packets_never_panic(
        (v, p) in version().prop_flat_map(|v| (Just(v), packet(v))),
    ) {
        let wire = encode_one(&p, v)?;
        for i in 0..wire.len().min(FLIP_BYTES) {
            for bit in 0..8 {
                let mut bytes = wire.to_vec();
                bytes[i] ^= 1 << bit;
                decode_all(v, &bytes)?;
            }
        }
    }
}

proptest! {
    // Each case checks every prefix of a ~16 KiB packet: a few cases are enough.
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Payloads past 16,383 bytes need a three-byte remaining length.
    #[test]
    fn large_publish_roundtrips(
        v in version(),
        payload in vec(any::<u8>(), 16_380..16_400),
        topic in topic_name(),
    ) {
        let p = Packet::Publish(Publish::new(topic, Bytes::from(payload)));
        check_roundtrip(v, &p)?;
    }
}

/// The generators reach every packet type the version has, so the properties above really
/// cover "every packet in every version".
#[test]
fn generators_cover_every_packet_type() {
    for v in [V3_1, V3_1_1, V5] {
        let strategy = packet(v);
        let mut runner = TestRunner::deterministic();
        let mut seen = HashSet::new();
        for _ in 0..600 {
            let p = strategy
                .new_tree(&mut runner)
                .expect("strategy yields")
                .current();
            seen.insert(p.name());
        }
        let expected = if v.is_v5() { 15 } else { 14 };
        assert_eq!(seen.len(), expected, "{v}: saw only {seen:?}");
    }
}
