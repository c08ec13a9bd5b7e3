//! AUTH (§3.15), v5 only: the enhanced authentication exchange.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::wire::read_u8;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Auth {
    pub(crate) fn decode(mut buf: Bytes) -> Result<Auth, DecodeError> {
        let mut auth = Auth::default();
        if buf.has_remaining() {
            let code = read_u8(&mut buf)?;
            if !matches!(code, 0x00 | 0x18 | 0x19) {
                return Err(DecodeError::InvalidReasonCode {
                    packet: "AUTH",
                    code,
                });
            }
            auth.reason = ReasonCode(code);
            if buf.has_remaining() {
                auth.properties = Properties::decode(&mut buf, Context::Auth)?;
            }
        }
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(auth)
    }

    pub(crate) fn body_len(&self) -> usize {
        if self.reason == ReasonCode::SUCCESS && self.properties.is_empty() {
            0
        } else {
            1 + self.properties.encoded_len()
        }
    }

    pub(crate) fn encode_body(&self, buf: &mut BytesMut) {
        if self.body_len() > 0 {
            buf.put_u8(self.reason.0);
            self.properties.encode(buf);
        }
    }
}
