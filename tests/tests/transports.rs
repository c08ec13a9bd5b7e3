//! Every transport over real sockets: TLS (and mutual TLS, certificate reload), WebSocket and
//! secure WebSocket, the PROXY protocol, Unix sockets; and the one timeout discipline across
//! them: everything from accept to a complete CONNECT within `connect_timeout`.
//!
//! Certificates are made at run time (rcgen). Clients: rumqttc over TLS, WS and WSS; raw
//! bytes over tokio-rustls, tokio-tungstenite, TCP and Unix streams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use petrel_server::config::{ListenerConfig, ListenerProtocol, ProxyProtocol, UserConfig};
use petrel_tests::pki::{connect_tls, Ca, TempDir};
use petrel_tests::{connect_v311_hex, hex, TestBroker, PROMPT};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CONNACK_OK: &[u8] = &[0x20, 0x02, 0x00, 0x00];

fn listener(protocol: ListenerProtocol) -> ListenerConfig {
    ListenerConfig {
        protocol,
        ..ListenerConfig::default()
    }
}

/// A TLS (or WSS) listener using `server.pem` / `server.key` from `dir`.
fn tls_listener(protocol: ListenerProtocol, dir: &TempDir, ca: &Ca) -> ListenerConfig {
    let (cert, key) = ca.server().write(&dir.0, "server");
    ListenerConfig {
        cert: Some(cert),
        key: Some(key),
        ..listener(protocol)
    }
}

async fn broker_with(listeners: Vec<ListenerConfig>) -> TestBroker {
    TestBroker::start_with(|c| c.listeners = listeners).await
}

/// Sends a 3.1.1 CONNECT and expects CONNACK accepted, over any stream.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, id: &str) {
    stream
        .write_all(&hex(&connect_v311_hex(id, true, 60)))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(PROMPT, stream.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(ack, CONNACK_OK);
}

/// Waits until the broker closes `stream`; returns how long that took from `since`.
async fn closed_after<S: AsyncRead + Unpin>(stream: &mut S, since: Instant) -> Duration {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("not closed within 10 s"),
        }
    }
}

/// A rumqttc client on `transport`; returns it after CONNACK, with its event channel.
async fn rumqttc_client(
    id: &str,
    host: String,
    port: u16,
    transport: Transport,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Incoming>) {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport);
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(i) = event {
                if tx.send(i).is_err() {
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(PROMPT, rx.recv()).await {
        Ok(Some(Incoming::ConnAck(ack))) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    (client, rx)
}

/// Subscribes, publishes to itself and expects the message back.
async fn round_trip(
    client: &AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Incoming>,
    topic: &str,
) {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    client
        .publish(topic, QoS::AtLeastOnce, false, "over the transport")
        .await
        .unwrap();
    let deadline = Instant::now() + PROMPT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Incoming::Publish(p))) => {
                assert_eq!(&p.payload[..], b"over the transport");
                return;
            }
            Ok(Some(_)) => continue,
            other => panic!("no message back on {topic}: {other:?}"),
        }
    }
}

/// rumqttc's TLS settings: a rustls config trusting `ca` (ring provider), with ALPN "mqtt".
fn tls_config(ca: &Ca, client: Option<&petrel_tests::pki::Leaf>) -> TlsConfiguration {
    TlsConfiguration::Rustls(ca.client_config(client, &[b"mqtt"]))
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_rumqttc_and_negotiates_alpn_mqtt() {
    let dir = TempDir::new("tls");
    let ca = Ca::new("test CA");
    let broker = broker_with(vec![tls_listener(ListenerProtocol::Tls, &dir, &ca)]).await;
    let (client, mut rx) = rumqttc_client(
        "tls-client",
        "localhost".into(),
        broker.addr.port(),
        Transport::Tls(tls_config(&ca, None)),
    )
    .await;
    round_trip(&client, &mut rx, "tls/echo").await;

    // A raw client sees ALPN "mqtt" and TLS 1.2 or 1.3.
    let mut raw = connect_tls(broker.addr, ca.client_config(None, &[b"mqtt"]))
        .await
        .unwrap();
    assert_eq!(raw.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    mqtt_connect(&mut raw, "raw-tls").await;

    // A client that does not trust the server's CA fails the handshake.
    let other = Ca::new("other CA");
    assert!(connect_tls(broker.addr, other.client_config(None, &[]))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_certificate_is_a_login_and_required_when_configured() {
    let dir = TempDir::new("mtls");
    let ca = Ca::new("test CA");
    std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
    let required = ListenerConfig {
        client_ca: Some(dir.path("ca.pem")),
        require_client_cert: true,
        ..tls_listener(ListenerProtocol::Tls, &dir, &ca)
    };
    let optional = ListenerConfig {
        client_ca: Some(dir.path("ca.pem")),
        ..tls_listener(ListenerProtocol::Tls, &dir, &ca)
    };
    let broker = TestBroker::start_with(|c| {
        c.listeners = vec![required, optional];
        c.auth.allow_anonymous = false;
        c.auth.users = vec![UserConfig {
            name: "bob".into(),
            password: Some("builder".into()),
            scram_sha256: None,
        }];
    })
    .await;
    let (required_addr, optional_addr) = (broker.addrs[0], broker.addrs[1]);
    let device = ca.client("device-7");

    // With a certificate from the CA and no user name: in, by the certificate.
    let (client, mut rx) = rumqttc_client(
        "device-7",
        "localhost".into(),
        required_addr.port(),
        Transport::Tls(tls_config(&ca, Some(&device))),
    )
    .await;
    round_trip(&client, &mut rx, "mtls/echo").await;

    // Without one, the listener that requires it refuses the handshake (TLS 1.3 reports it
    // on the first read).
    let refused = async {
        let mut s = connect_tls(required_addr, ca.client_config(None, &[])).await?;
        s.write_all(&hex(&connect_v311_hex("nocert", true, 60)))
            .await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.map(|_| b)
    };
    assert!(refused.await.is_err(), "no certificate: no MQTT session");

    // The optional listener lets it through TLS, but anonymous clients are not allowed here:
    // CONNACK 5 (not authorized).
    let mut s = connect_tls(optional_addr, ca.client_config(None, &[]))
        .await
        .unwrap();
    s.write_all(&hex(&connect_v311_hex("anon", true, 60)))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05]);

    // A certificate from another CA is refused.
    let stranger = Ca::new("other CA").client("device-8");
    let foreign = async {
        let mut s = connect_tls(optional_addr, ca.client_config(Some(&stranger), &[])).await?;
        s.write_all(&hex(&connect_v311_hex("x", true, 60))).await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.map(|_| b)
    };
    assert!(foreign.await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_reload_when_changed_and_a_broken_one_keeps_the_old() {
    let dir = TempDir::new("reload");
    let first = Ca::new("first CA");
    let broker = broker_with(vec![tls_listener(ListenerProtocol::Tls, &dir, &first)]).await;
    let mut s = connect_tls(broker.addr, first.client_config(None, &[]))
        .await
        .unwrap();
    mqtt_connect(&mut s, "before").await;

    // New files from another CA: within a few seconds the broker serves them.
    let second = Ca::new("second CA");
    tokio::time::sleep(Duration::from_millis(1100)).await; // a different mtime, whatever the fs
    second.server().write(&dir.0, "server");
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        if connect_tls(broker.addr, second.client_config(None, &[]))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate not in service after 8 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(connect_tls(broker.addr, first.client_config(None, &[]))
        .await
        .is_err());

    // A broken file is refused; the second certificate stays in service.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(dir.path("server.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut s = connect_tls(broker.addr, second.client_config(None, &[]))
        .await
        .unwrap();
    mqtt_connect(&mut s, "after").await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_wss_listeners_serve_rumqttc() {
    let dir = TempDir::new("ws");
    let ca = Ca::new("test CA");
    let broker = broker_with(vec![
        listener(ListenerProtocol::Ws),
        tls_listener(ListenerProtocol::Wss, &dir, &ca),
    ])
    .await;
    let (ws, wss) = (broker.addrs[0], broker.addrs[1]);
    let (client, mut rx) = rumqttc_client(
        "ws-client",
        format!("ws://127.0.0.1:{}/mqtt", ws.port()),
        ws.port(),
        Transport::Ws,
    )
    .await;
    round_trip(&client, &mut rx, "ws/echo").await;

    let wss_tls = TlsConfiguration::Rustls(ca.client_config(None, &[b"http/1.1"]));
    let (client, mut rx) = rumqttc_client(
        "wss-client",
        format!("wss://localhost:{}/mqtt", wss.port()),
        wss.port(),
        Transport::Wss(wss_tls),
    )
    .await;
    round_trip(&client, &mut rx, "wss/echo").await;
}

async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&str>,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await
}

/// The next binary message's bytes.
async fn ws_next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(PROMPT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return b.to_vec(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_carry_mqtt_bytes_however_they_are_split() {
    let broker = broker_with(vec![listener(ListenerProtocol::Ws)]).await;
    // Subprotocol negotiation: "mqtt" is echoed.
    let (mut ws, response) = ws_connect(broker.addr, "/mqtt", Some("mqtt"))
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    // CONNECT one byte per frame.
    for byte in hex(&connect_v311_hex("split", true, 60)) {
        ws.send(Message::Binary(vec![byte].into())).await.unwrap();
    }
    assert_eq!(ws_next(&mut ws).await, CONNACK_OK);
    // SUBSCRIBE and PINGREQ in one frame: SUBACK and PINGRESP come back.
    let mut both = hex("82 06 00 01 00 01 74 00");
    both.extend(hex("c0 00"));
    ws.send(Message::Binary(both.into())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 7 {
        got.extend(ws_next(&mut ws).await);
    }
    assert_eq!(got, hex("90 03 00 01 00 d0 00"));
    // A WebSocket ping is answered with a pong, and is not an MQTT packet.
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    match tokio::time::timeout(PROMPT, ws.next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected pong, got {other:?}"),
    }
    // A text frame is not MQTT: the connection ends [MQTT-6.0.0-1].
    ws.send(Message::Text("hello".into())).await.unwrap();
    let end = tokio::time::timeout(PROMPT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "text frame must end the connection");

    // Another path is not upgraded.
    match ws_connect(broker.addr, "/other", Some("mqtt")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

fn v2_header(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(source);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(1883u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_give_the_client_address_and_are_required_when_configured() {
    let broker = broker_with(vec![ListenerConfig {
        proxy_protocol: ProxyProtocol::Required,
        // Two connections per second per client address: the limit sees the address from
        // the PROXY header, not the balancer's.
        max_connection_rate_per_ip: 2,
        ..listener(ListenerProtocol::Tcp)
    }])
    .await;
    let connect = hex(&connect_v311_hex("behind-lb", true, 60));
    let attempt = |header: Vec<u8>| {
        let connect = connect.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
            let mut bytes = header;
            bytes.extend(&connect);
            s.write_all(&bytes).await.unwrap();
            let mut ack = [0u8; 4];
            match tokio::time::timeout(PROMPT, s.read_exact(&mut ack)).await {
                Ok(Ok(_)) => Some(ack),
                _ => None,
            }
        }
    };
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 1883\r\n").into_bytes();
    assert_eq!(attempt(v1("10.9.9.9")).await, Some([0x20, 2, 0, 0]), "v1");
    assert_eq!(
        attempt(v2_header([10, 9, 9, 9], 40001)).await,
        Some([0x20, 2, 0, 0]),
        "v2"
    );
    assert_eq!(
        attempt(v1("10.9.9.9")).await,
        None,
        "third from 10.9.9.9 in a second"
    );
    assert_eq!(
        attempt(v1("10.9.9.8")).await,
        Some([0x20, 2, 0, 0]),
        "another client address behind the same balancer"
    );
    assert_eq!(attempt(Vec::new()).await, None, "no header: refused");
    assert!(petrel_engine::stats::Stats::get(&broker.broker.stats.rate_limited) >= 1);
}

// ---------------------------------------------------------------------------------------------
// Unix sockets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_listener_serves_mqtt_with_the_configured_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("unix");
    let path: PathBuf = dir.path("mqtt.sock");
    let broker = broker_with(vec![ListenerConfig {
        socket: Some(path.clone()),
        socket_mode: Some("0600".into()),
        ..listener(ListenerProtocol::Unix)
    }])
    .await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    mqtt_connect(&mut s, "over-unix").await;
    s.write_all(&hex("c0 00")).await.unwrap();
    let mut pong = [0u8; 2];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(pong, [0xd0, 0x00]);
    drop(broker);
}

// ---------------------------------------------------------------------------------------------
// One timeout discipline: accept → complete CONNECT within connect_timeout, on every transport

fn timed(mut l: ListenerConfig, connect_timeout: Duration) -> ListenerConfig {
    l.connect_timeout = connect_timeout;
    l
}

fn assert_around(took: Duration, want: Duration, what: &str) {
    assert!(
        took >= want.saturating_sub(Duration::from_millis(50))
            && took < want + Duration::from_millis(700),
        "{what}: closed after {took:?}, deadline {want:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_in_tls_handshake_websocket_upgrade_or_before_connect_end_at_the_connect_deadline() {
    let dir = TempDir::new("stall");
    let ca = Ca::new("test CA");
    let deadline = Duration::from_millis(1000);
    let broker = broker_with(vec![
        timed(tls_listener(ListenerProtocol::Tls, &dir, &ca), deadline),
        timed(listener(ListenerProtocol::Ws), deadline),
        timed(tls_listener(ListenerProtocol::Wss, &dir, &ca), deadline),
        ListenerConfig {
            handshake_timeout: Some(Duration::from_millis(300)),
            ..timed(
                tls_listener(ListenerProtocol::Tls, &dir, &ca),
                Duration::from_secs(3),
            )
        },
    ])
    .await;
    let (tls, ws, wss, tls_short) = (
        broker.addrs[0],
        broker.addrs[1],
        broker.addrs[2],
        broker.addrs[3],
    );

    // TLS: nothing sent at all; half a ClientHello.
    let t = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(tls).await.unwrap();
    assert_around(closed_after(&mut silent, t).await, deadline, "TLS, silent");
    let t = Instant::now();
    let mut half = tokio::net::TcpStream::connect(tls).await.unwrap();
    half.write_all(&hex("16 03 01 02 00 01 00 01 fc 03 03"))
        .await
        .unwrap();
    assert_around(
        closed_after(&mut half, t).await,
        deadline,
        "TLS, half a ClientHello",
    );

    // WebSocket: half an upgrade request.
    let t = Instant::now();
    let mut upgrade = tokio::net::TcpStream::connect(ws).await.unwrap();
    upgrade
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    assert_around(
        closed_after(&mut upgrade, t).await,
        deadline,
        "WS, half an upgrade",
    );

    // TLS done, then no CONNECT: the same deadline, counted from accept.
    let t = Instant::now();
    let mut idle = connect_tls(tls, ca.client_config(None, &[])).await.unwrap();
    assert_around(
        closed_after(&mut idle, t).await,
        deadline,
        "TLS, no CONNECT",
    );

    // WSS: TLS done, upgrade never sent.
    let t = Instant::now();
    let mut idle = connect_tls(wss, ca.client_config(None, &[])).await.unwrap();
    assert_around(
        closed_after(&mut idle, t).await,
        deadline,
        "WSS, no upgrade",
    );

    // WebSocket upgraded, then no CONNECT.
    let t = Instant::now();
    let (mut upgraded, _) = ws_connect(ws, "/mqtt", Some("mqtt")).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match upgraded.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return t.elapsed(),
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .expect("upgraded WebSocket without CONNECT not closed");
    assert_around(end, deadline, "WS upgraded, no CONNECT");

    // handshake_timeout, shorter, ends a stalled handshake sooner.
    let t = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(tls_short).await.unwrap();
    assert_around(
        closed_after(&mut silent, t).await,
        Duration::from_millis(300),
        "handshake_timeout",
    );
    assert!(petrel_engine::stats::Stats::get(&broker.broker.stats.handshake_failures) >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connect_within_the_deadline_succeeds_on_every_transport() {
    let dir = TempDir::new("slow");
    let ca = Ca::new("test CA");
    let deadline = Duration::from_secs(4);
    let broker = broker_with(vec![
        timed(tls_listener(ListenerProtocol::Tls, &dir, &ca), deadline),
        timed(listener(ListenerProtocol::Ws), deadline),
    ])
    .await;
    let connect = hex(&connect_v311_hex("slowpoke", true, 60));
    let pause = Duration::from_millis(2500) / connect.len() as u32;

    // TLS: CONNECT byte by byte over 2.5 s.
    let mut tls = connect_tls(broker.addrs[0], ca.client_config(None, &[]))
        .await
        .unwrap();
    for byte in &connect {
        tls.write_all(&[*byte]).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(pause).await;
    }
    let mut ack = [0u8; 4];
    tls.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, CONNACK_OK);

    // WebSocket: one frame per byte, over 2.5 s.
    let (mut ws, _) = ws_connect(broker.addrs[1], "/mqtt", Some("mqtt"))
        .await
        .unwrap();
    for byte in &connect {
        ws.send(Message::Binary(vec![*byte].into())).await.unwrap();
        tokio::time::sleep(pause).await;
    }
    assert_eq!(ws_next(&mut ws).await, CONNACK_OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pings_do_not_count_as_mqtt_keepalive() {
    let broker = broker_with(vec![listener(ListenerProtocol::Ws)]).await;
    let (mut ws, _) = ws_connect(broker.addr, "/mqtt", Some("mqtt"))
        .await
        .unwrap();
    // CONNECT with keepalive 1 s: 1.5 s without an MQTT packet ends it.
    ws.send(Message::Binary(
        hex(&connect_v311_hex("pinger", true, 1)).into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await, CONNACK_OK);
    let connected = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // A WebSocket ping every 200 ms: answered, but not an MQTT packet.
            let _ = ws.send(Message::Ping(Vec::new().into())).await;
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "connection not closed by the MQTT keepalive");
    let took = connected.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2600),
        "closed after {took:?}, keepalive limit 1.5 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_honoured_only_when_trusted() {
    // One connection per second per client address. Behind a trusted proxy the address is
    // the first of X-Forwarded-For; otherwise the header is ignored and every client here is
    // 127.0.0.1.
    let limited = |trust| ListenerConfig {
        trust_x_forwarded_for: trust,
        max_connection_rate_per_ip: 1,
        ..listener(ListenerProtocol::Ws)
    };
    let broker = broker_with(vec![limited(true), limited(false)]).await;
    let (trusted, untrusted) = (broker.addrs[0], broker.addrs[1]);
    let attempt = |addr: SocketAddr, forwarded: &'static str| async move {
        let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        headers.insert("x-forwarded-for", forwarded.parse().unwrap());
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(request).await else {
            return false;
        };
        let _ = ws
            .send(Message::Binary(
                hex(&connect_v311_hex("fwd", true, 60)).into(),
            ))
            .await;
        matches!(
            tokio::time::timeout(PROMPT, ws.next()).await,
            Ok(Some(Ok(Message::Binary(b)))) if b[..] == *CONNACK_OK
        )
    };
    assert!(attempt(trusted, "203.0.113.9, 10.0.0.1").await);
    assert!(
        !attempt(trusted, "203.0.113.9").await,
        "same client address within the second"
    );
    assert!(
        attempt(trusted, "203.0.113.10").await,
        "another client behind the same proxy"
    );
    assert!(attempt(untrusted, "203.0.113.9").await);
    assert!(
        !attempt(untrusted, "203.0.113.10").await,
        "untrusted: the header is ignored, both are 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_server_certificates_work() {
    let dir = TempDir::new("ed25519");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path("server.key"), key.serialize_pem()).unwrap();
    let broker = broker_with(vec![ListenerConfig {
        cert: Some(dir.path("server.pem")),
        key: Some(dir.path("server.key")),
        ..listener(ListenerProtocol::Tls)
    }])
    .await;
    // Trust the self-signed certificate itself.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut s = connect_tls(broker.addr, std::sync::Arc::new(config))
        .await
        .unwrap();
    mqtt_connect(&mut s, "ed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_listeners() {
    let broker = TestBroker::start_with(|c| {
        c.listeners = vec![
            listener(ListenerProtocol::Tcp),
            listener(ListenerProtocol::Tcp),
        ];
        c.max_connections = 1;
    })
    .await;
    let mut first = tokio::net::TcpStream::connect(broker.addrs[0])
        .await
        .unwrap();
    mqtt_connect(&mut first, "first").await;
    // The other listener has room of its own, but the server as a whole has none: the
    // second client waits (in the backlog) until the first leaves.
    let mut second = tokio::net::TcpStream::connect(broker.addrs[1])
        .await
        .unwrap();
    second
        .write_all(&hex(&connect_v311_hex("second", true, 60)))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut ack))
            .await
            .is_err(),
        "served past max_connections"
    );
    drop(first);
    tokio::time::timeout(PROMPT, second.read_exact(&mut ack))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(ack, CONNACK_OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_and_unix_socket_stalls_end_at_the_connect_deadline() {
    let dir = TempDir::new("stall2");
    let deadline = Duration::from_millis(1000);
    let path = dir.path("stall.sock");
    let broker = broker_with(vec![
        timed(
            ListenerConfig {
                proxy_protocol: ProxyProtocol::Required,
                ..listener(ListenerProtocol::Tcp)
            },
            deadline,
        ),
        timed(
            ListenerConfig {
                socket: Some(path.clone()),
                ..listener(ListenerProtocol::Unix)
            },
            deadline,
        ),
    ])
    .await;
    let t = Instant::now();
    let mut half = tokio::net::TcpStream::connect(broker.addrs[0])
        .await
        .unwrap();
    half.write_all(b"PROXY TCP4 10.0.0.").await.unwrap();
    assert_around(
        closed_after(&mut half, t).await,
        deadline,
        "half a PROXY header",
    );
    let t = Instant::now();
    let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_around(
        closed_after(&mut idle, t).await,
        deadline,
        "unix, no CONNECT",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_judged_on_mqtt_packets_over_tls_too() {
    let dir = TempDir::new("tlska");
    let ca = Ca::new("test CA");
    let broker = broker_with(vec![tls_listener(ListenerProtocol::Tls, &dir, &ca)]).await;
    let mut s = connect_tls(broker.addr, ca.client_config(None, &[]))
        .await
        .unwrap();
    s.write_all(&hex(&connect_v311_hex("ka", true, 1)))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    let t = Instant::now();
    assert_around(
        closed_after(&mut s, t).await,
        Duration::from_millis(1500),
        "TLS keepalive 1 s",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_max_connections_per_ip_open() {
    let broker = broker_with(vec![ListenerConfig {
        max_connections_per_ip: 2,
        ..listener(ListenerProtocol::Tcp)
    }])
    .await;
    let mut first = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    mqtt_connect(&mut first, "one").await;
    let mut second = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    mqtt_connect(&mut second, "two").await;
    // The third is closed without a CONNACK.
    let mut third = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let _ = third
        .write_all(&hex(&connect_v311_hex("three", true, 60)))
        .await;
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(PROMPT, third.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(matches!(read, Ok(0) | Err(_)), "no CONNACK: {read:?}");
    assert_eq!(
        petrel_engine::stats::Stats::get(&broker.broker.stats.refused_connections_per_ip),
        1
    );
    // One leaves; its place is free again.
    drop(first);
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let mut again = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
        let _ = again
            .write_all(&hex(&connect_v311_hex("again", true, 60)))
            .await;
        let mut ack = [0u8; 4];
        if let Ok(Ok(_)) = tokio::time::timeout(PROMPT, again.read_exact(&mut ack)).await {
            assert_eq!(ack, [0x20, 2, 0, 0]);
            break;
        }
        // The first connection's end may not have been seen yet.
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_identity_is_the_user_name_for_topic_rules() {
    let dir = TempDir::new("mtls-acl");
    let ca = Ca::new("test CA");
    std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
    std::fs::write(
        dir.path("acl.toml"),
        "[[rules]]\ncertificate = \"device-7\"\naccess = \"both\"\ntopics = [\"devices/%u/#\"]\n",
    )
    .unwrap();
    let listener = ListenerConfig {
        client_ca: Some(dir.path("ca.pem")),
        require_client_cert: true,
        ..tls_listener(ListenerProtocol::Tls, &dir, &ca)
    };
    let broker = TestBroker::start_with(|c| {
        c.listeners = vec![listener];
        c.auth.allow_anonymous = false;
        c.auth.acl_file = Some(dir.path("acl.toml"));
    })
    .await;
    let device = ca.client("device-7");
    let (client, mut rx) = rumqttc_client(
        "any-id",
        "localhost".into(),
        broker.addr.port(),
        Transport::Tls(tls_config(&ca, Some(&device))),
    )
    .await;
    // Its own topics, named after the certificate, work.
    round_trip(&client, &mut rx, "devices/device-7/echo").await;
    // Another device's are refused.
    client
        .subscribe("devices/device-8/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = Instant::now() + PROMPT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Incoming::SubAck(ack))) => {
                assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Failure]);
                break;
            }
            Ok(Some(_)) => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}
