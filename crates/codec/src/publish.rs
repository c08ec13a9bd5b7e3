//! PUBLISH (§3.3). Topic and payload are slices of the frame the packet was read from.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::num::NonZeroU16;

use crate::error::{DecodeError, EncodeError};
use crate::packet::{PacketType, MAX_REMAINING_LENGTH};
use crate::properties::{Context, Properties, PublishExtra};
use crate::strings::TopicName;
use crate::types::{PacketId, ProtocolVersion, QoS};
use crate::wire::{self, read_string, read_u16};

#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only when a v5 Topic Alias names the topic.
    pub topic: TopicName,
    /// Present exactly when `qos` is 1 or 2 [MQTT-2.3.1-5].
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

impl std::fmt::Debug for Publish {
    // Payloads are the client's data and never reach logs; only the length is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish")
            .field("dup", &self.dup)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("topic", &self.topic)
            .field("packet_id", &self.packet_id)
            .field("properties", &self.properties)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Publish {
    /// A QoS 0 message with no properties; the common case in tests and tools.
    pub fn new(topic: TopicName, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: None,
            properties: Properties::default(),
            payload,
        }
    }

    pub(crate) fn decode(
        flags: u8,
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQoS0);
        }
        let topic = TopicName::from_string(read_string(&mut buf)?)?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?)
        };
        let properties = if version.is_v5() {
            Properties::decode(&mut buf, Context::Publish)?
        } else {
            Properties::default()
        };
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicWithoutAlias);
        }
        let payload = buf.split_to(buf.remaining());
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload,
        })
    }

    /// The same packet, borrowed, for encoding.
    pub fn as_ref(&self) -> PublishRef<'_> {
        PublishRef {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic.as_str(),
            packet_id: self.packet_id,
            properties: &self.properties,
            extra: PublishExtra::default(),
            payload: &self.payload,
        }
    }

    pub(crate) fn flags(&self) -> u8 {
        self.as_ref().flags()
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        self.as_ref().body_len(version)
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        self.as_ref().encode_body(version, buf)
    }
}

/// A PUBLISH whose parts are borrowed: what a broker writes for each delivery of a stored
/// message, without cloning its topic, payload and properties into a [`Publish`] first.
#[derive(Clone, Copy, Debug)]
pub struct PublishRef<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// A topic name; empty when `extra.topic_alias` names an alias the receiver already
    /// holds (§3.3.2.3.4).
    pub topic: &'a str,
    /// Present exactly when `qos` is 1 or 2 [MQTT-2.3.1-5].
    pub packet_id: Option<PacketId>,
    pub properties: &'a Properties,
    /// v5 properties of this one delivery, written in place of the same ones in `properties`.
    pub extra: PublishExtra<'a>,
    pub payload: &'a [u8],
}

impl PublishRef<'_> {
    /// The whole packet's size on the wire in `version`, fixed header included: what a
    /// receiver's Maximum Packet Size is compared with [MQTT-3.1.2-24].
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let body = self.body_len(version);
        1 + wire::varint_len(body) + body
    }

    /// Appends the packet, encoded for `version`, to `buf`.
    pub fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let body = self.body_len(version);
        if body > MAX_REMAINING_LENGTH {
            return Err(EncodeError::TooLarge(body));
        }
        buf.reserve(1 + wire::varint_len(body) + body);
        buf.put_u8(((PacketType::Publish as u8) << 4) | self.flags());
        wire::write_varint(buf, body);
        self.encode_body(version, buf);
        Ok(())
    }

    fn flags(&self) -> u8 {
        (u8::from(self.dup) << 3) | ((self.qos as u8) << 1) | u8::from(self.retain)
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        let mut len = 2 + self.topic.len() + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            len += 2;
        }
        if version.is_v5() {
            let props = self.properties.body_len_with(&self.extra);
            len += wire::varint_len(props) + props;
        }
        len
    }

    fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        wire::write_binary(buf, self.topic.as_bytes());
        if self.qos != QoS::AtMostOnce {
            // A QoS > 0 publish built without an id is a bug in the caller; 1 keeps the
            // stream well-formed rather than writing a forbidden zero.
            buf.put_u16(self.packet_id.map_or(1, NonZeroU16::get));
        }
        if version.is_v5() {
            self.properties.encode_with(&self.extra, buf);
        }
        buf.put_slice(self.payload);
    }
}
