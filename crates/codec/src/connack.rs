//! CONNACK (§3.2). The engine always speaks in v5 reason codes; this file maps them to the
//! six return codes of 3.1/3.1.1 and back, so no layer above needs to know the difference.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::types::ProtocolVersion;
use crate::wire::read_u8;

/// The 3.1/3.1.1 CONNACK return codes (§3.2.2.3 of 3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUserNameOrPassword = 4,
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    /// The closest 3.1.1 return code for a v5 reason code.
    pub fn from_reason(reason: ReasonCode) -> ConnectReturnCode {
        match reason {
            ReasonCode::SUCCESS => ConnectReturnCode::Accepted,
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => {
                ConnectReturnCode::UnacceptableProtocolVersion
            }
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => ConnectReturnCode::IdentifierRejected,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD => ConnectReturnCode::BadUserNameOrPassword,
            ReasonCode::NOT_AUTHORIZED | ReasonCode::BANNED => ConnectReturnCode::NotAuthorized,
            _ => ConnectReturnCode::ServerUnavailable,
        }
    }

    pub fn to_reason(self) -> ReasonCode {
        match self {
            ConnectReturnCode::Accepted => ReasonCode::SUCCESS,
            ConnectReturnCode::UnacceptableProtocolVersion => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            ConnectReturnCode::IdentifierRejected => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ConnectReturnCode::ServerUnavailable => ReasonCode::SERVER_UNAVAILABLE,
            ConnectReturnCode::BadUserNameOrPassword => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            ConnectReturnCode::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// A v5 reason code; encoded as the matching return code for 3.1/3.1.1.
    pub reason: ReasonCode,
    pub properties: Properties,
}

const V5_CONNACK_REASONS: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];

impl ConnAck {
    pub(crate) fn decode(mut buf: Bytes, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let flags = read_u8(&mut buf)?;
        if flags & 0xfe != 0 {
            return Err(DecodeError::ConnAckReservedFlags);
        }
        let code = read_u8(&mut buf)?;
        let (reason, properties) = if version.is_v5() {
            if !V5_CONNACK_REASONS.contains(&code) {
                return Err(DecodeError::InvalidReasonCode {
                    packet: "CONNACK",
                    code,
                });
            }
            (
                ReasonCode(code),
                Properties::decode(&mut buf, Context::ConnAck)?,
            )
        } else {
            let rc = match code {
                0 => ConnectReturnCode::Accepted,
                1 => ConnectReturnCode::UnacceptableProtocolVersion,
                2 => ConnectReturnCode::IdentifierRejected,
                3 => ConnectReturnCode::ServerUnavailable,
                4 => ConnectReturnCode::BadUserNameOrPassword,
                5 => ConnectReturnCode::NotAuthorized,
                _ => {
                    return Err(DecodeError::InvalidReasonCode {
                        packet: "CONNACK",
                        code,
                    })
                }
            };
            (rc.to_reason(), Properties::default())
        };
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(ConnAck {
            // 3.1 has no session present flag (the byte is reserved, as in encode_body).
            session_present: flags & 1 != 0 && version != ProtocolVersion::V3_1,
            reason,
            properties,
        })
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + self.properties.encoded_len()
        } else {
            2
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        // 3.1 has no session present flag: the byte is reserved.
        let present = self.session_present && version != ProtocolVersion::V3_1;
        buf.put_u8(u8::from(present));
        if version.is_v5() {
            buf.put_u8(self.reason.0);
            self.properties.encode(buf);
        } else {
            buf.put_u8(ConnectReturnCode::from_reason(self.reason) as u8);
        }
    }
}
