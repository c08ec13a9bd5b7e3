//! Correctness smoke test: every scenario, with tiny parameters, against an in-process petrel.
//! It checks that the generator's accounting is right (everything expected arrives exactly
//! once, QoS 1/2 flows complete, the report has the documented shape); it never asserts on
//! speed. Timing belongs to real runs of the binary, see bench/README.md.

use std::net::SocketAddr;
use std::time::Duration;

use petrel_bench::{run, Options, Report, Scenario};
use petrel_codec::{ProtocolVersion, QoS};
use petrel_server::{Config, Server};
use tokio_util::sync::CancellationToken;

/// A petrel on an ephemeral loopback port, stopped when dropped. Its session queues are
/// large so that what this test checks is the generator, not the broker's (correct) dropping
/// of QoS 1 messages for a subscriber that falls 1000 messages behind.
struct Broker {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Broker {
    async fn start() -> Broker {
        let mut config = Config::default();
        config.storage.mode = petrel_server::config::StorageMode::Memory;
        config.mqtt.max_queued_messages = 1_000_000;
        for l in &mut config.listeners {
            l.bind = "127.0.0.1:0".parse().expect("literal address");
        }
        let server = Server::bind(&config).await.expect("bind test broker");
        let addr = server.local_addrs()[0];
        let shutdown = CancellationToken::new();
        tokio::spawn(server.run(shutdown.clone(), Duration::from_secs(1)));
        Broker { addr, shutdown }
    }

    fn options(&self, qos: QoS, version: ProtocolVersion) -> Options {
        Options {
            host: self.addr.ip().to_string(),
            ports: vec![self.addr.port()],
            qos,
            version,
            label: "petrel-smoke".into(),
            inflight: 16,
            timeout: Duration::from_secs(60),
            ..Options::default()
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `scenario` and asserts a complete, lossless, duplicate-free result.
async fn check(scenario: Scenario, qos: QoS, version: ProtocolVersion) -> Report {
    let broker = Broker::start().await;
    let report = run(&broker.options(qos, version), &scenario).await;
    let shown = serde_json::to_string_pretty(&report).expect("report serializes");
    assert!(report.ok, "{shown}");
    assert!(!report.timed_out, "{shown}");
    assert_eq!(report.error, None, "{shown}");
    assert!(report.expected > 0, "{shown}");
    assert_eq!(report.received, report.expected, "{shown}");
    assert_eq!(report.lost, 0, "{shown}");
    assert_eq!(report.duplicates, 0, "{shown}");
    assert_eq!(report.unexpected, 0, "{shown}");
    assert_eq!(report.label, "petrel-smoke");
    report
}

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_qos1() {
    let r = check(
        Scenario::FanIn {
            publishers: 3,
            messages: 300,
        },
        QoS::AtLeastOnce,
        V311,
    )
    .await;
    assert_eq!((r.sent, r.expected), (900, 900));
    assert!(r.latency_us.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_qos0_v5() {
    check(
        Scenario::FanIn {
            publishers: 2,
            messages: 200,
        },
        QoS::AtMostOnce,
        V5,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_qos2() {
    let r = check(
        Scenario::FanOut {
            subscribers: 4,
            messages: 200,
        },
        QoS::ExactlyOnce,
        V311,
    )
    .await;
    assert_eq!((r.sent, r.expected), (200, 800));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_qos1_v5() {
    let r = check(
        Scenario::Pairs {
            pairs: 3,
            messages: 300,
        },
        QoS::AtLeastOnce,
        V5,
    )
    .await;
    assert_eq!((r.sent, r.expected), (900, 900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_qos1() {
    let r = check(
        Scenario::Latency {
            rate: 2_000,
            duration: Duration::from_millis(300),
            publishers: 2,
        },
        QoS::AtLeastOnce,
        V311,
    )
    .await;
    assert_eq!(r.expected, 600);
    let latency = r.latency_us.expect("latency percentiles");
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert_eq!(latency.samples, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_own_rss() {
    // The broker runs in this process, so this process's RSS is the broker's.
    let r = check(
        Scenario::Connections {
            connections: 50,
            concurrency: 8,
            broker_pid: Some(std::process::id()),
        },
        QoS::AtMostOnce,
        V311,
    )
    .await;
    assert_eq!(r.pingresp_ok, Some(true));
    assert!(r.connections_per_s.is_some());
    assert!(r.rss_before_kib.is_some() && r.rss_after_kib.is_some());
    assert!(r.rss_per_connection_bytes.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_qos1() {
    // 300 subscriptions = 100 groups → 200 topics; 500 messages: even ones match 1 filter,
    // odd ones 2 filters on 2 different connections → 250 + 2 × 250 deliveries.
    let r = check(
        Scenario::Wildcards {
            subscriptions: 300,
            subscribers: 4,
            messages: 500,
        },
        QoS::AtLeastOnce,
        V311,
    )
    .await;
    assert_eq!(r.expected, 750);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_one_connection_gets_one_copy() {
    // With one connection, the `+` and `#` filters that both match an odd topic belong to the
    // same session: one copy expected, and petrel must not send two.
    let r = check(
        Scenario::Wildcards {
            subscriptions: 30,
            subscribers: 1,
            messages: 100,
        },
        QoS::AtMostOnce,
        V5,
    )
    .await;
    assert_eq!(r.expected, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_qos1() {
    let r = check(Scenario::Retained { retained: 500 }, QoS::AtLeastOnce, V311).await;
    assert_eq!(r.sent, 500);
    assert!(r.retained_seconds.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_broker_listed_twice_is_a_plain_run() {
    let broker = Broker::start().await;
    let mut opts = broker.options(QoS::AtLeastOnce, V311);
    opts.ports = vec![broker.addr.port(), broker.addr.port()];
    let r = run(
        &opts,
        &Scenario::Pairs {
            pairs: 4,
            messages: 200,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.received, 800);
    assert_eq!(r.duplicates, 0);
    let port = broker.addr.port();
    assert_eq!(r.params["ports"], serde_json::json!([port, port]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_over_two_separate_brokers_never_share_one() {
    // Two brokers that know nothing of each other: subscriber i and publisher i are always on
    // different ones, so nothing arrives (QoS 0, so loss is allowed and the run ends quietly).
    let (a, b) = (Broker::start().await, Broker::start().await);
    let mut opts = a.options(QoS::AtMostOnce, V311);
    opts.ports = vec![a.addr.port(), b.addr.port()];
    let r = run(
        &opts,
        &Scenario::Pairs {
            pairs: 4,
            messages: 50,
        },
    )
    .await;
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.sent, 200);
    assert_eq!(r.received, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_publish_runs_between_subscribing_and_publishing() {
    let broker = Broker::start().await;
    let scenario = Scenario::FanIn {
        publishers: 2,
        messages: 100,
    };
    let mut opts = broker.options(QoS::AtLeastOnce, V311);
    opts.before_publish = Some("true".into());
    let r = run(&opts, &scenario).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.received, 200);

    opts.before_publish = Some("exit 3".into());
    let r = run(&opts, &scenario).await;
    assert!(!r.ok);
    assert_eq!(r.sent, 0, "{r:?}");
    let error = r.error.unwrap_or_default();
    assert!(
        error.starts_with("--before-publish: exited with"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_reports_an_error() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port();
    let opts = Options {
        ports: vec![port],
        timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let r = run(
        &opts,
        &Scenario::FanIn {
            publishers: 1,
            messages: 10,
        },
    )
    .await;
    assert!(!r.ok);
    assert!(r.error.is_some(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_has_the_documented_fields() {
    let r = check(
        Scenario::Pairs {
            pairs: 1,
            messages: 10,
        },
        QoS::AtMostOnce,
        V311,
    )
    .await;
    let v = serde_json::to_value(&r).expect("report serializes");
    for key in [
        "scenario",
        "label",
        "params",
        "sent",
        "expected",
        "received",
        "lost",
        "duration_s",
        "sent_per_s",
        "delivered_per_s",
        "latency_us",
        "ok",
        "connections_per_s",
        "rss_per_connection_bytes",
        "retained_seconds",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    for key in ["p50", "p99", "p999", "max"] {
        assert!(
            v["latency_us"].get(key).is_some(),
            "missing latency_us.{key}"
        );
    }
    assert!(v["params"].is_object());
    assert_eq!(v["scenario"], "pairs");
}
