//! A session on its way from one node to another (a client reconnected elsewhere): the
//! engine's `StoredSession` in one or more NATS messages, so that a queue of any length
//! crosses. Each part is the format version, its index and the number of parts, the number of
//! deliveries it holds, the session's settings as JSON (in the first part only), then the
//! deliveries in binary: number, QoS, retain,
//! stage and packet id, subscription identifiers, and the message in its record form.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use petrel_codec::{QoS, TopicFilter};
use petrel_engine::auth::Login;
use petrel_engine::record::{decode_message, message_record, options_byte, options_from};
use petrel_engine::session::Subscription;
use petrel_engine::store::{StoredDelivery, StoredSession, StoredStage};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What a node asks of the node that holds a client id's session.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(crate) struct TakeoverRequest {
    pub client_id: String,
    pub clean_start: bool,
    /// The node asking, for logs.
    pub node: String,
    /// Who connects (user name, certificate identity), and whether the ACL binds the client
    /// id to them: the session goes only to its owner or to a granted login. Absent from a
    /// node that does not send it: then nothing is checked.
    #[serde(default)]
    pub login: Option<(Option<String>, Option<String>)>,
    #[serde(default)]
    pub granted: bool,
}

/// The answer to a [`TakeoverRequest`] for a session that belongs to another login: nothing
/// was touched. (A session's parts start with [`VERSION`]; no session is an empty answer.)
pub(crate) const REFUSED: &[u8] = b"\xffrefused";

/// The answer to a [`TakeoverRequest`] from a node that is claiming the client id itself at
/// that moment: the asker gives its claim back and looks again.
pub(crate) const BUSY: &[u8] = b"\xffbusy";

const VERSION: u8 = 2;

/// Version, index, count, deliveries, settings length.
const PART_HEADER: usize = 1 + 4 + 4 + 4 + 4;

/// The session's settings: everything but its deliveries.
#[derive(Serialize, Deserialize)]
struct Settings {
    client_id: String,
    /// Who owns the session (user name, certificate identity); absent from a node that does
    /// not keep owners yet, and then the first login to resume it here becomes its owner.
    #[serde(default)]
    owner: Option<(Option<String>, Option<String>)>,
    expiry_interval: u32,
    subscriptions: Vec<(String, u8, u32)>,
    inbound_qos2: Vec<u16>,
}

/// One delivery's size in a part.
fn delivery_size(d: &StoredDelivery, record: &[u8]) -> usize {
    8 + 1 + 1 + 1 + 2 + 2 + 4 * d.subscription_ids.len() + 4 + record.len()
}

fn put_delivery(out: &mut BytesMut, d: &StoredDelivery, record: &[u8]) {
    let (stage, packet_id) = match d.stage {
        StoredStage::Queued => (0, 0),
        StoredStage::Published(id) => (1, id),
        StoredStage::Released(id) => (2, id),
    };
    out.put_u64(d.seq);
    out.put_u8(d.qos as u8);
    out.put_u8(u8::from(d.retain));
    out.put_u8(stage);
    out.put_u16(packet_id);
    let ids = &d.subscription_ids[..d.subscription_ids.len().min(usize::from(u16::MAX))];
    out.put_u16(ids.len() as u16);
    for id in ids {
        out.put_u32(*id);
    }
    out.put_u32(record.len() as u32);
    out.put_slice(record);
}

/// The session in parts of at most `max_bytes` each, deliveries in queue order. A delivery
/// that cannot fit even a part of its own is left out (counted in the second value); with
/// the packet size limit the fabric sets, none is.
pub(crate) fn encode(session: &StoredSession, max_bytes: usize) -> (Vec<Bytes>, usize) {
    let settings = serde_json::to_vec(&Settings {
        client_id: session.client_id.clone(),
        owner: session
            .login
            .as_ref()
            .map(|l| (l.username.clone(), l.certificate.clone())),
        expiry_interval: session.expiry_interval,
        subscriptions: session
            .subscriptions
            .iter()
            .map(|(f, s)| (f.to_string(), options_byte(s.options), s.id))
            .collect(),
        inbound_qos2: session.inbound_qos2.clone(),
    })
    .unwrap_or_default();
    let start = |settings: &[u8]| {
        let mut part = BytesMut::with_capacity(PART_HEADER + settings.len());
        part.put_u8(VERSION);
        // Index, count and deliveries: written at the end.
        part.put_u32(0);
        part.put_u32(0);
        part.put_u32(0);
        part.put_u32(settings.len() as u32);
        part.put_slice(settings);
        part
    };
    let mut parts = vec![(start(&settings), 0u32)];
    let mut left_out = 0;
    for d in &session.deliveries {
        let record = message_record(&d.message);
        let size = delivery_size(d, &record);
        if PART_HEADER + size > max_bytes {
            left_out += 1;
            continue;
        }
        if parts
            .last()
            .is_some_and(|(p, _)| p.len() + size > max_bytes)
        {
            parts.push((start(&[]), 0));
        }
        if let Some((part, n)) = parts.last_mut() {
            put_delivery(part, d, &record);
            *n += 1;
        }
    }
    let count = parts.len() as u32;
    let parts = parts
        .into_iter()
        .enumerate()
        .map(|(i, (mut part, n))| {
            part[1..5].copy_from_slice(&(i as u32).to_be_bytes());
            part[5..9].copy_from_slice(&count.to_be_bytes());
            part[9..13].copy_from_slice(&n.to_be_bytes());
            part.freeze()
        })
        .collect();
    (parts, left_out)
}

/// A part's index and the number of parts, from its header.
pub(crate) fn part_of(bytes: &[u8]) -> Result<(u32, u32), String> {
    if bytes.len() < PART_HEADER || bytes[0] != VERSION {
        return Err(format!("not a handover part (version {:?})", bytes.first()));
    }
    let index = u32::from_be_bytes(bytes[1..5].try_into().map_err(|_| "short part")?);
    let count = u32::from_be_bytes(bytes[5..9].try_into().map_err(|_| "short part")?);
    if index >= count {
        return Err(format!("part {index} of {count}"));
    }
    Ok((index, count))
}

/// The session from all its parts, in order.
pub(crate) fn decode(parts: &[Bytes]) -> Result<StoredSession, String> {
    let mut settings = None;
    let mut deliveries = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let (index, count) = part_of(part)?;
        if index as usize != i || count as usize != parts.len() {
            return Err(format!(
                "part {index} of {count} came as {i} of {}",
                parts.len()
            ));
        }
        let mut rest = &part[PART_HEADER - 8..];
        let held = rest.get_u32();
        let len = rest.get_u32() as usize;
        if rest.len() < len {
            return Err("short settings".to_owned());
        }
        if i == 0 {
            settings =
                Some(serde_json::from_slice::<Settings>(&rest[..len]).map_err(|e| e.to_string())?);
        }
        rest = &rest[len..];
        for _ in 0..held {
            deliveries.push(get_delivery(&mut rest)?);
        }
        if !rest.is_empty() {
            return Err(format!("part {index}: more than its {held} deliveries"));
        }
    }
    let settings = settings.ok_or("no parts")?;
    let mut subscriptions = Vec::new();
    for (filter, options, id) in settings.subscriptions {
        let filter = TopicFilter::new(&filter).map_err(|e| format!("filter {filter:?}: {e}"))?;
        let options = options_from(options).ok_or("subscription options")?;
        subscriptions.push((filter, Subscription { options, id }));
    }
    Ok(StoredSession {
        client_id: settings.client_id,
        login: settings.owner.map(|(username, certificate)| Login {
            username,
            certificate,
        }),
        expiry_interval: settings.expiry_interval,
        expires_at: None,
        subscriptions,
        deliveries,
        inbound_qos2: settings.inbound_qos2,
        pending_will: None,
    })
}

fn get_delivery(rest: &mut &[u8]) -> Result<StoredDelivery, String> {
    let short = || "short delivery".to_owned();
    if rest.len() < 17 {
        return Err(short());
    }
    let seq = rest.get_u64();
    let qos = QoS::from_u8(rest.get_u8()).ok_or("delivery QoS")?;
    let retain = rest.get_u8() != 0;
    let stage = rest.get_u8();
    let packet_id = rest.get_u16();
    let ids = usize::from(rest.get_u16());
    if rest.len() < 4 * ids + 4 {
        return Err(short());
    }
    let subscription_ids = (0..ids).map(|_| rest.get_u32()).collect();
    let len = rest.get_u32() as usize;
    if rest.len() < len {
        return Err(short());
    }
    let message = Arc::new(decode_message(&rest[..len])?);
    rest.advance(len);
    let stage = match stage {
        0 => StoredStage::Queued,
        1 => StoredStage::Published(packet_id),
        2 => StoredStage::Released(packet_id),
        other => return Err(format!("delivery stage {other}")),
    };
    Ok(StoredDelivery {
        seq,
        message,
        qos,
        retain,
        subscription_ids,
        stage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use petrel_codec::{Properties, SubscriptionOptions, TopicName};
    use petrel_engine::message::Message;

    fn session(n: usize) -> StoredSession {
        let message = |i: usize| {
            Arc::new(Message::new(
                TopicName::new(&format!("t/{i}")).unwrap(),
                Bytes::from(vec![b'x'; 100]),
                QoS::ExactlyOnce,
                false,
                Properties::default(),
                0,
            ))
        };
        StoredSession {
            client_id: "c1".into(),
            login: Some(Login {
                username: Some("bob".into()),
                certificate: None,
            }),
            expiry_interval: 300,
            expires_at: None,
            subscriptions: vec![(
                TopicFilter::new("t/#").unwrap(),
                Subscription {
                    options: SubscriptionOptions::new(QoS::ExactlyOnce),
                    id: 7,
                },
            )],
            deliveries: (0..n)
                .map(|i| StoredDelivery {
                    seq: i as u64 + 1,
                    message: message(i),
                    qos: if i % 2 == 0 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::ExactlyOnce
                    },
                    retain: false,
                    subscription_ids: vec![7],
                    stage: match i % 3 {
                        0 => StoredStage::Queued,
                        1 => StoredStage::Published(i as u16 + 1),
                        _ => StoredStage::Released(i as u16 + 1),
                    },
                })
                .collect(),
            inbound_qos2: vec![3, 9],
            pending_will: None,
        }
    }

    #[test]
    fn a_session_crosses_whole() {
        let s = session(5);
        let (parts, left_out) = encode(&s, 1 << 20);
        assert_eq!((parts.len(), left_out), (1, 0));
        let back = decode(&parts).unwrap();
        assert_eq!(back.client_id, "c1");
        assert_eq!(back.login, s.login, "the owner goes with the session");
        assert_eq!(back.expiry_interval, 300);
        assert_eq!(back.subscriptions.len(), 1);
        assert_eq!(back.subscriptions[0].1.id, 7);
        assert_eq!(back.inbound_qos2, vec![3, 9]);
        assert_eq!(back.deliveries.len(), 5);
        for (a, b) in s.deliveries.iter().zip(&back.deliveries) {
            assert_eq!((a.seq, a.qos, a.stage), (b.seq, b.qos, b.stage));
            assert_eq!(a.message.topic, b.message.topic);
            assert_eq!(a.message.payload, b.message.payload);
            assert_eq!(a.subscription_ids, b.subscription_ids);
        }
    }

    #[test]
    fn a_long_queue_crosses_in_parts_whole_and_in_order() {
        let s = session(100);
        let (parts, left_out) = encode(&s, 4096);
        assert_eq!(left_out, 0);
        assert!(parts.len() > 3, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.len() <= 4096));
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(part_of(p).unwrap(), (i as u32, parts.len() as u32));
        }
        let back = decode(&parts).unwrap();
        let seqs: Vec<u64> = back.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
        assert_eq!(back.deliveries[1].stage, StoredStage::Published(2));
        assert_eq!(back.deliveries[2].stage, StoredStage::Released(3));
        // A part missing or out of order is refused, not taken for the whole.
        assert!(decode(&parts[..parts.len() - 1]).is_err());
        let mut swapped = parts.clone();
        swapped.swap(1, 2);
        assert!(decode(&swapped).is_err());
    }

    #[test]
    fn a_delivery_larger_than_a_part_is_counted() {
        let (parts, left_out) = encode(&session(3), 120);
        assert_eq!(left_out, 3);
        assert!(decode(&parts).unwrap().deliveries.is_empty());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[Bytes::from_static(b"{")]).is_err());
        let (parts, _) = encode(&session(2), 1 << 20);
        for cut in 0..parts[0].len() {
            assert!(decode(&[parts[0].slice(..cut)]).is_err(), "cut at {cut}");
        }
    }
}
