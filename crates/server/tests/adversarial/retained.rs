//! Retained messages outlive their publisher, so they are memory any client allowed to publish
//! can pin. The attacks: many small retained messages, and a few large ones. Bound: the
//! broker keeps at most `max_retained_messages` and `max_retained_bytes`; past them a new
//! retained message is refused (v5 PUBACK 0x97 Quota exceeded, counted), replacing or clearing
//! one still works, and the broker's resident memory grows by about the byte bound, not by what
//! the attacker sends.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

fn tables(admin: u16, extra: &str) -> String {
    format!(
        "[storage]\nmode = \"memory\"\n\n[mqtt]\n{extra}\n\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n"
    )
}

/// A v5 PUBLISH, QoS 1, retained, no properties.
fn retained_v5(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0); // no properties
    body.extend_from_slice(payload);
    let mut out = vec![0x33];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// The reason code of a v5 PUBACK for `packet_id`: 0x00 when the packet has none, and for
/// 0x10 (No matching subscribers), which is a success too.
async fn puback_reason(c: &mut RawClient, packet_id: u16) -> u8 {
    let p = c.packet(WAIT).await.expect("PUBACK");
    assert_eq!(p[0], 0x40, "PUBACK expected: {}", hex(&p));
    assert_eq!(u16::from_be_bytes([p[2], p[3]]), packet_id);
    match p.get(4) {
        Some(0x10) | None => 0x00,
        Some(code) => *code,
    }
}

async fn v5_client(addr: std::net::SocketAddr, id: &str) -> RawClient {
    let mut c = RawClient::connect(addr).await;
    c.send(&connect_v5(id, true, 0, 0)).await;
    let ack = c.packet(WAIT).await.expect("CONNACK");
    assert_eq!((ack[0], ack[3]), (0x20, 0x00), "{}", hex(&ack));
    c
}

/// Past `max_retained_messages`, a new retained message gets 0x97 and is not kept; a
/// replacement and a clear still work, and a clear makes room again.
#[tokio::test]
async fn retained_messages_past_the_count_are_refused_with_quota_exceeded() {
    let _machine = light().await;
    let admin = free_port();
    let broker = Broker::start_with("", &tables(admin, "max_retained_messages = 20"));
    let mut c = v5_client(broker.addr, "retainer").await;
    let mut id = 0u16;
    let mut send = |topic: String, payload: &'static [u8]| {
        id += 1;
        (id, retained_v5(&topic, id, payload))
    };
    for i in 0..20 {
        let (pid, p) = send(format!("r/{i}"), b"x");
        c.send(&p).await;
        assert_eq!(puback_reason(&mut c, pid).await, 0x00, "retained {i}");
    }
    let (pid, p) = send("r/20".into(), b"x");
    c.send(&p).await;
    assert_eq!(
        puback_reason(&mut c, pid).await,
        0x97,
        "the 21st: quota exceeded"
    );
    let (pid, p) = send("r/3".into(), b"replaced");
    c.send(&p).await;
    assert_eq!(
        puback_reason(&mut c, pid).await,
        0x00,
        "a replacement still works"
    );
    let (pid, p) = send("r/4".into(), b"");
    c.send(&p).await;
    assert_eq!(
        puback_reason(&mut c, pid).await,
        0x00,
        "a clear still works"
    );
    let (pid, p) = send("r/20".into(), b"x");
    c.send(&p).await;
    assert_eq!(
        puback_reason(&mut c, pid).await,
        0x00,
        "room again after a clear"
    );
    assert_eq!(metric(admin, "petrel_retained_messages").await, 20.0);
    assert_eq!(
        metric(admin, "petrel_refused_total{reason=\"retained_quota\"}").await,
        1.0
    );
    // A subscriber finds exactly the twenty kept.
    let mut sub = v5_client(broker.addr, "reader").await;
    sub.send(&subscribe_v5(1, "r/#", 0)).await;
    let mut topics = 0;
    while let Ok(p) = sub.packet(Duration::from_millis(500)).await {
        if p[0] >> 4 == 3 {
            topics += 1;
        }
    }
    assert_eq!(topics, 20);
}

/// The reviewer's attack: 512 KiB retained messages, 100 of them (50 MiB). With
/// `max_retained_bytes` at 16 MiB the broker keeps 16 MiB of them, refuses the rest, and its
/// resident memory grows by well under what was sent.
#[tokio::test]
async fn large_retained_messages_are_held_to_the_byte_bound() {
    let _machine = heavy().await;
    let admin = free_port();
    let broker = Broker::start_with(
        "",
        &tables(
            admin,
            "max_retained_bytes = 16777216\nmax_packet_size = 1048576",
        ),
    );
    let mut c = v5_client(broker.addr, "big-retainer").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = broker.rss_kib();
    let payload = vec![0x5a; 512 * 1024];
    let (mut kept, mut refused) = (0, 0);
    for i in 0..100u16 {
        c.send(&retained_v5(&format!("big/{i}"), i + 1, &payload))
            .await;
        match puback_reason(&mut c, i + 1).await {
            0x00 => kept += 1,
            0x97 => refused += 1,
            other => panic!("PUBACK reason {other:#04x}"),
        }
    }
    // 16 MiB holds 31 messages of 512 KiB and their topics.
    assert_eq!((kept, refused), (31, 69));
    let bytes = metric(admin, "petrel_retained_bytes").await;
    assert!(bytes <= 16.0 * 1024.0 * 1024.0, "{bytes}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let grown_mib = broker.rss_kib().saturating_sub(before) as f64 / 1024.0;
    eprintln!("retained flood: 100 x 512 KiB sent, {kept} kept, RSS grew {grown_mib:.1} MiB");
    assert!(
        grown_mib < 16.0 + 16.0,
        "resident memory grew {grown_mib:.1} MiB for a 16 MiB retained bound"
    );
}

/// `max_retained_per_client`: one client cannot take the whole retained store. Its sixth of
/// five is refused with 0x97 while another client still sets its own; replacing one of its
/// own works, and a message another client replaced is no longer counted as its.
#[tokio::test]
async fn one_client_is_held_to_its_share_of_the_retained_store() {
    let _machine = light().await;
    let admin = free_port();
    let broker = Broker::start_with("", &tables(admin, "max_retained_per_client = 5"));
    let mut greedy = v5_client(broker.addr, "greedy").await;
    let mut other = v5_client(broker.addr, "other").await;
    for i in 0..5u16 {
        greedy
            .send(&retained_v5(&format!("g/{i}"), i + 1, b"x"))
            .await;
        assert_eq!(puback_reason(&mut greedy, i + 1).await, 0x00, "its own {i}");
    }
    greedy.send(&retained_v5("g/5", 6, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 6).await, 0x97, "the sixth");
    greedy.send(&retained_v5("g/0", 7, b"again")).await;
    assert_eq!(
        puback_reason(&mut greedy, 7).await,
        0x00,
        "replacing its own"
    );
    other.send(&retained_v5("o/0", 1, b"x")).await;
    assert_eq!(puback_reason(&mut other, 1).await, 0x00, "another client's");
    // `other` takes over one of greedy's topics: greedy has room for one more.
    other.send(&retained_v5("g/1", 2, b"mine now")).await;
    assert_eq!(puback_reason(&mut other, 2).await, 0x00);
    greedy.send(&retained_v5("g/5", 8, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 8).await, 0x00, "room again");
    greedy.send(&retained_v5("g/6", 9, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 9).await, 0x97, "full again");
}
