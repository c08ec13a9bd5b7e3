//! Bridges against real brokers: petrel to petrel and petrel to Mosquitto (the Debian
//! `mosquitto` binary, started here on a loopback port), MQTT 5.0 and 3.1.1, both directions,
//! with topic prefixes, loop rules (the same filter both ways), and the remote killed and
//! restarted mid-way: no acknowledged QoS 1 message is lost, none goes round in a loop.
//! A petrel remote is SIGKILLed (its store is durable); Mosquitto is stopped with SIGTERM, after
//! which it has saved its sessions — SIGKILLed, it loses what it acknowledged and had not saved,
//! which is Mosquitto's durability, not the bridge's. The bridging petrel is SIGKILLed too.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// The bridge table of the local broker: `out` edge/# → site1/, `in` cmd/# → remote/, and the
/// loop rule loop/# both ways with no prefix.
fn bridge_tables(remote: SocketAddr, version: &str, admin: u16, storage: &str) -> String {
    format!(
        "{storage}\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n\n\
         [[bridges]]\nname = \"b\"\naddress = \"{remote}\"\nversion = \"{version}\"\n\
         reconnect_delay = \"100ms\"\nreconnect_delay_max = \"400ms\"\nkeepalive = \"5s\"\n\
         [[bridges.topics]]\ndirection = \"out\"\nfilter = \"edge/#\"\nprefix = \"site1/\"\nqos = 1\n\
         [[bridges.topics]]\ndirection = \"in\"\nfilter = \"cmd/#\"\nprefix = \"remote/\"\nqos = 1\n\
         [[bridges.topics]]\ndirection = \"out\"\nfilter = \"loop/#\"\nqos = 1\n\
         [[bridges.topics]]\ndirection = \"in\"\nfilter = \"loop/#\"\nqos = 1\n"
    )
}

fn memory() -> String {
    "[storage]\nmode = \"memory\"\n".to_owned()
}

fn disk(dir: &Path) -> String {
    format!(
        "[storage]\ndir = \"{}\"\nfsync = \"always\"\n\n[mqtt]\nmax_queued_messages = 100000\n",
        dir.display()
    )
}

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("petrel-bridge-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut c = connect_v311(client_id, 60);
    c[9] = 0x00; // Clean Session 0
    c
}

/// A subscriber that records (topic, payload) of every PUBLISH, acknowledging QoS 1.
struct Sub {
    client: RawClient,
    got: Vec<(String, String)>,
}

impl Sub {
    async fn new(addr: SocketAddr, id: &str, persistent: bool, filters: &[&str]) -> Sub {
        let mut client = RawClient::connect(addr).await;
        if persistent {
            client.send(&connect_persistent(id)).await;
            let connack = client.packet(WAIT).await.expect("CONNACK");
            assert_eq!(connack[..2], [0x20, 0x02]);
            assert_eq!(connack[3], 0, "{id} refused");
        } else {
            client.send(&connect_v311(id, 60)).await;
            client.expect(&CONNACK_ACCEPTED, WAIT).await;
        }
        for (i, filter) in filters.iter().enumerate() {
            let id = i as u16 + 1;
            client.send(&subscribe(id, filter, 1)).await;
            client.expect(&suback(id, 1), WAIT).await;
        }
        Sub {
            client,
            got: Vec::new(),
        }
    }

    /// Reads for up to `wait`, or until `done` says enough; returns whether `done` was met.
    async fn read_until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&[(String, String)]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + wait;
        while !done(&self.got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let Ok(p) = self.client.packet(left).await else {
                return done(&self.got);
            };
            if p[0] & 0xf0 != 0x30 {
                continue;
            }
            if (p[0] >> 1) & 0x03 == 1 {
                self.client.send(&puback(publish_packet_id(&p))).await;
            }
            self.got.push((
                publish_topic(&p),
                String::from_utf8_lossy(publish_payload(&p)).into_owned(),
            ));
        }
        true
    }

    fn count(&self, topic: &str) -> usize {
        self.got.iter().filter(|(t, _)| t == topic).count()
    }
}

/// Publishes QoS 1 messages and waits for each PUBACK.
async fn publish_acked(
    client: &mut RawClient,
    topic: &str,
    payloads: impl IntoIterator<Item = String>,
) {
    for (i, payload) in payloads.into_iter().enumerate() {
        let id = (i % 60_000) as u16 + 1;
        client
            .send(&publish(topic, 1, id, payload.as_bytes()))
            .await;
        client.expect(&puback(id), WAIT).await;
    }
}

/// Waits until the bridge carries in both directions: probes until each arrives.
async fn wait_for_bridge(local: SocketAddr, remote: SocketAddr) {
    let mut local_sub = Sub::new(local, "probe-l", false, &["remote/cmd/probe"]).await;
    let mut remote_sub = Sub::new(remote, "probe-r", false, &["site1/edge/probe"]).await;
    let mut lp = RawClient::connected(local, "probe-lp", 60).await;
    let mut rp = RawClient::connected(remote, "probe-rp", 60).await;
    let started = Instant::now();
    let (mut out_ok, mut in_ok) = (false, false);
    while !(out_ok && in_ok) {
        assert!(
            started.elapsed() < WAIT,
            "the bridge does not carry messages (out {out_ok}, in {in_ok})"
        );
        if !out_ok {
            lp.send(&publish("edge/probe", 0, 0, b"p")).await;
            out_ok = remote_sub
                .read_until(Duration::from_millis(200), |g| !g.is_empty())
                .await;
        }
        if !in_ok {
            rp.send(&publish("cmd/probe", 0, 0, b"p")).await;
            in_ok = local_sub
                .read_until(Duration::from_millis(200), |g| !g.is_empty())
                .await;
        }
    }
}

/// Both directions with prefixes, and the loop rule: each message arrives once on each side.
async fn both_ways_without_loops(local: SocketAddr, remote: SocketAddr) {
    wait_for_bridge(local, remote).await;
    let mut at_remote = Sub::new(remote, "sub-r", false, &["site1/#", "loop/#"]).await;
    let mut at_local = Sub::new(local, "sub-l", false, &["remote/#", "loop/#"]).await;
    let mut pub_local = RawClient::connected(local, "pub-l", 60).await;
    let mut pub_remote = RawClient::connected(remote, "pub-r", 60).await;

    let n = 20;
    publish_acked(&mut pub_local, "edge/a", (0..n).map(|i| format!("out-{i}"))).await;
    publish_acked(&mut pub_remote, "cmd/x", (0..n).map(|i| format!("in-{i}"))).await;
    publish_acked(&mut pub_local, "loop/l", (0..n).map(|i| format!("ll-{i}"))).await;
    publish_acked(&mut pub_remote, "loop/r", (0..n).map(|i| format!("lr-{i}"))).await;

    let remote_wants = |g: &[(String, String)]| g.len() >= 3 * n;
    assert!(
        at_remote.read_until(WAIT, remote_wants).await,
        "remote got {:?}",
        at_remote.got
    );
    assert!(
        at_local.read_until(WAIT, |g| g.len() >= 3 * n).await,
        "local got {:?}",
        at_local.got
    );
    // Anything going round a loop would come now.
    at_remote
        .read_until(Duration::from_secs(1), |_| false)
        .await;
    at_local.read_until(Duration::from_secs(1), |_| false).await;

    let in_order: Vec<String> = (0..n).map(|i| format!("out-{i}")).collect();
    let got: Vec<String> = at_remote
        .got
        .iter()
        .filter(|(t, _)| t == "site1/edge/a")
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(
        got, in_order,
        "out: each message once, in order, under the prefix"
    );
    let got: Vec<String> = at_local
        .got
        .iter()
        .filter(|(t, _)| t == "remote/cmd/x")
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(
        got,
        (0..n).map(|i| format!("in-{i}")).collect::<Vec<_>>(),
        "in: each message once, in order, under the prefix"
    );
    for (side, sub) in [("remote", &at_remote), ("local", &at_local)] {
        assert_eq!(
            sub.count("loop/l"),
            n,
            "{side}: loop/l messages (a loop repeats them)"
        );
        assert_eq!(
            sub.count("loop/r"),
            n,
            "{side}: loop/r messages (a loop repeats them)"
        );
    }
    assert_eq!(at_remote.got.len(), 3 * n, "remote: nothing else arrived");
    assert_eq!(at_local.got.len(), 3 * n, "local: nothing else arrived");
}

#[tokio::test]
async fn petrel_to_petrel_both_ways_without_loops_v5() {
    let _guard = light().await;
    let remote = Broker::start("");
    let admin = free_port();
    let local = Broker::start_with("", &bridge_tables(remote.addr, "5.0", admin, &memory()));
    both_ways_without_loops(local.addr, remote.addr).await;
    assert_eq!(metric(admin, "petrel_bridge_up{bridge=\"b\"} ").await, 1.0);
    assert!(
        metric(
            admin,
            "petrel_bridge_messages_total{bridge=\"b\",direction=\"out\"} "
        )
        .await
            >= 40.0
    );
    assert!(
        metric(
            admin,
            "petrel_bridge_messages_total{bridge=\"b\",direction=\"in\"} "
        )
        .await
            >= 40.0
    );
}

#[tokio::test]
async fn petrel_to_petrel_both_ways_without_loops_v311() {
    let _guard = light().await;
    let remote = Broker::start("");
    let admin = free_port();
    let local = Broker::start_with("", &bridge_tables(remote.addr, "3.1.1", admin, &memory()));
    both_ways_without_loops(local.addr, remote.addr).await;
}

/// The admin API reports the bridge.
#[tokio::test]
async fn the_admin_api_lists_the_bridge() {
    let _guard = light().await;
    let remote = Broker::start("");
    let admin = free_port();
    let local = Broker::start_with("", &bridge_tables(remote.addr, "5.0", admin, &memory()));
    wait_for_bridge(local.addr, remote.addr).await;
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{admin}/api/v1/bridges"))
        .bearer_auth("t")
        .send()
        .await
        .expect("GET /api/v1/bridges")
        .json()
        .await
        .expect("JSON");
    let b = &body["bridges"][0];
    assert_eq!(b["name"], "b");
    assert_eq!(b["state"], "up");
    assert_eq!(b["address"], remote.addr.to_string());
    assert_eq!(b["local_client_id"], "$bridge/b");
    assert_eq!(b["remote_client_id"], "petrel-b");
    assert!(b["messages_out"].as_u64().unwrap() >= 1, "{b}");
    // No client may take the bridge's local session.
    let mut c = RawClient::connect(local.addr).await;
    c.send(&connect_v311("$bridge/b", 60)).await;
    c.expect(&[0x20, 0x02, 0x00, 0x02], WAIT).await;
}

/// The remote is SIGKILLed mid-way (disk stores both sides) while QoS 1 messages go both
/// ways, and comes back on the same port: every message a broker acknowledged arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn petrel_remote_killed_mid_way_loses_no_qos1_message() {
    let _machine = heavy().await;
    let (local_dir, remote_dir) = (temp_dir("local"), temp_dir("remote"));
    let port = free_port();
    let remote = Broker::start_at(port, "", &disk(&remote_dir));
    let admin = free_port();
    let local = Broker::start_with(
        "",
        &bridge_tables(remote.addr, "5.0", admin, &disk(&local_dir)),
    );
    wait_for_bridge(local.addr, remote.addr).await;
    // Persistent subscribers on each side, so what arrives while they are away waits.
    drop(Sub::new(remote.addr, "keep-r", true, &["site1/edge/#"]).await);
    drop(Sub::new(local.addr, "keep-l", true, &["remote/cmd/#"]).await);

    const N: usize = 400;
    let local_addr = local.addr;
    // Out: published here, acknowledged here at once (the bridge's session queues).
    let outgoing = tokio::spawn(async move {
        let mut p = RawClient::connected(local_addr, "pub-l", 60).await;
        for i in 0..N {
            publish_acked(&mut p, "edge/n", [format!("o{i}")]).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // In: published at the remote, which dies mid-way: only what it acknowledged counts.
    let mut acked_in = BTreeSet::new();
    let mut remote = Some(remote);
    let mut i = 0;
    let mut publisher = RawClient::connected(remote.as_ref().unwrap().addr, "pub-r", 60).await;
    while i < N {
        if i == N / 2 && remote.is_some() {
            drop(remote.take()); // SIGKILL
            tokio::time::sleep(Duration::from_millis(300)).await;
            remote = Some(Broker::start_at(port, "", &disk(&remote_dir)));
            publisher =
                RawClient::connected(SocketAddr::from(([127, 0, 0, 1], port)), "pub-r", 60).await;
        }
        let payload = format!("i{i}");
        let id = (i % 60_000) as u16 + 1;
        if publisher
            .try_send(&publish("cmd/n", 1, id, payload.as_bytes()))
            .await
            .is_ok()
            && publisher.packet(WAIT).await.is_ok_and(|a| a == puback(id))
        {
            acked_in.insert(payload);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    outgoing.await.expect("outgoing publisher");
    let remote = remote.expect("the remote runs");

    let mut at_remote = Sub::new(remote.addr, "keep-r", true, &[]).await;
    let all_out = |g: &[(String, String)]| {
        g.iter()
            .map(|(_, p)| p.as_str())
            .collect::<BTreeSet<_>>()
            .len()
            >= N
    };
    let done = at_remote.read_until(Duration::from_secs(60), all_out).await;
    let got: BTreeSet<&str> = at_remote.got.iter().map(|(_, p)| p.as_str()).collect();
    let missing: Vec<String> = (0..N)
        .map(|i| format!("o{i}"))
        .filter(|p| !got.contains(p.as_str()))
        .collect();
    assert!(
        done && missing.is_empty(),
        "out: {} of {N} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    let mut at_local = Sub::new(local.addr, "keep-l", true, &[]).await;
    let wanted = acked_in.len();
    let all_in = |g: &[(String, String)]| {
        g.iter()
            .map(|(_, p)| p.as_str())
            .collect::<BTreeSet<_>>()
            .len()
            >= wanted
    };
    at_local.read_until(Duration::from_secs(60), all_in).await;
    let got: BTreeSet<String> = at_local.got.iter().map(|(_, p)| p.clone()).collect();
    let missing: Vec<&String> = acked_in.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "in: {} of {wanted} acknowledged lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        wanted > N / 2,
        "too few acknowledged by the remote: {wanted}"
    );
    assert!(metric(admin, "petrel_bridge_connects_total{bridge=\"b\"} ").await >= 2.0);
    assert!(metric(admin, "petrel_bridge_failures_total{bridge=\"b\"} ").await >= 1.0);
    drop(local);
    drop(remote);
    let _ = std::fs::remove_dir_all(&local_dir);
    let _ = std::fs::remove_dir_all(&remote_dir);
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// A Mosquitto broker on a loopback port, killed when dropped.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with its persistence file in `dir` (written when it stops).
    fn start(port: u16, dir: &Path) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n\
                 persistence true\npersistence_location {}/\n{}",
                dir.display(),
                // Started as root, mosquitto would become the user "mosquitto", who may not
                // write its persistence file here.
                // SAFETY: getuid cannot fail.
                if unsafe { libc::getuid() } == 0 {
                    "user root\n"
                } else {
                    ""
                }
            ),
        )
        .expect("write mosquitto.conf");
        let log = std::fs::File::create(dir.join("mosquitto.log")).expect("log file");
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("the mosquitto broker (Debian package mosquitto) is not installed");
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        dies_with_test(&mut command);
        let child = command.spawn().expect("spawn mosquitto");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < WAIT,
                "mosquitto does not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto {
            child,
            addr,
            dir: dir.to_owned(),
        }
    }
}

impl Mosquitto {
    /// SIGTERM: mosquitto saves its sessions and exits.
    fn terminate(mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                started.elapsed() < WAIT,
                "mosquitto does not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            eprintln!("--- mosquitto log ---\n{log}");
        }
    }
}

async fn petrel_to_mosquitto(version: &str) {
    let _guard = light().await;
    let dir = temp_dir(&format!("mosquitto-{version}"));
    let port = free_port();
    let mosquitto = Mosquitto::start(port, &dir);
    let admin = free_port();
    let local_dir = temp_dir(&format!("mosquitto-local-{version}"));
    let tables = bridge_tables(mosquitto.addr, version, admin, &disk(&local_dir));
    let local = Broker::start_with("", &tables);
    both_ways_without_loops(local.addr, mosquitto.addr).await;

    // Mosquitto is stopped (SIGTERM: it saves its sessions) and restarted while messages
    // flow both ways: every message petrel acknowledged reaches mosquitto's persistent
    // subscriber, and every one mosquitto acknowledged reaches petrel's.
    drop(Sub::new(mosquitto.addr, "keep-m", true, &["site1/edge/flow"]).await);
    drop(Sub::new(local.addr, "keep-l", true, &["remote/cmd/flow"]).await);
    const N: usize = 300;
    let local_addr = local.addr;
    let outgoing = tokio::spawn(async move {
        let mut p = RawClient::connected(local_addr, "pub-flow", 60).await;
        for i in 0..N {
            publish_acked(&mut p, "edge/flow", [format!("f{i}")]).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    let mut acked_in = BTreeSet::new();
    let mut mosquitto = Some(mosquitto);
    let mut publisher =
        RawClient::connected(SocketAddr::from(([127, 0, 0, 1], port)), "pub-m-flow", 60).await;
    for i in 0..N {
        if i == N / 3 {
            mosquitto.take().expect("running").terminate();
            tokio::time::sleep(Duration::from_millis(300)).await;
            mosquitto = Some(Mosquitto::start(port, &dir));
            publisher =
                RawClient::connected(SocketAddr::from(([127, 0, 0, 1], port)), "pub-m-flow", 60)
                    .await;
        }
        let payload = format!("c{i}");
        let id = i as u16 + 1;
        if publisher
            .try_send(&publish("cmd/flow", 1, id, payload.as_bytes()))
            .await
            .is_ok()
            && publisher.packet(WAIT).await.is_ok_and(|a| a == puback(id))
        {
            acked_in.insert(payload);
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    outgoing.await.expect("outgoing publisher");
    let mosquitto = mosquitto.expect("running");
    let distinct = |g: &[(String, String)]| {
        g.iter()
            .map(|(_, p)| p.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let mut at_remote = Sub::new(mosquitto.addr, "keep-m", true, &[]).await;
    at_remote.read_until(WAIT, |g| distinct(g) >= N).await;
    let got: BTreeSet<&str> = at_remote.got.iter().map(|(_, p)| p.as_str()).collect();
    let missing: Vec<String> = (0..N)
        .map(|i| format!("f{i}"))
        .filter(|p| !got.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "out: {} of {N} lost across mosquitto's restart, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let wanted = acked_in.len();
    assert!(
        wanted > N / 2,
        "mosquitto acknowledged only {wanted} of {N}"
    );
    let mut at_local = Sub::new(local.addr, "keep-l", true, &[]).await;
    at_local.read_until(WAIT, |g| distinct(g) >= wanted).await;
    let got: BTreeSet<String> = at_local.got.iter().map(|(_, p)| p.clone()).collect();
    let missing: Vec<&String> = acked_in.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "in: {} of {wanted} acknowledged lost across mosquitto's restart, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // And the bridge carries both ways again.
    wait_for_bridge(local.addr, mosquitto.addr).await;
    assert!(metric(admin, "petrel_bridge_connects_total{bridge=\"b\"} ").await >= 2.0);

    // Now petrel dies: what is published at mosquitto meanwhile waits there in the bridge's
    // session and arrives once petrel is back.
    drop(Sub::new(local.addr, "keep-l", true, &["remote/cmd/#"]).await);
    drop(local); // SIGKILL
    let mut p = RawClient::connected(mosquitto.addr, "pub-m", 60).await;
    publish_acked(&mut p, "cmd/down", (0..50).map(|i| format!("down{i}"))).await;
    let local = Broker::start_with("", &tables);
    let mut at_local = Sub::new(local.addr, "keep-l", true, &[]).await;
    let got_all = at_local
        .read_until(WAIT, |g| {
            g.iter()
                .filter(|(t, _)| t == "remote/cmd/down")
                .map(|(_, p)| p)
                .collect::<BTreeSet<_>>()
                .len()
                >= 50
        })
        .await;
    assert!(
        got_all,
        "after petrel's restart it got {} of 50",
        at_local.got.len()
    );
    drop(local);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&local_dir);
}

#[tokio::test]
async fn petrel_to_mosquitto_v5() {
    petrel_to_mosquitto("5.0").await;
}

#[tokio::test]
async fn petrel_to_mosquitto_v311() {
    petrel_to_mosquitto("3.1.1").await;
}

/// The bridging broker itself is SIGKILLed while its remote is down: what it acknowledged
/// for the remote waits on its disk, and goes out once both are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_queue_survives_a_restart_of_the_bridging_broker() {
    let _machine = heavy().await;
    let (local_dir, remote_dir) = (temp_dir("queue-local"), temp_dir("queue-remote"));
    let port = free_port();
    let remote = Broker::start_at(port, "", &disk(&remote_dir));
    let remote_addr = remote.addr;
    let admin = free_port();
    let tables = bridge_tables(remote_addr, "5.0", admin, &disk(&local_dir));
    let local = Broker::start_with("", &tables);
    wait_for_bridge(local.addr, remote_addr).await;
    drop(Sub::new(remote_addr, "keep-r", true, &["site1/edge/#"]).await);
    drop(remote); // the link is down

    let mut p = RawClient::connected(local.addr, "pub-l", 60).await;
    publish_acked(&mut p, "edge/q", (0..100).map(|i| format!("q{i}"))).await;
    drop(p);
    drop(local); // SIGKILL with 100 messages queued for the remote

    let local = Broker::start_with("", &tables);
    let remote = Broker::start_at(port, "", &disk(&remote_dir));
    let mut at_remote = Sub::new(remote.addr, "keep-r", true, &[]).await;
    let all =
        |g: &[(String, String)]| g.iter().map(|(_, p)| p).collect::<BTreeSet<_>>().len() >= 100;
    let done = at_remote.read_until(WAIT, all).await;
    let got: BTreeSet<&str> = at_remote.got.iter().map(|(_, p)| p.as_str()).collect();
    assert!(
        done,
        "the remote got {} of the 100 queued messages",
        got.len()
    );
    drop(local);
    drop(remote);
    let _ = std::fs::remove_dir_all(&local_dir);
    let _ = std::fs::remove_dir_all(&remote_dir);
}
