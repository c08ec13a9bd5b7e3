//! A session on its way from one node to another (a client reconnected elsewhere): the
//! engine's `StoredSession` as JSON, messages in their record form (base64).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use petrel_codec::{QoS, TopicFilter};
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
}

#[derive(Serialize, Deserialize)]
struct WireSession {
    client_id: String,
    expiry_interval: u32,
    subscriptions: Vec<(String, u8, u32)>,
    deliveries: Vec<WireDelivery>,
    inbound_qos2: Vec<u16>,
}

#[derive(Serialize, Deserialize)]
struct WireDelivery {
    seq: u64,
    message: String,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
    /// 0 queued, 1 published, 2 released (QoS 2, PUBREC received).
    stage: u8,
    packet_id: u16,
}

/// The session as sent; deliveries past `max_bytes` are left out (counted in the second
/// value) so that the reply fits a NATS message.
pub(crate) fn encode(session: &StoredSession, max_bytes: usize) -> (Vec<u8>, usize) {
    let mut wire = WireSession {
        client_id: session.client_id.clone(),
        expiry_interval: session.expiry_interval,
        subscriptions: session
            .subscriptions
            .iter()
            .map(|(f, s)| (f.to_string(), options_byte(s.options), s.id))
            .collect(),
        deliveries: Vec::new(),
        inbound_qos2: session.inbound_qos2.clone(),
    };
    let mut size = 1024
        + wire
            .subscriptions
            .iter()
            .map(|s| s.0.len() + 16)
            .sum::<usize>();
    let mut left_out = 0;
    for d in &session.deliveries {
        let message = STANDARD.encode(message_record(&d.message));
        if size + message.len() + 128 > max_bytes {
            left_out += 1;
            continue;
        }
        size += message.len() + 128;
        let (stage, packet_id) = match d.stage {
            StoredStage::Queued => (0, 0),
            StoredStage::Published(id) => (1, id),
            StoredStage::Released(id) => (2, id),
        };
        wire.deliveries.push(WireDelivery {
            seq: d.seq,
            message,
            qos: d.qos as u8,
            retain: d.retain,
            subscription_ids: d.subscription_ids.clone(),
            stage,
            packet_id,
        });
    }
    (serde_json::to_vec(&wire).unwrap_or_default(), left_out)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<StoredSession, String> {
    let wire: WireSession = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut subscriptions = Vec::new();
    for (filter, options, id) in wire.subscriptions {
        let filter = TopicFilter::new(&filter).map_err(|e| format!("filter {filter:?}: {e}"))?;
        let options = options_from(options).ok_or("subscription options")?;
        subscriptions.push((filter, Subscription { options, id }));
    }
    let mut deliveries = Vec::new();
    for d in wire.deliveries {
        let record = STANDARD.decode(&d.message).map_err(|e| e.to_string())?;
        let stage = match d.stage {
            0 => StoredStage::Queued,
            1 => StoredStage::Published(d.packet_id),
            2 => StoredStage::Released(d.packet_id),
            other => return Err(format!("delivery stage {other}")),
        };
        deliveries.push(StoredDelivery {
            seq: d.seq,
            message: Arc::new(decode_message(&record)?),
            qos: QoS::from_u8(d.qos).ok_or("delivery QoS")?,
            retain: d.retain,
            subscription_ids: d.subscription_ids,
            stage,
        });
    }
    Ok(StoredSession {
        client_id: wire.client_id,
        expiry_interval: wire.expiry_interval,
        expires_at: None,
        subscriptions,
        deliveries,
        inbound_qos2: wire.inbound_qos2,
        pending_will: None,
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
        let (bytes, left_out) = encode(&s, 1 << 20);
        assert_eq!(left_out, 0);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.client_id, "c1");
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
    fn what_does_not_fit_is_counted() {
        let (bytes, left_out) = encode(&session(100), 4096);
        assert!(bytes.len() <= 4096, "{}", bytes.len());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.deliveries.len() + left_out, 100);
        assert!(left_out > 0);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(decode(b"{").is_err());
        assert!(decode(b"{\"client_id\":1}").is_err());
    }
}
