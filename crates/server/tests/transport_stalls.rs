//! Thousands of connections stalled in a TLS handshake or a WebSocket upgrade, against the
//! real `petrel` binary: every one is closed at the listener's connect deadline (counted from
//! accept), the broker keeps serving, and its descriptors and memory come back afterwards.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const SOCKETS: usize = 5_000;
const OPENING: usize = 100;
const DEADLINE: Duration = Duration::from_secs(3);
const EARLY: Duration = Duration::from_millis(100);
const CLOSE_SLACK: Duration = Duration::from_secs(4);
const RSS_MARGIN_KIB: u64 = 8 * 1024;
const RSS_SETTLE: Duration = Duration::from_secs(5);

/// The first bytes of a TLS 1.2/1.3 ClientHello record, then nothing more.
const HALF_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];
/// An HTTP upgrade request cut off before its end.
const HALF_UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n";

/// Opens a socket, sends `prelude`, and waits for the broker to close it.
async fn stall(
    addr: std::net::SocketAddr,
    prelude: &'static [u8],
    opened_tx: mpsc::UnboundedSender<Result<(), String>>,
) -> Result<Duration, String> {
    let opened = Instant::now();
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            let _ = opened_tx.send(Err(e.to_string()));
            return Err(format!("connect: {e}"));
        }
    };
    if let Err(e) = stream.write_all(prelude).await {
        let _ = opened_tx.send(Err(e.to_string()));
        return Err(format!("write: {e}"));
    }
    let _ = opened_tx.send(Ok(()));
    drop(opened_tx);
    let mut buf = [0u8; 64];
    let wait = DEADLINE + CLOSE_SLACK + Duration::from_secs(5);
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(opened.elapsed()),
            // A TLS alert or an HTTP error before the close is fine: keep reading to EOF.
            Ok(Ok(_)) => continue,
            Err(_) => return Err(format!("still open after {wait:?}")),
        }
    }
}

async fn stalled_sockets_close_on_time(listener_keys: &str, prelude: &'static [u8], what: &str) {
    let _machine = heavy().await;
    if let Err(why) = raise_open_files_limit(SOCKETS as u64 + 200) {
        panic!("cannot open {SOCKETS} sockets: {why}");
    }
    let broker = Broker::start(listener_keys);
    let addr = broker.addr;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, fds_before) = (broker.rss_kib(), broker.open_fds());

    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(SOCKETS);
    while tasks.len() < SOCKETS {
        let batch = OPENING.min(SOCKETS - tasks.len());
        for _ in 0..batch {
            tasks.push(tokio::spawn(stall(addr, prelude, opened_tx.clone())));
        }
        for _ in 0..batch {
            if let Some(Err(e)) = opened_rx.recv().await {
                panic!("{what}: could not open {SOCKETS} sockets: {e}");
            }
        }
    }
    let rss_during = broker.rss_kib();
    let mut earliest = Duration::MAX;
    let mut latest = Duration::ZERO;
    let mut failures = Vec::new();
    for task in tasks {
        match task.await.expect("socket task") {
            Ok(t) => {
                earliest = earliest.min(t);
                latest = latest.max(t);
            }
            Err(e) => failures.push(e),
        }
    }
    let fds_after = broker.open_fds();
    let settle = Instant::now();
    let mut rss_after = broker.rss_kib();
    while rss_after > rss_before + RSS_MARGIN_KIB && settle.elapsed() < RSS_SETTLE {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_after = broker.rss_kib();
    }
    println!(
        "{what}: {SOCKETS} sockets opened and closed in {:?}; close after connect: earliest \
         {earliest:?}, latest {latest:?} (deadline {DEADLINE:?}); VmRSS before {rss_before} KiB, \
         during {rss_during} KiB, after {rss_after} KiB; fds before {fds_before}, after {fds_after}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{what}: {} sockets not closed by petrel, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        earliest + EARLY >= DEADLINE,
        "{what}: closed after {earliest:?}, before the deadline"
    );
    assert!(
        latest <= DEADLINE + CLOSE_SLACK,
        "{what}: closed only after {latest:?}"
    );
    assert!(
        fds_after <= fds_before + 2,
        "{what}: {fds_after} descriptors still held ({fds_before} before)"
    );
    assert!(
        rss_after <= rss_before + RSS_MARGIN_KIB,
        "{what}: memory did not come back: {rss_after} KiB after, {rss_before} KiB before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_sockets_stalled_in_the_tls_handshake() {
    let dir = std::env::temp_dir().join(format!("petrel-stall-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let keys = format!(
        "protocol = \"tls\"\nconnect_timeout = \"3s\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    stalled_sockets_close_on_time(&keys, HALF_CLIENT_HELLO, "TLS").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_sockets_stalled_in_the_websocket_upgrade() {
    stalled_sockets_close_on_time(
        "protocol = \"ws\"\nconnect_timeout = \"3s\"\n",
        HALF_UPGRADE,
        "WebSocket",
    )
    .await;
}
