//! Topic authorization over real sockets, with rumqttc (MQTT 3.1.1) clients logging in with
//! user names and passwords against a broker started from a config file and an ACL file, as
//! an operator would write them. A matrix of operations the rules forbid: each is refused the
//! way 3.1.1 can refuse it, and a watcher allowed to see everything proves that nothing
//! leaked (no message routed, no retained message revealed).

#[path = "common/rumqttc_util.rs"]
mod rumqttc_util;

use std::path::PathBuf;

use petrel_tests::TestBroker;
use rumqttc::{Event, Incoming, QoS, SubscribeReasonCode};
use rumqttc_util::{options, Peer};

const ACL: &str = r##"
[[rules]]
user = "alice"
access = "both"
topics = ["home/%u/#"]

[[rules]]
user = "bob"
access = "subscribe"
topics = ["home/alice/status"]

[[rules]]
user = "admin"
access = "both"
topics = ["#"]

[[rules]]
anonymous = true
access = "subscribe"
topics = ["public/#"]

# Every test ends with a message here, so "nothing else came" needs no sleep.
[[rules]]
everyone = true
access = "both"
topics = ["sentinel"]
"##;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn broker() -> (TestBroker, Dir) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "petrel-acl-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl.toml");
    std::fs::write(&acl, ACL).unwrap();
    let config = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:1883"

[auth]
allow_anonymous = true
acl_file = "{}"

[[auth.users]]
name = "alice"
password = "alice-pw"

[[auth.users]]
name = "bob"
password = "bob-pw"

[[auth.users]]
name = "admin"
password = "admin-pw"
"#,
        acl.display()
    );
    (TestBroker::start_toml(&config).await, Dir(dir))
}

async fn login(broker: &TestBroker, client_id: &str, user: Option<&str>) -> Peer {
    let mut o = options(broker.addr, client_id, true);
    if let Some(user) = user {
        o.set_credentials(user, format!("{user}-pw"));
    }
    Peer::connect_with(o).await
}

/// SUBSCRIBE and the SUBACK's code.
async fn try_subscribe(peer: &mut Peer, filter: &str) -> SubscribeReasonCode {
    peer.client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    let codes = peer
        .wait_for("SUBACK", |e| match e {
            Event::Incoming(Incoming::SubAck(ack)) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await;
    codes[0]
}

fn topics(publishes: &[rumqttc::Publish]) -> Vec<String> {
    publishes.iter().map(|p| p.topic.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_acl_forbids_leaks() {
    let (broker, _dir) = broker().await;
    let mut admin = login(&broker, "admin-1", Some("admin")).await;
    // Retained messages, one of which bob may see.
    for (topic, payload) in [
        ("home/alice/diary", "private"),
        ("home/alice/status", "home"),
    ] {
        admin
            .publish_confirmed(topic, QoS::AtLeastOnce, true, payload)
            .await;
    }
    let mut watcher = login(&broker, "watcher", Some("admin")).await;
    watcher.subscribe("#", QoS::AtLeastOnce).await;

    // bob: subscribe-only on one topic. Wildcards are allowed but reach only that topic;
    // a shared subscription must be covered outright; a filter that reaches nothing allowed
    // is refused.
    let mut bob = login(&broker, "bob-1", Some("bob")).await;
    assert_eq!(
        try_subscribe(&mut bob, "#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(
        try_subscribe(&mut bob, "home/+/diary").await,
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        try_subscribe(&mut bob, "$share/g/home/#").await,
        SubscribeReasonCode::Failure
    );
    // The retained replay for `#` brought only what bob may read.
    // bob publishes where he may not: 3.1.1 acknowledges and drops it.
    bob.publish_confirmed("home/alice/status", QoS::AtLeastOnce, false, "forged")
        .await;
    bob.publish_confirmed("home/alice/status", QoS::ExactlyOnce, false, "forged")
        .await;
    // alice publishes in her home and outside it.
    let mut alice = login(&broker, "alice-1", Some("alice")).await;
    alice
        .publish_confirmed("home/alice/status", QoS::AtLeastOnce, false, "out")
        .await;
    alice
        .publish_confirmed("home/alice/diary", QoS::AtLeastOnce, false, "dear")
        .await;
    alice
        .publish_confirmed("home/bob/door", QoS::AtLeastOnce, false, "open")
        .await;
    alice
        .publish_confirmed("$SYS/broker/uptime", QoS::AtLeastOnce, false, "0")
        .await;
    // Anonymous: public only.
    let mut anon = login(&broker, "anon-1", None).await;
    assert_eq!(
        try_subscribe(&mut anon, "home/#").await,
        SubscribeReasonCode::Failure
    );
    anon.publish_confirmed("public/news", QoS::AtLeastOnce, false, "hi")
        .await;
    admin
        .publish_confirmed("sentinel", QoS::AtLeastOnce, false, "end")
        .await;

    let seen_by_bob = bob.publishes_until("sentinel").await;
    assert_eq!(
        topics(&seen_by_bob),
        ["home/alice/status", "home/alice/status", "sentinel"],
        "the retained status, alice's update, the sentinel"
    );
    assert_eq!(&seen_by_bob[0].payload[..], b"home");
    assert!(seen_by_bob[0].retain);
    assert_eq!(&seen_by_bob[1].payload[..], b"out");

    // The watcher sees what was allowed to be published, and nothing else: not bob's
    // forgeries, not alice outside her home, not $SYS, not anonymous publishing.
    let seen_by_all = watcher.publishes_until("sentinel").await;
    let mut got: Vec<(String, Vec<u8>)> = seen_by_all
        .iter()
        .filter(|p| !p.retain)
        .map(|p| (p.topic.clone(), p.payload.to_vec()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("home/alice/diary".to_owned(), b"dear".to_vec()),
            ("home/alice/status".to_owned(), b"out".to_vec()),
            ("sentinel".to_owned(), b"end".to_vec()),
        ]
    );
    let stats = &broker.broker.stats;
    use petrel_engine::stats::Stats;
    assert_eq!(Stats::get(&stats.denied_publish), 5);
    assert_eq!(Stats::get(&stats.denied_subscribe), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_the_acl_forbids_refuses_the_login() {
    let (broker, _dir) = broker().await;
    let mut o = options(broker.addr, "bob-2", true);
    o.set_credentials("bob", "bob-pw");
    o.set_last_will(rumqttc::LastWill::new(
        "home/alice/status",
        "bob left",
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    let outcome = tokio::time::timeout(petrel_tests::PROMPT, eventloop.poll())
        .await
        .expect("an answer to CONNECT");
    match outcome {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 5, got {other:?}"),
    }
    drop(client);
}
