//! PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4-§3.7): one shape, four packet types.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::num::NonZeroU16;

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::types::{PacketId, ProtocolVersion};
use crate::wire::{read_u16, read_u8};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl AckKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            AckKind::PubAck => "PUBACK",
            AckKind::PubRec => "PUBREC",
            AckKind::PubRel => "PUBREL",
            AckKind::PubComp => "PUBCOMP",
        }
    }

    /// Reason codes each packet may carry (§3.4.2.1, §3.5.2.1, §3.6.2.1, §3.7.2.1).
    fn allows(self, code: u8) -> bool {
        match self {
            AckKind::PubAck | AckKind::PubRec => matches!(
                code,
                0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
            ),
            AckKind::PubRel | AckKind::PubComp => matches!(code, 0x00 | 0x92),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubAck {
    pub packet_id: PacketId,
    /// Always success for 3.1/3.1.1, which have no reason codes here.
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl PubAck {
    pub fn new(packet_id: PacketId) -> PubAck {
        PubAck {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }
    }

    pub fn with_reason(packet_id: PacketId, reason: ReasonCode) -> PubAck {
        PubAck {
            packet_id,
            reason,
            properties: Properties::default(),
        }
    }

    pub(crate) fn decode(
        kind: AckKind,
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<PubAck, DecodeError> {
        let packet_id = NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?;
        let mut ack = PubAck::new(packet_id);
        if version.is_v5() {
            // A remaining length of 2 means success with no properties (§3.4.2.1).
            if buf.has_remaining() {
                let code = read_u8(&mut buf)?;
                if !kind.allows(code) {
                    return Err(DecodeError::InvalidReasonCode {
                        packet: kind.name(),
                        code,
                    });
                }
                ack.reason = ReasonCode(code);
            }
            if buf.has_remaining() {
                ack.properties = Properties::decode(&mut buf, Context::Ack)?;
            }
        }
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(ack)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() {
            return 2;
        }
        if self.properties.is_empty() {
            if self.reason == ReasonCode::SUCCESS {
                2
            } else {
                3
            }
        } else {
            3 + self.properties.encoded_len()
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        let len = self.body_len(version);
        if len >= 3 {
            buf.put_u8(self.reason.0);
        }
        if len > 3 {
            self.properties.encode(buf);
        }
    }
}
