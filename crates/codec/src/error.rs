//! Decode errors, each naming the normative statement it enforces, and the one function that
//! maps them to MQTT 5 reason codes.

use crate::reason::ReasonCode;

/// Why a byte sequence is not a valid packet. "Not enough bytes yet" is never an error: the
/// decoder returns `Ok(None)` for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("remaining length is longer than 4 bytes [MQTT-1.5.5-1]")]
    MalformedVarInt,
    #[error("variable byte integer not in the fewest bytes [MQTT-1.5.5-1]")]
    NonMinimalVarInt,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} [MQTT-3.2.2-15]")]
    PacketTooLarge { size: usize, max: u32 },
    #[error("reserved packet type {0} [MQTT-2.1.2]")]
    ReservedPacketType(u8),
    #[error("packet type {0} is not defined in this protocol version")]
    PacketTypeNotInVersion(u8),
    #[error("reserved flag bits {flags:#06b} in the fixed header of {packet} [MQTT-2.1.3-1]")]
    InvalidHeaderFlags { packet: &'static str, flags: u8 },
    #[error("QoS 3 is not a valid QoS [MQTT-3.3.1-4]")]
    InvalidQoS,
    #[error("subscription option Maximum QoS 3 [MQTT-3.8.3.1]")]
    InvalidSubscriptionQoS,
    #[error("DUP flag set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")]
    DupOnQoS0,
    #[error("packet ends before its fields do [MQTT-1.5.5]")]
    Truncated,
    #[error("{0} bytes after the end of the packet's fields [MQTT-2.2.3]")]
    TrailingBytes(usize),
    #[error("string is not well-formed UTF-8 (or encodes a surrogate) [MQTT-1.5.4-1]")]
    InvalidUtf8,
    #[error("string contains U+0000 [MQTT-1.5.4-2]")]
    NullCharacter,
    #[error("protocol name {0:?} is not MQTT or MQIsdp [MQTT-3.1.2-1]")]
    InvalidProtocolName(String),
    #[error("protocol level {0} is not supported [MQTT-3.1.2-2]")]
    UnsupportedProtocolLevel(u8),
    #[error("reserved CONNECT flag is set [MQTT-3.1.2-3]")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]")]
    WillFlagsWithoutWill,
    #[error("password flag set without user name flag [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,
    #[error("topic name contains a wildcard [MQTT-3.3.2-2]")]
    WildcardInTopicName,
    #[error("topic name is empty [MQTT-4.7.3-1]")]
    EmptyTopicName,
    #[error("PUBLISH with an empty topic name and no Topic Alias [MQTT-3.3.2-1] [MQTT-4.7.3-1]")]
    EmptyTopicWithoutAlias,
    #[error("topic filter is empty [MQTT-4.7.3-1]")]
    EmptyTopicFilter,
    #[error("wildcard not on a whole level, or '#' not last [MQTT-4.7.1-2] [MQTT-4.7.1-3]")]
    InvalidTopicFilter,
    #[error("packet identifier is zero [MQTT-2.3.1-1]")]
    ZeroPacketId,
    #[error("SUBSCRIBE or UNSUBSCRIBE without topic filters [MQTT-3.8.3-3] [MQTT-3.10.3-2]")]
    NoTopicFilters,
    #[error("reserved bits set in subscription options [MQTT-3.8.3-5]")]
    SubscriptionOptionsReserved,
    #[error("retain handling 3 is not valid [MQTT-3.8.3-5]")]
    InvalidRetainHandling,
    #[error("shared subscription with No Local [MQTT-3.8.3-4]")]
    SharedNoLocal,
    #[error("property {0:#04x} appears more than once [MQTT-2.2.2-2]")]
    DuplicateProperty(u8),
    #[error("property {id:#04x} is not allowed in {packet} [MQTT-2.2.2-2]")]
    PropertyNotAllowed { id: u8, packet: &'static str },
    #[error("unknown property identifier {0:#04x} [MQTT-2.2.2-2]")]
    UnknownProperty(u8),
    #[error("property {0:#04x} has an invalid value")]
    InvalidPropertyValue(u8),
    #[error("property length runs past the packet [MQTT-2.2.2-1]")]
    PropertyLengthMismatch,
    #[error("reason code {code:#04x} is not valid in {packet} [MQTT-3.x]")]
    InvalidReasonCode { packet: &'static str, code: u8 },
    #[error("CONNACK flags have reserved bits set [MQTT-3.2.2-1]")]
    ConnAckReservedFlags,
}

impl DecodeError {
    /// The reason code a v5 server sends in DISCONNECT (or CONNACK) before closing for this
    /// error. The one place this mapping lives.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolLevel(_) | InvalidProtocolName(_) => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            WildcardInTopicName | EmptyTopicName => ReasonCode::TOPIC_NAME_INVALID,
            // A Topic Alias of 0 [MQTT-3.3.2-8].
            InvalidPropertyValue(0x23) => ReasonCode::TOPIC_ALIAS_INVALID,
            // What §2.2.2.2, §3.3.2.3 and §3.8 call a Protocol Error: a property twice, a
            // value out of its range (Receive Maximum 0, Subscription Identifier 0, ...), a
            // SUBSCRIBE or UNSUBSCRIBE with no filter, Maximum QoS or Retain Handling 3, an
            // empty topic without an alias.
            DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | ZeroPacketId
            | SharedNoLocal
            | NoTopicFilters
            | InvalidSubscriptionQoS
            | InvalidRetainHandling
            | EmptyTopicWithoutAlias
            | PacketTypeNotInVersion(_) => ReasonCode::PROTOCOL_ERROR,
            // A property not valid for its packet type, an unknown one, a value not of its
            // data type, anything else in the wrong shape: Malformed Packet (§2.2.2.2).
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// A packet that cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet too large to encode: remaining length {0} exceeds 268,435,455")]
    TooLarge(usize),
    #[error("packet type does not exist in protocol version {0}")]
    NotInVersion(crate::ProtocolVersion),
}
