//! DISCONNECT (§3.14). Empty in 3.1/3.1.1; a reason code and properties in 5.0, sent by either
//! side.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::types::ProtocolVersion;
use crate::wire::read_u8;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

const V5_DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];

impl Disconnect {
    pub fn with_reason(reason: ReasonCode) -> Disconnect {
        Disconnect {
            reason,
            properties: Properties::default(),
        }
    }

    pub(crate) fn decode(
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        if version.is_v5() && buf.has_remaining() {
            let code = read_u8(&mut buf)?;
            if !V5_DISCONNECT_REASONS.contains(&code) {
                return Err(DecodeError::InvalidReasonCode {
                    packet: "DISCONNECT",
                    code,
                });
            }
            d.reason = ReasonCode(code);
            if buf.has_remaining() {
                d.properties = Properties::decode(&mut buf, Context::Disconnect)?;
            }
        }
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(d)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() || (self.reason == ReasonCode::SUCCESS && self.properties.is_empty()) {
            0
        } else if self.properties.is_empty() {
            1
        } else {
            1 + self.properties.encoded_len()
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        let len = self.body_len(version);
        if len >= 1 {
            buf.put_u8(self.reason.0);
        }
        if len > 1 {
            self.properties.encode(buf);
        }
    }
}
