//! An application message as it travels through the broker: decoded once from the publisher's
//! PUBLISH, then shared by `Arc` with every subscriber queue and the retained store.
//!
//! The QoS 0 wire form is the same for every subscriber of one protocol family, so it is
//! encoded once, on first use, and the bytes are shared ("encode once per distinct wire form").
//! QoS 1/2 forms differ per subscriber only in the packet id, and are written per delivery.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use petrel_codec::{PacketId, Properties, ProtocolVersion, Publish, PublishRef, QoS, TopicName};

/// Identifies the session a message came from (for v5 No Local) and each session in the index.
pub type SessionId = u64;

pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// QoS the publisher sent it with; each delivery uses min(this, granted).
    pub qos: QoS,
    /// The retain flag as published.
    pub retain: bool,
    /// v5 properties that travel with the message (payload format, content type, response
    /// topic, correlation data, user properties, message expiry). Pointer-sized, and no
    /// allocation when there are none (every 3.1.1 message).
    pub properties: Properties,
    pub origin: SessionId,
    /// Encoded QoS 0 PUBLISH frames: [3.x retain=0, 3.x retain=1, 5.0 retain=0, 5.0 retain=1].
    qos0_frames: [OnceLock<Bytes>; 4],
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Message {
    pub fn new(
        topic: TopicName,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
        origin: SessionId,
    ) -> Message {
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            origin,
            qos0_frames: Default::default(),
        }
    }

    /// Builds the message a client's PUBLISH carries. Only properties meant for the receiver
    /// are kept (the topic alias is the sender's connection state, not the message's).
    pub fn from_publish(publish: Publish, topic: TopicName, origin: SessionId) -> Message {
        let mut properties = publish.properties;
        if !properties.is_empty() {
            properties.topic_alias = None;
            properties.subscription_identifiers.clear();
        }
        if properties.is_empty() {
            // Drop a set emptied just now, so the message carries no allocation.
            properties = Properties::default();
        }
        Message::new(
            topic,
            publish.payload,
            publish.qos,
            publish.retain,
            properties,
            origin,
        )
    }

    /// A copy whose topic and payload own exactly their bytes. A decoded message shares the
    /// read chunk it arrived in with its neighbours; a long-lived holder (the retained store)
    /// takes this copy so that one retained message cannot pin a whole chunk.
    pub fn compacted(&self) -> Message {
        let topic = TopicName::new(&self.topic).unwrap_or_else(|_| self.topic.clone());
        Message::new(
            topic,
            Bytes::copy_from_slice(&self.payload),
            self.qos,
            self.retain,
            self.properties.clone(),
            self.origin,
        )
    }

    /// Bytes this message counts against queue limits.
    pub fn weight(&self) -> usize {
        self.payload.len() + self.topic.len()
    }

    /// Appends the PUBLISH for one delivery to `out`.
    pub fn encode_into(
        &self,
        version: ProtocolVersion,
        qos: QoS,
        packet_id: Option<PacketId>,
        retain: bool,
        dup: bool,
        out: &mut BytesMut,
    ) {
        if qos == QoS::AtMostOnce {
            let slot = usize::from(version.is_v5()) * 2 + usize::from(retain);
            let frame = self.qos0_frames[slot].get_or_init(|| {
                let mut buf = BytesMut::new();
                self.encode_fresh(version, qos, None, retain, false, &mut buf);
                buf.freeze()
            });
            out.extend_from_slice(frame);
        } else {
            self.encode_fresh(version, qos, packet_id, retain, dup, out);
        }
    }

    fn encode_fresh(
        &self,
        version: ProtocolVersion,
        qos: QoS,
        packet_id: Option<PacketId>,
        retain: bool,
        dup: bool,
        out: &mut BytesMut,
    ) {
        let publish = PublishRef {
            dup,
            qos,
            retain,
            topic: &self.topic,
            packet_id,
            properties: &self.properties,
            payload: &self.payload,
        };
        // A message decoded from a packet within the size limit always re-encodes.
        if let Err(e) = publish.encode(version, out) {
            tracing::error!(error = %e, topic = %self.topic, "cannot encode PUBLISH");
        }
    }
}
