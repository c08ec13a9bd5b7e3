//! The admin listener against the real `petrel` binary: Prometheus metrics that follow what
//! clients do, and the JSON API (its answers checked against the OpenAPI description that
//! ships with it): listing clients, a client's subscriptions, disconnecting a client (an MQTT 5
//! client receives DISCONNECT 0x98), deleting a session (gone after a restart too), listing
//! and deleting retained messages, reloading, health and readiness.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "s3cret-token";
const WAIT: Duration = Duration::from_secs(5);

fn admin_table() -> String {
    format!("[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

/// The admin listener's address, from the broker's log.
fn admin_addr(broker: &Broker) -> SocketAddr {
    let started = Instant::now();
    loop {
        let log = broker.log();
        if let Some(line) = log.lines().find(|l| l.contains("admin listener")) {
            let addr = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .expect("addr= in the admin listener's log line");
            return addr.parse().expect("a socket address");
        }
        assert!(
            started.elapsed() < WAIT,
            "no admin listener in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> (u16, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Calls with the token and checks the JSON answer against the schema the OpenAPI
    /// document gives for that path, method and status.
    async fn json(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let (status, body) = self.call(method.clone(), path, Some(TOKEN)).await;
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"));
        conforms(method.as_str(), path, status, &value);
        (status, value)
    }

    async fn get(&self, path: &str) -> Value {
        let (status, value) = self.json(reqwest::Method::GET, path).await;
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }
}

/// Connects a v5 client and returns it with CONNACK's Session Present flag.
async fn v5_client(addr: SocketAddr, id: &str, clean: bool, expiry: u32) -> (RawClient, bool) {
    let mut c = RawClient::connect(addr).await;
    c.send(&connect_v5(id, clean, 30, expiry)).await;
    let connack = c.packet(WAIT).await.expect("CONNACK");
    assert_eq!(connack[0], 0x20, "CONNACK expected: {}", hex(&connack));
    assert_eq!(connack[3], 0x00, "CONNECT refused: {}", hex(&connack));
    (c, connack[2] & 1 == 1)
}

/// The metrics as `name{labels}` → value.
async fn scrape(api: &Api) -> HashMap<String, f64> {
    let (status, text) = api.call(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no metric {name}; have {:?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test]
async fn metrics_follow_what_clients_do() {
    let _guard = light().await;
    let dir = std::env::temp_dir().join(format!("petrel-admin-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::start_with(
        "",
        &format!(
            "[storage]\ndir = \"{}\"\nfsync = \"always\"\n\n{}",
            dir.display(),
            admin_table()
        ),
    );
    let api = Api::new(admin_addr(&broker));
    let listener = format!(
        "petrel_listener_accepted_total{{listener=\"tcp:{}\"}}",
        broker.addr
    );
    // The harness's readiness probe is accepted once the broker gets to it, which may be
    // after the probe returned: counted before the baseline, not in the deltas below.
    let started = Instant::now();
    let before = loop {
        let m = scrape(&api).await;
        if metric(&m, &listener) >= 1.0 || started.elapsed() > WAIT {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metric(&before, "petrel_connections"), 0.0);

    // A v5 subscriber, a 3.1.1 publisher, and a client of an unsupported protocol level.
    let (mut sub, _) = v5_client(broker.addr, "m-sub", true, 0).await;
    sub.send(&subscribe_v5(1, "m/#", 1)).await;
    assert_eq!(sub.packet(WAIT).await.unwrap()[0], 0x90);
    let mut publ = RawClient::connected(broker.addr, "m-pub", 60).await;
    publ.send(&publish("m/a", 0, 0, b"12345")).await;
    publ.send(&publish("m/a", 0, 0, b"123")).await;
    let mut retained = publish("m/r", 1, 7, b"retained");
    retained[0] |= 0x01;
    publ.send(&retained).await;
    publ.expect(&puback(7), WAIT).await;
    for _ in 0..3 {
        sub.packet(WAIT)
            .await
            .expect("a PUBLISH for the subscriber");
    }
    let mut old = RawClient::connect(broker.addr).await;
    old.send(&[
        0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 0x07, 0x02, 0, 60, 0, 1, b'x',
    ])
    .await;
    assert!(old.until_closed(WAIT).await.is_ok());

    let m = scrape(&api).await;
    assert_eq!(metric(&m, "petrel_connections"), 2.0);
    assert_eq!(
        metric(&m, "petrel_connections_by_version{version=\"5.0\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "petrel_connections_by_version{version=\"3.1.1\"}"),
        1.0
    );
    assert_eq!(metric(&m, "petrel_connects_total"), 2.0);
    assert_eq!(
        metric(
            &m,
            "petrel_connects_refused_total{reason=\"unsupported_protocol_version\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "petrel_messages_received_total{qos=\"0\"}"), 2.0);
    assert_eq!(metric(&m, "petrel_messages_received_total{qos=\"1\"}"), 1.0);
    assert_eq!(
        metric(&m, "petrel_payload_received_bytes_total{qos=\"0\"}"),
        8.0
    );
    assert_eq!(
        metric(&m, "petrel_payload_received_bytes_total{qos=\"1\"}"),
        8.0
    );
    assert_eq!(metric(&m, "petrel_messages_sent_total{qos=\"0\"}"), 2.0);
    assert_eq!(metric(&m, "petrel_messages_sent_total{qos=\"1\"}"), 1.0);
    assert!(metric(&m, "petrel_network_received_bytes_total") > 50.0);
    assert!(metric(&m, "petrel_network_sent_bytes_total") > 30.0);
    assert_eq!(metric(&m, "petrel_retained_messages"), 1.0);
    assert_eq!(metric(&m, "petrel_subscriptions"), 1.0);
    assert_eq!(metric(&m, "petrel_sessions{state=\"live\"}"), 2.0);
    // Three connections since the first scrape (the harness probed the port before it).
    assert_eq!(metric(&m, &listener) - metric(&before, &listener), 3.0);
    let open = format!(
        "petrel_listener_connections{{listener=\"tcp:{}\"}}",
        broker.addr
    );
    assert_eq!(metric(&m, &open), 2.0, "the two clients still connected");
    assert!(metric(&m, "petrel_store_disk_bytes") > 0.0);
    assert!(
        metric(&m, "petrel_store_write_seconds_count") >= 1.0,
        "the retained message was written"
    );
    assert!(metric(&m, "process_resident_memory_bytes") > 1_000_000.0);
    assert!(metric(&m, "process_open_fds") >= 3.0);

    // A keepalive close and a drop are counted by reason.
    let mut idle = RawClient::connect(broker.addr).await;
    idle.send(&connect_v311("m-idle", 1)).await;
    idle.expect(&CONNACK_ACCEPTED, WAIT).await;
    assert!(idle.until_closed(Duration::from_secs(4)).await.is_ok());
    drop(sub);
    drop(publ);
    let started = Instant::now();
    loop {
        let m = scrape(&api).await;
        if metric(&m, "petrel_connections") == 0.0 {
            assert_eq!(
                metric(
                    &m,
                    "petrel_connections_closed_total{reason=\"keepalive_timeout\"}"
                ),
                1.0
            );
            break;
        }
        assert!(started.elapsed() < WAIT, "connections did not go to 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_json_api_lists_and_manages_clients_as_described() {
    let _guard = light().await;
    let dir = std::env::temp_dir().join(format!("petrel-admin-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tables = format!(
        "[storage]\ndir = \"{}\"\nfsync = \"always\"\n\n{}",
        dir.display(),
        admin_table()
    );
    let mut broker = Broker::start_with("", &tables);
    let api = Api::new(admin_addr(&broker));

    // Health and readiness need no token; the API does.
    let (status, body) = api.call(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = api.call(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
    for token in [None, Some("wrong")] {
        let (status, body) = api
            .call(reqwest::Method::GET, "/api/v1/clients", token)
            .await;
        assert_eq!(status, 401, "{body}");
        conforms(
            "GET",
            "/api/v1/clients",
            status,
            &serde_json::from_str(&body).unwrap(),
        );
    }
    let (status, body) = api
        .call(reqwest::Method::GET, "/api/v1/openapi.json", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::from_str::<Value>(OPENAPI).unwrap()
    );

    // Two clients: a persistent v5 one with a subscription, a 3.1.1 one; a retained message.
    let (mut v5, _) = v5_client(broker.addr, "dev/one", true, 300).await;
    v5.send(&subscribe_v5(1, "sensors/+/temp", 1)).await;
    assert_eq!(v5.packet(WAIT).await.unwrap()[0], 0x90);
    let mut v3 = RawClient::connected(broker.addr, "other", 60).await;
    let mut retained = publish("sensors/a/temp", 1, 3, b"21.5");
    retained[0] |= 0x01;
    v3.send(&retained).await;
    v3.expect(&puback(3), WAIT).await;
    let mut binary = publish("blob", 1, 4, &[0xff, 0x00, 0xfe]);
    binary[0] |= 0x01;
    v3.send(&binary).await;
    v3.expect(&puback(4), WAIT).await;

    let list = api.get("/api/v1/clients").await;
    assert_eq!(list["total"], 2);
    let ids: Vec<&str> = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev/one", "other"]);
    let one = &list["clients"][0];
    assert_eq!(one["connected"], true);
    assert_eq!(one["protocol_version"], "5.0");
    assert_eq!(one["keep_alive"], 30);
    assert_eq!(one["session_expiry_interval"], 300);
    assert_eq!(one["subscriptions"], 1);
    assert!(one["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let since = one["connected_since"].as_u64().unwrap();
    assert!(
        since <= now && now - since < 30,
        "connected_since {since}, now {now}"
    );
    assert_eq!(list["clients"][1]["protocol_version"], "3.1.1");

    let found = api.get("/api/v1/clients?search=DEV").await;
    assert_eq!(found["total"], 1);
    assert_eq!(
        api.get("/api/v1/clients?limit=1&offset=1").await["clients"][0]["client_id"],
        "other"
    );
    let (status, _) = api
        .json(reqwest::Method::GET, "/api/v1/clients?state=sleeping")
        .await;
    assert_eq!(status, 400);

    let detail = api.get("/api/v1/clients/dev%2Fone").await;
    assert_eq!(detail["subscription_list"][0]["filter"], "sensors/+/temp");
    assert_eq!(detail["subscription_list"][0]["qos"], 1);
    let subs = api.get("/api/v1/clients/dev%2Fone/subscriptions").await;
    assert_eq!(subs["subscriptions"].as_array().unwrap().len(), 1);
    let (status, _) = api
        .json(reqwest::Method::GET, "/api/v1/clients/nobody")
        .await;
    assert_eq!(status, 404);

    // A single node: cluster mode is off.
    assert_eq!(
        api.get("/api/v1/cluster").await,
        json!({ "enabled": false })
    );

    let overview = api.get("/api/v1/overview").await;
    assert_eq!(overview["connections"], 2);
    assert_eq!(overview["connections_by_version"]["5.0"], 1);
    assert_eq!(overview["retained_messages"], 2);
    assert_eq!(overview["messages_received"], 2);

    // Retained messages: listed by filter, text and binary payloads, then deleted.
    let all = api.get("/api/v1/retained").await;
    let messages = all["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["topic"], "blob");
    assert_eq!(messages[0]["payload_base64"], "/wD+");
    assert_eq!(messages[1]["payload_utf8"], "21.5");
    assert_eq!(messages[1]["qos"], 1);
    let some = api.get("/api/v1/retained?filter=sensors/%23").await;
    assert_eq!(some["messages"].as_array().unwrap().len(), 1);
    let (status, _) = api
        .json(reqwest::Method::GET, "/api/v1/retained?filter=a/%23/b")
        .await;
    assert_eq!(status, 400);
    let (status, _) = api.json(reqwest::Method::DELETE, "/api/v1/retained").await;
    assert_eq!(status, 400, "deleting needs an explicit filter");
    let (status, removed) = api
        .json(
            reqwest::Method::DELETE,
            "/api/v1/retained?filter=sensors/%23",
        )
        .await;
    assert_eq!((status, removed["removed"].as_u64()), (200, Some(1)));
    // A new subscriber gets no retained message from there any more.
    let mut late = RawClient::connected(broker.addr, "late", 60).await;
    late.send(&subscribe(1, "sensors/#", 1)).await;
    late.expect(&suback(1, 1), WAIT).await;
    assert!(late.packet(Duration::from_millis(300)).await.is_err());

    // Disconnect: the v5 client is told why (0x98), its session stays, offline.
    let (status, result) = api
        .json(
            reqwest::Method::POST,
            "/api/v1/clients/dev%2Fone/disconnect",
        )
        .await;
    assert_eq!(
        (status, result["result"].as_str()),
        (200, Some("disconnected"))
    );
    let close = v5
        .until_closed(WAIT)
        .await
        .expect("the client is disconnected");
    assert_eq!(
        close.packets.last().map(|p| hex(p)),
        Some(hex(&[0xe0, 0x01, 0x98]))
    );
    let offline = api.get("/api/v1/clients?state=offline").await;
    assert_eq!(offline["clients"][0]["client_id"], "dev/one");
    assert_eq!(offline["clients"][0]["connected"], false);
    assert!(offline["clients"][0]["expires_in"].as_u64().unwrap() <= 300);
    let (status, _) = api
        .json(
            reqwest::Method::POST,
            "/api/v1/clients/dev%2Fone/disconnect",
        )
        .await;
    assert_eq!(status, 409, "not connected any more");
    let (status, _) = api
        .json(reqwest::Method::POST, "/api/v1/clients/nobody/disconnect")
        .await;
    assert_eq!(status, 404);

    // Delete the offline session: gone now, and after a restart.
    let (status, _) = api
        .json(reqwest::Method::DELETE, "/api/v1/sessions/dev%2Fone")
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .json(reqwest::Method::DELETE, "/api/v1/sessions/dev%2Fone")
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        api.get("/api/v1/clients?state=all").await["total"],
        2,
        "other and late"
    );

    // Delete a connected client's session: disconnected, and its session ends.
    let (mut keeper, _) = v5_client(broker.addr, "keeper", true, 300).await;
    let (status, _) = api
        .json(reqwest::Method::DELETE, "/api/v1/sessions/keeper")
        .await;
    assert_eq!(status, 200);
    assert!(keeper.until_closed(WAIT).await.is_ok());
    let started = Instant::now();
    while api
        .call(reqwest::Method::GET, "/api/v1/clients/keeper", Some(TOKEN))
        .await
        .0
        != 404
    {
        assert!(
            started.elapsed() < WAIT,
            "the session of keeper is still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Reload reads the file again (it has not changed).
    let (status, reloaded) = api.json(reqwest::Method::POST, "/api/v1/reload").await;
    assert_eq!(status, 200);
    assert_eq!(reloaded["restart_needed"], false);

    drop((v3, late));
    assert!(broker.terminate().success());
    let broker = Broker::start_with("", &tables);
    for id in ["dev/one", "keeper"] {
        let (_, present) = v5_client(broker.addr, id, false, 300).await;
        assert!(
            !present,
            "the deleted session of {id} came back after a restart"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn readiness_turns_to_draining_on_sigterm() {
    let _guard = light().await;
    let mut broker = Broker::start_with(
        "",
        &format!("[storage]\nmode = \"memory\"\n\n[mqtt]\nmax_inflight = 1000\nreceive_maximum = 1000\n\n{}", admin_table()),
    );
    let api = Api::new(admin_addr(&broker));
    // A subscriber that reads nothing keeps the drain going for the grace period (10 s).
    let (mut sub, _) = v5_client(broker.addr, "slow", true, 0).await;
    sub.send(&subscribe_v5(1, "big", 0)).await;
    assert_eq!(sub.packet(WAIT).await.unwrap()[0], 0x90);
    let mut publ = RawClient::connected(broker.addr, "pub", 60).await;
    let payload = vec![7u8; 64 * 1024];
    for _ in 0..120 {
        publ.send(&publish("big", 0, 0, &payload)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(broker.pid() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        let (status, body) = api.call(reqwest::Method::GET, "/readyz", None).await;
        if status == 503 {
            assert_eq!(body, r#"{"status":"draining"}"#);
            conforms(
                "GET",
                "/readyz",
                status,
                &serde_json::from_str(&body).unwrap(),
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "readyz still says {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sub);
    assert!(broker.terminate().success());
}

/// The schema check above is not vacuous: an answer the document does not describe fails it.
#[test]
#[should_panic(expected = "does not match the OpenAPI document")]
fn the_schema_check_rejects_an_answer_the_document_does_not_describe() {
    conforms(
        "GET",
        "/api/v1/overview",
        200,
        &json!({ "version": "0.1.0", "connections": -1 }),
    );
}
