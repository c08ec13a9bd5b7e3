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

/// `max_retained_per_client`: one login cannot take the whole retained store, and a new
/// client id does not give it a new share. Its sixth of five is refused with 0x97 while
/// another login still sets its own; replacing one of its own works, and a message another
/// login replaced is no longer counted as its.
#[tokio::test]
async fn one_login_is_held_to_its_share_of_the_retained_store() {
    let _machine = light().await;
    let admin = free_port();
    let broker = Broker::start_with(
        "",
        &tables(
            admin,
            "max_retained_per_client = 5\n\n[auth]\nallow_anonymous = false\n\
             max_pending_logins_per_address = 4\n\n\
             [[auth.users]]\nname = \"greedy\"\npassword = \"g\"\n\n\
             [[auth.users]]\nname = \"other\"\npassword = \"o\"",
        ),
    );
    let mut greedy = v5_login(broker.addr, "greedy-1", "greedy", "g").await;
    let mut other = v5_login(broker.addr, "other-1", "other", "o").await;
    for i in 0..5u16 {
        greedy
            .send(&retained_v5(&format!("g/{i}"), i + 1, b"x"))
            .await;
        assert_eq!(puback_reason(&mut greedy, i + 1).await, 0x00, "its own {i}");
    }
    greedy.send(&retained_v5("g/5", 6, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 6).await, 0x97, "the sixth");
    // Another client id of the same login shares its count.
    let mut again = v5_login(broker.addr, "greedy-2", "greedy", "g").await;
    again.send(&retained_v5("g/5", 1, b"x")).await;
    assert_eq!(
        puback_reason(&mut again, 1).await,
        0x97,
        "a new client id, same login"
    );
    greedy.send(&retained_v5("g/0", 7, b"again")).await;
    assert_eq!(
        puback_reason(&mut greedy, 7).await,
        0x00,
        "replacing its own"
    );
    other.send(&retained_v5("o/0", 1, b"x")).await;
    assert_eq!(puback_reason(&mut other, 1).await, 0x00, "another login's");
    // `other` takes over one of greedy's topics: greedy has room for one more.
    other.send(&retained_v5("g/1", 2, b"mine now")).await;
    assert_eq!(puback_reason(&mut other, 2).await, 0x00);
    greedy.send(&retained_v5("g/5", 8, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 8).await, 0x00, "room again");
    greedy.send(&retained_v5("g/6", 9, b"x")).await;
    assert_eq!(puback_reason(&mut greedy, 9).await, 0x97, "full again");
}

/// A v5 CONNECT with a user name and password, clean start, then its CONNACK checked.
async fn v5_login(addr: std::net::SocketAddr, id: &str, user: &str, password: &str) -> RawClient {
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xc2, 0x00, 0x00, 0x00,
    ];
    for field in [id, user, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut c = RawClient::connect(addr).await;
    c.send(&packet).await;
    let ack = c.packet(WAIT).await.expect("CONNACK");
    assert_eq!(
        (ack[0], ack[3]),
        (0x20, 0x00),
        "{user} as {id}: {}",
        hex(&ack)
    );
    c
}

/// A 3.1.1 CONNECT with a retained will, clean session, no credentials.
fn connect_with_retained_will(id: &str, topic: &str, message: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x26, 0x00, 0x00];
    for field in [id.as_bytes(), topic.as_bytes(), message] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Wills are retained messages too: clients that connect with a retained will and drop the
/// connection, over and over, get their wills published but not kept past the bounds. And no
/// will may stand for the broker's own `$SYS` figures, whether or not an ACL is configured.
#[tokio::test]
async fn retained_wills_are_held_to_the_bounds_and_never_under_sys() {
    let _machine = light().await;
    let admin = free_port();
    let broker = Broker::start_with("", &tables(admin, "max_retained_messages = 5"));
    for i in 0..10 {
        let mut c = RawClient::connect(broker.addr).await;
        c.send(&connect_with_retained_will(
            &format!("w{i}"),
            &format!("w/{i}"),
            b"gone",
        ))
        .await;
        c.expect(&CONNACK_ACCEPTED, WAIT).await;
        drop(c);
    }
    let started = std::time::Instant::now();
    while metric(admin, "petrel_wills_published_total").await < 10.0 {
        assert!(started.elapsed() < WAIT, "the wills were not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(admin, "petrel_retained_messages").await, 5.0);
    assert_eq!(
        metric(admin, "petrel_refused_total{reason=\"retained_quota\"}").await,
        5.0
    );

    let mut spoof = RawClient::connect(broker.addr).await;
    spoof
        .send(&connect_with_retained_will(
            "spoof",
            "$SYS/broker/uptime",
            b"0",
        ))
        .await;
    let close = spoof.until_closed(WAIT).await.expect("refused and closed");
    assert_eq!(
        close.packets,
        [vec![0x20, 0x02, 0x00, 0x05]],
        "a will under $SYS"
    );
}
