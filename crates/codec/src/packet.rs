//! The fixed header (§2.1), the [`Packet`] enum and the two entry points: [`decode`] and
//! [`encode`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::ack::{AckKind, PubAck};
use crate::auth::Auth;
use crate::connack::ConnAck;
use crate::connect::Connect;
use crate::disconnect::Disconnect;
use crate::error::{DecodeError, EncodeError};
use crate::publish::Publish;
use crate::subscribe::{SubAck, Subscribe};
use crate::types::ProtocolVersion;
use crate::unsubscribe::{UnsubAck, Unsubscribe};
use crate::wire;

/// The largest remaining length four variable-length bytes can express (§1.5.5).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubAck),
    PubRel(PubAck),
    PubComp(PubAck),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    /// The packet's name as the specification writes it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }

    fn fixed_flags(&self) -> u8 {
        match self {
            Packet::Publish(p) => p.flags(),
            // [MQTT-3.6.1-1] [MQTT-3.8.1-1] [MQTT-3.10.1-1]
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0x02,
            _ => 0,
        }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        match self {
            Packet::Connect(c) => c.body_len(),
            Packet::ConnAck(c) => c.body_len(version),
            Packet::Publish(p) => p.body_len(version),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                a.body_len(version)
            }
            Packet::Subscribe(s) => s.body_len(version),
            Packet::SubAck(s) => s.body_len(version),
            Packet::Unsubscribe(u) => u.body_len(version),
            Packet::UnsubAck(u) => u.body_len(version),
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(d) => d.body_len(version),
            Packet::Auth(a) => a.body_len(),
        }
    }
}

/// The complete encoded size of `packet` in `version`: what a v5 Maximum Packet Size is
/// compared against.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let body = packet.body_len(version);
    1 + wire::varint_len(body) + body
}

/// Appends `packet`, encoded for `version`, to `buf`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if matches!(packet, Packet::Auth(_)) && !version.is_v5() {
        return Err(EncodeError::NotInVersion(version));
    }
    // CONNECT announces its own version; everything else follows the connection's.
    let version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version,
    };
    let body = packet.body_len(version);
    if body > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(body));
    }
    buf.reserve(1 + wire::varint_len(body) + body);
    buf.put_u8(((packet.packet_type() as u8) << 4) | packet.fixed_flags());
    wire::write_varint(buf, body);
    let start = buf.len();
    match packet {
        Packet::Connect(c) => c.encode_body(buf),
        Packet::ConnAck(c) => c.encode_body(version, buf),
        Packet::Publish(p) => p.encode_body(version, buf),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            a.encode_body(version, buf)
        }
        Packet::Subscribe(s) => s.encode_body(version, buf),
        Packet::SubAck(s) => s.encode_body(version, buf),
        Packet::Unsubscribe(u) => u.encode_body(version, buf),
        Packet::UnsubAck(u) => u.encode_body(version, buf),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => d.encode_body(version, buf),
        Packet::Auth(a) => a.encode_body(buf),
    }
    debug_assert_eq!(
        buf.len() - start,
        body,
        "body_len disagrees with encode_body"
    );
    Ok(())
}

/// Decodes one packet from the front of `buf`.
///
/// * `Ok(None)`: the packet is not complete yet; nothing was consumed. A caller may reserve
///   space and read more.
/// * `Ok(Some(packet))`: the packet's bytes were removed from `buf`; its topics and payload
///   share that memory.
/// * `Err(_)`: the stream is malformed and the connection should close. A declared length above
///   `max_packet_size` is refused from the fixed header alone, before any of the body is
///   buffered.
///
/// `version` is the connection's agreed version; CONNECT is parsed by its own announced version.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((remaining, len_bytes)) = wire::parse_varint(&buf[1..])? else {
        return Ok(None);
    };
    let header_len = 1 + len_bytes;
    let total = header_len + remaining as usize;
    if total > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    // Validate the type and flags before waiting for the body, so garbage is refused at once.
    check_header(first, version)?;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let body = frame.split_off(header_len);
    decode_body(first, body, version).map(Some)
}

fn check_header(first: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    let (name, expected) = match kind {
        0 => return Err(DecodeError::ReservedPacketType(0)),
        3 => {
            if (flags >> 1) & 0x03 == 3 {
                return Err(DecodeError::InvalidQoS);
            }
            return Ok(());
        }
        15 if !version.is_v5() => return Err(DecodeError::PacketTypeNotInVersion(15)),
        1 => ("CONNECT", 0),
        2 => ("CONNACK", 0),
        4 => ("PUBACK", 0),
        5 => ("PUBREC", 0),
        6 => ("PUBREL", 2),
        7 => ("PUBCOMP", 0),
        8 => ("SUBSCRIBE", 2),
        9 => ("SUBACK", 0),
        10 => ("UNSUBSCRIBE", 2),
        11 => ("UNSUBACK", 0),
        12 => ("PINGREQ", 0),
        13 => ("PINGRESP", 0),
        14 => ("DISCONNECT", 0),
        _ => ("AUTH", 0),
    };
    if flags != expected {
        return Err(DecodeError::InvalidHeaderFlags {
            packet: name,
            flags,
        });
    }
    Ok(())
}

fn decode_body(first: u8, body: Bytes, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let empty = |body: &Bytes, p: Packet| {
        if body.is_empty() {
            Ok(p)
        } else {
            Err(DecodeError::TrailingBytes(body.len()))
        }
    };
    Ok(match first >> 4 {
        1 => Packet::Connect(Box::new(Connect::decode(body)?)),
        2 => Packet::ConnAck(ConnAck::decode(body, version)?),
        3 => Packet::Publish(Publish::decode(first & 0x0f, body, version)?),
        4 => Packet::PubAck(PubAck::decode(AckKind::PubAck, body, version)?),
        5 => Packet::PubRec(PubAck::decode(AckKind::PubRec, body, version)?),
        6 => Packet::PubRel(PubAck::decode(AckKind::PubRel, body, version)?),
        7 => Packet::PubComp(PubAck::decode(AckKind::PubComp, body, version)?),
        8 => Packet::Subscribe(Subscribe::decode(body, version)?),
        9 => Packet::SubAck(SubAck::decode(body, version)?),
        10 => Packet::Unsubscribe(Unsubscribe::decode(body, version)?),
        11 => Packet::UnsubAck(UnsubAck::decode(body, version)?),
        12 => empty(&body, Packet::PingReq)?,
        13 => empty(&body, Packet::PingResp)?,
        14 => Packet::Disconnect(Disconnect::decode(body, version)?),
        15 => Packet::Auth(Auth::decode(body)?),
        other => return Err(DecodeError::ReservedPacketType(other)),
    })
}
