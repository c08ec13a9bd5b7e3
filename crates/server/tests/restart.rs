//! Restarts of the real `petrel` binary with the disk store: persistent sessions (with their
//! subscriptions and expiry) and retained messages survive; a store that cannot be read stops
//! the start with a message naming `storage.dir`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

const PROMPT: Duration = Duration::from_secs(5);

fn data_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("petrel-restart-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn storage(dir: &Path) -> String {
    format!(
        "[storage]\ndir = \"{}\"\nfsync = \"always\"\n",
        dir.display()
    )
}

/// A 3.1.1 CONNECT with Clean Session 0.
fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut c = connect_v311(client_id, 60);
    c[9] = 0x00; // connect flags: clean session off
    c
}

/// A v5 CONNECT, Clean Start as given, Session Expiry Interval `expiry` seconds.
fn connect_v5(client_id: &str, clean: bool, expiry: u32) -> Vec<u8> {
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        0x05,
        if clean { 0x02 } else { 0x00 },
        0x00,
        0x3c,
    ];
    body.extend_from_slice(&[0x05, 0x11]);
    body.extend_from_slice(&expiry.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_subscriptions_and_retained_messages_survive_a_restart() {
    let _machine = light().await;
    let dir = data_dir("survive");
    let mut broker = Broker::start_with("", &storage(&dir));
    // A persistent session subscribes, then leaves.
    let mut keeper = RawClient::connect(broker.addr).await;
    keeper.send(&connect_persistent("keeper")).await;
    keeper.expect(&CONNACK_ACCEPTED, PROMPT).await;
    keeper.send(&subscribe(1, "news/#", 1)).await;
    keeper.expect(&suback(1, 1), PROMPT).await;
    drop(keeper);
    // A retained message, with QoS 1.
    let mut publ = RawClient::connected(broker.addr, "pub", 60).await;
    let mut retained = publish("news/today", 1, 1, b"sunny");
    retained[0] |= 0x01;
    publ.send(&retained).await;
    publ.expect(&puback(1), PROMPT).await;
    drop(publ);
    assert!(broker.terminate().success());

    let broker = Broker::start_with("", &storage(&dir));
    assert!(broker.log().contains("sessions=1"), "{}", broker.log());
    // The retained message is there for a new subscriber, with RETAIN set.
    let mut late = RawClient::connected(broker.addr, "late", 60).await;
    late.send(&subscribe(1, "news/#", 1)).await;
    late.expect(&suback(1, 1), PROMPT).await;
    let packet = late.packet(PROMPT).await.expect("retained message");
    assert_eq!(packet[0], 0x33, "PUBLISH QoS 1 with RETAIN");
    assert_eq!(publish_payload(&packet), b"sunny");

    // The persistent session is present and still subscribed.
    let mut keeper = RawClient::connect(broker.addr).await;
    keeper.send(&connect_persistent("keeper")).await;
    keeper.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await; // session present
                                                            // What was queued for it while it was away survived the restart: the QoS 1 message
                                                            // published before the restart is delivered first (with DUP clear: it was never sent).
    let packet = keeper
        .packet(PROMPT)
        .await
        .expect("queued message after the restart");
    assert_eq!(packet[0] & 0xf6, 0x32, "QoS 1 PUBLISH, not a resend");
    assert_eq!(publish_payload(&packet), b"sunny");
    keeper.send(&puback(publish_packet_id(&packet))).await;
    let mut publ = RawClient::connected(broker.addr, "pub", 60).await;
    publ.send(&publish("news/later", 1, 2, b"after the restart"))
        .await;
    publ.expect(&puback(2), PROMPT).await;
    let packet = keeper
        .packet(PROMPT)
        .await
        .expect("delivery to the restored subscription");
    assert_eq!(publish_payload(&packet), b"after the restart");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_keeps_counting_while_the_broker_is_down() {
    let _machine = light().await;
    let dir = data_dir("expiry");
    let mut broker = Broker::start_with("", &storage(&dir));
    for (id, expiry) in [("brief", 1u32), ("lasting", 3600)] {
        let mut c = RawClient::connect(broker.addr).await;
        c.send(&connect_v5(id, true, expiry)).await;
        let ack = c.packet(PROMPT).await.expect("CONNACK");
        assert_eq!(ack[3], 0x00, "{id}: CONNACK success");
        c.send(&[0xe0, 0x00]).await; // DISCONNECT
        let _ = c.until_closed(PROMPT).await;
    }
    assert!(broker.terminate().success());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let broker = Broker::start_with("", &storage(&dir));
    for (id, present) in [("brief", 0u8), ("lasting", 1)] {
        let mut c = RawClient::connect(broker.addr).await;
        c.send(&connect_v5(id, false, 3600)).await;
        let ack = c.packet(PROMPT).await.expect("CONNACK");
        assert_eq!(ack[2], present, "{id}: session present after the restart");
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_store_stops_the_start_naming_storage_dir() {
    let dir = data_dir("unreadable");
    std::fs::create_dir_all(&dir).unwrap();
    // Not a store: a "version" file with garbage where fjall keeps its marker.
    std::fs::write(dir.join("version"), b"definitely not a store").unwrap();
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        format!("[[listeners]]\nbind = \"127.0.0.1:0\"\n\n{}", storage(&dir)),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run petrel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a broken store: {stderr}");
    assert!(stderr.contains("storage.dir"), "{stderr}");
    // Nothing was removed.
    assert_eq!(
        std::fs::read(dir.join("version")).unwrap(),
        b"definitely not a store"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&config);
}

/// A v5 CONNECT with a will on `topic` delayed by `delay` seconds, session expiry 60 s.
fn connect_v5_with_delayed_will(
    client_id: &str,
    topic: &str,
    payload: &str,
    delay: u32,
) -> Vec<u8> {
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        0x05,
        0x02 | 0x04,
        0x00,
        0x3c,
    ];
    body.extend_from_slice(&[0x05, 0x11, 0, 0, 0, 60]);
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    body.push(0x05); // will properties: Will Delay Interval
    body.push(0x18);
    body.extend_from_slice(&delay.to_be_bytes());
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    body.extend_from_slice(payload.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_waiting_for_its_delay_survives_a_restart() {
    let _machine = light().await;
    let dir = data_dir("will");
    let mut broker = Broker::start_with("", &storage(&dir));
    let mut dying = RawClient::connect(broker.addr).await;
    dying
        .send(&connect_v5_with_delayed_will(
            "dying",
            "wills/dying",
            "gone",
            3,
        ))
        .await;
    dying.packet(PROMPT).await.expect("CONNACK");
    let lost = std::time::Instant::now();
    drop(dying); // no DISCONNECT: the will is due in 3 s
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(broker.terminate().success());

    let broker = Broker::start_with("", &storage(&dir));
    let mut watcher = RawClient::connected(broker.addr, "watcher", 60).await;
    watcher.send(&subscribe(1, "wills/#", 0)).await;
    watcher.expect(&suback(1, 0), PROMPT).await;
    let packet = watcher
        .packet(PROMPT)
        .await
        .expect("the delayed will, after the restart");
    assert_eq!(publish_payload(&packet), b"gone");
    let took = lost.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "will after {took:?}, delay 3 s"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
