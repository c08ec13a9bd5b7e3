//! Crash test: the real `petrel` binary, with the disk store, killed with SIGKILL at random
//! moments while a publisher sends QoS 1 and QoS 2 messages to offline persistent
//! subscribers. After a restart the subscribers come back: every message the broker
//! acknowledged (PUBACK, PUBREC) is delivered — QoS 2 exactly once, QoS 1 at least once — and
//! the retained message is intact. The second test does the same with the subscriber online
//! and acknowledging, where the store skips writing what is acknowledged in time.

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
