//! SUBSCRIBE (§3.8) and SUBACK (§3.9).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::num::NonZeroU16;

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::reason::ReasonCode;
use crate::strings::TopicFilter;
use crate::types::{PacketId, ProtocolVersion, QoS};
use crate::wire::{self, read_string, read_u16, read_u8};

/// When retained messages are sent for a new subscription (v5 §3.8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RetainHandling {
    #[default]
    OnSubscribe = 0,
    OnNewSubscription = 1,
    Never = 2,
}

/// Subscription options. 3.1/3.1.1 carry only `qos`; the rest keep their defaults there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn new(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        }
    }

    fn decode(byte: u8, version: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
        let qos = QoS::from_u8(byte & 0x03).ok_or(DecodeError::InvalidSubscriptionQoS)?;
        if !version.is_v5() {
            // [MQTT-3-8.3-4] in 3.1.1: the upper six bits are reserved.
            if byte & 0xfc != 0 {
                return Err(DecodeError::SubscriptionOptionsReserved);
            }
            return Ok(SubscriptionOptions::new(qos));
        }
        if byte & 0xc0 != 0 {
            return Err(DecodeError::SubscriptionOptionsReserved);
        }
        let retain_handling = match (byte >> 4) & 0x03 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscription,
            2 => RetainHandling::Never,
            _ => return Err(DecodeError::InvalidRetainHandling),
        };
        Ok(SubscriptionOptions {
            qos,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
        })
    }

    fn encode(&self, version: ProtocolVersion) -> u8 {
        let mut b = self.qos as u8;
        if version.is_v5() {
            b |= u8::from(self.no_local) << 2;
            b |= u8::from(self.retain_as_published) << 3;
            b |= (self.retain_handling as u8) << 4;
        }
        b
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
}

impl Subscribe {
    pub(crate) fn decode(
        mut buf: Bytes,
        version: ProtocolVersion,
    ) -> Result<Subscribe, DecodeError> {
        let packet_id = NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            Properties::decode(&mut buf, Context::Subscribe)?
        } else {
            Properties::default()
        };
        let mut filters = Vec::new();
        while buf.has_remaining() {
            let filter = TopicFilter::from_string(read_string(&mut buf)?)?;
            let options = SubscriptionOptions::decode(read_u8(&mut buf)?, version)?;
            if options.no_local && filter.starts_with("$share/") {
                return Err(DecodeError::SharedNoLocal);
            }
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Subscribe {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let mut len = 2;
        if version.is_v5() {
            len += self.properties.encoded_len();
        }
        len + self.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>()
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for (filter, options) in &self.filters {
            wire::write_binary(buf, filter.as_mqtt_string().as_bytes());
            buf.put_u8(options.encode(version));
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// One per requested filter, in order: the granted QoS (0x00-0x02) or a failure (>= 0x80).
    /// Failures are sent as 0x80 to 3.1.1 clients, which know no other.
    pub reasons: Vec<ReasonCode>,
}

impl SubAck {
    pub(crate) fn decode(mut buf: Bytes, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = NonZeroU16::new(read_u16(&mut buf)?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            Properties::decode(&mut buf, Context::SubAck)?
        } else {
            Properties::default()
        };
        let mut reasons = Vec::with_capacity(buf.remaining());
        while buf.has_remaining() {
            let code = buf.get_u8();
            let ok = if version.is_v5() {
                matches!(
                    code,
                    0x00 | 0x01
                        | 0x02
                        | 0x80
                        | 0x83
                        | 0x87
                        | 0x8F
                        | 0x91
                        | 0x97
                        | 0x9E
                        | 0xA1
                        | 0xA2
                )
            } else {
                matches!(code, 0x00 | 0x01 | 0x02 | 0x80)
            };
            if !ok {
                return Err(DecodeError::InvalidReasonCode {
                    packet: "SUBACK",
                    code,
                });
            }
            reasons.push(ReasonCode(code));
        }
        Ok(SubAck {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let props = if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        };
        2 + props + self.reasons.len()
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for r in &self.reasons {
            let code = if !version.is_v5() && r.is_error() {
                0x80
            } else {
                r.0
            };
            buf.put_u8(code);
        }
    }
}
