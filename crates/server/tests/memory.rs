//! Memory per idle connection, a tracked goal: thousands of connected clients that send
//! nothing must cost the broker little, and their memory must come back when they leave.
//!
//! This asserts a generous ceiling (a regression alarm, not the goal itself: BENCHMARKS.md
//! tracks the figure) and prints the measurement.

mod support;

use std::time::Duration;

use support::{raise_open_files_limit, Broker, CONNACK_ACCEPTED, PINGREQ, PINGRESP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 5000;
/// Ceiling per idle connection. The target is 2 KiB; this leaves room for allocator slack.
const CEILING_BYTES: u64 = 4096;

async fn settle_rss(broker: &Broker) -> u64 {
    // jemalloc returns idle pages after ~1 s; sample until the figure stops falling.
    let mut last = broker.rss_kib();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = broker.rss_kib();
        if now >= last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_cheap_and_released() {
    raise_open_files_limit(CLIENTS as u64 + 200).expect("enough file descriptors for the test");
    let broker = Broker::start("");
    let baseline = settle_rss(&broker).await;

    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(broker.addr).await.expect("connect");
        let id = format!("idle-{i:05}");
        let mut connect = vec![
            0x10,
            (12 + id.len()) as u8,
            0x00,
            0x04,
            b'M',
            b'Q',
            b'T',
            b'T',
            0x04,
            0x02,
            0x00,
            0x00,
        ];
        connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
        connect.extend_from_slice(id.as_bytes());
        s.write_all(&connect).await.expect("send CONNECT");
        let mut ack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
            .await
            .expect("CONNACK in time")
            .expect("read CONNACK");
        assert_eq!(ack, CONNACK_ACCEPTED, "client {i}");
        clients.push(s);
    }
    let loaded = settle_rss(&broker).await;
    let per_connection = (loaded.saturating_sub(baseline)) * 1024 / CLIENTS as u64;
    println!(
        "petrel VmRSS: {baseline} KiB idle broker, {loaded} KiB with {CLIENTS} idle clients: {per_connection} B per connection"
    );

    // Every one of them is still served.
    for (i, s) in clients.iter_mut().enumerate().step_by(50) {
        s.write_all(&PINGREQ).await.expect("send PINGREQ");
        let mut resp = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut resp))
            .await
            .expect("PINGRESP in time")
            .expect("read PINGRESP");
        assert_eq!(resp, PINGRESP, "client {i}");
    }

    drop(clients);
    // The broker notices the closes and frees the sessions (clean session).
    let mut after = settle_rss(&broker).await;
    for _ in 0..20 {
        if after <= baseline + 4 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = broker.rss_kib();
    }
    println!("petrel VmRSS after the clients left: {after} KiB");

    assert!(
        per_connection <= CEILING_BYTES,
        "{per_connection} B per idle connection exceeds the {CEILING_BYTES} B ceiling"
    );
    assert!(
        after <= baseline + 4 * 1024,
        "memory did not come back after the clients left: {after} KiB vs {baseline} KiB before"
    );
}
