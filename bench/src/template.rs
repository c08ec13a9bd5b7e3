//! Packets encoded once by the codec and patched per message, so the hot loops copy bytes
//! instead of building `Packet` values: a PUBLISH differs from the previous one only in its
//! packet id and the 16-byte stamp at the start of its payload, an ack only in its packet id.
//!
//! The stamp (big-endian):
//!
//! ```text
//! bytes 0..4   publisher id   which publisher's sequence this message belongs to
//! bytes 4..8   sequence       0, 1, 2, ... per publisher
//! bytes 8..16  sent_ns        nanoseconds since the run's shared start Instant
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use petrel_codec::{
    encode, MqttString, Packet, PacketId, ProtocolVersion, PubAck, Publish, QoS, TopicName,
};

use crate::error::BenchError;

/// Payload bytes the stamp takes; the smallest payload a run accepts.
pub const STAMP_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

impl Stamp {
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let b: &[u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
        Some(Stamp {
            publisher: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            seq: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            sent_ns: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }

    fn write(&self, dst: &mut [u8]) {
        dst[0..4].copy_from_slice(&self.publisher.to_be_bytes());
        dst[4..8].copy_from_slice(&self.seq.to_be_bytes());
        dst[8..16].copy_from_slice(&self.sent_ns.to_be_bytes());
    }
}

/// One PUBLISH, encoded, with the offsets of the fields that change per message.
pub struct PublishTemplate {
    bytes: Box<[u8]>,
    /// Where the two packet id bytes sit (QoS 1/2 only).
    packet_id_at: Option<usize>,
    /// Where the payload starts, when it is long enough to carry a stamp.
    stamp_at: Option<usize>,
}

impl PublishTemplate {
    pub fn new(
        topic: &str,
        qos: QoS,
        retain: bool,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> Result<PublishTemplate, BenchError> {
        let topic_name = TopicName::new(topic)
            .map_err(|e| BenchError::Usage(format!("topic {topic:?}: {e}")))?;
        let mut publish = Publish::new(topic_name, Bytes::from(vec![0u8; payload_len]));
        publish.qos = qos;
        publish.retain = retain;
        if qos != QoS::AtMostOnce {
            publish.packet_id = PacketId::new(1);
        }
        let mut buf = BytesMut::new();
        encode(&Packet::Publish(publish), version, &mut buf)
            .map_err(|e| BenchError::Usage(format!("PUBLISH of {payload_len} bytes: {e}")))?;
        // Fixed header, then the topic as a length-prefixed string, then the packet id: the
        // layout of §3.3.2 in every version (v5 properties come after the id).
        let (_, len_bytes) = petrel_codec::wire::parse_varint(&buf[1..])
            .ok()
            .flatten()
            .ok_or_else(|| BenchError::Usage("codec wrote a bad fixed header".into()))?;
        let packet_id_at = (qos != QoS::AtMostOnce).then_some(1 + len_bytes + 2 + topic.len());
        let stamp_at = (payload_len >= STAMP_LEN).then_some(buf.len() - payload_len);
        Ok(PublishTemplate {
            bytes: buf.to_vec().into_boxed_slice(),
            packet_id_at,
            stamp_at,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one copy with its packet id and stamp filled in.
    pub fn append(&self, buf: &mut BytesMut, packet_id: u16, stamp: &Stamp) {
        let at = buf.len();
        buf.put_slice(&self.bytes);
        let out = &mut buf[at..];
        if let Some(p) = self.packet_id_at {
            out[p..p + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        if let Some(s) = self.stamp_at {
            stamp.write(&mut out[s..s + STAMP_LEN]);
        }
    }
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP as the codec encodes them for this version.
#[derive(Clone, Copy)]
pub struct Acks {
    puback: [u8; 4],
    pubrec: [u8; 4],
    pubrel: [u8; 4],
    pubcomp: [u8; 4],
}

/// Named as the specification names the packets.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl Acks {
    pub fn new(version: ProtocolVersion) -> Acks {
        let one = PacketId::MIN;
        Acks {
            puback: four(&Packet::PubAck(PubAck::new(one)), version),
            pubrec: four(&Packet::PubRec(PubAck::new(one)), version),
            pubrel: four(&Packet::PubRel(PubAck::new(one)), version),
            pubcomp: four(&Packet::PubComp(PubAck::new(one)), version),
        }
    }

    pub fn append(&self, buf: &mut BytesMut, kind: AckKind, packet_id: u16) {
        let mut b = match kind {
            AckKind::PubAck => self.puback,
            AckKind::PubRec => self.pubrec,
            AckKind::PubRel => self.pubrel,
            AckKind::PubComp => self.pubcomp,
        };
        b[2..4].copy_from_slice(&packet_id.to_be_bytes());
        buf.put_slice(&b);
    }
}

/// A success ack with no properties is type, length 2 and the id in every version
/// (§3.4.2.1 lets v5 omit the reason code).
fn four(packet: &Packet, version: ProtocolVersion) -> [u8; 4] {
    let mut buf = BytesMut::with_capacity(4);
    let _ = encode(packet, version, &mut buf);
    let mut out = [0u8; 4];
    if buf.len() == 4 {
        out.copy_from_slice(&buf);
    }
    out
}

/// Encodes a packet that is sent once (CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT).
pub fn encode_once(packet: &Packet, version: ProtocolVersion) -> Result<BytesMut, BenchError> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf)
        .map_err(|e| BenchError::Usage(format!("encoding {}: {e}", packet.name())))?;
    Ok(buf)
}

/// A client id the codec accepts; ids are generated, so failure is a bug in the generator.
pub fn client_id(text: &str) -> Result<MqttString, BenchError> {
    MqttString::new(text).map_err(|e| BenchError::Usage(format!("client id {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_codec::decode;

    #[test]
    fn patched_template_decodes_to_the_patched_fields() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let t = PublishTemplate::new("a/b/c", qos, true, 40, version).unwrap();
                let stamp = Stamp {
                    publisher: 7,
                    seq: 123_456,
                    sent_ns: 987_654_321,
                };
                let mut buf = BytesMut::new();
                t.append(&mut buf, 0xBEEF, &stamp);
                let Some(Packet::Publish(p)) = decode(&mut buf, version, u32::MAX).unwrap() else {
                    panic!("not a publish");
                };
                assert_eq!(p.topic.as_str(), "a/b/c");
                assert_eq!(p.qos, qos);
                assert!(p.retain);
                assert_eq!(p.payload.len(), 40);
                assert_eq!(Stamp::read(&p.payload), Some(stamp));
                let want_id = (qos != QoS::AtMostOnce).then(|| PacketId::new(0xBEEF).unwrap());
                assert_eq!(p.packet_id, want_id, "{version} {qos:?}");
            }
        }
    }

    #[test]
    fn acks_decode_with_the_patched_id() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let acks = Acks::new(version);
            let mut buf = BytesMut::new();
            acks.append(&mut buf, AckKind::PubRel, 0x0102);
            let p = decode(&mut buf, version, u32::MAX).unwrap().unwrap();
            assert_eq!(
                p,
                Packet::PubRel(PubAck::new(PacketId::new(0x0102).unwrap()))
            );
        }
    }
}
