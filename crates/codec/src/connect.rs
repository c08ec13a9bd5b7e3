//! CONNECT (§3.1): the only packet whose parsing does not depend on a version already agreed,
//! because it is where the version is announced.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::properties::{Context, Properties};
use crate::strings::{MqttString, TopicName};
use crate::types::{ProtocolVersion, QoS};
use crate::wire::{self, read_binary, read_string, read_u16, read_u8};

/// The will message carried in CONNECT (§3.1.2.5, §3.1.3.2-3).
#[derive(Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 will properties (Will Delay Interval, Message Expiry, ...).
    pub properties: Properties,
}

impl std::fmt::Debug for LastWill {
    // Payloads are the client's data: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastWill")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("properties", &self.properties)
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// "Clean Session" in 3.1/3.1.1, "Clean Start" in 5.0.
    pub clean_start: bool,
    /// Seconds; 0 turns the keepalive mechanism off [MQTT-3.1.2-23].
    pub keep_alive: u16,
    pub properties: Properties,
    pub client_id: MqttString,
    pub will: Option<LastWill>,
    pub username: Option<MqttString>,
    pub password: Option<Bytes>,
    /// MQTT 3.1/3.1.1 only: the protocol level carried bit 0x80, as the bridges of Mosquitto
    /// (and petrel) send it, asking the server not to send the client back what it publishes
    /// (a bridge's loop guard; MQTT 5 has No Local per subscription instead).
    pub bridge: bool,
}

impl std::fmt::Debug for Connect {
    // The password is a secret: only its presence is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("protocol", &self.protocol)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("properties", &self.properties)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

impl Connect {
    pub(crate) fn decode(mut buf: Bytes) -> Result<Connect, DecodeError> {
        let name = read_binary(&mut buf)?;
        let level = read_u8(&mut buf)?;
        // Bit 0x80 marks a 3.x bridge; MQTT 5 has no such thing.
        let bridge = level & 0x80 != 0 && matches!(level & 0x7f, 3 | 4);
        let protocol = match (&name[..], level & if bridge { 0x7f } else { 0xff }) {
            (b"MQTT", 4) => ProtocolVersion::V3_1_1,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQIsdp", 3) => ProtocolVersion::V3_1,
            (b"MQTT", _) | (b"MQIsdp", _) => {
                return Err(DecodeError::UnsupportedProtocolLevel(level))
            }
            _ => {
                return Err(DecodeError::InvalidProtocolName(
                    String::from_utf8_lossy(&name).chars().take(16).collect(),
                ))
            }
        };
        let flags = read_u8(&mut buf)?;
        if flags & FLAG_RESERVED != 0 {
            return Err(DecodeError::ConnectReservedFlag);
        }
        let will_flag = flags & FLAG_WILL != 0;
        let will_qos = QoS::from_u8((flags >> 3) & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let will_retain = flags & FLAG_WILL_RETAIN != 0;
        if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::WillFlagsWithoutWill);
        }
        let has_username = flags & FLAG_USERNAME != 0;
        let has_password = flags & FLAG_PASSWORD != 0;
        if has_password && !has_username && protocol != ProtocolVersion::V5 {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = read_u16(&mut buf)?;
        let properties = if protocol.is_v5() {
            Properties::decode(&mut buf, Context::Connect)?
        } else {
            Properties::default()
        };
        let client_id = read_string(&mut buf)?;
        let will = if will_flag {
            let properties = if protocol.is_v5() {
                Properties::decode(&mut buf, Context::Will)?
            } else {
                Properties::default()
            };
            let topic = read_string(&mut buf)?;
            if topic.is_empty() {
                return Err(DecodeError::EmptyTopicName);
            }
            let topic = TopicName::from_string(topic)?;
            let payload = read_binary(&mut buf)?;
            Some(LastWill {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if has_username {
            Some(read_string(&mut buf)?)
        } else {
            None
        };
        let password = if has_password {
            Some(read_binary(&mut buf)?)
        } else {
            None
        };
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(Connect {
            protocol,
            clean_start: flags & FLAG_CLEAN != 0,
            keep_alive,
            properties,
            client_id,
            will,
            username,
            password,
            bridge,
        })
    }

    pub(crate) fn body_len(&self) -> usize {
        let v5 = self.protocol.is_v5();
        let mut len = 2 + self.protocol.protocol_name().len() + 1 + 1 + 2;
        if v5 {
            len += self.properties.encoded_len();
        }
        len += 2 + self.client_id.len();
        if let Some(w) = &self.will {
            if v5 {
                len += w.properties.encoded_len();
            }
            len += 2 + w.topic.len() + 2 + w.payload.len();
        }
        if let Some(u) = &self.username {
            len += 2 + u.len();
        }
        if let Some(p) = &self.password {
            len += 2 + p.len();
        }
        len
    }

    pub(crate) fn encode_body(&self, buf: &mut BytesMut) {
        let v5 = self.protocol.is_v5();
        wire::write_binary(buf, self.protocol.protocol_name().as_bytes());
        let bridge = if self.bridge && !v5 { 0x80 } else { 0 };
        buf.put_u8(self.protocol.level() | bridge);
        let mut flags = 0u8;
        if self.clean_start {
            flags |= FLAG_CLEAN;
        }
        if let Some(w) = &self.will {
            flags |= FLAG_WILL | ((w.qos as u8) << 3);
            if w.retain {
                flags |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            flags |= FLAG_PASSWORD;
        }
        buf.put_u8(flags);
        buf.put_u16(self.keep_alive);
        if v5 {
            self.properties.encode(buf);
        }
        wire::write_binary(buf, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                w.properties.encode(buf);
            }
            wire::write_binary(buf, w.topic.as_mqtt_string().as_bytes());
            wire::write_binary(buf, &w.payload);
        }
        if let Some(u) = &self.username {
            wire::write_binary(buf, u.as_bytes());
        }
        if let Some(p) = &self.password {
            wire::write_binary(buf, p);
        }
    }
}

/// The protocol version a CONNECT announces, read from the start of its bytes (`buf` begins
/// at the fixed header) without decoding the rest: `None` when too few bytes have arrived, the
/// packet is not a CONNECT or the level is unknown. Lets a broker refuse a CONNECT that is too
/// large in the client's own version (v5: CONNACK 0x95) before its body has arrived.
pub fn connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let (_, varint_len) = wire::parse_varint(buf.get(1..)?).ok()??;
    let rest = buf.get(1 + varint_len..)?;
    let name_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    match rest.get(2 + name_len)? {
        3 => Some(ProtocolVersion::V3_1),
        4 => Some(ProtocolVersion::V3_1_1),
        5 => Some(ProtocolVersion::V5),
        _ => None,
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn connect_version_from_a_partial_connect() {
        // A v5 CONNECT claiming 1 MiB, of which only the variable header's start arrived.
        let v5 = [
            0x10, 0x80, 0x80, 0x40, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02,
        ];
        assert_eq!(connect_version(&v5), Some(ProtocolVersion::V5));
        let v311 = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04];
        assert_eq!(connect_version(&v311), Some(ProtocolVersion::V3_1_1));
        let v31 = [
            0x10, 0x0f, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03,
        ];
        assert_eq!(connect_version(&v31), Some(ProtocolVersion::V3_1));
        assert_eq!(connect_version(&v5[..10]), None, "level not yet there");
        assert_eq!(connect_version(&[0x30, 0x02, 0, 0]), None, "not a CONNECT");
        assert_eq!(connect_version(&[]), None);
    }
}
