//! An application message as it travels through the broker: decoded once from the publisher's
//! PUBLISH, then shared by `Arc` with every subscriber queue and the retained store.
//!
//! The QoS 0 wire form is the same for every subscriber of one protocol family, so it is
//! encoded once, on first use, and the bytes are shared ("encode once per distinct wire form").
//! QoS 1/2 forms differ per subscriber only in the packet id, and are written per delivery.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use petrel_codec::{
    PacketId, Properties, ProtocolVersion, Publish, PublishExtra, PublishRef, QoS, TopicName,
};

use crate::session::Egress;

/// A delivery was not written: the PUBLISH would exceed the client's Maximum Packet Size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge;

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
    /// When the v5 Message Expiry Interval runs out, counted from when the broker received
    /// the message; `None` when it has none.
    pub expires_at: Option<Instant>,
    /// The durable store's id for this message, once a persistent session queued it.
    pub store_id: OnceLock<u64>,
    /// No delivery of it is written to a client before this durability token is durable
    /// (0: none to wait for). A QoS 2 message from a persistent session waits for its packet
    /// id record: delivered earlier, a crash would let the unacknowledged publisher send it
    /// again as a new message.
    pub hold: u64,
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
            expires_at: None,
            store_id: OnceLock::new(),
            hold: 0,
            qos0_frames: Default::default(),
        }
    }

    /// Starts the Message Expiry Interval, if the message has one, at `received`.
    pub fn with_expiry_from(mut self, received: Instant) -> Message {
        self.expires_at = self
            .properties
            .message_expiry_interval
            .map(|secs| received + Duration::from_secs(u64::from(secs)));
        self
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// Seconds of the expiry interval left at `now`, rounded up so that a message still
    /// alive is never forwarded with 0 [MQTT-3.3.2-6].
    fn expiry_left(&self, now: Instant) -> Option<u32> {
        let at = self.expires_at?;
        let left = at.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(u32::try_from(secs.max(1)).unwrap_or(u32::MAX))
    }

    /// Builds the message a client's PUBLISH carries. Only properties meant for the receiver
    /// are kept (the topic alias is the sender's connection state, not the message's).
    pub fn from_publish(
        publish: Publish,
        topic: TopicName,
        origin: SessionId,
        received: Instant,
    ) -> Message {
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
        .with_expiry_from(received)
    }

    /// A copy whose topic and payload own exactly their bytes. A decoded message shares the
    /// read chunk it arrived in with its neighbours; a long-lived holder (the retained store)
    /// takes this copy so that one retained message cannot pin a whole chunk.
    pub fn compacted(&self) -> Message {
        let topic = TopicName::new(&self.topic).unwrap_or_else(|_| self.topic.clone());
        let mut copy = Message::new(
            topic,
            Bytes::copy_from_slice(&self.payload),
            self.qos,
            self.retain,
            self.properties.clone(),
            self.origin,
        );
        copy.expires_at = self.expires_at;
        copy.hold = self.hold;
        copy
    }

    /// Bytes this message counts against queue limits.
    pub fn weight(&self) -> usize {
        self.payload.len() + self.topic.len()
    }

    /// Appends the PUBLISH for one delivery to the connection `egress` describes: with the
    /// expiry interval left, the subscription identifiers, and a topic alias where the
    /// connection uses them. Nothing is written when the packet would exceed the client's
    /// Maximum Packet Size.
    #[allow(clippy::too_many_arguments)]
    pub fn write_delivery(
        &self,
        egress: &mut Egress,
        qos: QoS,
        packet_id: Option<PacketId>,
        retain: bool,
        dup: bool,
        subscription_ids: &[u32],
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), TooLarge> {
        let version = egress.version;
        let plain = !version.is_v5()
            || (self.expires_at.is_none()
                && subscription_ids.is_empty()
                && !egress.aliases.enabled());
        let limit = egress.max_packet_size as usize;
        if plain {
            if limit == u32::MAX as usize {
                self.encode_into(version, qos, packet_id, retain, dup, out);
                return Ok(());
            }
            let start = out.len();
            self.encode_into(version, qos, packet_id, retain, dup, out);
            if out.len() - start > limit {
                out.truncate(start);
                return Err(TooLarge);
            }
            return Ok(());
        }
        let alias = egress.aliases.lookup(&self.topic);
        let mut publish = self.publish_ref(qos, packet_id, retain, dup);
        publish.extra = PublishExtra {
            topic_alias: alias.map(|(a, _)| a),
            message_expiry_interval: self.expiry_left(now),
            subscription_identifiers: subscription_ids,
        };
        if let Some((_, true)) = alias {
            // The client holds this alias already: the topic goes empty [MQTT-3.3.2-?].
            publish.topic = "";
        }
        if publish.encoded_len(version) > limit {
            return Err(TooLarge);
        }
        if let Err(e) = publish.encode(version, out) {
            tracing::error!(error = %e, topic = %self.topic, "cannot encode PUBLISH");
            return Err(TooLarge);
        }
        if let Some((a, false)) = alias {
            egress.aliases.commit(&self.topic, a);
        }
        Ok(())
    }

    /// This message as a PUBLISH with the stored properties as they are, borrowed.
    fn publish_ref(
        &self,
        qos: QoS,
        packet_id: Option<PacketId>,
        retain: bool,
        dup: bool,
    ) -> PublishRef<'_> {
        PublishRef {
            dup,
            qos,
            retain,
            topic: &self.topic,
            packet_id,
            properties: &self.properties,
            extra: PublishExtra::default(),
            payload: &self.payload,
        }
    }

    /// Appends the PUBLISH for one delivery to `out`, with the stored properties as they are.
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
        let publish = self.publish_ref(qos, packet_id, retain, dup);
        // A message decoded from a packet within the size limit always re-encodes.
        if let Err(e) = publish.encode(version, out) {
            tracing::error!(error = %e, topic = %self.topic, "cannot encode PUBLISH");
        }
    }
}
