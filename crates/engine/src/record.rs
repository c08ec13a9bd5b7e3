//! The portable form of a message: its expiry as wall-clock time and the message as a v5
//! PUBLISH frame in the codec's own format. The durable store writes it, and in cluster mode
//! messages and retained messages travel between nodes in it. Every record starts with its
//! version, so a later format can tell them apart.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use petrel_codec::{
    Packet, PacketId, Properties, ProtocolVersion, PublishExtra, PublishRef, QoS, RetainHandling,
    SubscriptionOptions,
};

use crate::message::Message;

pub const RECORD_VERSION: u8 = 1;

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An engine instant as wall-clock milliseconds (0 for none).
pub fn to_wall(at: Option<Instant>) -> u64 {
    let Some(at) = at else { return 0 };
    let now = Instant::now();
    let wall = SystemTime::now();
    let wall = if at >= now {
        wall + (at - now)
    } else {
        wall - (now - at)
    };
    unix_ms(wall).max(1)
}

/// Wall-clock milliseconds as an engine instant (`None` for 0).
pub fn from_wall(ms: u64) -> Option<Instant> {
    if ms == 0 {
        return None;
    }
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    Some(if ms >= now_ms {
        now + Duration::from_millis(ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - ms))
            .unwrap_or(now)
    })
}

/// A message: its expiry and the message as a v5 PUBLISH frame (QoS, retain flag, topic,
/// properties and payload in the codec's own format).
pub fn message_record(message: &Message) -> Vec<u8> {
    publish_record(
        message.expires_at,
        message.qos,
        message.retain,
        &message.topic,
        &message.properties,
        &message.payload,
    )
}

/// The record layout shared by messages and wills: a time (wall-clock ms, 0 for none), then
/// the message as a v5 PUBLISH frame.
pub fn publish_record(
    at: Option<Instant>,
    qos: QoS,
    retain: bool,
    topic: &str,
    properties: &Properties,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = BytesMut::new();
    let publish = PublishRef {
        dup: false,
        qos,
        retain,
        topic,
        packet_id: (qos != QoS::AtMostOnce).then_some(PacketId::MIN),
        properties,
        extra: PublishExtra::default(),
        payload,
    };
    // A message that came in within the packet size limit always re-encodes.
    let _ = publish.encode(ProtocolVersion::V5, &mut frame);
    let mut v = Vec::with_capacity(9 + frame.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&to_wall(at).to_be_bytes());
    v.extend_from_slice(&frame);
    v
}

pub fn decode_message(value: &[u8]) -> Result<Message, String> {
    if value.len() < 9 || value[0] != RECORD_VERSION {
        return Err(format!("unknown record version {:?}", value.first()));
    }
    let expires = u64::from_be_bytes(value[1..9].try_into().map_err(|_| "short record")?);
    let mut frame = BytesMut::from(&value[9..]);
    let packet = petrel_codec::decode(&mut frame, ProtocolVersion::V5, u32::MAX)
        .map_err(|e| format!("stored PUBLISH does not decode: {e}"))?
        .ok_or("stored PUBLISH is truncated")?;
    let Packet::Publish(p) = packet else {
        return Err("stored record is not a PUBLISH".to_owned());
    };
    let mut m = Message::new(
        p.topic,
        p.payload,
        p.qos,
        p.retain,
        if p.properties.is_empty() {
            Properties::default()
        } else {
            p.properties
        },
        0,
    );
    m.expires_at = from_wall(expires);
    Ok(m)
}

/// Subscription options as one byte (the SUBSCRIBE options byte's layout).
pub fn options_byte(o: SubscriptionOptions) -> u8 {
    (o.qos as u8)
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

pub fn options_from(byte: u8) -> Option<SubscriptionOptions> {
    let mut o = SubscriptionOptions::new(QoS::from_u8(byte & 0x03)?);
    o.no_local = byte & 0x04 != 0;
    o.retain_as_published = byte & 0x08 != 0;
    o.retain_handling = match (byte >> 4) & 0x03 {
        0 => RetainHandling::OnSubscribe,
        1 => RetainHandling::OnNewSubscription,
        2 => RetainHandling::Never,
        _ => return None,
    };
    Some(o)
}
