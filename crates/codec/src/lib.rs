//! # petrel-codec: the MQTT wire format
//!
//! Every packet of MQTT 3.1 (protocol name `MQIsdp`, level 3), 3.1.1 (level 4) and 5.0
//! (level 5), encoded and decoded in one place. The broker, the tests, the load generator and
//! the fuzz targets all use this crate; there is no second codec.
//!
//! How bytes become packets:
//!
//! ```text
//! read buffer (BytesMut) ──decode()──▶ fixed header ── too large? ──▶ Err(PacketTooLarge)
//!                                          │ not all there yet ──▶ Ok(None)
//!                                          ▼
//!                            split_to(len).freeze()  (one Bytes, no copy)
//!                                          ▼
//!                    per-packet parser (connect.rs, publish.rs, ...) slices
//!                    topics, payloads and strings out of that Bytes
//! ```
//!
//! * "Need more bytes" is `Ok(None)`; malformed input is `Err(DecodeError)`, each variant naming
//!   the normative statement it violates and mapping to one MQTT 5 reason code.
//! * Version differences live here and only here: callers pass the connection's
//!   [`ProtocolVersion`] and get the same packet structs back for every version.
//! * Nothing in this crate does I/O, reads a clock or depends on tokio.

mod ack;
mod auth;
mod connack;
mod connect;
mod disconnect;
mod error;
mod packet;
mod properties;
mod publish;
mod reason;
mod strings;
mod subscribe;
mod types;
mod unsubscribe;
pub mod wire;

pub use ack::{AckKind, PubAck};
pub use auth::Auth;
pub use connack::{ConnAck, ConnectReturnCode};
pub use connect::{connect_version, Connect, LastWill};
pub use disconnect::Disconnect;
pub use error::{DecodeError, EncodeError};
pub use packet::{decode, encode, encoded_len, Packet, PacketType, MAX_REMAINING_LENGTH};
pub use properties::{Properties, PropertyId, PropertySet, PublishExtra};
pub use publish::{Publish, PublishRef};
pub use reason::ReasonCode;
pub use strings::{MqttString, TopicFilter, TopicName};
pub use subscribe::{RetainHandling, SubAck, Subscribe, SubscriptionOptions};
pub use types::{PacketId, ProtocolVersion, QoS};
pub use unsubscribe::{UnsubAck, Unsubscribe};
