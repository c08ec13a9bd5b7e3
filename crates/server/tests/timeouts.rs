//! Connection timing, black-box: the `petrel` binary in its own process, raw bytes on TCP.
//!
//! The rules under test:
//! * one deadline, the listener's `connect_timeout`, from accept until a complete CONNECT has
//!   been read; partial progress does not move it and no other read timeout comes before it;
//! * after CONNACK the only idle limit is 1.5 × keepalive, counted from the last packet
//!   received from the client [MQTT-3.1.2-24]; what the broker sends does not extend it;
//! * keepalive 0 means no idle limit at all.
//!
//! Close times are measured from the client's side of the event that starts the deadline
//! (starting to connect, sending the last packet), which never comes after the broker's; so a
//! close may be early only by clock noise, and late by the scheduling of a loaded machine.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Tolerance for closing before the deadline: clock noise only.
const EARLY: Duration = Duration::from_millis(100);
/// Tolerance for closing after it: a busy 2-core machine.
const LATE: Duration = Duration::from_millis(1500);
/// How long any prompt reply (CONNACK, SUBACK, PINGRESP) may take.
const PROMPT: Duration = Duration::from_secs(5);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The case rumqttd got wrong: a slow but steady client must get through within the default
/// 10 s connect timeout, with no shorter read timeout in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connect_byte_by_byte_is_accepted() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"10s\"");
    let mut client = RawClient::connect(broker.addr).await;
    let connect = connect_v311("slow", 60); // 18 bytes: 17 gaps of 200 ms = 3.4 s
    for (i, byte) in connect.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Err(e) = client.stream.write_all(&[*byte]).await {
            panic!(
                "petrel dropped the connection after {:?}, at byte {i} of the CONNECT: {e}",
                client.opened.elapsed()
            );
        }
    }
    let spread = client.opened.elapsed();
    assert!(spread >= secs(3.0), "CONNECT spread over only {spread:?}");
    client.expect(&CONNACK_ACCEPTED, PROMPT).await;
    println!("CONNECT sent byte by byte over {spread:?}; CONNACK 20 02 00 00 received");
    // And it is an ordinary connection from then on.
    client.send(&PINGREQ).await;
    client.expect(&PINGRESP, PROMPT).await;
}

/// A socket that sends nothing, and one that stops half-way through CONNECT, are both closed
/// at the connect deadline, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_socket_closed_at_connect_deadline() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"1s\"");
    let connect = connect_v311("a", 60);
    let cases = [
        ("silent socket", Vec::new()),
        ("half a CONNECT", connect[..connect.len() / 2].to_vec()),
    ];
    let mut runs = Vec::new();
    for (name, sent) in cases {
        let addr = broker.addr;
        runs.push(tokio::spawn(async move {
            let mut client = RawClient::connect(addr).await;
            client.send(&sent).await;
            match client.until_closed(secs(5.0)).await {
                Ok(close) => {
                    assert!(
                        close.packets.is_empty(),
                        "{name}: petrel sent {:?}",
                        close.packets
                    );
                    (name, close.at - client.opened)
                }
                Err(_) => panic!("{name}: still open 5 s after connect (deadline 1 s)"),
            }
        }));
    }
    for run in runs {
        let (name, elapsed) = run.await.expect("client task");
        assert_close_time(name, elapsed, secs(1.0), EARLY, LATE);
    }
}

/// 10,000 sockets that never send CONNECT neither starve connected clients nor leave memory
/// behind once the connect deadline has closed them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_stalled_sockets() {
    const SOCKETS: usize = 10_000;
    /// Connects per batch. The broker's listen backlog is 128 (mio's default); a bigger burst
    /// than the accept loop drains overflows it, and the dropped SYNs cost 1 s retransmits.
    const OPENING: usize = 100;
    const DEADLINE: Duration = Duration::from_secs(3);
    /// How late each close may be: 10,000 timers fire within a few seconds of each other.
    const CLOSE_SLACK: Duration = Duration::from_secs(4);
    /// How much more memory the broker may hold after all closes than before the sockets.
    const RSS_MARGIN_KIB: u64 = 8 * 1024;
    /// How long after the closes memory may take to come back.
    const RSS_SETTLE: Duration = Duration::from_secs(5);
    const MESSAGES: u16 = 100;
    const LATENCY: Duration = Duration::from_secs(1);

    let _machine = heavy().await;
    // Both processes hold one descriptor per socket, plus a few of their own.
    if let Err(why) = raise_open_files_limit(SOCKETS as u64 + 200) {
        panic!("cannot open {SOCKETS} sockets: {why}");
    }
    let broker = Broker::start("connect_timeout = \"3s\"");
    let addr = broker.addr;

    let mut sub = RawClient::connected(addr, "sub", 60).await;
    sub.send(&subscribe(1, "load/+", 1)).await;
    sub.expect(&suback(1, 1), PROMPT).await;
    let mut publ = RawClient::connected(addr, "pub", 60).await;
    // Warm up: first messages allocate what every later one reuses.
    let mut next_id = 1u16;
    exchange(&mut publ, &mut sub, 20, &mut next_id, LATENCY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, fds_before) = (broker.rss_kib(), broker.open_fds());

    // Open them in batches; each task then waits for the broker to close its socket. The
    // next batch starts once the broker has accepted the last, so the listen backlog never
    // overflows (an overflow costs the client a 1 s SYN retransmit, not a failure).
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let open_started = Instant::now();
    let mut stalled = Vec::with_capacity(SOCKETS);
    while stalled.len() < SOCKETS {
        let batch = OPENING.min(SOCKETS - stalled.len());
        for _ in 0..batch {
            stalled.push(tokio::spawn(hold_until_closed(
                addr,
                opened_tx.clone(),
                DEADLINE + CLOSE_SLACK + secs(5.0),
            )));
        }
        for connected in 0..batch {
            match opened_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => panic!(
                    "could open only {} of {SOCKETS} sockets: {e} \
                     (check ulimit -n and the ephemeral port range)",
                    stalled.len() - batch + connected
                ),
                None => unreachable!("a sender is held here"),
            }
        }
        let accepted_by = Instant::now() + secs(2.0);
        while broker.open_fds() < fds_before + stalled.len() {
            assert!(
                Instant::now() < accepted_by,
                "petrel accepted only {} of {} sockets within 2 s of their connect",
                broker.open_fds().saturating_sub(fds_before),
                stalled.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let open_took = open_started.elapsed();

    // While all 10,000 wait for their deadline, the connected clients are served promptly.
    let (rss_during, fds_during) = (broker.rss_kib(), broker.open_fds());
    let latency = exchange(&mut publ, &mut sub, MESSAGES, &mut next_id, LATENCY).await;
    let fds_after_messages = broker.open_fds();
    let messages_done = open_started.elapsed();
    assert!(
        fds_after_messages >= fds_before + SOCKETS,
        "the stalled sockets were already closing while messages were measured \
         ({fds_after_messages} fds open, {fds_before} before); opening took {open_took:?}"
    );

    // Then every one of them is closed at its deadline.
    let mut earliest = Duration::MAX;
    let mut latest = Duration::ZERO;
    let mut failures = Vec::new();
    for task in stalled {
        match task.await.expect("socket task") {
            Ok(elapsed) => {
                earliest = earliest.min(elapsed);
                latest = latest.max(elapsed);
            }
            Err(what) => failures.push(what),
        }
    }
    let all_closed = open_started.elapsed();
    // The connected clients were not caught up in the closes.
    let latency_after = exchange(&mut publ, &mut sub, 10, &mut next_id, LATENCY).await;
    let fds_after = broker.open_fds();
    // glibc hands freed memory back to the OS lazily (a per-thread arena shrinks when a later
    // free consolidates with its top), so give it a few seconds.
    let rss_closed = broker.rss_kib();
    let settle_started = Instant::now();
    let mut rss_after = rss_closed;
    while rss_after > rss_before + RSS_MARGIN_KIB && settle_started.elapsed() < RSS_SETTLE {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_after = broker.rss_kib();
    }
    let settled_in = settle_started.elapsed();

    println!("opened {SOCKETS} sockets in {open_took:?}; messages measured by {messages_done:?}; all closed by {all_closed:?}");
    println!(
        "close after connect: earliest {earliest:?}, latest {latest:?} (deadline {DEADLINE:?})"
    );
    println!("message latency with {SOCKETS} stalled sockets open: max {latency:?} over {MESSAGES} QoS 0 + {MESSAGES} QoS 1; after: {latency_after:?}");
    println!(
        "broker VmRSS: before {rss_before} KiB, during {rss_during} KiB (+{} KiB, {} B per socket), \
         right after the closes {rss_closed} KiB, {settled_in:.1?} later {rss_after} KiB (+{} KiB)",
        rss_during as i64 - rss_before as i64,
        (rss_during as i64 - rss_before as i64) * 1024 / SOCKETS as i64,
        rss_after as i64 - rss_before as i64,
    );
    println!("broker open fds: before {fds_before}, during {fds_during}, after {fds_after}");

    assert!(
        failures.is_empty(),
        "{} of {SOCKETS} sockets did not end with a close by petrel, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        earliest + EARLY >= DEADLINE,
        "a stalled socket was closed after {earliest:?}, before the {DEADLINE:?} connect deadline"
    );
    assert!(
        latest <= DEADLINE + CLOSE_SLACK,
        "a stalled socket was closed only after {latest:?} (deadline {DEADLINE:?})"
    );
    assert!(
        fds_after <= fds_before + 2,
        "petrel still holds {fds_after} descriptors after the closes ({fds_before} before)"
    );
    assert!(
        rss_after <= rss_before + RSS_MARGIN_KIB,
        "petrel's memory did not come back: VmRSS {rss_after} KiB {RSS_SETTLE:?} after the \
         closes, {rss_before} KiB before the sockets (margin {RSS_MARGIN_KIB} KiB): memory \
         still held per closed connection, or freed memory the allocator keeps"
    );
}

/// Opens a socket that never sends, reports that it is open, and waits for the broker to close
/// it: `Ok(time from connect to close)`, or what went wrong instead.
async fn hold_until_closed(
    addr: std::net::SocketAddr,
    opened_tx: mpsc::UnboundedSender<Result<(), String>>,
    wait: Duration,
) -> Result<Duration, String> {
    // Before connecting: the broker cannot accept earlier, so a close is never early from here.
    let opened = Instant::now();
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            let _ = opened_tx.send(Err(e.to_string()));
            return Err(format!("connect: {e}"));
        }
    };
    let _ = opened_tx.send(Ok(()));
    drop(opened_tx);
    let mut buf = [0u8; 16];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(opened.elapsed()),
        Ok(Ok(n)) => Err(format!("petrel sent {}", hex(&buf[..n]))),
        Err(_) => Err(format!("still open after {wait:?}")),
    }
}

/// Publishes `count` QoS 0 and `count` QoS 1 messages one at a time; each must reach the
/// subscriber within `limit`. Returns the worst latency.
async fn exchange(
    publ: &mut RawClient,
    sub: &mut RawClient,
    count: u16,
    next_id: &mut u16,
    limit: Duration,
) -> Duration {
    let mut worst = Duration::ZERO;
    for qos in [0u8, 1] {
        for _ in 0..count {
            let id = *next_id;
            *next_id = next_id.wrapping_add(1).max(1);
            let payload = format!("m{id}");
            let sent = Instant::now();
            publ.send(&publish("load/x", qos, id, payload.as_bytes()))
                .await;
            let packet = match sub.packet(limit).await {
                Ok(p) => p,
                Err(why) => {
                    panic!("QoS {qos} message {id} not delivered within {limit:?}: {why:?}")
                }
            };
            let latency = sent.elapsed();
            assert_eq!(
                packet[0] & 0xf0,
                0x30,
                "expected PUBLISH, got {}",
                hex(&packet)
            );
            assert_eq!(
                publish_payload(&packet),
                payload.as_bytes(),
                "message order"
            );
            if qos == 1 {
                sub.send(&puback(publish_packet_id(&packet))).await;
                publ.expect(&puback(id), limit).await;
            }
            worst = worst.max(latency);
        }
    }
    worst
}

/// Keepalive 1 s and silence: closed at 1.5 s. Keepalive 2 s with a PINGREQ every second:
/// open as long as the pings come, then closed 3 s after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_expires_at_one_and_a_half_times() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"10s\"");
    let addr = broker.addr;

    let silent = tokio::spawn(async move {
        let mut client = RawClient::connect(addr).await;
        client.send(&connect_v311("silent", 1)).await;
        let sent = Instant::now();
        let close = client
            .until_closed(secs(5.0))
            .await
            .unwrap_or_else(|_| panic!("keepalive 1: still open 5 s after CONNECT"));
        assert_eq!(
            close.packets,
            vec![CONNACK_ACCEPTED.to_vec()],
            "only CONNACK"
        );
        close.at - sent
    });

    let mut pinger = RawClient::connect(addr).await;
    pinger.send(&connect_v311("pinger", 2)).await;
    pinger.expect(&CONNACK_ACCEPTED, PROMPT).await;
    let started = Instant::now();
    let mut last_ping = Instant::now();
    for second in 1..=5u64 {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        pinger.send(&PINGREQ).await;
        last_ping = Instant::now();
        pinger.expect(&PINGRESP, PROMPT).await;
    }
    println!(
        "keepalive 2 with PINGREQ every 1 s: open after {:?}",
        started.elapsed()
    );
    let close = pinger
        .until_closed(secs(6.0))
        .await
        .unwrap_or_else(|_| panic!("keepalive 2: still open 6 s after the last PINGREQ"));
    assert!(close.packets.is_empty(), "unexpected {:?}", close.packets);
    assert_close_time(
        "keepalive 2, after the last PINGREQ",
        close.at - last_ping,
        secs(3.0),
        EARLY,
        LATE,
    );

    let elapsed = silent.await.expect("silent client task");
    assert_close_time(
        "keepalive 1, silent after CONNECT",
        elapsed,
        secs(1.5),
        EARLY,
        LATE,
    );
}

/// The subscriber's idle time counts from its last packet to the broker, however much the
/// broker sends it in the meantime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_traffic_does_not_extend_keepalive() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"10s\"");
    let mut publ = RawClient::connected(broker.addr, "pub", 60).await;
    let mut sub = RawClient::connected(broker.addr, "sub", 1).await;
    sub.send(&subscribe(1, "feed", 0)).await;
    let t0 = Instant::now(); // the subscriber's last packet
    sub.expect(&suback(1, 0), PROMPT).await;

    let publisher = tokio::spawn(async move {
        let mut sent = 0u32;
        let start = Instant::now();
        while start.elapsed() < secs(4.0) {
            publ.send(&publish("feed", 0, 0, b"tick")).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });

    let close = sub.until_closed(secs(5.0)).await.unwrap_or_else(|p| {
        panic!(
            "subscriber still open 5 s after SUBSCRIBE, having received {} packets",
            p.len()
        )
    });
    let received = close.packets.iter().filter(|p| p[0] & 0xf0 == 0x30).count();
    let sent = publisher.await.expect("publisher task");
    println!("subscriber received {received} PUBLISHes (publisher sent {sent}) before the close");
    assert!(
        received >= 5,
        "only {received} PUBLISHes reached the subscriber"
    );
    assert_close_time(
        "keepalive 1, receiving only",
        close.at - t0,
        secs(1.5),
        EARLY,
        LATE,
    );
}

/// As above, with the publisher sending as fast as it can: the broker's writes to the
/// subscriber never stop, and the keepalive timer must still fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_flood_does_not_extend_keepalive() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"10s\"");
    let mut publ = RawClient::connected(broker.addr, "pub", 60).await;
    let mut sub = RawClient::connected(broker.addr, "sub", 1).await;
    sub.send(&subscribe(1, "feed", 0)).await;
    let t0 = Instant::now();
    sub.expect(&suback(1, 0), PROMPT).await;

    let publisher = tokio::spawn(async move {
        let batch: Vec<u8> = (0..100)
            .flat_map(|_| publish("feed", 0, 0, b"tick"))
            .collect();
        let start = Instant::now();
        let mut batches = 0u64;
        while start.elapsed() < secs(5.0) {
            if publ.stream.write_all(&batch).await.is_err() {
                break;
            }
            batches += 1;
            tokio::task::yield_now().await;
        }
        batches * 100
    });

    let result = sub.until_closed(secs(6.0)).await;
    publisher.abort();
    let close = result.unwrap_or_else(|p| {
        panic!(
            "subscriber still open 6 s after SUBSCRIBE under a flood ({} packets received)",
            p.len()
        )
    });
    let received = close.packets.iter().filter(|p| p[0] & 0xf0 == 0x30).count();
    println!("subscriber received {received} PUBLISHes before the close");
    assert!(
        received >= 100,
        "only {received} PUBLISHes reached the subscriber"
    );
    assert_close_time(
        "keepalive 1, flooded",
        close.at - t0,
        secs(1.5),
        EARLY,
        LATE,
    );
}

/// Keepalive 0: no idle limit, and the connect deadline is gone once CONNACK is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_means_no_idle_limit() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"1s\"");
    let mut client = RawClient::connected(broker.addr, "idle", 0).await;
    match client.packet(secs(4.0)).await {
        Err(Ended::TimedOut) => {}
        Err(Ended::Closed) => panic!(
            "keepalive 0: closed {:?} after connect (connect_timeout 1 s)",
            client.opened.elapsed()
        ),
        Ok(p) => panic!("keepalive 0: unexpected {}", hex(&p)),
    }
    client.send(&PINGREQ).await;
    client.expect(&PINGRESP, PROMPT).await;
    println!(
        "keepalive 0: silent for 4 s, PINGREQ answered {:?} after connect",
        client.opened.elapsed()
    );
}

/// A CONNECT trickling in slower than the deadline allows: bytes arriving do not push the
/// deadline back; it counts from accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_counts_from_accept_not_from_last_byte() {
    let _machine = light().await;
    let broker = Broker::start("connect_timeout = \"2s\"");
    let client = RawClient::connect(broker.addr).await;
    let opened = client.opened;
    let (mut reader, mut writer) = client.stream.into_split();
    let connect = connect_v311("a", 60); // 15 bytes: all of it would take 4.2 s
    let connect_len = connect.len();

    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let trickle = tokio::spawn({
        let sent = sent.clone();
        async move {
            for (i, byte) in connect.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if writer.write_all(&[*byte]).await.is_err() {
                    break;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });

    let mut received = Vec::new();
    let mut chunk = [0u8; 64];
    let closed_at = loop {
        match tokio::time::timeout(secs(6.0), reader.read(&mut chunk)).await {
            Err(_) => panic!("still open 6 s after connect (connect_timeout 2 s)"),
            Ok(Ok(0)) | Ok(Err(_)) => break Instant::now(),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    };
    trickle.abort();
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    println!("closed with {sent} of {} CONNECT bytes sent", connect_len);
    assert!(
        sent < connect_len,
        "the whole CONNECT went out before the close"
    );
    assert!(
        received.is_empty(),
        "petrel sent {} to an unfinished CONNECT",
        hex(&received)
    );
    assert_close_time(
        "CONNECT at one byte per 300 ms",
        closed_at - opened,
        secs(2.0),
        EARLY,
        LATE,
    );
}
