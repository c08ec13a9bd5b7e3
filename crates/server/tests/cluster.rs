//! Cluster mode against real NATS: `nats-server` (Debian package, JetStream on, loopback
//! ports) and three petrel nodes, each its own process, with clients on different nodes.
//! Messages at every QoS cross nodes and reach only nodes with interest; overlapping filters
//! deliver once; retained messages are cluster-wide (also for a node that joins later);
//! shared groups balance across nodes; an acknowledged QoS 1 message survives the SIGKILL of
//! the node it was published on and of the node its subscriber's session lives on; and with
//! a three-server NATS cluster, killing the NATS server a node uses does not stop service.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// The cluster tests start several processes each; one at a time keeps their timing sane on
/// a shared two-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("petrel-cluster-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The Debian package puts it in /usr/sbin, which a user's PATH may not hold.
fn nats_server() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// NATS servers with JetStream, killed when dropped.
struct Nats {
    servers: Vec<Option<Child>>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl Nats {
    /// One server.
    fn single(label: &str) -> Nats {
        Nats::start(label, 1)
    }

    /// `n` servers in one NATS cluster (JetStream clustered: replicas up to `n`).
    fn start(label: &str, n: usize) -> Nats {
        let dir = temp_dir(&format!("nats-{label}"));
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..n {
            let mut command = Command::new(nats_server());
            command
                .args(["-js", "-a", "127.0.0.1", "-p", &ports[i].to_string()])
                .args([
                    "--store_dir",
                    &dir.join(format!("s{i}")).display().to_string(),
                ])
                .args(["--server_name", &format!("s{i}")]);
            if n > 1 {
                let others: Vec<String> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                    .collect();
                command
                    .args(["--cluster_name", "petrel-test"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                    .args(["--routes", &others.join(",")]);
            }
            let log = std::fs::File::create(dir.join(format!("s{i}.log"))).expect("nats log");
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            dies_with_test(&mut command);
            let child = command.spawn().unwrap_or_else(|e| {
                panic!("cannot start nats-server (Debian package nats-server): {e}")
            });
            servers.push(Some(child));
        }
        let nats = Nats {
            servers,
            ports,
            dir,
        };
        let started = Instant::now();
        for i in 0..n {
            while !nats.log(i).contains("Server is ready") {
                assert!(
                    started.elapsed() < WAIT,
                    "nats-server s{i} not ready:\n{}",
                    nats.log(i)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if n > 1 {
            // JetStream in a cluster serves once its meta group has a leader.
            while !(0..n).any(|i| {
                nats.log(i)
                    .contains("JetStream cluster new metadata leader")
            }) {
                assert!(
                    started.elapsed() < WAIT,
                    "no JetStream leader:\n{}",
                    nats.log(0)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        nats
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("s{i}.log"))).unwrap_or_default()
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A petrel node: its broker process, admin port and settings to restart it with.
struct Node {
    broker: Broker,
    admin: u16,
    id: String,
    tables: String,
}

impl Node {
    /// Node `id` on the NATS servers `nats` (its first is the one it tries first); `storage`
    /// is a whole `[storage]` table.
    fn start(id: &str, nats: &[String], storage: &str, replicas: usize) -> Node {
        let admin = free_port();
        let urls: Vec<String> = nats.iter().map(|u| format!("\"{u}\"")).collect();
        let tables = format!(
            "{storage}\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n\n\
             [cluster]\nnats = [{}]\nnode_id = \"{id}\"\nreplicas = {replicas}\n\
             heartbeat = \"200ms\"\nnode_timeout = \"1s\"\n",
            urls.join(", ")
        );
        let broker = Broker::start_with("", &tables);
        Node {
            broker,
            admin,
            id: id.to_owned(),
            tables,
        }
    }

    /// Node `id` with a disk store (synced always) under `dir`.
    fn disk(id: &str, nats: &Nats, dir: &std::path::Path) -> Node {
        let storage = format!(
            "[storage]\ndir = \"{}\"\nfsync = \"always\"\n",
            dir.join(id).display()
        );
        Node::start(id, &nats.urls(), &storage, 1)
    }

    fn memory(id: &str, nats: &Nats) -> Node {
        Node::start(id, &nats.urls(), "[storage]\nmode = \"memory\"\n", 1)
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.broker.pid() as i32, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
    }

    fn restart(&mut self) {
        self.broker = Broker::start_at(self.broker.addr.port(), "", &self.tables);
    }

    /// `GET /api/v1/cluster`, checked against the OpenAPI document.
    async fn cluster(&self) -> serde_json::Value {
        let value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/cluster", self.admin))
            .bearer_auth("t")
            .send()
            .await
            .expect("GET /api/v1/cluster")
            .json()
            .await
            .expect("cluster JSON");
        conforms("GET", "/api/v1/cluster", 200, &value);
        value
    }

    /// Messages this node received from other nodes, both paths.
    async fn received(&self) -> u64 {
        let c = self.cluster().await;
        c["messages"]["received_core"].as_u64().unwrap()
            + c["messages"]["received_durable"].as_u64().unwrap()
    }

    /// Waits until this node knows of at least `filters` ordinary filters on other nodes
    /// and `groups` shared groups (interest travels through NATS, not instantly).
    async fn sees_interest(&self, filters: u64, groups: usize) {
        let started = Instant::now();
        loop {
            let c = self.cluster().await;
            if c["remote_filters"].as_u64().unwrap_or(0) >= filters
                && c["groups"].as_array().map_or(0, Vec::len) >= groups
            {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "node {} never saw {filters} remote filters and {groups} groups: {c}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn client(node: &Node, id: &str) -> RawClient {
    RawClient::connected(node.broker.addr, id, 60).await
}

async fn subscribed(node: &Node, id: &str, filters: &[(&str, u8)]) -> RawClient {
    let mut c = client(node, id).await;
    for (i, (filter, qos)) in filters.iter().enumerate() {
        c.send(&subscribe(i as u16 + 1, filter, *qos)).await;
        c.expect(&suback(i as u16 + 1, *qos), WAIT).await;
    }
    c
}

/// Publishes and, for QoS 1, waits for the PUBACK.
async fn publish_acked(c: &mut RawClient, topic: &str, qos: u8, id: u16, payload: &[u8]) {
    c.send(&publish(topic, qos, id, payload)).await;
    if qos == 1 {
        c.expect(&puback(id), WAIT).await;
    }
}

/// The next PUBLISH a client receives (acknowledging QoS 1/2 ones), as (topic, payload).
async fn next_message(c: &mut RawClient, wait: Duration) -> Option<(String, Vec<u8>)> {
    loop {
        let packet = c.packet(wait).await.ok()?;
        match packet[0] >> 4 {
            3 => {
                let qos = (packet[0] >> 1) & 3;
                if qos == 1 {
                    c.send(&puback(publish_packet_id(&packet))).await;
                } else if qos == 2 {
                    let id = publish_packet_id(&packet).to_be_bytes();
                    c.send(&[0x50, 0x02, id[0], id[1]]).await;
                }
                return Some((publish_topic(&packet), publish_payload(&packet).to_vec()));
            }
            // PUBREL: complete the QoS 2 exchange.
            6 => c.send(&[0x70, 0x02, packet[2], packet[3]]).await,
            _ => {}
        }
    }
}

/// Everything a client receives until `quiet` passes without a message.
async fn drain(c: &mut RawClient, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(m) = next_message(c, quiet).await {
        got.push(m);
    }
    got
}

#[tokio::test]
async fn messages_cross_nodes_at_every_qos_once_and_only_to_interested_nodes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("cross");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let c = Node::memory("c", &nats);
    // Overlapping filters on one node: each message still arrives once.
    let mut sub = subscribed(&b, "sub-b", &[("t/#", 2), ("t/+", 1), ("t/x", 0)]).await;
    a.sees_interest(3, 0).await;
    c.sees_interest(3, 0).await;
    let mut publisher = client(&a, "pub-a").await;
    let mut sent = Vec::new();
    for i in 0..30u16 {
        let qos = (i % 3) as u8;
        let payload = format!("m{i}");
        if qos == 2 {
            publisher
                .send(&publish("t/x", 2, i + 1, payload.as_bytes()))
                .await;
            let id = (i + 1).to_be_bytes();
            publisher.expect(&[0x50, 0x02, id[0], id[1]], WAIT).await;
            publisher.send(&[0x62, 0x02, id[0], id[1]]).await;
            publisher.expect(&[0x70, 0x02, id[0], id[1]], WAIT).await;
        } else {
            publish_acked(&mut publisher, "t/x", qos, i + 1, payload.as_bytes()).await;
        }
        sent.push(payload.into_bytes());
    }
    let got: Vec<Vec<u8>> = drain(&mut sub, Duration::from_secs(2))
        .await
        .into_iter()
        .map(|(topic, payload)| {
            assert_eq!(topic, "t/x");
            payload
        })
        .collect();
    // Once each; within one QoS, in order (QoS 0 and 1/2 take different paths).
    let mut sorted = got.clone();
    sorted.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(sorted, want, "every message exactly once across nodes");
    for qos in 0..3 {
        let order: Vec<&Vec<u8>> = got
            .iter()
            .filter(|p| {
                let n: usize = std::str::from_utf8(&p[1..]).unwrap().parse().unwrap();
                n % 3 == qos
            })
            .collect();
        let expected: Vec<&Vec<u8>> = sent.iter().skip(qos).step_by(3).collect();
        assert_eq!(order, expected, "QoS {qos} messages in publish order");
    }
    // Node c has no subscriber: nothing was sent to it.
    assert_eq!(
        c.received().await,
        0,
        "a node without interest receives nothing"
    );
    assert_eq!(b.received().await, 30);
    // A topic nobody subscribes to stays on its node.
    publish_acked(&mut publisher, "other/topic", 1, 100, b"x").await;
    let c_status = a.cluster().await;
    let sent_total = c_status["messages"]["sent_core"].as_u64().unwrap()
        + c_status["messages"]["sent_durable"].as_u64().unwrap();
    assert_eq!(
        sent_total, 30,
        "nothing forwarded without interest: {c_status}"
    );
    // Membership: all three alive, as seen from any node.
    let members: BTreeSet<String> = c.cluster().await["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["alive"] == true)
        .map(|m| m["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(members, ["a", "b", "c"].map(String::from).into());
    // The same in the metrics, with this node's traffic.
    assert_eq!(metric(c.admin, "petrel_cluster_nodes ").await, 3.0);
    assert_eq!(metric(c.admin, "petrel_cluster_nats_connected ").await, 1.0);
    assert_eq!(
        metric(c.admin, "petrel_cluster_member_alive{node=\"a\"} ").await,
        1.0
    );
    assert_eq!(
        metric(
            b.admin,
            "petrel_cluster_messages_received_total{path=\"durable\"} "
        )
        .await,
        20.0
    );
    assert_eq!(
        metric(
            b.admin,
            "petrel_cluster_messages_received_total{path=\"core\"} "
        )
        .await,
        10.0
    );
    // Unsubscribing withdraws the interest: the other nodes forget it.
    let mut unsubscribe = vec![0xa2, 0x00, 0x00, 0x07];
    for f in ["t/#", "t/+", "t/x"] {
        unsubscribe.extend_from_slice(&(f.len() as u16).to_be_bytes());
        unsubscribe.extend_from_slice(f.as_bytes());
    }
    unsubscribe[1] = (unsubscribe.len() - 2) as u8;
    sub.send(&unsubscribe).await;
    sub.expect(&[0xb0, 0x02, 0x00, 0x07], WAIT).await;
    let started = Instant::now();
    while a.cluster().await["remote_filters"] != 0 {
        assert!(
            started.elapsed() < WAIT,
            "the interest stayed: {}",
            a.cluster().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn retained_messages_are_cluster_wide_also_for_a_node_that_joins_later() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("retained");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let mut publisher = client(&a, "pub").await;
    let mut retained = publish("r/1", 1, 1, b"one");
    retained[0] |= 0x01;
    publisher.send(&retained).await;
    publisher.expect(&puback(1), WAIT).await;
    let mut retained2 = publish("r/2", 1, 2, b"two");
    retained2[0] |= 0x01;
    publisher.send(&retained2).await;
    publisher.expect(&puback(2), WAIT).await;
    // Acknowledged means stored cluster-wide: a subscriber on b gets it at once.
    let started = Instant::now();
    let got = loop {
        let mut s = subscribed(&b, "sub-b", &[("r/#", 1)]).await;
        let got = drain(&mut s, Duration::from_millis(500)).await;
        if got.len() == 2 || started.elapsed() > WAIT {
            break got;
        }
    };
    let got: BTreeMap<String, Vec<u8>> = got.into_iter().collect();
    assert_eq!(got.get("r/1").map(Vec::as_slice), Some(&b"one"[..]));
    assert_eq!(got.get("r/2").map(Vec::as_slice), Some(&b"two"[..]));
    // Cleared on b: gone on a too.
    let mut clearer = client(&b, "clear").await;
    let mut clear = publish("r/1", 1, 3, b"");
    clear[0] |= 0x01;
    clearer.send(&clear).await;
    clearer.expect(&puback(3), WAIT).await;
    // A node that joins later loads them from the bucket before it serves.
    let c = Node::memory("c", &nats);
    let mut s = subscribed(&c, "sub-c", &[("r/#", 1)]).await;
    let got = drain(&mut s, Duration::from_millis(500)).await;
    assert_eq!(got, vec![("r/2".to_owned(), b"two".to_vec())]);
    let started = Instant::now();
    loop {
        let mut s = subscribed(&a, "sub-a", &[("r/#", 1)]).await;
        let got = drain(&mut s, Duration::from_millis(300)).await;
        if got == vec![("r/2".to_owned(), b"two".to_vec())] {
            break;
        }
        assert!(started.elapsed() < WAIT, "a still has {got:?}");
    }
}

#[tokio::test]
async fn shared_groups_balance_across_nodes_and_deliver_each_message_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("shared");
    let nodes = [
        Node::memory("a", &nats),
        Node::memory("b", &nats),
        Node::memory("c", &nats),
    ];
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        members.push(subscribed(node, &format!("m{i}"), &[("$share/g/s/#", 1)]).await);
    }
    // A second group gets its own copy of every message.
    let mut other = subscribed(&nodes[2], "other", &[("$share/h/s/#", 1)]).await;
    for node in &nodes {
        let started = Instant::now();
        loop {
            let groups = node.cluster().await["groups"].clone();
            let g = groups
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["share"] == "g")
                .map_or(0, |g| g["nodes"].as_u64().unwrap());
            if g == 3 && groups.as_array().unwrap().len() == 2 {
                break;
            }
            assert!(started.elapsed() < WAIT, "groups on {}: {groups}", node.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut publisher = client(&nodes[0], "pub").await;
    let n = 60u16;
    for i in 0..n {
        publish_acked(
            &mut publisher,
            &format!("s/{i}"),
            (i % 2) as u8,
            i + 1,
            b"x",
        )
        .await;
    }
    let mut per_member = Vec::new();
    let mut all = Vec::new();
    for m in &mut members {
        let got = drain(m, Duration::from_secs(1)).await;
        per_member.push(got.len());
        all.extend(got.into_iter().map(|(t, _)| t));
    }
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        all.len(),
        usize::from(n),
        "each message once in group g: {per_member:?}"
    );
    assert_eq!(unique.len(), usize::from(n));
    for (i, count) in per_member.iter().enumerate() {
        assert!(*count > 0, "member on node {i} got nothing: {per_member:?}");
    }
    let other_got = drain(&mut other, Duration::from_millis(500)).await;
    assert_eq!(
        other_got.len(),
        usize::from(n),
        "group h gets its own copy of each"
    );
}

/// Publishes QoS 1 messages `prefix-0..` on `c` until `stop`, returning those acknowledged.
async fn publish_until(
    mut c: RawClient,
    topic: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> BTreeSet<u32> {
    let mut acked = BTreeSet::new();
    let mut n: u32 = 0;
    while !*stop.borrow() {
        let id = (n % 60_000) as u16 + 1;
        if c.try_send(&publish(topic, 1, id, &n.to_be_bytes()))
            .await
            .is_err()
        {
            break;
        }
        match c.packet(Duration::from_secs(5)).await {
            Ok(p) if p == puback(id) => {
                acked.insert(n);
            }
            _ => break,
        }
        n += 1;
    }
    acked
}

fn numbers(got: &[(String, Vec<u8>)]) -> BTreeSet<u32> {
    got.iter()
        .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn no_acknowledged_qos1_message_is_lost_when_a_node_is_sigkilled() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("kill");
    let dir = temp_dir("kill");
    let disk = |n: &str| {
        format!(
            "[storage]\ndir = \"{}\"\nfsync = \"always\"\n\n[mqtt]\nmax_queued_messages = 100000\n",
            dir.join(n).display()
        )
    };
    let mut a = Node::start("a", &nats.urls(), &disk("a"), 1);
    let mut b = Node::start("b", &nats.urls(), &disk("b"), 1);

    // 1. The publisher's node dies mid-load: every message it acknowledged reaches b.
    let mut sub = subscribed(&b, "sub", &[("load/#", 1)]).await;
    a.sees_interest(1, 0).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_until(client(&a, "pub").await, "load/a", stopped));
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.kill();
    let acked = publisher.await.unwrap();
    let _ = stop.send(true);
    assert!(
        acked.len() > 20,
        "the load ran: {} acknowledged",
        acked.len()
    );
    let got = numbers(&drain(&mut sub, Duration::from_secs(2)).await);
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    drop(sub);

    // 2. The subscriber's node dies: its persistent session's messages wait in JetStream
    //    and in its store, and come after the restart.
    a.restart();
    let mut persistent = RawClient::connect(b.broker.addr).await;
    persistent.send(&connect_persistent("keeper")).await;
    let _ = persistent.packet(WAIT).await.expect("CONNACK");
    persistent.send(&subscribe(1, "keep/#", 1)).await;
    persistent.expect(&suback(1, 1), WAIT).await;
    a.sees_interest(1, 0).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_until(client(&a, "pub2").await, "keep/x", stopped));
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    drop(persistent);
    // Publishing goes on while b is down: JetStream keeps b's messages.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = stop.send(true);
    let acked = publisher.await.unwrap();
    b.restart();
    let mut back = RawClient::connect(b.broker.addr).await;
    back.send(&connect_persistent("keeper")).await;
    let _ = back.packet(WAIT).await.expect("CONNACK");
    let mut got = BTreeSet::new();
    let started = Instant::now();
    while !acked.is_subset(&got) && started.elapsed() < WAIT {
        got.extend(numbers(&drain(&mut back, Duration::from_millis(500)).await));
    }
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost across b's SIGKILL: {lost:?}",
        lost.len(),
        acked.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// CONNECT 3.1.1, Clean Session 0.
fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut p = connect_v311(client_id, 60);
    assert!(p.len() < 128, "one-byte remaining length");
    // Fixed header (2 bytes), protocol name (6), level (1), then the connect flags.
    assert_eq!(p[9], 0x02);
    p[9] = 0x00;
    p
}

#[tokio::test]
async fn service_continues_when_the_nats_server_of_a_node_is_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut nats = Nats::start("three", 3);
    let urls = nats.urls();
    let rotate = |i: usize| -> Vec<String> { (0..3).map(|j| urls[(i + j) % 3].clone()).collect() };
    let memory = "[storage]\nmode = \"memory\"\n";
    let a = Node::start("a", &rotate(0), memory, 3);
    let b = Node::start("b", &rotate(1), memory, 3);
    let mut sub = subscribed(&b, "sub", &[("ha/#", 1)]).await;
    a.sees_interest(1, 0).await;
    let mut publisher = client(&a, "pub").await;
    for i in 0..20u16 {
        publish_acked(
            &mut publisher,
            "ha/x",
            1,
            i + 1,
            &u32::from(i).to_be_bytes(),
        )
        .await;
    }
    // a's NATS server goes away; a reconnects to another, and messages keep flowing.
    nats.kill(0);
    let mut acked = BTreeSet::new();
    let started = Instant::now();
    for i in 20u32..60 {
        let id = i as u16 + 1;
        publisher
            .send(&publish("ha/x", 1, id, &i.to_be_bytes()))
            .await;
        match publisher.packet(WAIT).await {
            Ok(p) if p == puback(id) => {
                acked.insert(i);
            }
            other => panic!("no PUBACK for {i} after the NATS server died: {other:?}"),
        }
    }
    assert!(started.elapsed() < WAIT);
    // b's pulls were served by a stream leader that may have been on the dead server: it
    // notices the missed heartbeats and pulls anew.
    let mut got = BTreeSet::new();
    while !acked.is_subset(&got) && started.elapsed() < WAIT * 2 {
        got.extend(numbers(&drain(&mut sub, Duration::from_millis(500)).await));
    }
    eprintln!(
        "all acknowledged messages arrived {:?} after the kill",
        started.elapsed()
    );
    assert!(acked.is_subset(&got), "lost: {:?}", acked.difference(&got));
    assert!((0..20).all(|i| got.contains(&i)));
    assert_eq!(a.cluster().await["nats_connected"], true);
}

#[tokio::test]
async fn a_client_id_is_unique_cluster_wide_and_its_session_moves_with_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("takeover");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let c = Node::memory("c", &nats);

    // A persistent v5 session on a, with a subscription and three messages in flight.
    let mut first = RawClient::connect(a.broker.addr).await;
    first.send(&connect_v5("mover", false, 60, 300)).await;
    let connack = first.packet(WAIT).await.expect("CONNACK");
    assert_eq!(
        &connack[..4],
        &[0x20, connack[1], 0x00, 0x00],
        "{connack:?}"
    );
    first.send(&subscribe_v5(1, "mv/#", 1)).await;
    let suback = first.packet(WAIT).await.expect("SUBACK");
    assert_eq!(suback[0], 0x90);
    c.sees_interest(1, 0).await;
    let mut publisher = client(&c, "pub").await;
    for i in 0..5u16 {
        publish_acked(&mut publisher, "mv/x", 1, i + 1, format!("m{i}").as_bytes()).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let p = first.packet(WAIT).await.expect("a delivery on a");
        if p[0] >> 4 == 3 {
            seen.push(publish_packet_id(&p));
        }
    }
    // Two acknowledged, three left in flight.
    for id in &seen[..2] {
        first.send(&puback(*id)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The same client id connects to b: a closes the old connection as taken over...
    let mut second = RawClient::connect(b.broker.addr).await;
    second.send(&connect_v5("mover", false, 60, 300)).await;
    let connack = second.packet(WAIT).await.expect("CONNACK from b");
    assert_eq!(connack[0], 0x20);
    assert_eq!(
        connack[2] & 1,
        1,
        "the session is present on b: {connack:?}"
    );
    assert_eq!(connack[3], 0x00);
    let mut reasons = Vec::new();
    while let Ok(p) = first.packet(WAIT).await {
        reasons.push(p);
    }
    assert!(
        reasons.iter().any(|p| p[0] == 0xe0 && p[2] == 0x8e),
        "a sent DISCONNECT 0x8E (session taken over): {reasons:?}"
    );
    // ...and b resends the three unacknowledged messages, then delivers new ones.
    let mut resent = Vec::new();
    while resent.len() < 3 {
        let p = second.packet(WAIT).await.expect("resent on b");
        if p[0] >> 4 == 3 {
            assert_ne!(p[0] & 0x08, 0, "a resend carries DUP");
            second.send(&puback(publish_packet_id(&p))).await;
            resent.push(publish_payload_v5(&p).to_vec());
        }
    }
    assert_eq!(resent, vec![b"m2".to_vec(), b"m3".to_vec(), b"m4".to_vec()]);
    c.sees_interest(1, 0).await;
    // b's subscription is the one the cluster knows now (a withdrew its interest).
    let started = Instant::now();
    loop {
        let members = c.cluster().await;
        if members["remote_filters"] == 1 && a.cluster().await["remote_filters"] == 1 {
            break;
        }
        assert!(started.elapsed() < WAIT, "{members}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_acked(&mut publisher, "mv/x", 1, 10, b"after").await;
    let p = loop {
        let p = second.packet(WAIT).await.expect("a new message on b");
        if p[0] >> 4 == 3 {
            break p;
        }
    };
    assert_eq!(publish_payload_v5(&p), b"after");

    // A clean start elsewhere ends the session: the old connection is closed, nothing moves.
    let mut third = RawClient::connect(a.broker.addr).await;
    third.send(&connect_v5("mover", true, 60, 0)).await;
    let connack = third.packet(WAIT).await.expect("CONNACK from a");
    assert_eq!(
        connack[2] & 1,
        0,
        "a clean start has no session: {connack:?}"
    );
    let mut closed = Vec::new();
    while let Ok(p) = second.packet(WAIT).await {
        closed.push(p);
    }
    assert!(
        closed.iter().any(|p| p[0] == 0xe0 && p[2] == 0x8e),
        "{closed:?}"
    );
}

/// The number a v5 QoS 1 PUBLISH carries (`publish_until`'s payload), acknowledged; `None`
/// for any other packet or none within `wait`.
async fn next_number_v5(c: &mut RawClient, wait: Duration) -> Option<u32> {
    let p = c.packet(wait).await.ok()?;
    if p[0] >> 4 != 3 {
        return None;
    }
    c.send(&puback(publish_packet_id(&p))).await;
    Some(u32::from_be_bytes(
        publish_payload_v5(&p)[..4].try_into().ok()?,
    ))
}

/// A v5 PUBLISH's payload: after topic, packet id and the properties.
fn publish_payload_v5(p: &[u8]) -> &[u8] {
    let mut i = 1;
    while p[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let topic_len = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
    i += 2 + topic_len;
    if (p[0] >> 1) & 3 > 0 {
        i += 2;
    }
    // Property length (one byte here: no long properties in these tests).
    let props = usize::from(p[i]);
    &p[i + 1 + props..]
}

/// A 3.1.1 CONNECT (clean session) with a QoS 1 will on `topic`.
fn connect_with_will(client_id: &str, topic: &str, message: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02 | 0x04 | 0x08];
    body.extend_from_slice(&60u16.to_be_bytes());
    for field in [client_id.as_bytes(), topic.as_bytes(), message] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn wills_fire_once_cluster_wide_also_when_their_node_dies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("wills");
    let mut a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let c = Node::memory("c", &nats);
    let mut watcher = subscribed(&c, "watcher", &[("will/#", 1)]).await;
    a.sees_interest(1, 0).await;
    b.sees_interest(1, 0).await;
    let with_will = |node: &Node, id: &'static str| {
        let addr = node.broker.addr;
        async move {
            let mut w = RawClient::connect(addr).await;
            w.send(&connect_with_will(id, &format!("will/{id}"), b"gone"))
                .await;
            w.expect(&[0x20, 0x02, 0x00, 0x00], WAIT).await;
            w
        }
    };
    // A client that vanishes from a live node: its will, once, from that node.
    let w1 = with_will(&a, "w1").await;
    drop(w1);
    // Clients on a, which dies, and on b, which stays.
    let _w2 = with_will(&a, "w2").await;
    let _w3 = with_will(&b, "w3").await;
    let got = drain(&mut watcher, Duration::from_secs(1)).await;
    assert_eq!(got, vec![("will/w1".to_owned(), b"gone".to_vec())]);
    // Let a's will registrations reach NATS, then kill it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    // b and c both notice a's heartbeat stop; one of them publishes w2's will.
    let started = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && started.elapsed() < WAIT {
        got = drain(&mut watcher, Duration::from_millis(500)).await;
    }
    got.extend(drain(&mut watcher, Duration::from_secs(3)).await);
    assert_eq!(
        got,
        vec![("will/w2".to_owned(), b"gone".to_vec())],
        "w2's will exactly once, w3's not at all (its node lives)"
    );
    // a comes back: nothing of its previous run is published again.
    a.restart();
    let got = drain(&mut watcher, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "{got:?}");
}

impl Node {
    /// An admin call with a JSON body, its answer checked against the OpenAPI document.
    async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .request(
                method.clone(),
                format!("http://127.0.0.1:{}{path}", self.admin),
            )
            .bearer_auth("t");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        let value: serde_json::Value = response.json().await.expect("JSON answer");
        conforms(method.as_str(), path, status, &value);
        (status, value)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_operator_drains_a_node_and_its_clients_move_with_their_sessions() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("redirect");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let there = b.broker.addr.to_string();

    let mut v5 = RawClient::connect(a.broker.addr).await;
    v5.send(&connect_v5("drained", false, 60, 300)).await;
    assert_eq!(v5.packet(WAIT).await.expect("CONNACK")[3], 0x00);
    v5.send(&subscribe_v5(1, "dr/#", 1)).await;
    assert_eq!(v5.packet(WAIT).await.expect("SUBACK")[0], 0x90);
    let mut v3 = client(&a, "old-client").await;

    let (status, _) = a
        .admin_call(
            reqwest::Method::PUT,
            "/api/v1/redirect",
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(status, 400, "a redirect needs a server reference");
    let (status, answer) = a
        .admin_call(
            reqwest::Method::PUT,
            "/api/v1/redirect",
            Some(serde_json::json!({ "server_reference": there })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["clients_told"], 2);
    // The v5 client is told where to go; the 3.1.1 one is closed.
    let told = v5.packet(WAIT).await.expect("DISCONNECT");
    assert_eq!((told[0], told[2]), (0xe0, 0x9c), "{told:?}");
    assert!(
        contains(&told, there.as_bytes()),
        "Server Reference {there} in {told:?}"
    );
    assert!(v3.until_closed(WAIT).await.is_ok());
    // New clients are sent away too.
    let mut late = RawClient::connect(a.broker.addr).await;
    late.send(&connect_v5("late", true, 60, 0)).await;
    let connack = late.packet(WAIT).await.expect("CONNACK");
    assert_eq!(connack[3], 0x9c, "{connack:?}");
    assert!(contains(&connack, there.as_bytes()));
    let mut late3 = RawClient::connect(a.broker.addr).await;
    late3.send(&connect_v311("late3", 60)).await;
    late3.expect(&[0x20, 0x02, 0x00, 0x03], WAIT).await;

    // The client goes where it was told, and its session is there.
    let mut moved = RawClient::connect(b.broker.addr).await;
    moved.send(&connect_v5("drained", false, 60, 300)).await;
    let connack = moved.packet(WAIT).await.expect("CONNACK from b");
    assert_eq!((connack[2] & 1, connack[3]), (1, 0x00), "{connack:?}");
    let mut publisher = client(&b, "pub").await;
    publish_acked(&mut publisher, "dr/1", 1, 1, b"here").await;
    let p = loop {
        let p = moved.packet(WAIT).await.expect("delivery on b");
        if p[0] >> 4 == 3 {
            break p;
        }
    };
    assert_eq!(publish_payload_v5(&p), b"here");

    // Lifted: a serves again.
    let (_, answer) = a
        .admin_call(reqwest::Method::DELETE, "/api/v1/redirect", None)
        .await;
    assert_eq!(answer["redirecting"], false);
    let _ok = client(&a, "welcome-back").await;
}

#[tokio::test]
async fn messages_on_their_way_to_the_old_node_follow_a_session_that_moves() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("transit");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let c = Node::memory("c", &nats);
    let mut first = RawClient::connect(a.broker.addr).await;
    first.send(&connect_v5("traveller", false, 60, 300)).await;
    assert_eq!(first.packet(WAIT).await.expect("CONNACK")[3], 0x00);
    first.send(&subscribe_v5(1, "tr/#", 1)).await;
    assert_eq!(first.packet(WAIT).await.expect("SUBACK")[0], 0x90);
    c.sees_interest(1, 0).await;
    // A publisher on c keeps going while the client moves from a to b: what c sends to a
    // before it learns of the move must reach the client on b.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_until(client(&c, "pub").await, "tr/x", stopped));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut second = RawClient::connect(b.broker.addr).await;
    second.send(&connect_v5("traveller", false, 60, 300)).await;
    let connack = second.packet(WAIT).await.expect("CONNACK from b");
    assert_eq!((connack[2] & 1, connack[3]), (1, 0x00), "{connack:?}");
    let mut got = BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(800) {
        if let Some(n) = next_number_v5(&mut second, Duration::from_millis(100)).await {
            got.insert(n);
        }
    }
    let _ = stop.send(true);
    let acked = publisher.await.unwrap();
    let started = Instant::now();
    while !acked.is_subset(&got) && started.elapsed() < WAIT {
        if let Some(n) = next_number_v5(&mut second, Duration::from_millis(500)).await {
            got.insert(n);
        }
    }
    drop(first);
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(acked.len() > 50, "the load ran: {}", acked.len());
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost in the move: {lost:?}",
        lost.len(),
        acked.len()
    );
}

#[tokio::test]
async fn messages_kept_for_a_dead_node_follow_its_client_to_another_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("stale");
    let dir = temp_dir("stale");
    let a = Node::memory("a", &nats);
    let mut b = Node::disk("b", &nats, &dir);
    // A persistent session on b that does not read: its messages wait there.
    let mut keeper = RawClient::connect(b.broker.addr).await;
    keeper.send(&connect_persistent("keeper")).await;
    assert_eq!(
        keeper.packet(WAIT).await.expect("CONNACK"),
        [0x20, 0x02, 0x00, 0x00]
    );
    keeper.send(&subscribe(1, "keep/#", 1)).await;
    keeper.expect(&suback(1, 1), WAIT).await;
    a.sees_interest(1, 0).await;
    let mut publisher = client(&a, "pub").await;
    for i in 0..50u32 {
        publish_acked(&mut publisher, "keep/x", 1, i as u16 + 1, &i.to_be_bytes()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // b dies; what is published meanwhile waits in JetStream for it.
    b.kill();
    drop(keeper);
    for i in 50..100u32 {
        publish_acked(&mut publisher, "keep/x", 1, i as u16 + 1, &i.to_be_bytes()).await;
    }
    // The client goes to a instead: b cannot hand its session over, so it starts anew there
    // and subscribes again, as a client told "no session" does.
    let mut moved = RawClient::connect(a.broker.addr).await;
    moved.send(&connect_persistent("keeper")).await;
    assert_eq!(
        moved.packet(WAIT).await.expect("CONNACK"),
        [0x20, 0x02, 0x00, 0x00]
    );
    moved.send(&subscribe(1, "keep/#", 1)).await;
    moved.expect(&suback(1, 1), WAIT).await;
    // b comes back and sends the client's messages after it.
    b.restart();
    let mut got = BTreeSet::new();
    let started = Instant::now();
    while got.len() < 100 && started.elapsed() < WAIT {
        got.extend(numbers(
            &drain(&mut moved, Duration::from_millis(500)).await,
        ));
    }
    let lost: Vec<u32> = (0..100).filter(|i| !got.contains(i)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_session_that_moved_is_durable_on_its_new_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("adopt");
    let dir = temp_dir("adopt");
    let a = Node::memory("a", &nats);
    let mut b = Node::disk("b", &nats, &dir);
    // Three messages wait unacknowledged in a session on a.
    let mut first = RawClient::connect(a.broker.addr).await;
    first.send(&connect_persistent("mover")).await;
    assert_eq!(
        first.packet(WAIT).await.expect("CONNACK"),
        [0x20, 0x02, 0x00, 0x00]
    );
    first.send(&subscribe(1, "d/#", 1)).await;
    first.expect(&suback(1, 1), WAIT).await;
    let mut publisher = client(&a, "pub").await;
    for i in 0..3u32 {
        publish_acked(&mut publisher, "d/x", 1, i as u16 + 1, &i.to_be_bytes()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // It moves to b (disk store), which is then SIGKILLed and restarted.
    let mut second = RawClient::connect(b.broker.addr).await;
    second.send(&connect_persistent("mover")).await;
    assert_eq!(
        second.packet(WAIT).await.expect("CONNACK"),
        [0x20, 0x02, 0x01, 0x00]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(second);
    b.kill();
    b.restart();
    // The session, its subscription and the three messages survived on b.
    let mut third = RawClient::connect(b.broker.addr).await;
    third.send(&connect_persistent("mover")).await;
    assert_eq!(
        third.packet(WAIT).await.expect("CONNACK"),
        [0x20, 0x02, 0x01, 0x00]
    );
    let got = numbers(&drain(&mut third, Duration::from_secs(2)).await);
    assert_eq!(got, (0..3).collect::<BTreeSet<u32>>());
    publish_acked(&mut publisher, "d/x", 1, 10, &7u32.to_be_bytes()).await;
    let got = numbers(&drain(&mut third, Duration::from_secs(2)).await);
    assert_eq!(got, BTreeSet::from([7]), "the subscription lives on b");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The broker's packet size limit is held to what one NATS message carries: the largest
/// message it accepts crosses nodes whole, a burst of small ones behind it crosses in order,
/// and a larger PUBLISH is refused without stalling the node's acknowledgements.
#[tokio::test]
async fn the_largest_message_crosses_and_the_packet_limit_follows_the_fabric() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("large");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let mut sub = subscribed(&b, "sub-large", &[("big/#", 1)]).await;
    a.sees_interest(1, 0).await;
    // nats-server's default max_payload is 1 MiB; petrel keeps 8 KiB for its frame.
    let limit: u32 = 1024 * 1024 - 8 * 1024;
    let mut v5 = RawClient::connect(a.broker.addr).await;
    v5.send(&connect_v5("v5-large", true, 60, 0)).await;
    let connack = v5.packet(WAIT).await.expect("CONNACK");
    let announced = [&[0x27][..], &limit.to_be_bytes()].concat();
    assert!(
        contains(&connack, &announced),
        "CONNACK {connack:02x?} does not announce Maximum Packet Size {limit}"
    );

    let mut publisher = client(&a, "pub-large").await;
    let big: Vec<u8> = (0..limit - 64).map(|i| (i % 251) as u8).collect();
    publisher.send(&publish("big/one", 1, 1, &big)).await;
    publisher.expect(&puback(1), WAIT).await;
    for i in 0..300u16 {
        let payload = format!("s{i}");
        publisher
            .send(&publish("big/small", 1, i + 2, payload.as_bytes()))
            .await;
    }
    for i in 0..300u16 {
        publisher.expect(&puback(i + 2), WAIT).await;
    }
    let (topic, payload) = next_message(&mut sub, WAIT)
        .await
        .expect("the large message");
    assert_eq!(topic, "big/one");
    assert!(
        payload == big,
        "the large message arrived changed ({} bytes)",
        payload.len()
    );
    let small: Vec<String> = drain(&mut sub, Duration::from_secs(2))
        .await
        .into_iter()
        .map(|(_, p)| String::from_utf8(p).unwrap())
        .collect();
    let want: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    assert_eq!(small, want, "the burst behind it, once each and in order");

    // Past the limit: refused (the connection closes), and the node acknowledges on.
    let mut too_big = client(&a, "pub-too-big").await;
    // The broker may close before it has read all of it: the write can fail.
    let _ = too_big
        .try_send(&publish("big/two", 1, 1, &vec![0; limit as usize + 16]))
        .await;
    assert!(
        too_big.until_closed(WAIT).await.is_ok(),
        "a PUBLISH over the limit did not close its connection"
    );
    publish_acked(&mut publisher, "big/after", 1, 400, b"after").await;
    let (topic, _) = next_message(&mut sub, WAIT)
        .await
        .expect("a message after it");
    assert_eq!(topic, "big/after");
    assert_eq!(
        a.cluster().await["messages"]["dropped_too_large"],
        0,
        "nothing within the limit is too large for NATS"
    );
}

/// A persistent session whose queue is larger than one NATS message moves whole: the node
/// that held it hands it over in parts, and every queued message arrives on the new node,
/// unchanged and in order.
#[tokio::test]
async fn a_session_with_a_queue_larger_than_a_nats_message_moves_whole() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("long-queue");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let mut s = RawClient::connect(a.broker.addr).await;
    s.send(&connect_persistent("long-queue")).await;
    s.expect(&CONNACK_ACCEPTED, WAIT).await;
    s.send(&subscribe(1, "lq/#", 1)).await;
    s.expect(&suback(1, 1), WAIT).await;
    s.send(&[0xe0, 0x00]).await;
    let _ = s.until_closed(WAIT).await;

    // 48 messages of 64 KiB queue for it on a: 3 MiB, three NATS messages' worth.
    const COUNT: u16 = 48;
    let payload = |i: u16| -> Vec<u8> {
        let mut p = vec![(i % 251) as u8; 64 * 1024];
        p[..2].copy_from_slice(&i.to_be_bytes());
        p
    };
    let mut publisher = client(&a, "lq-pub").await;
    for i in 0..COUNT {
        publish_acked(&mut publisher, "lq/x", 1, i + 1, &payload(i)).await;
    }

    let mut back = RawClient::connect(b.broker.addr).await;
    back.send(&connect_persistent("long-queue")).await;
    back.expect(&[0x20, 0x02, 0x01, 0x00], WAIT).await;
    let mut got = Vec::new();
    while got.len() < usize::from(COUNT) {
        let Some((topic, p)) = next_message(&mut back, WAIT).await else {
            break;
        };
        assert_eq!(topic, "lq/x");
        got.push(p);
    }
    assert_eq!(
        got.len(),
        usize::from(COUNT),
        "queued messages lost in the move"
    );
    for (i, p) in got.iter().enumerate() {
        assert!(
            *p == payload(i as u16),
            "message {i} arrived changed or out of order (starts {:02x?})",
            &p[..2]
        );
    }
}

/// A v5 CONNECT: Clean Start 0, Session Expiry Interval 300 s, and a QoS 1 will on `topic`
/// with a Will Delay Interval of `delay` seconds.
fn connect_v5_delayed_will(client_id: &str, topic: &str, message: &[u8], delay: u32) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x04 | 0x08];
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend_from_slice(&[5, 0x11]);
    body.extend_from_slice(&300u32.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(&[5, 0x18]);
    body.extend_from_slice(&delay.to_be_bytes());
    for field in [topic.as_bytes(), message] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// Wills that wait for their delay in offline sessions are the cluster's too: when their
/// node dies, another publishes each when it is due (not before), once; and the node, back
/// with the sessions from its disk store, does not publish them again.
#[tokio::test]
async fn delayed_wills_of_offline_sessions_fire_once_when_their_node_dies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("delayed-wills");
    let dir = temp_dir("delayed-wills");
    let mut a = Node::disk("a", &nats, &dir);
    let b = Node::memory("b", &nats);
    let mut watcher = subscribed(&b, "dw-watcher", &[("dw/#", 1)]).await;
    a.sees_interest(1, 0).await;
    // Two v5 clients on a leave without DISCONNECT: their sessions stay, their wills wait
    // 3 and 10 s.
    for (id, delay) in [("dw1", 3), ("dw2", 10)] {
        let mut w = RawClient::connect(a.broker.addr).await;
        w.send(&connect_v5_delayed_will(
            id,
            &format!("dw/{id}"),
            b"gone",
            delay,
        ))
        .await;
        let connack = w.packet(WAIT).await.expect("CONNACK");
        assert_eq!(&connack[..4], &[0x20, connack[1], 0x00, 0x00]);
    }
    let left = Instant::now();
    // The pending wills reach NATS; then a dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();

    let mut arrivals = Vec::new();
    let mut restarted = false;
    while left.elapsed() < Duration::from_secs(13) {
        for (topic, payload) in drain(&mut watcher, Duration::from_millis(100)).await {
            assert_eq!(payload, b"gone");
            arrivals.push((topic, left.elapsed()));
        }
        // Back between the two wills' times, with both sessions restored from its store.
        if !restarted && left.elapsed() > Duration::from_millis(6500) {
            a.restart();
            restarted = true;
        }
    }
    let topics: Vec<&str> = arrivals.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        ["dw/dw1", "dw/dw2"],
        "each will once, in the order due: {arrivals:?}"
    );
    // dw1 while a was down, when due; dw2 when due, by the node that took it (a, back with
    // it in its store, knows it was taken).
    assert!(
        arrivals[0].1 >= Duration::from_millis(2800) && arrivals[0].1 < Duration::from_secs(6),
        "dw1's will not published by another node when due: {arrivals:?}"
    );
    assert!(
        arrivals[1].1 >= Duration::from_millis(9800),
        "dw2's will published before its delay: {arrivals:?}"
    );
}

/// Flow control across nodes: publishers that write QoS 0 faster than their node can hand it
/// to NATS are paused, as for a full subscriber queue on one node, instead of having their
/// messages dropped on the way out.
#[tokio::test]
async fn qos0_publishers_faster_than_nats_are_paused_not_dropped() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("fan-in");
    let a = Node::memory("a", &nats);
    let b = Node::memory("b", &nats);
    let mut sub = subscribed(&b, "fan-in-sub", &[("fi/#", 0)]).await;
    a.sees_interest(1, 0).await;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 60_000;
    let writers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let addr = a.broker.addr;
            tokio::spawn(async move {
                let mut c = RawClient::connected(addr, &format!("fi-pub-{p}"), 60).await;
                // Everything at once: the node reads as fast as it may.
                let mut burst = Vec::with_capacity(EACH * 24);
                for i in 0..EACH {
                    burst.extend_from_slice(&publish("fi/x", 0, 0, format!("{p}-{i}").as_bytes()));
                }
                c.send(&burst).await;
                c
            })
        })
        .collect();
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while sub.packet(Duration::from_secs(3)).await.is_ok() {
            got += 1;
        }
        got
    });
    let mut publishers = Vec::new();
    for w in writers {
        publishers.push(w.await.unwrap());
    }
    let got = reader.await.unwrap();
    let status = a.cluster().await;
    let sent = status["messages"]["sent_core"].as_u64().unwrap();
    let dropped = status["messages"]["dropped"].as_u64().unwrap();
    let pauses = metric(a.admin, "petrel_flow_control_pauses_total ").await;
    println!(
        "{} published, {sent} handed to NATS, {dropped} dropped on the way out, {pauses} pauses, {got} received",
        PUBLISHERS * EACH
    );
    assert_eq!(
        dropped, 0,
        "QoS 0 dropped on the publishing node instead of pausing its publishers: {status}"
    );
    assert_eq!(sent, (PUBLISHERS * EACH) as u64, "{status}");
    drop(publishers);
}

/// A 3.1.1 CONNECT with a user name and password, Clean Session 0.
fn connect_as(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc0, 0x00, 0x3c];
    for field in [client_id, user, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// A session belongs to its login cluster-wide: alice, connecting to b with the client id of
/// bob's session on a, is refused (return code 5) and nothing moves: bob stays connected on a
/// with his session, which he alone can then take to b.
#[tokio::test]
async fn another_login_cannot_take_a_session_from_another_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = Nats::single("owner");
    let tables = "[storage]\nmode = \"memory\"\n\n[auth]\nallow_anonymous = false\n\
                  max_pending_logins_per_address = 8\n\n\
                  [[auth.users]]\nname = \"alice\"\npassword = \"pa\"\n\n\
                  [[auth.users]]\nname = \"bob\"\npassword = \"pb\"\n";
    let a = Node::start("a", &nats.urls(), tables, 1);
    let b = Node::start("b", &nats.urls(), tables, 1);

    let mut bob = RawClient::connect(a.broker.addr).await;
    bob.send(&connect_as("bob-phone", "bob", "pb")).await;
    bob.expect(&CONNACK_ACCEPTED, WAIT).await;
    bob.send(&subscribe(1, "home/bob", 1)).await;
    bob.expect(&suback(1, 1), WAIT).await;

    let mut alice = RawClient::connect(b.broker.addr).await;
    alice.send(&connect_as("bob-phone", "alice", "pa")).await;
    let close = alice.until_closed(WAIT).await.expect("refused and closed");
    assert_eq!(
        close.packets,
        [vec![0x20, 0x02, 0x00, 0x05]],
        "alice refused"
    );

    // Several CONNECTs at once, two to b and two to a third node, so that one lands while
    // another's claim has the key pointing away from a: every one is refused.
    let c = Node::start("c", &nats.urls(), tables, 1);
    let mut tries = Vec::new();
    for node in [&b, &c, &b, &c] {
        let addr = node.broker.addr;
        tries.push(tokio::spawn(async move {
            let mut alice = RawClient::connect(addr).await;
            alice.send(&connect_as("bob-phone", "alice", "pa")).await;
            alice.until_closed(WAIT).await.map(|c| c.packets)
        }));
    }
    for attempt in tries {
        let packets = attempt.await.unwrap().expect("refused and closed");
        assert_eq!(packets, [vec![0x20, 0x02, 0x00, 0x05]], "alice refused");
    }

    // bob was not disconnected, and his session is still on a: a message published on a
    // reaches him there.
    bob.send(&PINGREQ).await;
    bob.expect(&PINGRESP, WAIT).await;
    let mut publisher = RawClient::connect(a.broker.addr).await;
    publisher.send(&connect_as("pub", "alice", "pa")).await;
    publisher.expect(&CONNACK_ACCEPTED, WAIT).await;
    publish_acked(&mut publisher, "home/bob", 1, 1, b"still here").await;
    let (topic, payload) = next_message(&mut bob, WAIT).await.expect("delivery on a");
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("home/bob", &b"still here"[..])
    );

    // bob himself moves his session to b.
    let mut moved = RawClient::connect(b.broker.addr).await;
    moved.send(&connect_as("bob-phone", "bob", "pb")).await;
    moved.expect(&[0x20, 0x02, 0x01, 0x00], WAIT).await;
}
