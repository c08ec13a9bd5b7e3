//! Byte-level transcripts: "these bytes on a connection of this version decode to that".
//!
//! One row per rule, named by the normative statement it checks (or by its section where the
//! specification gives the rule no number), so a failure points at the spec. The byte strings
//! double as seeds for the fuzz target in `fuzz/`.

use bytes::BytesMut;
use petrel_codec::{
    decode, encode, DecodeError, Packet, PacketType, ProtocolVersion, QoS, ReasonCode,
};

use ProtocolVersion::{V3_1, V3_1_1, V5};

/// Large enough that no case below hits it by accident.
const LIMIT: u32 = 1 << 20;

/// What a transcript expects: `Ok(None)` is "need more bytes" with nothing consumed,
/// `Ok(Some(t))` a packet of type `t` that consumed the whole buffer, `Err(e)` that error.
type Want = Result<Option<PacketType>, DecodeError>;

/// "30 05 00 03" → bytes. Whitespace is ignored.
fn hex(s: &str) -> BytesMut {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits in {s:?}");
    let bytes: Vec<u8> = digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ascii");
            u8::from_str_radix(text, 16)
                .unwrap_or_else(|_| panic!("bad hex byte {text:?} in {s:?}"))
        })
        .collect();
    BytesMut::from(&bytes[..])
}

fn run(name: &str, version: ProtocolVersion, max: u32, bytes: &str, want: &Want) {
    let mut buf = hex(bytes);
    let before = buf.clone();
    let got = decode(&mut buf, version, max);
    match (&got, want) {
        (Ok(Some(p)), Ok(Some(t))) => {
            assert_eq!(p.packet_type(), *t, "{name}");
            assert!(buf.is_empty(), "{name}: {} bytes left", buf.len());
        }
        (Ok(None), Ok(None)) => assert_eq!(buf, before, "{name}: Ok(None) consumed bytes"),
        (Err(e), Err(w)) => assert_eq!(e, w, "{name}"),
        _ => panic!("{name}: got {got:?}, want {want:?}"),
    }
}

fn ok(t: PacketType) -> Want {
    Ok(Some(t))
}

fn not_allowed(id: u8, packet: &'static str) -> Want {
    Err(DecodeError::PropertyNotAllowed { id, packet })
}

fn bad_flags(packet: &'static str, flags: u8) -> Want {
    Err(DecodeError::InvalidHeaderFlags { packet, flags })
}

fn bad_reason(packet: &'static str, code: u8) -> Want {
    Err(DecodeError::InvalidReasonCode { packet, code })
}

#[test]
fn transcripts() {
    use DecodeError::*;
    #[rustfmt::skip]
    let cases: Vec<(&str, ProtocolVersion, &str, Want)> = vec![
        // --- Fixed header and remaining length (§2.1, §1.5.5) ---
        ("empty buffer: need more", V3_1_1, "", Ok(None)),
        ("remaining length not finished: need more", V3_1_1, "30 80", Ok(None)),
        ("body not all there: need more", V3_1_1, "30 05 00 03", Ok(None)),
        ("remaining length with 5 bytes [MQTT-1.5.5-1]", V3_1_1, "30 ff ff ff ff 01", Err(MalformedVarInt)),
        ("4 continuation bytes refused before a 5th arrives [MQTT-1.5.5-1]", V5, "30 80 80 80 80", Err(MalformedVarInt)),
        ("reserved packet type 0 (§2.1.2)", V3_1_1, "00 00", Err(ReservedPacketType(0))),
        ("reserved packet type 0 in 5.0 (§2.1.2)", V5, "00 00", Err(ReservedPacketType(0))),
        ("AUTH in 3.1.1, where type 15 is reserved (§2.2.1)", V3_1_1, "f0 00", Err(PacketTypeNotInVersion(15))),
        ("AUTH in 3.1, where type 15 is reserved", V3_1, "f0 00", Err(PacketTypeNotInVersion(15))),
        ("AUTH in 5.0, success, no body (§3.15.2.1)", V5, "f0 00", ok(PacketType::Auth)),
        ("AUTH with a reason code it may not carry (§3.15.2.1)", V5, "f0 01 05", bad_reason("AUTH", 0x05)),
        ("CONNECT with header flags 0001 [MQTT-2.1.3-1]", V3_1_1, "11 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 61", bad_flags("CONNECT", 1)),
        ("PUBREL with header flags 0000 [MQTT-3.6.1-1]", V3_1_1, "60 02 00 01", bad_flags("PUBREL", 0)),
        ("SUBSCRIBE with header flags 0000 [MQTT-3.8.1-1]", V3_1_1, "80 06 00 01 00 01 61 00", bad_flags("SUBSCRIBE", 0)),
        ("UNSUBSCRIBE with header flags 0000 [MQTT-3.10.1-1]", V3_1_1, "a0 05 00 01 00 01 61", bad_flags("UNSUBSCRIBE", 0)),
        ("PINGREQ with header flags 0001 [MQTT-2.1.3-1]", V3_1_1, "c1 00", bad_flags("PINGREQ", 1)),
        ("bad flags refused from the header alone [MQTT-2.1.3-1]", V3_1_1, "c1 05", bad_flags("PINGREQ", 1)),
        ("PINGREQ with a trailing byte (§3.12)", V3_1_1, "c0 01 00", Err(TrailingBytes(1))),
        ("PINGRESP with a trailing byte (§3.13)", V5, "d0 01 00", Err(TrailingBytes(1))),
        ("3.1.1 DISCONNECT with a body (§3.14)", V3_1_1, "e0 01 00", Err(TrailingBytes(1))),
        ("5.0 DISCONNECT, reason only (§3.14.2.1)", V5, "e0 01 04", ok(PacketType::Disconnect)),
        ("5.0 DISCONNECT with reason 0x01 (§3.14.2.1)", V5, "e0 01 01", bad_reason("DISCONNECT", 0x01)),
        // --- CONNECT (§3.1) ---
        ("MQIsdp level 3 CONNECT accepted (3.1)", V3_1, "10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 61", ok(PacketType::Connect)),
        ("MQIsdp level 3 CONNECT accepted whatever the version passed", V3_1_1, "10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 61", ok(PacketType::Connect)),
        ("unsupported protocol level 6 [MQTT-3.1.2-2]", V3_1_1, "10 0d 00 04 4d 51 54 54 06 02 00 3c 00 01 61", Err(UnsupportedProtocolLevel(6))),
        ("MQTT at level 3 [MQTT-3.1.2-2]", V3_1_1, "10 0d 00 04 4d 51 54 54 03 02 00 3c 00 01 61", Err(UnsupportedProtocolLevel(3))),
        ("MQIsdp at level 4 [MQTT-3.1.2-2]", V3_1_1, "10 0f 00 06 4d 51 49 73 64 70 04 02 00 3c 00 01 61", Err(UnsupportedProtocolLevel(4))),
        ("protocol name MQXX [MQTT-3.1.2-1]", V3_1_1, "10 0d 00 04 4d 51 58 58 04 02 00 3c 00 01 61", Err(InvalidProtocolName("MQXX".into()))),
        ("CONNECT reserved flag set [MQTT-3.1.2-3]", V3_1_1, "10 0d 00 04 4d 51 54 54 04 03 00 3c 00 01 61", Err(ConnectReservedFlag)),
        ("CONNECT reserved flag set in 5.0 [MQTT-3.1.2-3]", V5, "10 0e 00 04 4d 51 54 54 05 03 00 3c 00 00 01 61", Err(ConnectReservedFlag)),
        ("will QoS 1 without will flag [MQTT-3.1.2-13]", V3_1_1, "10 0d 00 04 4d 51 54 54 04 0a 00 3c 00 01 61", Err(WillFlagsWithoutWill)),
        ("will retain without will flag [MQTT-3.1.2-15]", V3_1_1, "10 0d 00 04 4d 51 54 54 04 22 00 3c 00 01 61", Err(WillFlagsWithoutWill)),
        ("will QoS 1 without will flag in 5.0 [MQTT-3.1.2-11]", V5, "10 0e 00 04 4d 51 54 54 05 0a 00 3c 00 00 01 61", Err(WillFlagsWithoutWill)),
        ("will QoS 3 [MQTT-3.1.2-14]", V3_1_1, "10 0d 00 04 4d 51 54 54 04 1e 00 3c 00 01 61", Err(InvalidQoS)),
        ("will topic empty [MQTT-4.7.3-1]", V3_1_1, "10 11 00 04 4d 51 54 54 04 06 00 3c 00 01 61 00 00 00 00", Err(EmptyTopicName)),
        ("will topic with # [MQTT-3.3.2-2]", V3_1_1, "10 14 00 04 4d 51 54 54 04 06 00 3c 00 01 61 00 03 61 2f 23 00 00", Err(WildcardInTopicName)),
        ("will with topic and payload accepted (§3.1.3.2)", V3_1_1, "10 14 00 04 4d 51 54 54 04 2e 00 3c 00 01 61 00 03 61 2f 62 00 00", ok(PacketType::Connect)),
        ("password without user name in 3.1.1 [MQTT-3.1.2-22]", V3_1_1, "10 10 00 04 4d 51 54 54 04 42 00 3c 00 01 61 00 01 70", Err(PasswordWithoutUsername)),
        ("password without user name in 3.1 [MQTT-3.1.2-22]", V3_1, "10 12 00 06 4d 51 49 73 64 70 03 42 00 3c 00 01 61 00 01 70", Err(PasswordWithoutUsername)),
        ("password without user name allowed in 5.0 (§3.1.2.9)", V5, "10 11 00 04 4d 51 54 54 05 42 00 3c 00 00 01 61 00 01 70", ok(PacketType::Connect)),
        ("client id length past the end (§1.5.4)", V3_1_1, "10 0d 00 04 4d 51 54 54 04 02 00 3c 00 05 61", Err(Truncated)),
        ("user name flag set, user name missing (§3.1.3.5)", V3_1_1, "10 0d 00 04 4d 51 54 54 04 82 00 3c 00 01 61", Err(Truncated)),
        ("CONNECT with a byte after the payload (§3.1.3)", V3_1_1, "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 01 61 ff", Err(TrailingBytes(1))),
        ("CONNECT with two Session Expiry Interval (§3.1.2.11.2)", V5, "10 18 00 04 4d 51 54 54 05 02 00 3c 0a 11 00 00 00 0a 11 00 00 00 0a 00 01 61", Err(DuplicateProperty(0x11))),
        ("Topic Alias in CONNECT (§2.2.2.2)", V5, "10 11 00 04 4d 51 54 54 05 02 00 3c 03 23 00 01 00 01 61", not_allowed(0x23, "CONNECT")),
        ("Will Delay Interval in CONNECT, not in the will (§2.2.2.2)", V5, "10 13 00 04 4d 51 54 54 05 02 00 3c 05 18 00 00 00 05 00 01 61", not_allowed(0x18, "CONNECT")),
        ("unknown property 0x05 (§2.2.2.2)", V5, "10 10 00 04 4d 51 54 54 05 02 00 3c 02 05 00 00 01 61", Err(UnknownProperty(0x05))),
        ("property length past the end (§2.2.2.1)", V5, "10 0e 00 04 4d 51 54 54 05 02 00 3c 09 00 01 61", Err(PropertyLengthMismatch)),
        ("Receive Maximum 0 (§3.1.2.11.3)", V5, "10 11 00 04 4d 51 54 54 05 02 00 3c 03 21 00 00 00 01 61", Err(InvalidPropertyValue(0x21))),
        ("Request Problem Information 2 (§3.1.2.11.7)", V5, "10 10 00 04 4d 51 54 54 05 02 00 3c 02 17 02 00 01 61", Err(InvalidPropertyValue(0x17))),
        // --- CONNACK (§3.2) ---
        ("CONNACK reserved flag bits [MQTT-3.2.2-1]", V3_1_1, "20 02 02 00", Err(ConnAckReservedFlags)),
        ("3.1.1 CONNACK return code 6 (§3.2.2.3)", V3_1_1, "20 02 00 06", bad_reason("CONNACK", 0x06)),
        ("5.0 CONNACK reason 0x04 (§3.2.2.2)", V5, "20 03 00 04 00", bad_reason("CONNACK", 0x04)),
        ("Topic Alias in CONNACK (§2.2.2.2)", V5, "20 06 00 00 03 23 00 01", not_allowed(0x23, "CONNACK")),
        ("Maximum QoS 2 in CONNACK (§3.2.2.3.4)", V5, "20 05 00 00 02 24 02", Err(InvalidPropertyValue(0x24))),
        // --- PUBLISH (§3.3) ---
        ("PUBLISH topic with + [MQTT-3.3.2-2]", V3_1_1, "30 05 00 03 61 2f 2b", Err(WildcardInTopicName)),
        ("PUBLISH topic with # [MQTT-3.3.2-2]", V5, "30 06 00 03 61 2f 23 00", Err(WildcardInTopicName)),
        ("PUBLISH QoS 3 [MQTT-3.3.1-4]", V3_1_1, "36 05 00 01 61 00 01", Err(InvalidQoS)),
        ("QoS 3 refused from the header alone [MQTT-3.3.1-4]", V3_1_1, "36 05", Err(InvalidQoS)),
        ("PUBLISH DUP on QoS 0 [MQTT-3.3.1-2]", V3_1_1, "38 03 00 01 61", Err(DupOnQoS0)),
        ("PUBLISH QoS 1 packet id 0 [MQTT-2.3.1-1]", V3_1_1, "32 05 00 01 61 00 00", Err(ZeroPacketId)),
        ("PUBLISH QoS 1 without packet id (§3.3.2.2)", V3_1_1, "32 03 00 01 61", Err(Truncated)),
        ("PUBLISH topic with U+0000 [MQTT-1.5.4-2]", V3_1_1, "30 05 00 03 61 00 62", Err(NullCharacter)),
        ("PUBLISH topic with invalid UTF-8 [MQTT-1.5.4-1]", V3_1_1, "30 04 00 02 c0 af", Err(InvalidUtf8)),
        ("PUBLISH topic with a lone continuation byte [MQTT-1.5.4-1]", V3_1, "30 03 00 01 80", Err(InvalidUtf8)),
        ("PUBLISH topic with UTF-16 surrogate ED A0 80 [MQTT-1.5.4-1]", V3_1_1, "30 05 00 03 ed a0 80", Err(InvalidUtf8)),
        ("PUBLISH topic length past the end (§1.5.4)", V3_1_1, "30 03 00 05 61", Err(Truncated)),
        ("PUBLISH empty topic [MQTT-4.7.3-1]", V3_1_1, "30 02 00 00", Err(EmptyTopicWithoutAlias)),
        ("5.0 PUBLISH empty topic without alias [MQTT-3.3.2-1]", V5, "30 03 00 00 00", Err(EmptyTopicWithoutAlias)),
        ("remaining length not in the fewest bytes [MQTT-1.5.5-1]", V5, "c0 80 00", Err(NonMinimalVarInt)),
        ("5.0 SUBSCRIBE Maximum QoS 3 [MQTT-3.8.3.1]", V5, "82 07 00 01 00 00 01 61 03", Err(InvalidSubscriptionQoS)),
        ("5.0 PUBLISH empty topic with alias (§3.3.2.3.4)", V5, "30 06 00 00 03 23 00 01", ok(PacketType::Publish)),
        ("5.0 PUBLISH Topic Alias 0 [MQTT-3.3.2-8]", V5, "30 07 00 01 61 03 23 00 00", Err(InvalidPropertyValue(0x23))),
        ("5.0 PUBLISH Response Topic with # [MQTT-3.3.2-14]", V5, "30 0a 00 01 61 06 08 00 03 61 2f 23", Err(InvalidPropertyValue(0x08))),
        ("5.0 PUBLISH Payload Format Indicator 2 (§3.3.2.3.2)", V5, "30 06 00 01 61 02 01 02", Err(InvalidPropertyValue(0x01))),
        ("5.0 PUBLISH two Message Expiry Interval (§3.3.2.3.3)", V5, "30 0e 00 01 61 0a 02 00 00 00 01 02 00 00 00 01", Err(DuplicateProperty(0x02))),
        ("Session Expiry Interval in PUBLISH (§2.2.2.2)", V5, "30 09 00 01 61 05 11 00 00 00 01", not_allowed(0x11, "PUBLISH")),
        ("5.0 PUBLISH with two Subscription Identifiers (§3.3.4)", V5, "30 08 00 01 61 04 0b 01 0b 02", ok(PacketType::Publish)),
        ("3.1.1 PUBLISH: all after the topic is payload (§3.3.3)", V3_1_1, "30 06 00 01 61 00 00 00", ok(PacketType::Publish)),
        // --- PUBACK, PUBREC, PUBREL, PUBCOMP (§3.4-§3.7) ---
        ("PUBACK packet id 0 [MQTT-2.3.1-1]", V3_1_1, "40 02 00 00", Err(ZeroPacketId)),
        ("PUBCOMP packet id 0 [MQTT-2.3.1-1]", V5, "70 02 00 00", Err(ZeroPacketId)),
        ("3.1.1 PUBACK with a reason byte (§3.4.2)", V3_1_1, "40 03 00 01 00", Err(TrailingBytes(1))),
        ("PUBACK truncated packet id (§3.4.2)", V3_1_1, "40 01 00", Err(Truncated)),
        ("5.0 PUBACK with PUBREL's reason 0x92 (§3.4.2.1)", V5, "40 03 00 01 92", bad_reason("PUBACK", 0x92)),
        ("5.0 PUBREL with reason 0x10 (§3.6.2.1)", V5, "62 03 00 01 10", bad_reason("PUBREL", 0x10)),
        ("5.0 PUBREC reason and Reason String (§3.5.2.2)", V5, "50 08 00 01 80 04 1f 00 01 78", ok(PacketType::PubRec)),
        ("Session Expiry Interval in PUBACK (§2.2.2.2)", V5, "40 09 00 01 00 05 11 00 00 00 01", not_allowed(0x11, "PUBACK/PUBREC/PUBREL/PUBCOMP")),
        // --- SUBSCRIBE and SUBACK (§3.8, §3.9) ---
        ("SUBSCRIBE packet id 0 [MQTT-2.3.1-1]", V3_1_1, "82 06 00 00 00 01 61 00", Err(ZeroPacketId)),
        ("SUBSCRIBE with no filters [MQTT-3.8.3-3]", V3_1_1, "82 02 00 01", Err(NoTopicFilters)),
        ("5.0 SUBSCRIBE with no filters [MQTT-3.8.3-2]", V5, "82 03 00 01 00", Err(NoTopicFilters)),
        ("SUBSCRIBE filter a# [MQTT-4.7.1-2]", V3_1_1, "82 07 00 01 00 02 61 23 00", Err(InvalidTopicFilter)),
        ("SUBSCRIBE filter a/#/b [MQTT-4.7.1-2]", V3_1_1, "82 0a 00 01 00 05 61 2f 23 2f 62 00", Err(InvalidTopicFilter)),
        ("SUBSCRIBE filter a+ [MQTT-4.7.1-3]", V3_1_1, "82 07 00 01 00 02 61 2b 00", Err(InvalidTopicFilter)),
        ("SUBSCRIBE empty filter [MQTT-4.7.3-1]", V3_1_1, "82 05 00 01 00 00 00", Err(EmptyTopicFilter)),
        ("SUBSCRIBE filter with U+0000 [MQTT-1.5.4-2]", V3_1_1, "82 06 00 01 00 01 00 00", Err(NullCharacter)),
        ("SUBSCRIBE options byte missing (§3.8.3)", V3_1_1, "82 05 00 01 00 01 61", Err(Truncated)),
        ("3.1.1 SUBSCRIBE reserved option bits [MQTT-3-8.3-4]", V3_1_1, "82 06 00 01 00 01 61 04", Err(SubscriptionOptionsReserved)),
        ("3.1 SUBSCRIBE reserved option bits (§3.8.3)", V3_1, "82 06 00 01 00 01 61 80", Err(SubscriptionOptionsReserved)),
        ("SUBSCRIBE requested QoS 3 [MQTT-3-8.3-4]", V3_1_1, "82 06 00 01 00 01 61 03", Err(InvalidSubscriptionQoS)),
        ("5.0 SUBSCRIBE retain handling 3 [MQTT-3.8.3-5]", V5, "82 07 00 01 00 00 01 61 30", Err(InvalidRetainHandling)),
        ("5.0 SUBSCRIBE reserved option bits 6-7 [MQTT-3.8.3-5]", V5, "82 07 00 01 00 00 01 61 c0", Err(SubscriptionOptionsReserved)),
        ("5.0 SUBSCRIBE No Local on a shared subscription [MQTT-3.8.3-4]", V5, "82 10 00 01 00 00 0a 24 73 68 61 72 65 2f 67 2f 61 04", Err(SharedNoLocal)),
        ("5.0 SUBSCRIBE two Subscription Identifiers (§3.8.2.1.2)", V5, "82 0b 00 01 04 0b 01 0b 02 00 01 61 00", Err(DuplicateProperty(0x0b))),
        ("5.0 SUBSCRIBE Subscription Identifier 0 (§3.8.2.1.2)", V5, "82 09 00 01 02 0b 00 00 01 61 00", Err(InvalidPropertyValue(0x0b))),
        ("5.0 SUBSCRIBE all options and an identifier (§3.8.3.1)", V5, "82 09 00 01 02 0b 05 00 01 61 2d", ok(PacketType::Subscribe)),
        ("3.1.1 SUBACK with the v5-only code 0x83 (§3.9.3)", V3_1_1, "90 03 00 01 83", bad_reason("SUBACK", 0x83)),
        ("5.0 SUBACK with 0x83 (§3.9.3)", V5, "90 04 00 01 00 83", ok(PacketType::SubAck)),
        // --- UNSUBSCRIBE and UNSUBACK (§3.10, §3.11) ---
        ("UNSUBSCRIBE packet id 0 [MQTT-2.3.1-1]", V3_1_1, "a2 05 00 00 00 01 61", Err(ZeroPacketId)),
        ("UNSUBSCRIBE with no filters [MQTT-3.10.3-2]", V3_1_1, "a2 02 00 01", Err(NoTopicFilters)),
        ("UNSUBSCRIBE filter a+ [MQTT-4.7.1-3]", V3_1_1, "a2 06 00 01 00 02 61 2b", Err(InvalidTopicFilter)),
        ("3.1.1 UNSUBACK with a payload (§3.11.3)", V3_1_1, "b0 03 00 01 00", Err(TrailingBytes(1))),
        ("5.0 UNSUBACK with reason 0x01 (§3.11.3)", V5, "b0 04 00 01 00 01", bad_reason("UNSUBACK", 0x01)),
    ];
    for (name, version, bytes, want) in &cases {
        run(name, *version, LIMIT, bytes, want);
    }
}

/// A declared length over the limit is refused from the fixed header alone: the buffers below
/// hold only the 2 to 5 header bytes, so the body is never waited for.
#[test]
fn packet_too_large_from_header_alone() {
    let too_large =
        |size: usize, max: u32| -> Want { Err(DecodeError::PacketTooLarge { size, max }) };
    #[rustfmt::skip]
    let cases: Vec<(&str, ProtocolVersion, u32, &str, Want)> = vec![
        ("2-byte header, 127-byte body over 100 [MQTT-3.2.2-15]", V5, 100, "30 7f", too_large(129, 100)),
        ("3-byte header, 128-byte body over 100 [MQTT-3.2.2-15]", V5, 100, "30 80 01", too_large(131, 100)),
        ("4-byte header, SUBSCRIBE over 1 KiB [MQTT-3.2.2-15]", V3_1_1, 1024, "82 ff ff 01", too_large(32_771, 1024)),
        ("5-byte header, largest remaining length [MQTT-3.2.2-15]", V3_1_1, LIMIT, "30 ff ff ff 7f", too_large(268_435_460, LIMIT)),
        ("the limit counts the header: 1 + 1 + 99 over 100", V5, 100, "30 63", too_large(101, 100)),
        ("exactly at the limit: wait for the body", V5, 100, "30 62", Ok(None)),
        ("exactly at the limit: accepted", V3_1_1, 2, "c0 00", ok(PacketType::PingReq)),
        ("largest remaining length, no limit: wait for the body", V5, u32::MAX, "30 ff ff ff 7f", Ok(None)),
        ("size is checked before the type", V3_1_1, 10, "00 7f", too_large(129, 10)),
    ];
    for (name, version, max, bytes, want) in &cases {
        run(name, *version, *max, bytes, want);
    }
}

/// The one mapping from decode errors to what a v5 server puts in its CONNACK or DISCONNECT.
#[test]
fn reason_codes_for_decode_errors() {
    #[rustfmt::skip]
    let cases: Vec<(&str, u32, &str, ReasonCode)> = vec![
        ("packet too large", 100, "30 7f", ReasonCode::PACKET_TOO_LARGE),
        ("duplicate property", LIMIT, "30 0e 00 01 61 0a 02 00 00 00 01 02 00 00 00 01", ReasonCode::PROTOCOL_ERROR),
        ("property not allowed [MQTT-2.2.2.2]", LIMIT, "30 09 00 01 61 05 11 00 00 00 01", ReasonCode::MALFORMED_PACKET),
        ("empty topic without alias [MQTT-3.3.2-1]", LIMIT, "30 03 00 00 00", ReasonCode::PROTOCOL_ERROR),
        ("SUBSCRIBE without filters [MQTT-3.8.3-2]", LIMIT, "82 03 00 01 00", ReasonCode::PROTOCOL_ERROR),
        ("Retain Handling 3 [MQTT-3.8.3.1]", LIMIT, "82 07 00 01 00 00 01 61 30", ReasonCode::PROTOCOL_ERROR),
        ("Subscription Identifier 0 [MQTT-3.8.2.1.2]", LIMIT, "82 09 00 01 02 0b 00 00 01 61 00", ReasonCode::PROTOCOL_ERROR),
        ("Topic Alias 0 [MQTT-3.3.2-8]", LIMIT, "30 08 00 01 61 03 23 00 00 78", ReasonCode::TOPIC_ALIAS_INVALID),
        ("non-minimal remaining length [MQTT-1.5.5-1]", LIMIT, "c0 80 00", ReasonCode::MALFORMED_PACKET),
        ("zero packet id", LIMIT, "40 02 00 00", ReasonCode::PROTOCOL_ERROR),
        ("malformed: 5-byte remaining length", LIMIT, "30 ff ff ff ff 01", ReasonCode::MALFORMED_PACKET),
        ("malformed: truncated string", LIMIT, "30 03 00 05 61", ReasonCode::MALFORMED_PACKET),
        ("malformed: invalid UTF-8", LIMIT, "30 04 00 02 c0 af", ReasonCode::MALFORMED_PACKET),
        ("malformed: bad header flags", LIMIT, "c1 00", ReasonCode::MALFORMED_PACKET),
        ("wildcard in topic name", LIMIT, "30 06 00 03 61 2f 2b 00", ReasonCode::TOPIC_NAME_INVALID),
        ("unsupported protocol level", LIMIT, "10 0d 00 04 4d 51 54 54 06 02 00 3c 00 01 61", ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
    ];
    for (name, max, bytes, want) in cases {
        let mut buf = hex(bytes);
        match decode(&mut buf, V5, max) {
            Err(e) => assert_eq!(e.reason_code(), want, "{name}: {e}"),
            other => panic!("{name}: expected an error, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known-good packets, field by field
// ---------------------------------------------------------------------------------------------

/// Decodes a CONNECT the way a server does before any version is agreed (parsing must not
/// depend on the version passed in), checks it re-encodes to the very same bytes, returns it.
fn connect(bytes: &str) -> petrel_codec::Connect {
    let wire = hex(bytes);
    let mut first = None;
    for v in [V3_1, V3_1_1, V5] {
        let mut buf = wire.clone();
        let got = match decode(&mut buf, v, LIMIT) {
            Ok(Some(Packet::Connect(c))) => *c,
            other => panic!("{bytes}: expected CONNECT, got {other:?}"),
        };
        assert!(buf.is_empty());
        let mut again = BytesMut::new();
        encode(&Packet::Connect(Box::new(got.clone())), v, &mut again).expect("encodes");
        assert_eq!(again, wire, "re-encoding differs");
        if let Some(first) = &first {
            assert_eq!(
                first, &got,
                "CONNECT parsed differently on a {v} connection"
            );
        }
        first = Some(got);
    }
    first.expect("three versions tried")
}

#[test]
fn minimal_3_1_1_connect() {
    let c = connect("10 0c 00 04 4d 51 54 54 04 02 00 3c 00 00");
    assert_eq!(c.protocol, V3_1_1);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id.as_str(), "");
    assert!(c.will.is_none());
    assert!(c.username.is_none());
    assert!(c.password.is_none());
    assert!(c.properties.is_empty());
}

#[test]
fn v5_connect_with_properties_and_will() {
    let c = connect(
        "10 33 00 04 4d 51 54 54 05 ee 00 1e
         0f 11 00 00 0e 10 21 00 14 26 00 01 6b 00 01 76
         00 02 63 31
         05 18 00 00 00 05 00 01 77 00 03 62 79 65
         00 01 75 00 02 70 77",
    );
    assert_eq!(c.protocol, V5);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.properties.session_expiry_interval, Some(3600));
    assert_eq!(c.properties.receive_maximum, Some(20));
    assert_eq!(c.properties.user_properties.len(), 1);
    let (k, v) = &c.properties.user_properties[0];
    assert_eq!((k.as_str(), v.as_str()), ("k", "v"));
    assert_eq!(c.client_id.as_str(), "c1");
    let will = c.will.as_ref().expect("will flag set");
    assert_eq!(will.topic.as_str(), "w");
    assert_eq!(&will.payload[..], b"bye");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(will.retain);
    assert_eq!(will.properties.will_delay_interval, Some(5));
    assert_eq!(c.username.as_ref().map(|u| u.as_str()), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn v3_1_connect_with_credentials() {
    let c = connect("10 15 00 06 4d 51 49 73 64 70 03 c2 00 3c 00 01 61 00 01 75 00 01 70");
    assert_eq!(c.protocol, V3_1);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id.as_str(), "a");
    assert_eq!(c.username.as_ref().map(|u| u.as_str()), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert!(c.will.is_none());
}

#[test]
fn v5_password_without_username() {
    let c = connect("10 11 00 04 4d 51 54 54 05 42 00 3c 00 00 01 61 00 01 70");
    assert!(c.username.is_none());
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
}

/// 3.1 has no Session Present flag: the CONNACK's first byte is reserved, so a set bit 0 must
/// not surface as `session_present` (the encoder never writes it, so it could not round-trip).
#[test]
fn v3_1_connack_has_no_session_present() {
    for (v, present) in [(V3_1, false), (V3_1_1, true), (V5, true)] {
        let wire = if v.is_v5() {
            "20 03 01 00 00"
        } else {
            "20 02 01 00"
        };
        let mut buf = hex(wire);
        match decode(&mut buf, v, LIMIT) {
            Ok(Some(Packet::ConnAck(c))) => {
                assert_eq!(c.session_present, present, "{v}");
                assert_eq!(c.reason, ReasonCode::SUCCESS);
            }
            other => panic!("{v}: expected CONNACK, got {other:?}"),
        }
    }
}

/// 3.1.1 return codes map to v5 reason codes and back (§3.2.2.3).
#[test]
fn v3_connack_return_codes() {
    let cases: &[(u8, ReasonCode)] = &[
        (0, ReasonCode::SUCCESS),
        (1, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        (2, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        (3, ReasonCode::SERVER_UNAVAILABLE),
        (4, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        (5, ReasonCode::NOT_AUTHORIZED),
    ];
    for &(code, reason) in cases {
        let mut buf = hex(&format!("20 02 00 {code:02x}"));
        let Ok(Some(Packet::ConnAck(c))) = decode(&mut buf, V3_1_1, LIMIT) else {
            panic!("return code {code} refused");
        };
        assert_eq!(c.reason, reason, "return code {code}");
        let mut again = BytesMut::new();
        encode(&Packet::ConnAck(c), V3_1_1, &mut again).expect("encodes");
        assert_eq!(&again[..], &[0x20, 0x02, 0x00, code], "return code {code}");
    }
}

/// Bit 0x80 of a 3.x protocol level marks a bridge (as Mosquitto's bridges send it); it is
/// not a version of its own, and MQTT 5 has no such bit.
#[test]
fn the_bridge_bit_of_a_3x_protocol_level() {
    // 3.1.1, level 0x84, clean session, keep alive 60, client id "b".
    let mut buf = hex("10 0d 00 04 4d 51 54 54 84 02 00 3c 00 01 62");
    let Ok(Some(Packet::Connect(c))) = decode(&mut buf, ProtocolVersion::V3_1_1, 1024) else {
        panic!("a 3.1.1 bridge CONNECT decodes");
    };
    assert!(c.bridge);
    assert_eq!(c.protocol, ProtocolVersion::V3_1_1);
    let mut out = BytesMut::new();
    encode(
        &Packet::Connect(c.clone()),
        ProtocolVersion::V3_1_1,
        &mut out,
    )
    .unwrap();
    assert_eq!(
        out,
        hex("10 0d 00 04 4d 51 54 54 84 02 00 3c 00 01 62"),
        "encodes back"
    );
    // 3.1 (MQIsdp, level 0x83) likewise.
    let mut buf = hex("10 0f 00 06 4d 51 49 73 64 70 83 02 00 3c 00 01 62");
    let Ok(Some(Packet::Connect(c))) = decode(&mut buf, ProtocolVersion::V3_1, 1024) else {
        panic!("a 3.1 bridge CONNECT decodes");
    };
    assert!(c.bridge && c.protocol == ProtocolVersion::V3_1);
    // 0x85 is not a version.
    let mut buf = hex("10 0e 00 04 4d 51 54 54 85 02 00 3c 00 00 00 01 62");
    assert!(matches!(
        decode(&mut buf, ProtocolVersion::V5, 1024),
        Err(DecodeError::UnsupportedProtocolLevel(0x85))
    ));
}
