//! MQTT 5.0 properties (§2.2.2). One struct holds every property; which ones a packet may carry
//! is a table ([`Context::allows`]) checked while decoding, together with the rule that only
//! User Property (and Subscription Identifier in a server's PUBLISH) may repeat.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::strings::MqttString;
use crate::wire::{self, read_binary, read_string, read_u16, read_u32, read_u8, read_varint};

/// Property identifiers (§2.2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQoS = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

/// Where a property block sits; decides which properties are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Context {
    fn name(self) -> &'static str {
        match self {
            Context::Connect => "CONNECT",
            Context::ConnAck => "CONNACK",
            Context::Publish => "PUBLISH",
            Context::Will => "will properties",
            Context::Ack => "PUBACK/PUBREC/PUBREL/PUBCOMP",
            Context::Subscribe => "SUBSCRIBE",
            Context::SubAck => "SUBACK",
            Context::Unsubscribe => "UNSUBSCRIBE",
            Context::UnsubAck => "UNSUBACK",
            Context::Disconnect => "DISCONNECT",
            Context::Auth => "AUTH",
        }
    }

    /// The table of §2.2.2.2: which packet may carry which property.
    fn allows(self, id: u8) -> bool {
        use Context::*;
        match id {
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(self, Publish | Will),
            0x0B => matches!(self, Publish | Subscribe),
            0x11 => matches!(self, Connect | ConnAck | Disconnect),
            0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => self == ConnAck,
            0x15 | 0x16 => matches!(self, Connect | ConnAck | Auth),
            0x17 | 0x19 => self == Connect,
            0x18 => self == Will,
            0x1C => matches!(self, ConnAck | Disconnect),
            0x1F => !matches!(self, Connect | Publish | Will | Subscribe | Unsubscribe),
            0x21 | 0x22 | 0x27 => matches!(self, Connect | ConnAck),
            0x23 => self == Publish,
            0x26 => true,
            _ => false,
        }
    }
}

/// The properties of one packet: every MQTT 5.0 property, read and written as fields
/// (`props.topic_alias`) through `Deref`/`DerefMut` to a [`PropertySet`].
///
/// A pointer-sized handle: an empty set (every v3.1/3.1.1 packet, and most v5 PUBLISH packets)
/// holds no allocation, so packets stay small to move on the hot path. The set is boxed on the
/// first write through `DerefMut`; reads of an empty one see [`PropertySet::EMPTY`].
#[derive(Clone, Default)]
pub struct Properties(Option<Box<PropertySet>>);

impl std::ops::Deref for Properties {
    type Target = PropertySet;

    fn deref(&self) -> &PropertySet {
        static EMPTY: PropertySet = PropertySet::EMPTY;
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut PropertySet {
        self.0.get_or_insert_with(Default::default)
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        **self == **other
    }
}

impl Eq for Properties {}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Properties(empty)"),
            Some(set) => set.fmt(f),
        }
    }
}

/// Every MQTT 5.0 property. Absent properties are `None` (or empty), which is also what a
/// v3.1/3.1.1 packet carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PropertySet {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttString>,
    pub response_topic: Option<MqttString>,
    pub correlation_data: Option<Bytes>,
    /// Several only in a PUBLISH sent by the server (one per matching subscription, §3.3.4).
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<MqttString>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<MqttString>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<MqttString>,
    pub server_reference: Option<MqttString>,
    pub reason_string: Option<MqttString>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(MqttString, MqttString)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Sets an `Option` property once; a second occurrence is a protocol error.
fn set_once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(value);
    Ok(())
}

fn read_flag(buf: &mut Bytes, id: u8) -> Result<u8, DecodeError> {
    let v = read_u8(buf)?;
    if v > 1 {
        return Err(DecodeError::InvalidPropertyValue(id));
    }
    Ok(v)
}

fn read_nonzero_u16(buf: &mut Bytes, id: u8) -> Result<u16, DecodeError> {
    let v = read_u16(buf)?;
    if v == 0 {
        return Err(DecodeError::InvalidPropertyValue(id));
    }
    Ok(v)
}

impl PropertySet {
    /// No property at all.
    pub const EMPTY: PropertySet = PropertySet {
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        subscription_identifiers: Vec::new(),
        session_expiry_interval: None,
        assigned_client_identifier: None,
        server_keep_alive: None,
        authentication_method: None,
        authentication_data: None,
        request_problem_information: None,
        will_delay_interval: None,
        request_response_information: None,
        response_information: None,
        server_reference: None,
        reason_string: None,
        receive_maximum: None,
        topic_alias_maximum: None,
        topic_alias: None,
        maximum_qos: None,
        retain_available: None,
        user_properties: Vec::new(),
        maximum_packet_size: None,
        wildcard_subscription_available: None,
        subscription_identifier_available: None,
        shared_subscription_available: None,
    };
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        match self.0.as_deref() {
            None => true,
            Some(set) => *set == PropertySet::EMPTY,
        }
    }

    /// Reads a property block: its variable byte integer length, then the properties.
    pub(crate) fn decode(buf: &mut Bytes, ctx: Context) -> Result<Properties, DecodeError> {
        let len = read_varint(buf)? as usize;
        if buf.len() < len {
            return Err(DecodeError::PropertyLengthMismatch);
        }
        let mut block = buf.split_to(len);
        let mut p = Properties::default();
        while !block.is_empty() {
            let id_raw = read_varint(&mut block)?;
            let id = u8::try_from(id_raw).map_err(|_| DecodeError::UnknownProperty(0xff))?;
            if !Context::Connect.allows(id)
                && !Context::ConnAck.allows(id)
                && !Context::Publish.allows(id)
                && !Context::Will.allows(id)
                && !Context::Subscribe.allows(id)
                && !Context::Ack.allows(id)
            {
                return Err(DecodeError::UnknownProperty(id));
            }
            if !ctx.allows(id) {
                return Err(DecodeError::PropertyNotAllowed {
                    id,
                    packet: ctx.name(),
                });
            }
            let b = &mut block;
            match id {
                0x01 => set_once(&mut p.payload_format_indicator, id, read_flag(b, id)?)?,
                0x02 => set_once(&mut p.message_expiry_interval, id, read_u32(b)?)?,
                0x03 => set_once(&mut p.content_type, id, read_string(b)?)?,
                0x08 => {
                    let topic = read_string(b)?;
                    // The Response Topic is a topic name: no wildcards [MQTT-3.3.2-14].
                    if topic.is_empty() || topic.contains(['+', '#']) {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    set_once(&mut p.response_topic, id, topic)?
                }
                0x09 => set_once(&mut p.correlation_data, id, read_binary(b)?)?,
                0x0B => {
                    let v = read_varint(b)?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    // Repeats are legal only in a server-to-client PUBLISH; a SUBSCRIBE may
                    // carry one [MQTT-3.8.2.1.2].
                    if ctx == Context::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::DuplicateProperty(id));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set_once(&mut p.session_expiry_interval, id, read_u32(b)?)?,
                0x12 => set_once(&mut p.assigned_client_identifier, id, read_string(b)?)?,
                0x13 => set_once(&mut p.server_keep_alive, id, read_u16(b)?)?,
                0x15 => set_once(&mut p.authentication_method, id, read_string(b)?)?,
                0x16 => set_once(&mut p.authentication_data, id, read_binary(b)?)?,
                0x17 => set_once(&mut p.request_problem_information, id, read_flag(b, id)?)?,
                0x18 => set_once(&mut p.will_delay_interval, id, read_u32(b)?)?,
                0x19 => set_once(&mut p.request_response_information, id, read_flag(b, id)?)?,
                0x1A => set_once(&mut p.response_information, id, read_string(b)?)?,
                0x1C => set_once(&mut p.server_reference, id, read_string(b)?)?,
                0x1F => set_once(&mut p.reason_string, id, read_string(b)?)?,
                0x21 => set_once(&mut p.receive_maximum, id, read_nonzero_u16(b, id)?)?,
                0x22 => set_once(&mut p.topic_alias_maximum, id, read_u16(b)?)?,
                0x23 => set_once(&mut p.topic_alias, id, read_nonzero_u16(b, id)?)?,
                0x24 => set_once(&mut p.maximum_qos, id, read_flag(b, id)?)?,
                0x25 => set_once(&mut p.retain_available, id, read_flag(b, id)?)?,
                0x26 => {
                    let k = read_string(b)?;
                    let v = read_string(b)?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = read_u32(b)?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    set_once(&mut p.maximum_packet_size, id, v)?
                }
                0x28 => set_once(
                    &mut p.wildcard_subscription_available,
                    id,
                    read_flag(b, id)?,
                )?,
                0x29 => set_once(
                    &mut p.subscription_identifier_available,
                    id,
                    read_flag(b, id)?,
                )?,
                0x2A => set_once(&mut p.shared_subscription_available, id, read_flag(b, id)?)?,
                _ => return Err(DecodeError::UnknownProperty(id)),
            }
        }
        Ok(p)
    }

    /// Bytes of the properties themselves, without the length prefix.
    pub fn body_len(&self) -> usize {
        if self.0.is_none() {
            return 0;
        }
        fn s(v: &Option<MqttString>) -> usize {
            v.as_ref().map_or(0, |v| 3 + v.len())
        }
        fn b(v: &Option<Bytes>) -> usize {
            v.as_ref().map_or(0, |v| 3 + v.len())
        }
        fn n<T>(v: &Option<T>, size: usize) -> usize {
            v.as_ref().map_or(0, |_| 1 + size)
        }
        n(&self.payload_format_indicator, 1)
            + n(&self.message_expiry_interval, 4)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + subscription_ids_len(&self.subscription_identifiers)
            + n(&self.session_expiry_interval, 4)
            + s(&self.assigned_client_identifier)
            + n(&self.server_keep_alive, 2)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n(&self.request_problem_information, 1)
            + n(&self.will_delay_interval, 4)
            + n(&self.request_response_information, 1)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n(&self.receive_maximum, 2)
            + n(&self.topic_alias_maximum, 2)
            + n(&self.topic_alias, 2)
            + n(&self.maximum_qos, 1)
            + n(&self.retain_available, 1)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + n(&self.maximum_packet_size, 4)
            + n(&self.wildcard_subscription_available, 1)
            + n(&self.subscription_identifier_available, 1)
            + n(&self.shared_subscription_available, 1)
    }

    /// Length prefix plus body.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        wire::varint_len(body) + body
    }

    /// Body length once `extra` is applied: its properties take the place of the same ones in
    /// this set.
    pub(crate) fn body_len_with(&self, extra: &PublishExtra<'_>) -> usize {
        let mut len = self.body_len();
        if extra.message_expiry_interval.is_some() {
            len += 5;
            if self.message_expiry_interval.is_some() {
                len -= 5;
            }
        }
        if extra.topic_alias.is_some() {
            len += 3;
            if self.topic_alias.is_some() {
                len -= 3;
            }
        }
        if !extra.subscription_identifiers.is_empty() {
            len += subscription_ids_len(extra.subscription_identifiers);
            len -= subscription_ids_len(&self.subscription_identifiers);
        }
        len
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        wire::write_varint(buf, self.body_len());
        if self.0.is_none() {
            return;
        }
        self.encode_fields(buf, &PublishExtra::default());
    }

    /// The property block with `extra` applied (see [`PublishExtra`]).
    pub(crate) fn encode_with(&self, extra: &PublishExtra<'_>, buf: &mut BytesMut) {
        wire::write_varint(buf, self.body_len_with(extra));
        self.encode_fields(buf, extra);
    }

    fn encode_fields(&self, buf: &mut BytesMut, extra: &PublishExtra<'_>) {
        fn byte(buf: &mut BytesMut, id: u8, v: Option<u8>) {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u8(v);
            }
        }
        fn u16p(buf: &mut BytesMut, id: u8, v: Option<u16>) {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u16(v);
            }
        }
        fn u32p(buf: &mut BytesMut, id: u8, v: Option<u32>) {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u32(v);
            }
        }
        fn strp(buf: &mut BytesMut, id: u8, v: &Option<MqttString>) {
            if let Some(v) = v {
                buf.put_u8(id);
                wire::write_binary(buf, v.as_bytes());
            }
        }
        fn binp(buf: &mut BytesMut, id: u8, v: &Option<Bytes>) {
            if let Some(v) = v {
                buf.put_u8(id);
                wire::write_binary(buf, v);
            }
        }
        byte(buf, 0x01, self.payload_format_indicator);
        u32p(
            buf,
            0x02,
            extra
                .message_expiry_interval
                .or(self.message_expiry_interval),
        );
        strp(buf, 0x03, &self.content_type);
        strp(buf, 0x08, &self.response_topic);
        binp(buf, 0x09, &self.correlation_data);
        let ids = if extra.subscription_identifiers.is_empty() {
            &self.subscription_identifiers[..]
        } else {
            extra.subscription_identifiers
        };
        for &id in ids {
            buf.put_u8(0x0B);
            wire::write_varint(buf, id as usize);
        }
        u32p(buf, 0x11, self.session_expiry_interval);
        strp(buf, 0x12, &self.assigned_client_identifier);
        u16p(buf, 0x13, self.server_keep_alive);
        strp(buf, 0x15, &self.authentication_method);
        binp(buf, 0x16, &self.authentication_data);
        byte(buf, 0x17, self.request_problem_information);
        u32p(buf, 0x18, self.will_delay_interval);
        byte(buf, 0x19, self.request_response_information);
        strp(buf, 0x1A, &self.response_information);
        strp(buf, 0x1C, &self.server_reference);
        strp(buf, 0x1F, &self.reason_string);
        u16p(buf, 0x21, self.receive_maximum);
        u16p(buf, 0x22, self.topic_alias_maximum);
        u16p(buf, 0x23, extra.topic_alias.or(self.topic_alias));
        byte(buf, 0x24, self.maximum_qos);
        byte(buf, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            buf.put_u8(0x26);
            wire::write_binary(buf, k.as_bytes());
            wire::write_binary(buf, v.as_bytes());
        }
        u32p(buf, 0x27, self.maximum_packet_size);
        byte(buf, 0x28, self.wildcard_subscription_available);
        byte(buf, 0x29, self.subscription_identifier_available);
        byte(buf, 0x2A, self.shared_subscription_available);
    }
}

fn subscription_ids_len(ids: &[u32]) -> usize {
    ids.iter().map(|&v| 1 + wire::varint_len(v as usize)).sum()
}

/// Properties a broker adds to a stored message's set for one delivery (§3.3.2.3): they take
/// the place of the same properties in the set, so the stored set is written unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishExtra<'a> {
    /// The alias this connection uses for the topic [MQTT-3.3.2-12].
    pub topic_alias: Option<u16>,
    /// The time left of the message's expiry interval [MQTT-3.3.2-6].
    pub message_expiry_interval: Option<u32>,
    /// One per matching subscription that has an identifier [MQTT-3.3.4-3].
    pub subscription_identifiers: &'a [u32],
}
