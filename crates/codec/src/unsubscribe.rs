//! UNSUBSCRIBE (§3.10) and UNSUBACK (§3.11).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::num::NonZeroU16;

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::strings::TopicFilter;
use crate::types::{PacketId, ProtocolVersion};
use crate::wire::{self, read_string, read_u16};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<TopicFilter>,
}

impl Unsubscribe {
    pub(crate) fn decode(
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<Unsubscribe, DecodeError> {
        let packet_id = NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            Properties::decode(&mut buf, Context::Unsubscribe)?
        } else {
            Properties::default()
        };
        let mut filters = Vec::new();
        while buf.has_remaining() {
            filters.push(TopicFilter::from_string(read_string(&mut buf)?)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Unsubscribe {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let props = if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        };
        2 + props + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for f in &self.filters {
            wire::write_binary(buf, f.as_mqtt_string().as_bytes());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// v5 only: one per filter. 3.1/3.1.1 UNSUBACK has no payload.
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn decode(
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<UnsubAck, DecodeError> {
        let packet_id = NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?;
        let mut ack = UnsubAck {
            packet_id,
            properties: Properties::default(),
            reasons: Vec::new(),
        };
        if version.is_v5() {
            ack.properties = Properties::decode(&mut buf, Context::UnsubAck)?;
            while buf.has_remaining() {
                let code = buf.get_u8();
                if !matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91) {
                    return Err(DecodeError::InvalidReasonCode {
                        packet: "UNSUBACK",
                        code,
                    });
                }
                ack.reasons.push(ReasonCode(code));
            }
        }
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(ack)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + self.properties.encoded_len() + self.reasons.len()
        } else {
            2
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
            for r in &self.reasons {
                buf.put_u8(r.0);
            }
        }
    }
}
