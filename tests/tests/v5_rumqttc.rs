//! MQTT 5.0 against an independent client: rumqttc's v5 module, over real sockets. Topic
//! aliases both ways, subscription identifiers, shared subscriptions, session expiry and
//! resumption, message expiry, request/response properties and Receive Maximum, each as
//! rumqttc sees them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use petrel_tests::{TestBroker, PROMPT};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const QUIET: Duration = Duration::from_millis(300);

/// A rumqttc v5 client whose event loop runs in its own task; incoming packets arrive on a
/// channel. The loop stops at the first error instead of reconnecting.
struct V5Peer {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
    session_present: bool,
}

fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o
}

impl V5Peer {
    async fn connect(o: MqttOptions) -> V5Peer {
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        });
        let connack = tokio::time::timeout(PROMPT, rx.recv())
            .await
            .expect("CONNACK in time")
            .expect("event loop running");
        let Packet::ConnAck(ack) = connack else {
            panic!("expected CONNACK, got {connack:?}");
        };
        V5Peer {
            client,
            incoming: rx,
            task,
            session_present: ack.session_present,
        }
    }

    /// The next incoming PUBLISH, skipping acknowledgements.
    async fn publish(&mut self) -> Publish {
        loop {
            match tokio::time::timeout(PROMPT, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return p,
                Ok(Some(_)) => continue,
                other => panic!("expected a PUBLISH, got {other:?}"),
            }
        }
    }

    /// Waits for the SUBACK of the subscription just sent.
    async fn suback(&mut self) {
        loop {
            match tokio::time::timeout(PROMPT, self.incoming.recv()).await {
                Ok(Some(Packet::SubAck(_))) => return,
                Ok(Some(_)) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// PUBLISH packets that arrive within `QUIET`.
    async fn publishes_within_quiet(&mut self) -> Vec<Publish> {
        let mut got = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout(QUIET, self.incoming.recv()).await {
            if let Packet::Publish(p) = p {
                got.push(p);
            }
        }
        got
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.suback().await;
    }

    async fn disconnect(self) {
        self.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(PROMPT, self.task).await;
    }
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_properties_reach_the_subscriber_at_every_qos() {
    let broker = TestBroker::start().await;
    let mut sub = V5Peer::connect(options(broker.addr, "sub")).await;
    sub.subscribe("rr/+", QoS::ExactlyOnce).await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("rr/reply".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr")),
            user_properties: vec![("k".into(), format!("{i}"))],
            ..Default::default()
        };
        publ.client
            .publish_with_properties(format!("rr/{i}"), qos, false, "{}", props)
            .await
            .unwrap();
        let got = sub.publish().await;
        assert_eq!(got.qos, qos);
        let p = got.properties.expect("properties");
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.response_topic.as_deref(), Some("rr/reply"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00corr"[..]));
        assert_eq!(p.user_properties, [("k".to_owned(), format!("{i}"))]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_both_ways() {
    let broker = TestBroker::start().await;
    let mut o = options(broker.addr, "sub");
    o.set_topic_alias_max(Some(4));
    let mut sub = V5Peer::connect(o).await;
    sub.subscribe("alias/#", QoS::AtMostOnce).await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    // The publisher sets alias 1 for the topic, then sends by alias alone.
    for i in 0..3 {
        let t = if i == 0 { "alias/long/topic/name" } else { "" };
        let props = PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        publ.client
            .publish_with_properties(t, QoS::AtMostOnce, false, format!("{i}"), props)
            .await
            .unwrap();
    }
    // rumqttc 0.25 records the broker's aliases (its state would answer an unknown one with a
    // protocol error) but hands the application the packet as received, so the first message
    // carries the topic and alias 1, the later ones alias 1 alone.
    for i in 0..3 {
        let got = sub.publish().await;
        let want_topic = if i == 0 { "alias/long/topic/name" } else { "" };
        assert_eq!(topic(&got), want_topic, "message {i}");
        assert_eq!(text(&got), format!("{i}"));
        let alias = got.properties.as_ref().and_then(|p| p.topic_alias);
        assert_eq!(
            alias,
            Some(1),
            "the broker uses an alias towards the subscriber"
        );
    }
    // The subscriber accepted every alias: its connection still delivers.
    publ.client
        .publish("alias/other", QoS::AtMostOnce, false, "after")
        .await
        .unwrap();
    let got = sub.publish().await;
    assert_eq!(topic(&got), "alias/other");
    assert_eq!(text(&got), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifiers_come_back_with_matching_messages() {
    let broker = TestBroker::start().await;
    let mut sub = V5Peer::connect(options(broker.addr, "sub")).await;
    let props = SubscribeProperties {
        id: Some(11),
        user_properties: vec![],
    };
    sub.client
        .subscribe_with_properties("sid/+", QoS::AtLeastOnce, props)
        .await
        .unwrap();
    sub.suback().await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    publ.client
        .publish("sid/a", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let got = sub.publish().await;
    assert_eq!(got.properties.unwrap().subscription_identifiers, [11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_members_split_the_messages_with_none_lost() {
    let broker = TestBroker::start().await;
    let mut a = V5Peer::connect(options(broker.addr, "a")).await;
    let mut b = V5Peer::connect(options(broker.addr, "b")).await;
    a.subscribe("$share/workers/jobs", QoS::AtLeastOnce).await;
    b.subscribe("$share/workers/jobs", QoS::AtLeastOnce).await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    for i in 0..20 {
        publ.client
            .publish("jobs", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(text(&a.publish().await));
        seen.push(text(&b.publish().await));
    }
    assert!(a.publishes_within_quiet().await.is_empty());
    assert!(b.publishes_within_quiet().await.is_empty());
    seen.sort_by_key(|s| s.parse::<u32>().unwrap());
    assert_eq!(seen, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_with_expiry_interval_is_resumed_with_its_queued_messages() {
    let broker = TestBroker::start().await;
    let mut o = options(broker.addr, "durable");
    o.set_clean_start(true);
    o.set_session_expiry_interval(Some(30));
    let mut sub = V5Peer::connect(o).await;
    sub.subscribe("q/+", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    publ.client
        .publish("q/1", QoS::AtLeastOnce, false, "queued")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut o = options(broker.addr, "durable");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(30));
    let mut back = V5Peer::connect(o).await;
    assert!(back.session_present);
    assert_eq!(text(&back.publish().await), "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_interval_is_forwarded_with_the_time_left() {
    let broker = TestBroker::start().await;
    let mut sub = V5Peer::connect(options(broker.addr, "sub")).await;
    sub.subscribe("exp", QoS::AtMostOnce).await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    let props = PublishProperties {
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    publ.client
        .publish_with_properties("exp", QoS::AtMostOnce, false, "x", props)
        .await
        .unwrap();
    let got = sub.publish().await;
    let left = got.properties.unwrap().message_expiry_interval.unwrap();
    assert!((29..=30).contains(&left), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_respects_the_clients_receive_maximum() {
    let broker = TestBroker::start().await;
    let mut o = options(broker.addr, "slow");
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut sub = V5Peer::connect(o).await;
    sub.client
        .subscribe_many([Filter::new("rm", QoS::AtLeastOnce)])
        .await
        .unwrap();
    sub.suback().await;
    let publ = V5Peer::connect(options(broker.addr, "pub")).await;
    for i in 0..6 {
        publ.client
            .publish("rm", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let first = sub.publishes_within_quiet().await;
    assert_eq!(
        first.len(),
        2,
        "no more than Receive Maximum unacknowledged"
    );
    sub.client.ack(&first[0]).await.unwrap();
    let next = sub.publishes_within_quiet().await;
    assert_eq!(next.len(), 1, "one acknowledgement, one more message");
    assert_eq!(text(&next[0]), "2");
}
