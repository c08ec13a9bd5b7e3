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

fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut c = connect_v311(client_id, 120);
    c[9] = 0x00; // Clean Session 0
    c
}

/// Connects `client_id` with its session kept; `Err` with why, instead of failing, so a storm
/// task can report it. SYNs dropped by a full accept backlog are retried by the kernel.
async fn storm_connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    session_present: u8,
) -> Result<RawClient, String> {
    let mut c = RawClient::try_connect(addr)
        .await
        .map_err(|e| format!("{client_id}: connect: {e}"))?;
    c.try_send(&connect_persistent(client_id))
        .await
        .map_err(|e| format!("{client_id}: send CONNECT: {e}"))?;
    let connack = c
        .packet(STORM_WAIT)
        .await
        .map_err(|e| format!("{client_id}: no CONNACK: {e:?}"))?;
    if connack != [0x20, 0x02, session_present, 0x00] {
        return Err(format!("{client_id}: CONNACK {connack:02x?}"));
    }
    Ok(c)
}

const STORM_CLIENTS: usize = 10_000;
const STORM_WAIT: Duration = Duration::from_secs(60);
const STORM_MESSAGES: usize = 3;

/// A reconnect storm: 10,000 persistent subscribers lose their connections at once (no
/// DISCONNECT, as when a network link drops) while messages are published for them, then all
/// come back at the same moment. Every one is accepted with its session, receives every
/// message queued for it, and once they all leave the broker holds no connection state and no
/// more descriptors than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_ten_thousand_clients() {
    let _machine = heavy().await;
    // Both processes hold one descriptor per client, plus a few of their own.
    if let Err(why) = raise_open_files_limit(STORM_CLIENTS as u64 + 200) {
        panic!("cannot open {STORM_CLIENTS} sockets: {why}");
    }
    let admin = free_port();
    let broker = Broker::start_with("", &tables(admin));
    let addr = broker.addr;
    let fds_before = broker.open_fds();

    // 10,000 persistent sessions subscribed to one topic, connected in batches.
    let mut clients = Vec::with_capacity(STORM_CLIENTS);
    for batch in 0..STORM_CLIENTS / 200 {
        let mut tasks = Vec::new();
        for i in batch * 200..(batch + 1) * 200 {
            tasks.push(tokio::spawn(async move {
                let mut c = storm_connect(addr, &format!("storm-{i:05}"), 0).await?;
                c.try_send(&subscribe(1, "storm/all", 1))
                    .await
                    .map_err(|e| e.to_string())?;
                match c.packet(STORM_WAIT).await {
                    Ok(p) if p == suback(1, 1) => Ok(c),
                    other => Err(format!("storm-{i:05}: SUBACK {other:02x?}")),
                }
            }));
        }
        for t in tasks {
            clients.push(
                t.await
                    .expect("client task")
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
    }
    settles(admin, "petrel_connections ", STORM_CLIENTS as f64).await;

    // The link drops: every socket closes at once, without DISCONNECT.
    drop(clients);
    settles(admin, "petrel_connections ", 0.0).await;
    settles(
        admin,
        "petrel_sessions{state=\"offline\"} ",
        STORM_CLIENTS as f64,
    )
    .await;
    let mut publ = RawClient::connected(addr, "storm-pub", 60).await;
    for n in 0..STORM_MESSAGES {
        let id = n as u16 + 1;
        publ.send(&publish("storm/all", 1, id, format!("m{n}").as_bytes()))
            .await;
        publ.expect(&puback(id), WAIT).await;
    }
    drop(publ);
    settles(
        admin,
        "petrel_queued_messages ",
        (STORM_CLIENTS * STORM_MESSAGES) as f64,
    )
    .await;

    // ...and comes back: all 10,000 reconnect at the same moment.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(STORM_CLIENTS);
    for i in 0..STORM_CLIENTS {
        tasks.push(tokio::spawn(async move {
            let id = format!("storm-{i:05}");
            let mut c = storm_connect(addr, &id, 1).await?;
            let mut got = std::collections::BTreeSet::new();
            while got.len() < STORM_MESSAGES {
                let p = c
                    .packet(STORM_WAIT)
                    .await
                    .map_err(|e| format!("{id}: after {got:?}: {e:?}"))?;
                if p[0] & 0xf0 != 0x30 {
                    return Err(format!("{id}: unexpected {p:02x?}"));
                }
                got.insert(String::from_utf8_lossy(publish_payload(&p)).into_owned());
                c.try_send(&puback(publish_packet_id(&p)))
                    .await
                    .map_err(|e| format!("{id}: PUBACK: {e}"))?;
            }
            Ok::<_, String>(c)
        }));
    }
    let mut back = Vec::with_capacity(STORM_CLIENTS);
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.expect("storm task") {
            Ok(c) => back.push(c),
            Err(e) => failures.push(e),
        }
    }
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {STORM_CLIENTS} clients failed the storm, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    println!(
        "{STORM_CLIENTS} clients reconnected and received {STORM_MESSAGES} queued messages each in {took:?}; broker RSS {} KiB",
        broker.rss_kib()
    );
    settles(admin, "petrel_connections ", STORM_CLIENTS as f64).await;
    settles(admin, "petrel_queued_messages ", 0.0).await;
    assert_eq!(
        metric(admin, "petrel_connects_total ").await,
        (2 * STORM_CLIENTS + 1) as f64,
        "every CONNECT accepted, none refused"
    );

    // They leave properly this time; nothing stays behind.
    for c in back.iter_mut() {
        c.send(&[0xe0, 0x00]).await;
    }
    drop(back);
    settles(admin, "petrel_connections ", 0.0).await;
    let deadline = Instant::now() + WAIT;
    while broker.open_fds() > fds_before + 2 {
        assert!(
            Instant::now() < deadline,
            "the broker holds {} descriptors, {fds_before} before the storm",
            broker.open_fds()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serves(addr).await;
    assert!(!broker.log().contains("panicked"), "{}", broker.log());
}
