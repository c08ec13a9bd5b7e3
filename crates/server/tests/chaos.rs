//! Chaos against the real binary: clients that vanish mid-packet, half-open sockets and
//! takeover storms on one client id. The broker keeps serving, never panics, and holds no
//! connection state for clients that are gone (its own gauges, read from /metrics, return to
//! what is really connected).

mod support;

use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(10);

fn tables(admin: u16) -> String {
    format!(
        "[storage]\nmode = \"memory\"\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n"
    )
}

/// Waits until `name` reads `want`.
async fn settles(admin: u16, name: &str, want: f64) {
    let started = Instant::now();
    loop {
        let got = metric(admin, name).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "{name} stays at {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The broker still serves: a new client publishes and receives its own message.
async fn still_serves(addr: std::net::SocketAddr) {
    let mut c = RawClient::connected(addr, "probe", 60).await;
    c.send(&subscribe(1, "probe/t", 0)).await;
    c.expect(&suback(1, 0), WAIT).await;
    c.send(&publish("probe/t", 0, 0, b"alive")).await;
    let packet = c.packet(WAIT).await.expect("the probe's own message");
    assert_eq!(publish_payload(&packet), b"alive");
}

#[tokio::test]
async fn clients_vanishing_mid_packet_leave_nothing_behind() {
    let _guard = light().await;
    let admin = free_port();
    let broker = Broker::start_with("connect_timeout = \"2s\"", &tables(admin));
    let whole = publish("chaos/t", 1, 1, &[7u8; 3000]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let addr = broker.addr;
        let whole = whole.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            match i % 4 {
                // Half a CONNECT.
                0 => c.send(&connect_v311(&format!("v{i}"), 60)[..9]).await,
                // CONNECT, then half a PUBLISH.
                1 => {
                    c.send(&connect_v311(&format!("v{i}"), 60)).await;
                    c.expect(&CONNACK_ACCEPTED, WAIT).await;
                    c.send(&whole[..whole.len() / 2]).await;
                }
                // CONNECT, then a remaining length promising more than ever comes.
                2 => {
                    c.send(&connect_v311(&format!("v{i}"), 60)).await;
                    c.expect(&CONNACK_ACCEPTED, WAIT).await;
                    c.send(&[0x30, 0xff, 0xff, 0x7f]).await;
                }
                // A subscriber that leaves with messages on their way to it.
                _ => {
                    c.send(&connect_v311(&format!("v{i}"), 60)).await;
                    c.expect(&CONNACK_ACCEPTED, WAIT).await;
                    c.send(&subscribe(1, "chaos/#", 1)).await;
                    c.expect(&suback(1, 1), WAIT).await;
                }
            }
            // Dropped here: the socket closes mid-packet (or mid-delivery).
        }));
    }
    let mut publ = RawClient::connected(broker.addr, "chaos-pub", 60).await;
    for n in 0..100u16 {
        publ.send(&publish("chaos/t", 1, n + 1, b"x")).await;
    }
    for t in tasks {
        t.await.expect("client task");
    }
    drop(publ);
    settles(admin, "petrel_connections ", 0.0).await;
    settles(admin, "petrel_sessions{state=\"live\"} ", 0.0).await;
    settles(admin, "petrel_subscriptions ", 0.0).await;
    still_serves(broker.addr).await;
    assert!(!broker.log().contains("panicked"), "{}", broker.log());
}

#[tokio::test]
async fn half_open_sockets_are_closed_by_their_deadlines() {
    let _guard = light().await;
    let admin = free_port();
    let broker = Broker::start_with("connect_timeout = \"1s\"", &tables(admin));
    // Sockets that connect and then say nothing, and clients that connect with keepalive 1 and
    // then go silent (as if the network dropped them without a FIN).
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(RawClient::connect(broker.addr).await);
    }
    for i in 0..50 {
        let mut c = RawClient::connect(broker.addr).await;
        c.send(&connect_v311(&format!("h{i}"), 1)).await;
        c.expect(&CONNACK_ACCEPTED, WAIT).await;
        silent.push(c);
    }
    let listener = format!(
        "petrel_listener_connections{{listener=\"tcp:{}\"}} ",
        broker.addr
    );
    settles(admin, &listener, 0.0).await;
    assert_eq!(
        metric(
            admin,
            "petrel_connections_closed_total{reason=\"connect_timeout\"} "
        )
        .await,
        50.0
    );
    assert_eq!(
        metric(
            admin,
            "petrel_connections_closed_total{reason=\"keepalive_timeout\"} "
        )
        .await,
        50.0
    );
    still_serves(broker.addr).await;
    drop(silent);
}

#[tokio::test]
async fn a_takeover_storm_on_one_client_id_ends_with_one_session() {
    let _guard = light().await;
    let admin = free_port();
    let broker = Broker::start_with("", &tables(admin));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = broker.addr;
        tasks.push(tokio::spawn(async move {
            let mut kept = None;
            for _ in 0..25 {
                let mut c = RawClient::connect(addr).await;
                let mut connect = connect_v311("same", 60);
                connect[9] = 0x00; // Clean Session 0: the session is taken over, not restarted
                c.send(&connect).await;
                // Each CONNECT is answered, then the connection is displaced by the next.
                let connack = c.packet(WAIT).await.expect("CONNACK");
                assert_eq!(connack[0], 0x20);
                assert_eq!(connack[3], 0x00);
                kept = Some(c);
            }
            kept
        }));
    }
    let mut survivors = Vec::new();
    for t in tasks {
        if let Some(c) = t.await.expect("storm task") {
            survivors.push(c);
        }
    }
    // Exactly one connection holds the session; the broker closed every other one.
    settles(admin, "petrel_connections ", 1.0).await;
    assert_eq!(metric(admin, "petrel_sessions{state=\"live\"} ").await, 1.0);
    assert_eq!(metric(admin, "petrel_connects_total ").await, 500.0);
    assert_eq!(
        metric(
            admin,
            "petrel_connections_closed_total{reason=\"session_taken_over\"} "
        )
        .await,
        499.0
    );
    let mut open = 0;
    for mut c in survivors {
        if c.until_closed(Duration::from_millis(100)).await.is_err() {
            open += 1;
        }
    }
    assert_eq!(open, 1, "one survivor keeps its connection");
    still_serves(broker.addr).await;
    assert!(!broker.log().contains("panicked"));
}
