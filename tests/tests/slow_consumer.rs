//! A subscriber that stops reading must not grow the broker's memory without bound, and must
//! not slow down the other subscribers of the same topic.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use petrel_tests::{connect_v311_hex, RawClient, TestBroker};

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// A 3.1.1 QoS 0 PUBLISH to "t" with `payload_len` bytes of payload.
fn publish_qos0(payload_len: usize) -> Vec<u8> {
    let remaining = 2 + 1 + payload_len;
    let mut p = vec![0x30];
    let mut len = remaining;
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(&[0x00, 0x01, b't']);
    p.extend(std::iter::repeat_n(0xab, payload_len));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_bounded_and_others_keep_receiving() {
    // 256 KiB of QoS 0 may wait per connection. The stalled subscriber holds the publisher
    // once, for the flow-control timeout; after that everything past its bound is dropped for
    // that subscriber only.
    let broker = TestBroker::start_with(|c| {
        c.mqtt.outbox_bytes = 256 * 1024;
        c.mqtt.flow_control_timeout = Duration::from_millis(500);
    })
    .await;

    let mut slow = RawClient::connect(broker.addr).await;
    slow.send_hex(&connect_v311_hex("slow", true, 0)).await;
    slow.expect_hex("20 02 00 00").await;
    slow.send_hex("82 06 00 01 00 01 74 00").await; // SUBSCRIBE "t" QoS 0
    slow.expect_hex("90 03 00 01 00").await;
    // From here on `slow` never reads again.

    let mut fast = RawClient::connect(broker.addr).await;
    fast.send_hex(&connect_v311_hex("fast", true, 0)).await;
    fast.expect_hex("20 02 00 00").await;
    fast.send_hex("82 06 00 01 00 01 74 00").await;
    fast.expect_hex("90 03 00 01 00").await;

    let mut publisher = RawClient::connect(broker.addr).await;
    publisher.send_hex(&connect_v311_hex("pub", true, 0)).await;
    publisher.expect_hex("20 02 00 00").await;

    // The fast subscriber reads continuously, as a healthy client does.
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match fast.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n, Ordering::SeqCst);
                }
            }
        }
    });

    let message = publish_qos0(16 * 1024);
    // Each burst (128 KiB) fits in the outbox bound (256 KiB), so a subscriber that keeps
    // reading never loses a message; 256 × 128 KiB = 32 MiB are offered to each subscriber.
    let batches = 256;
    let per_batch = 8;
    let baseline = resident_kib();
    let mut peak = baseline;
    let mut expected = 0;
    for _ in 0..batches {
        let mut burst = Vec::with_capacity(message.len() * per_batch);
        for _ in 0..per_batch {
            burst.extend_from_slice(&message);
        }
        publisher.send_bytes(&burst).await;
        expected += burst.len();
        // The fast subscriber gets every byte of the batch, promptly, whatever the stalled one
        // does.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::SeqCst) < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fast subscriber starved: {} of {expected} bytes",
                received.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        peak = peak.max(resident_kib());
    }
    assert_eq!(
        received.load(Ordering::SeqCst),
        expected,
        "fast subscriber got extra bytes"
    );
    reader.abort();

    let dropped = petrel_engine::stats::Stats::get(&broker.broker.stats.dropped_outbox_full);
    let growth_kib = peak.saturating_sub(baseline);
    println!("baseline {baseline} KiB, peak {peak} KiB, growth {growth_kib} KiB, dropped for slow subscriber: {dropped}");
    // 32 MiB were offered to the stalled subscriber; what it could not take was dropped, not
    // buffered. The socket buffers and the bounded outbox account for the rest.
    assert!(
        dropped > 1000,
        "expected most messages to the stalled subscriber to be dropped, got {dropped}"
    );
    assert_eq!(
        petrel_engine::stats::Stats::get(&broker.broker.stats.stalled_subscribers),
        1,
        "found stalled once, and not flow-controlled again while it stays stalled"
    );
    assert!(
        growth_kib < 24 * 1024,
        "memory grew by {growth_kib} KiB for a stalled subscriber"
    );
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_is_bounded_for_qos1() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_queued_messages = 50).await;

    let mut sub = RawClient::connect(broker.addr).await;
    sub.send_hex(&connect_v311_hex("persistent", false, 0))
        .await;
    sub.expect_hex("20 02 00 00").await;
    sub.send_hex("82 06 00 01 00 01 74 01").await; // SUBSCRIBE "t" QoS 1
    sub.expect_hex("90 03 00 01 01").await;
    sub.send_hex("e0 00").await; // DISCONNECT: the session stays
    sub.expect_closed().await;

    let mut publisher = RawClient::connect(broker.addr).await;
    publisher.send_hex(&connect_v311_hex("pub", true, 0)).await;
    publisher.expect_hex("20 02 00 00").await;
    for id in 1..=200u16 {
        // QoS 1 PUBLISH "t", packet id, payload "x"
        let [hi, lo] = id.to_be_bytes();
        publisher
            .send_bytes(&[0x32, 0x06, 0x00, 0x01, b't', hi, lo, b'x'])
            .await;
        publisher
            .expect_hex(&format!("40 02 {hi:02x} {lo:02x}"))
            .await;
    }

    let dropped = petrel_engine::stats::Stats::get(&broker.broker.stats.dropped_queue_full);
    assert_eq!(dropped, 150, "queue bound of 50 should drop the other 150");

    let mut back = RawClient::connect(broker.addr).await;
    back.send_hex(&connect_v311_hex("persistent", false, 0))
        .await;
    back.expect_hex("20 02 01 00").await; // session present
    let mut received = 0;
    while let Ok(packet) = back.recv_within(Duration::from_millis(500)).await {
        if let petrel_codec::Packet::Publish(p) = packet {
            received += 1;
            back.send(&petrel_codec::Packet::PubAck(petrel_codec::PubAck::new(
                p.packet_id.expect("QoS 1 has an id"),
            )))
            .await;
        }
    }
    assert_eq!(received, 50, "exactly the queued messages are delivered");
}
