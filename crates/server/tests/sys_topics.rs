//! `$SYS/broker/...` topics from the real `petrel` binary, seen by independent clients that
//! speak hand-written bytes (and `mosquitto_sub` where it is installed): the figures arrive
//! retained, follow the clients and messages within a couple of intervals, reach only explicit
//! `$SYS` subscriptions, cannot be forged by a client, and are off with `sys_interval = "0s"`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// The interval the brokers here publish at.
const INTERVAL: &str = "1s";
/// Long enough for two intervals and the delivery after them.
const TWO_INTERVALS: Duration = Duration::from_millis(2500);
const PROMPT: Duration = Duration::from_secs(5);
const VERSION: &str = concat!("petrel ", env!("CARGO_PKG_VERSION"));

/// A `petrel` process on an OS-chosen port of 127.0.0.1, killed when dropped.
struct Petrel {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Petrel {
    /// Starts petrel with `sys_interval` (a top-level key, so before any table), one TCP
    /// listener on port 0, nothing on disk and no admin listener.
    fn start(sys_interval: &str) -> Petrel {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "petrel-sys-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let config = dir.join("petrel.toml");
        let text = format!(
            "sys_interval = \"{sys_interval}\"\n\n\
             [[listeners]]\nbind = \"127.0.0.1:0\"\n\n\
             [storage]\nmode = \"memory\"\n\n\
             [admin]\nenabled = false\n"
        );
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.join("petrel.log")).expect("create log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        dies_with_test(&mut command);
        let child = command.spawn().expect("spawn petrel");
        let mut petrel = Petrel {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
            dir,
        };
        // The port the OS gave is in the "listening" line of the log.
        let started = Instant::now();
        loop {
            let log = petrel.log();
            let addr = log
                .lines()
                .filter(|l| l.contains("listening"))
                .find_map(|l| {
                    l.split_once("addr=")?
                        .1
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
            if let Some(addr) = addr {
                petrel.addr = addr;
                return petrel;
            }
            if let Ok(Some(status)) = petrel.child.try_wait() {
                panic!("petrel exited with {status}; its log:\n{log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "petrel not listening after 15 s; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("petrel.log")).unwrap_or_default()
    }
}

impl Drop for Petrel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- petrel log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const DISCONNECT: [u8; 2] = [0xe0, 0x00];

fn is_publish(packet: &[u8]) -> bool {
    packet[0] >> 4 == 3
}

/// A 3.1.1 client subscribed to a `$SYS` filter, keeping the latest text of each topic.
struct Watcher {
    client: RawClient,
    latest: HashMap<String, String>,
    /// Every message received, in order.
    seen: Vec<(String, String)>,
}

impl Watcher {
    async fn subscribe(addr: SocketAddr, client_id: &str, filter: &str) -> Watcher {
        let mut client = RawClient::connected(addr, client_id, 60).await;
        client.send(&subscribe(1, filter, 0)).await;
        client.expect(&suback(1, 0), PROMPT).await;
        Watcher {
            client,
            latest: HashMap::new(),
            seen: Vec::new(),
        }
    }

    /// Reads until `topic` (under `$SYS/broker/`) holds a text that `ok` accepts; returns it.
    async fn wait_for(&mut self, topic: &str, ok: impl Fn(&str) -> bool, wait: Duration) -> String {
        let topic = format!("$SYS/broker/{topic}");
        let deadline = Instant::now() + wait;
        loop {
            if let Some(text) = self.latest.get(&topic).filter(|t| ok(t)) {
                return text.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.client.packet(left).await {
                Ok(packet) if is_publish(&packet) => {
                    let text = String::from_utf8_lossy(publish_payload(&packet)).into_owned();
                    let topic = publish_topic(&packet);
                    self.seen.push((topic.clone(), text.clone()));
                    self.latest.insert(topic, text);
                }
                Ok(_) => {}
                Err(why) => panic!(
                    "{topic}: no acceptable value within {wait:?} ({why:?}); last {:?}",
                    self.latest.get(&topic)
                ),
            }
        }
    }

    /// Reads whatever arrives for `wait`.
    async fn soak(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.client.packet(left).await {
                Ok(packet) if is_publish(&packet) => {
                    let text = String::from_utf8_lossy(publish_payload(&packet)).into_owned();
                    let topic = publish_topic(&packet);
                    self.seen.push((topic.clone(), text.clone()));
                    self.latest.insert(topic, text);
                }
                Ok(_) => {}
                Err(Ended::TimedOut) => return,
                Err(Ended::Closed) => panic!("petrel closed the watcher's connection"),
            }
        }
    }
}

fn number(text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a decimal count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_follow_clients_and_messages_and_stay_out_of_wildcards() {
    let petrel = Petrel::start(INTERVAL);
    let addr = petrel.addr;
    let mut sys = Watcher::subscribe(addr, "sys-watcher", "$SYS/broker/#").await;
    // A subscription to everything, which must not include `$` topics [MQTT-4.7.2-1].
    let mut everything = RawClient::connected(addr, "everything", 60).await;
    everything.send(&subscribe(1, "#", 0)).await;
    everything.expect(&suback(1, 0), PROMPT).await;

    // Published at start, retained: here at once.
    let version = sys.wait_for("version", |_| true, PROMPT).await;
    assert_eq!(version, VERSION);
    let uptime = sys.wait_for("uptime", |_| true, PROMPT).await;
    let seconds = uptime
        .strip_suffix(" seconds")
        .unwrap_or_else(|| panic!("uptime {uptime:?} is not \"<n> seconds\""));
    number(seconds);
    // The broker's own figures are not counted as retained messages.
    sys.wait_for("retained messages/count", |t| number(t) == 0, TWO_INTERVALS)
        .await;

    // The watcher and the `#` subscriber, then a visitor comes and goes.
    sys.wait_for("clients/connected", |t| t == "2", TWO_INTERVALS)
        .await;
    let mut visitor = RawClient::connected(addr, "visitor", 60).await;
    sys.wait_for("clients/connected", |t| t == "3", TWO_INTERVALS)
        .await;
    // The deprecated alias follows in the same round.
    sys.wait_for("clients/active", |t| t == "3", PROMPT).await;
    sys.wait_for("clients/maximum", |t| t == "3", TWO_INTERVALS)
        .await;
    sys.wait_for("clients/total", |t| t == "3", TWO_INTERVALS)
        .await;
    visitor.send(&DISCONNECT).await;
    drop(visitor);
    sys.wait_for("clients/connected", |t| t == "2", TWO_INTERVALS)
        .await;
    sys.wait_for("clients/maximum", |t| t == "3", PROMPT).await;

    // Three PUBLISH packets in, three out (to the `#` subscriber).
    let before = number(
        &sys.wait_for("publish/messages/received", |_| true, PROMPT)
            .await,
    );
    for n in 0..3u8 {
        sys.client
            .send(&publish("plain/topic", 0, 0, &[b'0' + n]))
            .await;
    }
    let after = sys
        .wait_for(
            "publish/messages/received",
            |t| number(t) >= before + 3,
            TWO_INTERVALS,
        )
        .await;
    assert_eq!(number(&after), before + 3);
    sys.wait_for("messages/received", |t| number(t) >= before + 3, PROMPT)
        .await;
    sys.wait_for("publish/bytes/received", |t| number(t) >= 3, PROMPT)
        .await;
    let load = sys
        .wait_for("load/publish/received/1min", |t| t != "0.00", TWO_INTERVALS)
        .await;
    let (whole, cents) = load.split_once('.').expect("a load with two decimals");
    assert!(whole.parse::<u64>().is_ok() && cents.len() == 2, "{load}");

    // The `#` subscriber got the three messages and nothing under `$SYS`.
    let mut topics = Vec::new();
    while let Ok(packet) = everything.packet(Duration::from_millis(300)).await {
        if is_publish(&packet) {
            topics.push(publish_topic(&packet));
        }
    }
    assert_eq!(
        topics, ["plain/topic"; 3],
        "# matches no $ topic [MQTT-4.7.2-1]"
    );
    assert!(sys.seen.iter().all(|(t, _)| t.starts_with("$SYS/broker/")));
}

/// A v5 CONNECT, Clean Start, no properties.
fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00,
    ];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

/// A v5 QoS 1 PUBLISH with RETAIN, no properties.
fn publish_v5_retained(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0x00);
    body.extend_from_slice(payload);
    let mut out = vec![0x33, body.len() as u8];
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_a_sys_topic() {
    let petrel = Petrel::start(INTERVAL);
    let addr = petrel.addr;
    let mut watcher = Watcher::subscribe(addr, "version-watcher", "$SYS/broker/version").await;
    assert_eq!(watcher.wait_for("version", |_| true, PROMPT).await, VERSION);

    // MQTT 5: refused with PUBACK 0x87 (Not authorized).
    let mut v5 = RawClient::connect(addr).await;
    v5.send(&connect_v5("forger-v5")).await;
    let connack = v5.packet(PROMPT).await.expect("CONNACK");
    assert_eq!((connack[0], connack[3]), (0x20, 0x00), "{}", hex(&connack));
    v5.send(&publish_v5_retained("$SYS/broker/version", 7, b"forged"))
        .await;
    let refused = v5.packet(PROMPT).await.expect("PUBACK");
    assert_eq!(
        &refused[..5],
        &[0x40, refused[1], 0x00, 0x07, 0x87],
        "{}",
        hex(&refused)
    );

    // 3.1.1 cannot refuse a PUBLISH: acknowledged (QoS 1) and dropped.
    let mut v3 = RawClient::connected(addr, "forger-v3", 60).await;
    let mut retained_qos1 = publish("$SYS/broker/version", 1, 8, b"forged");
    retained_qos1[0] |= 0x01;
    v3.send(&retained_qos1).await;
    v3.expect(&puback(8), PROMPT).await;
    let mut retained_qos0 = publish("$SYS/broker/version", 0, 0, b"forged");
    retained_qos0[0] |= 0x01;
    v3.send(&retained_qos0).await;

    // Nothing reached the subscriber over the next two intervals, and the retained value is
    // the broker's.
    watcher.soak(TWO_INTERVALS).await;
    assert!(
        watcher.seen.iter().all(|(_, text)| text == VERSION),
        "{:?}",
        watcher.seen
    );
    let mut late = Watcher::subscribe(addr, "late-watcher", "$SYS/broker/version").await;
    assert_eq!(late.wait_for("version", |_| true, PROMPT).await, VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_interval_publishes_nothing() {
    let petrel = Petrel::start("0s");
    let mut sys = Watcher::subscribe(petrel.addr, "sys-watcher", "$SYS/#").await;
    let mut other = RawClient::connected(petrel.addr, "other", 60).await;
    other.send(&publish("plain/topic", 0, 0, b"x")).await;
    sys.soak(Duration::from_millis(1500)).await;
    assert_eq!(sys.seen, []);
}

/// The same figures through `mosquitto_sub`, an independent client; skipped where it is not
/// installed (CI installs mosquitto-clients).
#[test]
fn mosquitto_sub_reads_the_figures() {
    if Command::new("mosquitto_sub")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("mosquitto_sub not found; skipping");
        return;
    }
    let petrel = Petrel::start(INTERVAL);
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &petrel.addr.port().to_string()])
        .args(["-V", "mqttv5", "-v", "-C", "5", "-W", "5"])
        .args(["-t", "$SYS/broker/version"])
        .args(["-t", "$SYS/broker/retained messages/count"])
        .args(["-t", "$SYS/broker/load/connections/+"])
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_sub");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        out.status.success(),
        "mosquitto_sub: {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines.contains(&format!("$SYS/broker/version {VERSION}").as_str()),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("$SYS/broker/retained messages/count ")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("$SYS/broker/load/connections/")),
        "{text}"
    );
}
