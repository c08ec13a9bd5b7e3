//! A bridge over each transport to a petrel that serves them: TLS with a client certificate
//! (the remote requires one), WebSocket, and WebSocket over TLS; and a bridge that does not
//! trust the remote's certificate, which never connects and says why in the admin API.
//! Clients: rumqttc on both sides.

#[path = "common/rumqttc_util.rs"]
mod rumqttc_util;

use std::collections::BTreeSet;
use std::time::Duration;

use petrel_tests::pki::{Ca, TempDir};
use petrel_tests::TestBroker;
use rumqttc::QoS;
use rumqttc_util::Peer;

const WAIT: Duration = Duration::from_secs(20);

/// `GET /api/v1/bridges` on the admin listener at `admin` (token "t").
async fn bridges_api(admin: u16) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{admin}/api/v1/bridges"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn bridges_over_tls_with_a_client_certificate_ws_and_wss() {
    let dir = TempDir::new("bridge-transports");
    let ca = Ca::new("bridge test CA");
    let (cert, key) = ca.server().write(&dir.0, "server");
    let (client_cert, client_key) = ca.client("edge-bridge").write(&dir.0, "client");
    let ca_file = dir.path("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let stranger = Ca::new("another CA");
    let stranger_file = dir.path("stranger.pem");
    std::fs::write(&stranger_file, &stranger.pem).unwrap();

    // The remote: TCP for the test's own clients, TLS requiring a client certificate, WS, WSS.
    let remote = TestBroker::start_toml(&format!(
        "[[listeners]]\nprotocol = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"tls\"\nbind = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         client_ca = \"{ca}\"\nrequire_client_cert = true\n\
         [[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"wss\"\nbind = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        cert = cert.display(),
        key = key.display(),
        ca = ca_file.display(),
    ))
    .await;
    let [tcp, tls, ws, wss] = remote.addrs[..] else {
        panic!("four listeners: {:?}", remote.addrs)
    };

    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bridge = |name: &str, address: std::net::SocketAddr, transport: &str, extra: String| {
        format!(
            "[[bridges]]\nname = \"{name}\"\naddress = \"{address}\"\ntransport = \"{transport}\"\n\
             reconnect_delay = \"100ms\"\nreconnect_delay_max = \"500ms\"\n{extra}\n\
             [[bridges.topics]]\ndirection = \"out\"\nfilter = \"x/#\"\nprefix = \"{name}/\"\n\
             [[bridges.topics]]\ndirection = \"in\"\nfilter = \"{name}-in/#\"\nprefix = \"back/\"\n"
        )
    };
    let local = TestBroker::start_toml(&format!(
        "[[listeners]]\nprotocol = \"tcp\"\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n\n{}\n{}\n{}\n{}",
        bridge(
            "t",
            tls,
            "tls",
            format!(
                "ca_file = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                ca_file.display(),
                client_cert.display(),
                client_key.display()
            )
        ),
        bridge("w", ws, "ws", String::new()),
        bridge(
            "s",
            wss,
            "wss",
            format!("ca_file = \"{}\"\n", ca_file.display())
        ),
        bridge(
            "bad",
            wss,
            "wss",
            format!("ca_file = \"{}\"\n", stranger_file.display())
        ),
    ))
    .await;

    let mut at_remote = Peer::connect(tcp, "at-remote", true).await;
    at_remote.subscribe("+/x/#", QoS::AtLeastOnce).await;
    let mut at_local = Peer::connect(local.addr, "at-local", true).await;
    at_local.subscribe("back/#", QoS::AtLeastOnce).await;
    let local_pub = Peer::connect(local.addr, "local-pub", true).await;
    let remote_pub = Peer::connect(tcp, "remote-pub", true).await;

    // Until every working bridge has carried a message each way (they connect in the
    // background), publish again; then each arrives.
    let want_out: BTreeSet<String> = ["t/x/1", "w/x/1", "s/x/1"].map(String::from).into();
    let want_in: BTreeSet<String> = ["back/t-in/a", "back/w-in/a", "back/s-in/a"]
        .map(String::from)
        .into();
    let (mut got_out, mut got_in) = (BTreeSet::new(), BTreeSet::new());
    let started = std::time::Instant::now();
    while got_out != want_out || got_in != want_in {
        assert!(
            started.elapsed() < WAIT,
            "out: {got_out:?} of {want_out:?}; in: {got_in:?} of {want_in:?}"
        );
        local_pub.publish("x/1", QoS::AtLeastOnce, false, "o").await;
        for name in ["t", "w", "s", "bad"] {
            remote_pub
                .publish(&format!("{name}-in/a"), QoS::AtLeastOnce, false, "i")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Some(p) = at_remote.try_publish() {
            got_out.insert(p.topic);
        }
        while let Some(p) = at_local.try_publish() {
            got_in.insert(p.topic);
        }
    }
    assert!(!got_out.contains("bad/x/1") && !got_in.contains("back/bad-in/a"));

    let body = bridges_api(admin).await;
    let bridges = body["bridges"].as_array().expect("bridges");
    let by_name = |n: &str| bridges.iter().find(|b| b["name"] == n).expect(n).clone();
    for name in ["t", "w", "s"] {
        assert_eq!(by_name(name)["state"], "up", "{name}: {}", by_name(name));
    }
    let bad = by_name("bad");
    assert_eq!(bad["state"], "connecting", "{bad}");
    assert!(bad["failures"].as_u64().unwrap() >= 1, "{bad}");
    let why = bad["last_error"].as_str().unwrap_or_default();
    assert!(why.to_lowercase().contains("certificate"), "{bad}");
    drop(remote);
    drop(local);
}

/// Against a port where nothing listens, attempts back off: 100 ms doubling to 400 ms, each
/// wait drawn between half and all of it, makes 6 to 13 failures in 2 s (1 s of waits would
/// be 20 without backoff; without jitter the count would not vary between runs either).
#[tokio::test]
async fn reconnects_back_off_exponentially_with_jitter() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let local = TestBroker::start_toml(&format!(
        "[[listeners]]\nprotocol = \"tcp\"\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n\n\
         [[bridges]]\nname = \"down\"\naddress = \"{nowhere}\"\n\
         reconnect_delay = \"100ms\"\nreconnect_delay_max = \"400ms\"\n\
         [[bridges.topics]]\nfilter = \"x/#\"\n"
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = bridges_api(admin).await;
    let b = &body["bridges"][0];
    let failures = b["failures"].as_u64().unwrap();
    assert!(
        (6..=13).contains(&failures),
        "{failures} failures in 2 s: {b}"
    );
    assert_eq!(b["state"], "connecting");
    assert!(
        b["last_error"]
            .as_str()
            .unwrap()
            .contains(&nowhere.to_string()),
        "{b}"
    );
    drop(local);
}
