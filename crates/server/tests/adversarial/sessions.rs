//! A session belongs to the login that made it. The attacks: an authenticated user reuses
//! another user's client id to read the messages waiting in that user's session, to delete
//! them (a clean start) or to kick that user off; and a SCRAM client proves one user while its
//! CONNECT names another. Bound: nothing of the victim's session reaches the attacker, the
//! session is untouched (its messages all reach the victim afterwards), and the victim stays
//! connected. A client id the ACL binds to several logins is shared by them, and even then a
//! message only reaches a login whose rules let it read it.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use petrel_codec::{Connect, MqttString, Packet, Properties, ProtocolVersion};
use petrel_engine::scram;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(5);

/// bob reads `home/bob/#`, alice `home/alice/#`, ops `ops/#`; admin publishes anywhere.
/// `shared-id` is bound to bob and ops.
const ACL: &str = r##"
[[rules]]
user = "admin"
access = "both"
topics = ["#"]

[[rules]]
everyone = true
access = "both"
topics = ["home/%u/#"]

[[rules]]
user = "ops"
access = "both"
topics = ["ops/#"]

[[client_ids]]
client_id = "shared-id"
users = ["bob", "ops"]
"##;

struct Guarded {
    broker: Broker,
    dir: PathBuf,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> Guarded {
    let dir = std::env::temp_dir().join(format!(
        "petrel-adversarial-sessions-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl.toml");
    std::fs::write(&acl, ACL).unwrap();
    let mut tables =
        String::from("[storage]\nmode = \"memory\"\n\n[auth]\nallow_anonymous = false\n");
    tables.push_str(&format!("acl_file = {:?}\n", acl.display().to_string()));
    for user in ["admin", "alice", "bob", "ops"] {
        tables.push_str(&format!(
            "\n[[auth.users]]\nname = \"{user}\"\npassword = \"{user}-secret\"\n"
        ));
    }
    Guarded {
        broker: Broker::start_with("", &tables),
        dir,
    }
}

/// A CONNECT as `user` (its password is `{user}-secret`), persistent unless `clean`.
fn login(version: ProtocolVersion, client_id: &str, user: &str, clean: bool) -> Vec<u8> {
    let mut properties = Properties::default();
    if version.is_v5() && !clean {
        properties.session_expiry_interval = Some(600);
    }
    encode(
        Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: clean,
            keep_alive: 0,
            properties,
            client_id: MqttString::new(client_id).unwrap(),
            will: None,
            username: Some(MqttString::new(user).unwrap()),
            password: Some(Bytes::from(format!("{user}-secret"))),
            bridge: false,
        })),
        version,
    )
}

fn encode(packet: Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    petrel_codec::encode(&packet, version, &mut out).unwrap();
    out.to_vec()
}

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
/// 3.1.1 CONNACK: refused, not authorized (return code 5).
const REFUSED_V311: [u8; 4] = [0x20, 0x02, 0x00, 0x05];
const SESSION_PRESENT_V311: [u8; 4] = [0x20, 0x02, 0x01, 0x00];

async fn connected(g: &Guarded, version: ProtocolVersion, id: &str, user: &str) -> RawClient {
    let mut c = RawClient::connect(g.broker.addr).await;
    c.send(&login(version, id, user, false)).await;
    let ack = c.packet(WAIT).await.expect("CONNACK");
    assert_eq!(ack[0], 0x20, "CONNACK expected, got {}", hex(&ack));
    assert_eq!(ack[3], 0, "{user} refused as {id}: {}", hex(&ack));
    c
}

/// The topics of the PUBLISH packets that arrive within `wait` (acknowledging none).
async fn publishes(c: &mut RawClient, wait: Duration) -> Vec<String> {
    let mut topics = Vec::new();
    while let Ok(p) = c.packet(wait).await {
        if p[0] >> 4 == 3 {
            topics.push(publish_topic(&p));
        }
    }
    topics
}

/// admin publishes `topics` at QoS 1 and waits for each PUBACK.
async fn publish_all(g: &Guarded, topics: &[&str]) {
    let mut admin = connected(g, V311, "admin-pub", "admin").await;
    for (i, topic) in topics.iter().enumerate() {
        let id = i as u16 + 1;
        admin.send(&publish(topic, 1, id, b"for bob only")).await;
        admin.expect(&puback(id), WAIT).await;
    }
}

/// bob's session under `id`: subscribed to `home/bob/#` at QoS 1, three messages delivered
/// and unacknowledged, then the socket dropped; two more queued while he is away.
async fn leave_bob_with_messages(g: &Guarded, id: &str) {
    let mut bob = connected(g, V311, id, "bob").await;
    bob.send(&subscribe(1, "home/bob/#", 1)).await;
    bob.expect(&suback(1, 1), WAIT).await;
    publish_all(g, &["home/bob/1", "home/bob/2", "home/bob/3"]).await;
    assert_eq!(
        publishes(&mut bob, Duration::from_millis(500)).await,
        ["home/bob/1", "home/bob/2", "home/bob/3"]
    );
    drop(bob);
    // The broker notices the drop before the next messages, so they queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_all(g, &["home/bob/4", "home/bob/5"]).await;
}

/// [MQTT-3.1.4-2] lets a new connection take over a client id's session; it must not let
/// another user do so. alice, with bob's client id, is refused (3.1.1 return code 5, v5
/// 0x87) whether she resumes or starts clean, and bob then finds every message waiting.
#[tokio::test]
async fn another_user_cannot_resume_read_or_discard_a_session() {
    let _machine = light().await;
    let g = start();
    leave_bob_with_messages(&g, "bob-phone").await;

    let mut alice = RawClient::connect(g.broker.addr).await;
    alice.send(&login(V311, "bob-phone", "alice", false)).await;
    let close = alice.until_closed(WAIT).await.expect("refused and closed");
    assert_eq!(
        close.packets,
        [REFUSED_V311.to_vec()],
        "alice resuming bob's session"
    );

    for clean in [false, true] {
        let mut alice = RawClient::connect(g.broker.addr).await;
        alice.send(&login(V5, "bob-phone", "alice", clean)).await;
        let close = alice.until_closed(WAIT).await.expect("refused and closed");
        assert_eq!(
            close
                .packets
                .iter()
                .map(|p| (p[0], p[3]))
                .collect::<Vec<_>>(),
            [(0x20, 0x87)],
            "alice with clean start {clean}: CONNACK 0x87 Not authorized"
        );
    }

    let mut bob = RawClient::connect(g.broker.addr).await;
    bob.send(&login(V311, "bob-phone", "bob", false)).await;
    bob.expect(&SESSION_PRESENT_V311, WAIT).await;
    assert_eq!(
        publishes(&mut bob, Duration::from_millis(500)).await,
        [
            "home/bob/1",
            "home/bob/2",
            "home/bob/3",
            "home/bob/4",
            "home/bob/5"
        ],
        "bob's session is whole: three resent, two queued"
    );
}

/// alice cannot kick bob off by connecting with his client id while he is online.
#[tokio::test]
async fn another_user_cannot_take_over_a_connected_client() {
    let _machine = light().await;
    let g = start();
    let mut bob = connected(&g, V5, "bob-laptop", "bob").await;
    let mut alice = RawClient::connect(g.broker.addr).await;
    alice.send(&login(V5, "bob-laptop", "alice", true)).await;
    let close = alice.until_closed(WAIT).await.expect("refused and closed");
    assert_eq!(close.packets.len(), 1);
    assert_eq!((close.packets[0][0], close.packets[0][3]), (0x20, 0x87));
    bob.send(&PINGREQ).await;
    bob.expect(&PINGRESP, WAIT).await;
    // And bob himself may take his own session over, as the specification says.
    let mut again = RawClient::connect(g.broker.addr).await;
    again.send(&login(V5, "bob-laptop", "bob", false)).await;
    let ack = again.packet(WAIT).await.unwrap();
    assert_eq!(
        (ack[0], ack[2], ack[3]),
        (0x20, 0x01, 0x00),
        "{}",
        hex(&ack)
    );
}

/// A client id bound to bob and ops is shared by them; ops resuming bob's session gets none
/// of bob's unacknowledged messages, because ops may not read `home/bob/#`: the resend path
/// applies the receiving login's ACL like the queue path.
#[tokio::test]
async fn a_bound_client_id_is_shared_but_each_login_reads_only_its_own_topics() {
    let _machine = light().await;
    let g = start();
    leave_bob_with_messages(&g, "shared-id").await;

    // alice holds no binding to this id: refused before anything is looked at.
    let mut alice = RawClient::connect(g.broker.addr).await;
    alice.send(&login(V311, "shared-id", "alice", true)).await;
    let close = alice.until_closed(WAIT).await.expect("refused and closed");
    assert_eq!(close.packets, [REFUSED_V311.to_vec()]);

    let mut ops = RawClient::connect(g.broker.addr).await;
    ops.send(&login(V311, "shared-id", "ops", false)).await;
    ops.expect(&SESSION_PRESENT_V311, WAIT).await;
    assert_eq!(
        publishes(&mut ops, Duration::from_millis(700)).await,
        Vec::<String>::new(),
        "nothing on home/bob/# reaches ops"
    );
}

/// A SCRAM-SHA-256 exchange proves a user name; a CONNECT whose User Name field names
/// another user is refused, so that the topic rules and the session owner are the proven
/// user's. Before, alice proving herself while naming bob got bob's rules.
#[tokio::test]
async fn scram_proves_the_user_the_rules_apply_to() {
    let _machine = light().await;
    let g = start();
    for (named, want) in [(Some("bob"), 0x87u8), (Some("alice"), 0x00), (None, 0x00)] {
        let mut c = RawClient::connect(g.broker.addr).await;
        let nonce = "fyko+d2lbbFgONRv9qkxdawL";
        let mut properties = Properties::default();
        properties.authentication_method = Some(MqttString::new(scram::METHOD).unwrap());
        properties.authentication_data = Some(Bytes::from(scram::client::first("alice", nonce)));
        c.send(&encode(
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 0,
                properties,
                client_id: MqttString::new("scram-client").unwrap(),
                will: None,
                username: named.map(|n| MqttString::new(n).unwrap()),
                password: None,
                bridge: false,
            })),
            V5,
        ))
        .await;
        let challenge = c.packet(WAIT).await.expect("AUTH 0x18");
        let server_first = auth_data(&challenge);
        let (last, _) = scram::client::last("alice", nonce, "alice-secret", &server_first);
        let mut properties = Properties::default();
        properties.authentication_method = Some(MqttString::new(scram::METHOD).unwrap());
        properties.authentication_data = Some(Bytes::from(last));
        c.send(&encode(
            Packet::Auth(petrel_codec::Auth {
                reason: petrel_codec::ReasonCode::CONTINUE_AUTHENTICATION,
                properties,
            }),
            V5,
        ))
        .await;
        let ack = c.packet(WAIT).await.expect("CONNACK");
        assert_eq!(
            (ack[0], ack[3]),
            (0x20, want),
            "SCRAM as alice naming {named:?}: {}",
            hex(&ack)
        );
        if want == 0 {
            // The rules are alice's: she may subscribe to her home, not to bob's.
            c.send(&subscribe_v5(1, "home/alice/x", 0)).await;
            c.send(&subscribe_v5(2, "home/bob/x", 0)).await;
            let a = c.packet(WAIT).await.unwrap();
            let b = c.packet(WAIT).await.unwrap();
            assert_eq!((a[0], *a.last().unwrap()), (0x90, 0x00), "{}", hex(&a));
            assert_eq!((b[0], *b.last().unwrap()), (0x90, 0x87), "{}", hex(&b));
        }
    }
}

/// The Authentication Data of an AUTH packet from the broker.
fn auth_data(packet: &[u8]) -> String {
    let mut buf = BytesMut::from(packet);
    match petrel_codec::decode(&mut buf, V5, 1 << 20) {
        Ok(Some(Packet::Auth(auth))) => String::from_utf8(
            auth.properties
                .authentication_data
                .clone()
                .expect("authentication data")
                .to_vec(),
        )
        .unwrap(),
        other => panic!("expected AUTH, got {other:?} from {}", hex(packet)),
    }
}
