//! Crash test: the real `petrel` binary, with the disk store, killed with SIGKILL at random
//! moments while a publisher sends QoS 1 and QoS 2 messages to offline persistent
//! subscribers. After a restart the subscribers come back: every message the broker
//! acknowledged (PUBACK, PUBREC) is delivered — QoS 2 exactly once, QoS 1 at least once — and
//! the retained message is intact. The second test does the same with the subscriber online
//! and acknowledging, where the store skips writing what is acknowledged in time. The third
//! kills it during QoS 2 flows with a persistent publisher and subscriber both online and
//! resuming their exchanges after each restart: every message exactly once.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

const PROMPT: Duration = Duration::from_secs(5);
const ITERATIONS: usize = 6;

/// The disk store, and offline queues large enough for everything the test publishes: a
/// message dropped at a queue bound is dropped by design (counted and logged), not lost.
fn storage(dir: &Path) -> String {
    format!(
        "[mqtt]\nmax_queued_messages = 1000000\n\n[storage]\ndir = \"{}\"\nfsync = \"always\"\n",
        dir.display()
    )
}

fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut c = connect_v311(client_id, 60);
    c[9] = 0x00; // Clean Session 0
    c
}

fn ack(kind: u8, id: u16) -> Vec<u8> {
    let id = id.to_be_bytes();
    vec![kind, 0x02, id[0], id[1]]
}

/// A small generator (xorshift) so that a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    /// Seeded from the clock; the seed is printed so that a failing run can be replayed.
    fn seeded() -> (u64, Rng) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        println!("crash test seed {seed}");
        (seed, Rng(seed))
    }

    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Publishes alternately QoS 1 and QoS 2 until the broker dies; returns the payloads it
/// acknowledged (QoS 1 at PUBACK, QoS 2 at PUBREC).
async fn publish_until_killed(
    addr: std::net::SocketAddr,
    iteration: usize,
    acked: &mut BTreeMap<String, u8>,
) {
    let Ok(mut publ) =
        tokio::time::timeout(PROMPT, RawClient::connected(addr, "publisher", 60)).await
    else {
        return;
    };
    for n in 0..100_000u32 {
        let qos = if n % 2 == 0 { 1 } else { 2 };
        let id = (n % 60_000 + 1) as u16;
        let payload = format!("{iteration}-{n}");
        let topic = if qos == 1 { "crash/q1" } else { "crash/q2" };
        if publ
            .try_send(&publish(topic, qos, id, payload.as_bytes()))
            .await
            .is_err()
        {
            return;
        }
        let Ok(reply) = publ.packet(PROMPT).await else {
            return;
        };
        match (qos, reply[0]) {
            (1, 0x40) | (2, 0x50) => {
                acked.insert(payload, qos);
            }
            _ => panic!("unexpected reply {:02x?}", reply),
        }
        if qos == 2 {
            // PUBREL; killed before PUBCOMP, the message was acknowledged all the same.
            if publ.try_send(&ack(0x62, id)).await.is_err() || publ.packet(PROMPT).await.is_err() {
                return;
            }
        }
    }
}

/// Reads every message the subscriber gets until it is quiet, acknowledging each.
async fn drain(sub: &mut RawClient) -> Vec<(String, u8, bool)> {
    let mut got = Vec::new();
    loop {
        let packet = match sub.packet(Duration::from_millis(1500)).await {
            Ok(p) => p,
            Err(_) => return got,
        };
        match packet[0] & 0xf0 {
            0x30 => {
                let qos = (packet[0] >> 1) & 0x03;
                let dup = packet[0] & 0x08 != 0;
                got.push((
                    String::from_utf8_lossy(publish_payload(&packet)).into_owned(),
                    qos,
                    dup,
                ));
                let id = publish_packet_id(&packet);
                match qos {
                    1 => sub.send(&puback(id)).await,
                    2 => sub.send(&ack(0x50, id)).await, // PUBREC
                    _ => {}
                }
            }
            0x60 => {
                // PUBREL: complete the QoS 2 exchange.
                let id = u16::from_be_bytes([packet[2], packet[3]]);
                sub.send(&ack(0x70, id)).await;
            }
            other => panic!("unexpected packet type {other:#04x}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let _machine = heavy().await;
    let dir = std::env::temp_dir().join(format!("petrel-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (seed, mut rng) = Rng::seeded();

    // Persistent subscribers, then offline; a retained message.
    let broker = Broker::start_with("", &storage(&dir));
    for (id, filter, qos) in [("sub1", "crash/q1", 1u8), ("sub2", "crash/q2", 2)] {
        let mut s = RawClient::connect(broker.addr).await;
        s.send(&connect_persistent(id)).await;
        s.expect(&CONNACK_ACCEPTED, PROMPT).await;
        s.send(&subscribe(1, filter, qos)).await;
        s.expect(&suback(1, qos), PROMPT).await;
    }
    let mut p = RawClient::connected(broker.addr, "retainer", 60).await;
    let mut retained = publish("crash/retained", 1, 1, b"kept");
    retained[0] |= 0x01;
    p.send(&retained).await;
    p.expect(&puback(1), PROMPT).await;
    drop(p);
    drop(broker); // SIGKILL

    let mut acked = BTreeMap::new();
    for iteration in 0..ITERATIONS {
        let broker = Broker::start_with("", &storage(&dir));
        let kill_after = Duration::from_millis(30 + rng.next(300));
        let addr = broker.addr;
        let before = acked.len();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            drop(broker); // SIGKILL, wherever the publisher is
        });
        publish_until_killed(addr, iteration, &mut acked).await;
        killer.await.unwrap();
        println!(
            "iteration {iteration}: killed after {kill_after:?}, {} messages acknowledged",
            acked.len() - before
        );
    }
    assert!(
        acked.len() > 20,
        "too few messages acknowledged to mean anything: {}",
        acked.len()
    );

    let started = Instant::now();
    let broker = Broker::start_with("", &storage(&dir));
    println!("restart took {:?}", started.elapsed());
    let mut delivered: Vec<(String, u8, bool)> = Vec::new();
    for id in ["sub1", "sub2"] {
        let mut s = RawClient::connect(broker.addr).await;
        s.send(&connect_persistent(id)).await;
        s.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await;
        delivered.extend(drain(&mut s).await);
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (payload, _, _) in &delivered {
        *counts.entry(payload.as_str()).or_insert(0) += 1;
    }
    let mut missing = BTreeSet::new();
    for (payload, qos) in &acked {
        match counts.get(payload.as_str()) {
            None => {
                missing.insert(payload.clone());
            }
            Some(&n) if *qos == 2 && n != 1 => {
                panic!("QoS 2 message {payload} delivered {n} times")
            }
            _ => {}
        }
    }
    for (payload, qos, _) in &delivered {
        if *qos == 2 {
            assert_eq!(counts[payload.as_str()], 1, "QoS 2 duplicate {payload}");
        }
    }
    assert!(
        missing.is_empty(),
        "seed {seed}: {} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    println!(
        "{} acknowledged, {} delivered (QoS 1 may repeat; unacknowledged ones may arrive)",
        acked.len(),
        delivered.len()
    );

    // The retained message is intact.
    let mut late = RawClient::connected(broker.addr, "late", 60).await;
    late.send(&subscribe(1, "crash/retained", 1)).await;
    late.expect(&suback(1, 1), PROMPT).await;
    let packet = late.packet(PROMPT).await.expect("retained message");
    assert_eq!(publish_payload(&packet), b"kept");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes QoS 1 messages in bursts of `BURST` (so that many wait for the store at once)
/// until the broker dies; returns the payloads it acknowledged.
async fn publish_bursts_until_killed(
    addr: std::net::SocketAddr,
    iteration: usize,
    acked: &mut BTreeSet<String>,
) {
    const BURST: u16 = 20;
    let Ok(mut publ) =
        tokio::time::timeout(PROMPT, RawClient::connected(addr, "burster", 60)).await
    else {
        return;
    };
    for burst in 0..5_000u32 {
        let payload = |i: u16| format!("live-{iteration}-{burst}-{i}");
        for i in 1..=BURST {
            let message = publish("crash/live", 1, i, payload(i).as_bytes());
            if publ.try_send(&message).await.is_err() {
                return;
            }
        }
        for _ in 1..=BURST {
            let Ok(reply) = publ.packet(PROMPT).await else {
                return;
            };
            assert_eq!(reply[0], 0x40, "unexpected reply {reply:02x?}");
            acked.insert(payload(publish_ack_id(&reply)));
        }
    }
}

fn publish_ack_id(ack: &[u8]) -> u16 {
    u16::from_be_bytes([ack[2], ack[3]])
}

/// The same promise with the subscriber online: a message it acknowledges before the store
/// wrote it is never written, so the broker must not acknowledge the publisher before either
/// the message is durable or the subscriber has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_with_the_subscriber_online() {
    let _machine = heavy().await;
    let dir = std::env::temp_dir().join(format!("petrel-crash-live-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (seed, mut rng) = Rng::seeded();

    let broker = Broker::start_with("", &storage(&dir));
    let mut s = RawClient::connect(broker.addr).await;
    s.send(&connect_persistent("live")).await;
    s.expect(&CONNACK_ACCEPTED, PROMPT).await;
    s.send(&subscribe(1, "crash/live", 1)).await;
    s.expect(&suback(1, 1), PROMPT).await;
    drop(s);
    drop(broker);

    let mut acked = BTreeSet::new();
    let mut received = BTreeSet::new();
    for iteration in 0..ITERATIONS {
        let broker = Broker::start_with("", &storage(&dir));
        let addr = broker.addr;
        // The subscriber reads and acknowledges everything until the broker dies.
        let mut sub = RawClient::connect(addr).await;
        sub.send(&connect_persistent("live")).await;
        sub.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(packet) = sub.packet(PROMPT).await {
                assert_eq!(packet[0] & 0xf0, 0x30, "unexpected {packet:02x?}");
                got.push(String::from_utf8_lossy(publish_payload(&packet)).into_owned());
                if sub
                    .try_send(&puback(publish_packet_id(&packet)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            got
        });
        let kill_after = Duration::from_millis(50 + rng.next(300));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            drop(broker);
        });
        let before = acked.len();
        publish_bursts_until_killed(addr, iteration, &mut acked).await;
        killer.await.unwrap();
        let got = reader.await.unwrap();
        println!(
            "iteration {iteration}: killed after {kill_after:?}, {} acknowledged, {} received live",
            acked.len() - before,
            got.len()
        );
        received.extend(got);
    }
    assert!(acked.len() > 100, "too few acknowledged: {}", acked.len());

    let broker = Broker::start_with("", &storage(&dir));
    let mut s = RawClient::connect(broker.addr).await;
    s.send(&connect_persistent("live")).await;
    s.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await;
    let after: Vec<String> = drain(&mut s).await.into_iter().map(|(p, _, _)| p).collect();
    println!(
        "{} acknowledged, {} received live, {} after the last restart",
        acked.len(),
        received.len(),
        after.len()
    );
    received.extend(after);
    let missing: Vec<&String> = acked.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: {} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The QoS 2 client side of the SIGKILL test: a publisher that keeps its unfinished
/// exchanges across connections, as a persistent 3.1.1 client must [MQTT-4.4.0-1].
#[derive(Default)]
struct Qos2Sender {
    /// The next message number to publish.
    next: u32,
    /// Packet id → (message number, PUBREC received).
    outstanding: BTreeMap<u16, (u32, bool)>,
    next_id: u16,
}

/// Few packet ids, so that ids are reused soon after their PUBCOMP: a completed id that a
/// crash brought back would swallow the next message with it.
const QOS2_IDS: u16 = 24;
const QOS2_WINDOW: usize = 8;

/// A QoS 2 receiver that keeps its session state (ids awaiting PUBREL) across connections:
/// what it hands to the application is what a real client would.
#[derive(Default)]
struct Qos2Receiver {
    awaiting: BTreeSet<u16>,
    delivered: Vec<u32>,
}

fn qos2_payload(n: u32) -> String {
    format!("q2-{n}")
}

fn qos2_number(payload: &[u8]) -> u32 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|p| p.strip_prefix("q2-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {payload:02x?}"))
}

/// Connects `client_id` with Clean Session 0; `None` if the broker is gone. A session the
/// test set up earlier must still be there.
async fn resume(addr: std::net::SocketAddr, client_id: &str) -> Option<RawClient> {
    let mut c = tokio::time::timeout(PROMPT, RawClient::try_connect(addr))
        .await
        .ok()?
        .ok()?;
    c.try_send(&connect_persistent(client_id)).await.ok()?;
    let connack = c.packet(PROMPT).await.ok()?;
    assert_eq!(
        connack,
        [0x20, 0x02, 0x01, 0x00],
        "{client_id}: CONNACK without its session"
    );
    Some(c)
}

/// Publishes QoS 2 messages, at most `QOS2_WINDOW` at a time, until the broker dies; with
/// `finish`, publishes nothing new and returns once every exchange it had is complete.
async fn run_qos2_sender(addr: std::net::SocketAddr, s: &mut Qos2Sender, finish: bool) {
    let Some(mut c) = resume(addr, "q2-pub").await else {
        return;
    };
    // Unfinished exchanges first: PUBLISH again with DUP, or PUBREL where PUBREC came.
    for (&id, &(n, received)) in &s.outstanding {
        let packet = if received {
            ack(0x62, id)
        } else {
            let mut p = publish("crash/q2", 2, id, qos2_payload(n).as_bytes());
            p[0] |= 0x08;
            p
        };
        if c.try_send(&packet).await.is_err() {
            return;
        }
    }
    loop {
        while !finish && s.outstanding.len() < QOS2_WINDOW {
            let id = loop {
                s.next_id = s.next_id % QOS2_IDS + 1;
                if !s.outstanding.contains_key(&s.next_id) {
                    break s.next_id;
                }
            };
            let n = s.next;
            s.next += 1;
            s.outstanding.insert(id, (n, false));
            let packet = publish("crash/q2", 2, id, qos2_payload(n).as_bytes());
            if c.try_send(&packet).await.is_err() {
                return;
            }
        }
        if finish && s.outstanding.is_empty() {
            return;
        }
        let Ok(packet) = c.packet(PROMPT).await else {
            return;
        };
        let id = publish_ack_id(&packet);
        match packet[0] {
            0x50 => {
                let entry = s.outstanding.get_mut(&id).expect("PUBREC for an id in use");
                entry.1 = true;
                if c.try_send(&ack(0x62, id)).await.is_err() {
                    return;
                }
            }
            0x70 => {
                let (_, received) = s.outstanding.remove(&id).expect("PUBCOMP for an id in use");
                assert!(received, "PUBCOMP before PUBREC for id {id}");
            }
            other => panic!("publisher got {other:#04x}"),
        }
    }
}

/// Receives and completes QoS 2 deliveries until the broker dies or is quiet for `quiet`.
async fn run_qos2_receiver(
    addr: std::net::SocketAddr,
    r: &mut Qos2Receiver,
    client_id: &str,
    quiet: Duration,
) {
    let Some(mut c) = resume(addr, client_id).await else {
        return;
    };
    while let Ok(packet) = c.packet(quiet).await {
        let reply = match packet[0] & 0xf0 {
            0x30 => {
                assert_eq!(packet[0] & 0x06, 0x04, "a QoS 2 delivery: {packet:02x?}");
                let id = publish_packet_id(&packet);
                // Handed on once per id until its PUBREL [MQTT-4.3.3-9]: a DUP repeat is not.
                if r.awaiting.insert(id) {
                    r.delivered.push(qos2_number(publish_payload(&packet)));
                }
                ack(0x50, id)
            }
            0x60 => {
                let id = publish_ack_id(&packet);
                r.awaiting.remove(&id);
                ack(0x70, id)
            }
            other => panic!("subscriber got {other:#04x}"),
        };
        if c.try_send(&reply).await.is_err() {
            return;
        }
    }
}

/// SIGKILL during QoS 2 flows with the subscribers online: a persistent publisher and a
/// persistent subscriber that both resume their exchanges after each restart, as the
/// specification has clients do. Every message the publisher started is delivered to the
/// subscriber exactly once in the end — none lost, none twice, whether the broker died
/// before or after routing it, before or after any of PUBREC, PUBREL, PUBCOMP either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_is_exactly_once_across_sigkill_with_the_clients_online() {
    let _machine = heavy().await;
    let dir = std::env::temp_dir().join(format!("petrel-crash-q2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (seed, mut rng) = Rng::seeded();

    let broker = Broker::start_with("", &storage(&dir));
    let mut s = RawClient::connect(broker.addr).await;
    s.send(&connect_persistent("q2-sub")).await;
    s.expect(&CONNACK_ACCEPTED, PROMPT).await;
    s.send(&subscribe(1, "crash/q2", 2)).await;
    s.expect(&suback(1, 2), PROMPT).await;
    let mut p = RawClient::connect(broker.addr).await;
    p.send(&connect_persistent("q2-pub")).await;
    p.expect(&CONNACK_ACCEPTED, PROMPT).await;
    // DISCONNECT: the sessions are offline, and stored, before the first kill.
    for mut c in [s, p] {
        c.send(&[0xe0, 0x00]).await;
        let _ = c.until_closed(PROMPT).await;
    }
    drop(broker);

    let mut sender = Qos2Sender::default();
    let mut receiver = Qos2Receiver::default();
    for iteration in 0..ITERATIONS * 2 {
        let broker = Broker::start_with("", &storage(&dir));
        let addr = broker.addr;
        let kill_after = Duration::from_millis(40 + rng.next(400));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            drop(broker);
        });
        let receiving = tokio::spawn(async move {
            run_qos2_receiver(addr, &mut receiver, "q2-sub", PROMPT).await;
            receiver
        });
        let (before, completed) = (sender.next, sender.outstanding.len());
        run_qos2_sender(addr, &mut sender, false).await;
        killer.await.unwrap();
        receiver = receiving.await.unwrap();
        println!(
            "iteration {iteration}: killed after {kill_after:?}: {} new messages, {} exchanges open (was {completed}), {} delivered so far",
            sender.next - before,
            sender.outstanding.len(),
            receiver.delivered.len()
        );
    }
    assert!(
        sender.next > 50,
        "too few messages published to mean anything: {}",
        sender.next
    );

    // The last restart: the publisher completes what it started, the subscriber gets the rest.
    let broker = Broker::start_with("", &storage(&dir));
    let addr = broker.addr;
    let receiving = tokio::spawn(async move {
        run_qos2_receiver(addr, &mut receiver, "q2-sub", Duration::from_secs(2)).await;
        receiver
    });
    run_qos2_sender(addr, &mut sender, true).await;
    assert!(
        sender.outstanding.is_empty(),
        "seed {seed}: the publisher could not complete {:?}",
        sender.outstanding
    );
    let receiver = receiving.await.unwrap();

    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for n in &receiver.delivered {
        *counts.entry(*n).or_insert(0) += 1;
    }
    let twice: Vec<(&u32, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "seed {seed}: QoS 2 messages delivered more than once (number, times): {twice:?}"
    );
    let missing: Vec<u32> = (0..sender.next)
        .filter(|n| !counts.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: {} of {} QoS 2 messages never delivered, e.g. {:?}",
        missing.len(),
        sender.next,
        &missing[..missing.len().min(10)]
    );
    println!(
        "{} QoS 2 messages over {} kills: each delivered exactly once",
        sender.next,
        ITERATIONS * 2
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CONNACK for a persistent session promises the session: SIGKILL right after it must not
/// lose it. Clients that connect at once, the broker killed the moment the last CONNACK is in:
/// all find their sessions after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_a_connack_promised_survives_sigkill() {
    let _machine = heavy().await;
    let dir = std::env::temp_dir().join(format!("petrel-crash-connack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    const CLIENTS: usize = 20;
    for round in 0..3 {
        let broker = Broker::start_with("", &storage(&dir));
        let addr = broker.addr;
        let clients = (0..CLIENTS).map(|i| {
            tokio::spawn(async move {
                let mut c = RawClient::connect(addr).await;
                c.send(&connect_persistent(&format!("promised-{round}-{i}")))
                    .await;
                c.expect(&CONNACK_ACCEPTED, PROMPT).await;
                c
            })
        });
        let mut connected = Vec::new();
        for c in clients.collect::<Vec<_>>() {
            connected.push(c.await.unwrap());
        }
        drop(broker); // SIGKILL the moment the last CONNACK is in
        drop(connected);

        let broker = Broker::start_with("", &storage(&dir));
        for i in 0..CLIENTS {
            let mut c = RawClient::connect(broker.addr).await;
            c.send(&connect_persistent(&format!("promised-{round}-{i}")))
                .await;
            let connack = c.packet(PROMPT).await.expect("CONNACK");
            assert_eq!(
                connack,
                [0x20, 0x02, 0x01, 0x00],
                "round {round}: promised-{round}-{i} lost its session to SIGKILL after its CONNACK"
            );
        }
        drop(broker);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
