//! What travels between nodes: a message in the engine's record form
//! (`petrel_engine::record`) behind a short header naming the node it came from, its number
//! there, and for a copy meant for one session only (forwarded after that session moved) the
//! session's client id. The number lets a node that receives one message through several of
//! its NATS subscriptions (overlapping filters) route it once.
//!
//! QoS 1/2 copies for one node or one shared group travel as a batch: every message the
//! forwarder had queued for that subject when it wrote, in one JetStream message, so that
//! JetStream stores, delivers and acknowledges them as one.

use bytes::{BufMut, Bytes, BytesMut};
use petrel_codec::LastWill;
use petrel_engine::message::Message;
use petrel_engine::record::{decode_message, message_record, publish_record};

const FRAME_VERSION: u8 = 1;
const BATCH_VERSION: u8 = 2;

/// A message as sent to other nodes; `target`: for that session only.
pub(crate) fn encode(origin: &str, seq: u64, target: Option<&str>, message: &Message) -> Bytes {
    let record = message_record(message);
    let origin = &origin.as_bytes()[..origin.len().min(255)];
    let target = target.map_or(&[][..], str::as_bytes);
    let target = &target[..target.len().min(usize::from(u16::MAX))];
    let mut out = BytesMut::with_capacity(2 + origin.len() + 10 + target.len() + record.len());
    out.put_u8(FRAME_VERSION);
    out.put_u8(origin.len() as u8);
    out.put_slice(origin);
    out.put_u64(seq);
    out.put_u16(target.len() as u16);
    out.put_slice(target);
    out.put_slice(&record);
    out.freeze()
}

/// A received frame: the origin node, its number there, the one session it is for (if so)
/// and the message.
pub(crate) struct Frame {
    pub origin: String,
    pub seq: u64,
    pub target: Option<String>,
    pub message: Message,
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Frame, String> {
    let (&version, rest) = bytes.split_first().ok_or("empty frame")?;
    if version != FRAME_VERSION {
        return Err(format!("unknown frame version {version}"));
    }
    let (&len, rest) = rest.split_first().ok_or("short frame")?;
    let len = usize::from(len);
    if rest.len() < len + 8 {
        return Err("short frame".to_owned());
    }
    let origin = std::str::from_utf8(&rest[..len])
        .map_err(|_| "origin is not UTF-8")?
        .to_owned();
    let seq = u64::from_be_bytes(rest[len..len + 8].try_into().map_err(|_| "short frame")?);
    let rest = &rest[len + 8..];
    if rest.len() < 2 {
        return Err("short frame".to_owned());
    }
    let target_len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let rest = &rest[2..];
    if rest.len() < target_len {
        return Err("short frame".to_owned());
    }
    let target = match target_len {
        0 => None,
        _ => Some(
            std::str::from_utf8(&rest[..target_len])
                .map_err(|_| "target is not UTF-8")?
                .to_owned(),
        ),
    };
    let message = decode_message(&rest[target_len..])?;
    Ok(Frame {
        origin,
        seq,
        target,
        message,
    })
}

/// Several messages from one node for one subject: the version, the origin and the count
/// (4 bytes), then for each message its number there, its record's length (4 bytes) and the
/// record.
pub(crate) struct Batch {
    bytes: BytesMut,
    /// The messages' numbers, in order.
    pub seqs: Vec<u64>,
}

impl Batch {
    pub fn new(origin: &str) -> Batch {
        let origin = &origin.as_bytes()[..origin.len().min(255)];
        let mut bytes = BytesMut::with_capacity(2 + origin.len() + 256);
        bytes.put_u8(BATCH_VERSION);
        bytes.put_u8(origin.len() as u8);
        bytes.put_slice(origin);
        bytes.put_u32(0); // the count, written by `finish`
        Batch {
            bytes,
            seqs: Vec::new(),
        }
    }

    /// What a message adds to a batch besides its record.
    pub const ENTRY_HEADER: usize = 12;

    /// A batch's bytes before its first message, for `origin`.
    pub fn header_len(origin: &str) -> usize {
        2 + origin.len().min(255) + 4
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn push(&mut self, seq: u64, record: &[u8]) {
        self.bytes.put_u64(seq);
        self.bytes.put_u32(record.len() as u32);
        self.bytes.put_slice(record);
        self.seqs.push(seq);
    }

    pub fn finish(mut self) -> (Bytes, Vec<u64>) {
        let at = 2 + usize::from(self.bytes[1]);
        self.bytes[at..at + 4].copy_from_slice(&(self.seqs.len() as u32).to_be_bytes());
        (self.bytes.freeze(), self.seqs)
    }
}

/// A single frame or a batch, as the frames it holds, in order.
pub(crate) fn decode_any(bytes: &[u8]) -> Result<Vec<Frame>, String> {
    if bytes.first() != Some(&BATCH_VERSION) {
        return decode(bytes).map(|f| vec![f]);
    }
    let rest = &bytes[1..];
    let (&len, rest) = rest.split_first().ok_or("short batch")?;
    let len = usize::from(len);
    if rest.len() < len + 4 {
        return Err("short batch".to_owned());
    }
    let origin = std::str::from_utf8(&rest[..len]).map_err(|_| "origin is not UTF-8")?;
    let count = u32::from_be_bytes(rest[len..len + 4].try_into().map_err(|_| "short batch")?);
    let mut rest = &rest[len + 4..];
    // Not trusted for the allocation: each entry takes at least its header.
    let mut frames = Vec::with_capacity((count as usize).min(rest.len() / Batch::ENTRY_HEADER));
    for _ in 0..count {
        if rest.len() < Batch::ENTRY_HEADER {
            return Err("short batch".to_owned());
        }
        let seq = u64::from_be_bytes(rest[..8].try_into().map_err(|_| "short batch")?);
        let size = u32::from_be_bytes(rest[8..12].try_into().map_err(|_| "short batch")?) as usize;
        rest = &rest[12..];
        if rest.len() < size {
            return Err("short batch".to_owned());
        }
        frames.push(Frame {
            origin: origin.to_owned(),
            seq,
            target: None,
            message: decode_message(&rest[..size])?,
        });
        rest = &rest[size..];
    }
    if frames.is_empty() || !rest.is_empty() {
        return Err("a batch's count does not match its entries".to_owned());
    }
    Ok(frames)
}

/// A will as kept in the wills bucket: its Will Delay Interval (4 bytes), then the will as a
/// message record (a PUBLISH carries no delay).
pub(crate) fn encode_will(will: &LastWill) -> Bytes {
    let delay = will.properties.will_delay_interval.unwrap_or(0);
    let mut properties = will.properties.clone();
    properties.will_delay_interval = None;
    let record = publish_record(
        None,
        will.qos,
        will.retain,
        &will.topic,
        &properties,
        &will.payload,
    );
    let mut out = BytesMut::with_capacity(4 + record.len());
    out.put_u32(delay);
    out.put_slice(&record);
    out.freeze()
}

/// Wall-clock milliseconds since the Unix epoch: times that other nodes read.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An offline session's will waiting for its delay, as kept in the wills bucket: when it is
/// due (wall-clock milliseconds, 8 bytes), then the will as [`encode_will`] has it.
pub(crate) fn encode_pending_will(due: std::time::Instant, will: &LastWill) -> Bytes {
    let due = wall_ms()
        + due
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as u64;
    let will = encode_will(will);
    let mut out = BytesMut::with_capacity(8 + will.len());
    out.put_u64(due);
    out.put_slice(&will);
    out.freeze()
}

/// A pending will from the bucket and when it is due (wall-clock milliseconds).
pub(crate) fn decode_pending_will(bytes: &[u8]) -> Result<(LastWill, u64), String> {
    if bytes.len() < 8 {
        return Err("short pending will".to_owned());
    }
    let due = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| "short pending will")?);
    let (will, _) = decode_will(&bytes[8..])?;
    Ok((will, due))
}

/// A will from the bucket and its delay in seconds.
pub(crate) fn decode_will(bytes: &[u8]) -> Result<(LastWill, u32), String> {
    if bytes.len() < 4 {
        return Err("short will".to_owned());
    }
    let delay = u32::from_be_bytes(bytes[..4].try_into().map_err(|_| "short will")?);
    let m = decode_message(&bytes[4..])?;
    Ok((
        LastWill {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            properties: m.properties,
        },
        delay,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_codec::{Properties, QoS, TopicName};

    #[test]
    fn a_message_crosses_with_its_properties_and_origin() {
        let mut properties = Properties::default();
        properties.content_type = Some(petrel_codec::MqttString::new("text/plain").unwrap());
        properties.message_expiry_interval = Some(60);
        let message = Message::new(
            TopicName::new("a/b").unwrap(),
            Bytes::from_static(b"hello"),
            QoS::ExactlyOnce,
            true,
            properties,
            7,
        )
        .with_expiry_from(std::time::Instant::now());
        let frame = decode(&encode("node-1", 42, None, &message)).unwrap();
        assert_eq!(frame.origin, "node-1");
        assert_eq!(frame.seq, 42);
        assert_eq!(frame.target, None);
        let targeted = decode(&encode("node-1", 43, Some("client/é"), &message)).unwrap();
        assert_eq!(targeted.target.as_deref(), Some("client/é"));
        assert_eq!(targeted.message.payload, message.payload);
        assert_eq!(&*frame.message.topic, "a/b");
        assert_eq!(&frame.message.payload[..], b"hello");
        assert_eq!(frame.message.qos, QoS::ExactlyOnce);
        assert!(frame.message.retain);
        assert_eq!(
            frame.message.properties.content_type.as_deref(),
            Some("text/plain")
        );
        let left = frame.message.expires_at.unwrap() - std::time::Instant::now();
        assert!(left.as_secs() >= 58 && left.as_secs() <= 60, "{left:?}");
    }

    #[test]
    fn a_will_keeps_its_delay_apart() {
        let mut properties = Properties::default();
        properties.will_delay_interval = Some(30);
        properties.content_type = Some(petrel_codec::MqttString::new("t").unwrap());
        let will = LastWill {
            topic: TopicName::new("w/1").unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties,
        };
        let (back, delay) = decode_will(&encode_will(&will)).unwrap();
        assert_eq!(delay, 30);
        assert_eq!(&*back.topic, "w/1");
        assert_eq!(&back.payload[..], b"gone");
        assert_eq!((back.qos, back.retain), (QoS::AtLeastOnce, true));
        assert_eq!(back.properties.will_delay_interval, None);
        assert_eq!(back.properties.content_type.as_deref(), Some("t"));
        assert!(decode_will(b"\0\0").is_err());

        let due = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let (pending, at) = decode_pending_will(&encode_pending_will(due, &will)).unwrap();
        let wall = wall_ms();
        assert!((89_000..=90_000).contains(&(at - wall)), "{}", at - wall);
        assert_eq!(&pending.payload[..], b"gone");
        assert!(decode_pending_will(b"\0\0\0").is_err());
    }

    #[test]
    fn truncated_or_foreign_frames_are_refused() {
        let message = Message::new(
            TopicName::new("t").unwrap(),
            Bytes::from_static(b"x"),
            QoS::AtMostOnce,
            false,
            Properties::default(),
            0,
        );
        let good = encode("n", 1, Some("c"), &message);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = good.to_vec();
        other[0] = 9;
        assert!(decode(&other).is_err());
    }

    #[test]
    fn a_batch_carries_its_messages_in_order_and_refuses_truncation() {
        let message = |payload: &'static [u8], qos| {
            Message::new(
                TopicName::new("b/t").unwrap(),
                Bytes::from_static(payload),
                qos,
                false,
                Properties::default(),
                0,
            )
        };
        let mut batch = Batch::new("node-2");
        batch.push(5, &message_record(&message(b"one", QoS::AtLeastOnce)));
        batch.push(9, &message_record(&message(b"", QoS::ExactlyOnce)));
        batch.push(10, &message_record(&message(b"three", QoS::AtLeastOnce)));
        let (bytes, seqs) = batch.finish();
        assert_eq!(seqs, [5, 9, 10]);
        let frames = decode_any(&bytes).unwrap();
        let got: Vec<(&str, u64, &[u8], QoS)> = frames
            .iter()
            .map(|f| (&f.origin[..], f.seq, &f.message.payload[..], f.message.qos))
            .collect();
        assert_eq!(
            got,
            [
                ("node-2", 5, &b"one"[..], QoS::AtLeastOnce),
                ("node-2", 9, &b""[..], QoS::ExactlyOnce),
                ("node-2", 10, &b"three"[..], QoS::AtLeastOnce)
            ]
        );
        assert!(frames.iter().all(|f| f.target.is_none()));
        for cut in 0..bytes.len() {
            assert!(decode_any(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A single frame still decodes.
        let single = encode("n", 3, None, &message(b"x", QoS::AtLeastOnce));
        assert_eq!(decode_any(&single).unwrap()[0].seq, 3);
    }
}
