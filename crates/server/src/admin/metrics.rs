//! `/metrics`: the broker's figures in the Prometheus text format.
//!
//! Nothing here is on the hot path. Connections count into the engine's relaxed atomics
//! (`Stats`), which cost one uncontended add each; a scrape reads them all through one
//! `prometheus_client` collector and encodes them. Gauges that need a walk (sessions by
//! state) take only the registry lock, not the sessions'.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use petrel_engine::stats::{Refusal, Stats};
use petrel_engine::Broker;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::bridge::{BridgeStatus, LinkState};
use crate::listener::ListenerStats;

/// The labels of per-QoS and per-version series.
const QOS: [&str; 3] = ["0", "1", "2"];
const VERSIONS: [&str; 3] = ["3.1", "3.1.1", "5.0"];

struct BrokerCollector {
    broker: Arc<Broker>,
    listeners: Vec<Arc<ListenerStats>>,
    bridges: Vec<Arc<BridgeStatus>>,
    cluster: Option<Arc<petrel_cluster::Cluster>>,
}

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCollector")
            .field("listeners", &self.listeners)
            .finish()
    }
}

impl std::fmt::Debug for ListenerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerStats")
            .field("name", &self.name)
            .finish()
    }
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn gauge_f(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One counter family with a single label.
fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value_label, value) in series {
        let labels = [(label, value_label)];
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_label, value) in series {
        let labels = [(label, value_label)];
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn get(c: &AtomicU64) -> u64 {
    Stats::get(c)
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for BrokerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.broker;
        let s = &b.stats;
        let e = &mut e;
        {
            let mut info = e.encode_descriptor(
                "petrel_build",
                "The petrel version running",
                None,
                MetricType::Info,
            )?;
            info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        }
        gauge_f(
            e,
            "petrel_uptime_seconds",
            "Seconds since the broker started",
            b.uptime_ms() as f64 / 1000.0,
        )?;

        // Connections.
        gauge(
            e,
            "petrel_connections",
            "MQTT clients connected now (CONNECT accepted)",
            get(&s.connections_current) as i64,
        )?;
        gauges(
            e,
            "petrel_connections_by_version",
            "MQTT clients connected now, by protocol version",
            "version",
            VERSIONS
                .iter()
                .zip(&s.connections_by_version)
                .map(|(v, c)| (*v, get(c) as i64)),
        )?;
        counter(
            e,
            "petrel_connects",
            "CONNECTs accepted since start",
            get(&s.connections_total),
        )?;
        counters(
            e,
            "petrel_connects_refused",
            "CONNECTs refused with a CONNACK failure code, by reason",
            "reason",
            Refusal::ALL
                .iter()
                .zip(&s.refused)
                .map(|(r, c)| (r.name(), get(c))),
        )?;
        counters(
            e,
            "petrel_connections_refused",
            "Connections refused by a listener before MQTT began, by reason",
            "reason",
            [
                ("rate_limit", get(&s.rate_limited)),
                ("per_ip_limit", get(&s.refused_connections_per_ip)),
                ("handshake_failed", get(&s.handshake_failures)),
            ],
        )?;
        counters(
            e,
            "petrel_connections_closed",
            "Connections the broker closed, by reason",
            "reason",
            [
                ("connect_timeout", get(&s.connect_timeouts)),
                ("partial_input_budget", get(&s.partial_input_shed)),
                ("keepalive_timeout", get(&s.keepalive_timeouts)),
                ("protocol_error", get(&s.protocol_errors)),
                ("session_taken_over", get(&s.takeovers)),
                ("administrative", get(&s.admin_disconnects)),
            ],
        )?;
        {
            let mut open = e.encode_descriptor(
                "petrel_listener_connections",
                "Connections open on a listener (accepted, CONNECT or not)",
                None,
                MetricType::Gauge,
            )?;
            for l in &self.listeners {
                let labels = [("listener", l.name.as_str())];
                ConstGauge::new(signed(l.open())).encode(open.encode_family(&labels)?)?;
            }
        }
        {
            let mut accepted = e.encode_descriptor(
                "petrel_listener_accepted",
                "Connections a listener accepted since start",
                None,
                MetricType::Counter,
            )?;
            for l in &self.listeners {
                let labels = [("listener", l.name.as_str())];
                ConstCounter::new(get(&l.accepted)).encode(accepted.encode_family(&labels)?)?;
            }
        }
        self.encode_bridges(e)?;
        self.encode_cluster(e)?;

        // Messages and bytes.
        counters(
            e,
            "petrel_messages_received",
            "PUBLISH packets received from clients, by QoS",
            "qos",
            QOS.iter()
                .zip(&s.publish_received)
                .map(|(q, c)| (*q, get(c))),
        )?;
        counters(
            e,
            "petrel_messages_sent",
            "PUBLISH packets sent to clients, by QoS (as delivered)",
            "qos",
            QOS.iter().zip(&s.publish_sent).map(|(q, c)| (*q, get(c))),
        )?;
        counters(
            e,
            "petrel_payload_received_bytes",
            "Payload bytes of PUBLISH packets received, by QoS",
            "qos",
            QOS.iter()
                .zip(&s.payload_bytes_received)
                .map(|(q, c)| (*q, get(c))),
        )?;
        counters(
            e,
            "petrel_payload_sent_bytes",
            "Payload bytes of PUBLISH packets sent, by QoS",
            "qos",
            QOS.iter()
                .zip(&s.payload_bytes_sent)
                .map(|(q, c)| (*q, get(c))),
        )?;
        counter(
            e,
            "petrel_network_received_bytes",
            "MQTT bytes read from client connections",
            get(&s.bytes_received),
        )?;
        counter(
            e,
            "petrel_network_sent_bytes",
            "MQTT bytes written to client connections",
            get(&s.bytes_sent),
        )?;
        counters(
            e,
            "petrel_messages_dropped",
            "Messages not delivered, by reason",
            "reason",
            [
                ("outbox_full", get(&s.dropped_outbox_full)),
                ("queue_full", get(&s.dropped_queue_full)),
                ("broker_queue_full", get(&s.dropped_broker_queue_full)),
                ("offline_qos0", get(&s.dropped_offline_qos0)),
                ("expired", get(&s.messages_expired)),
                ("too_large", get(&s.dropped_too_large)),
                ("not_authorized", get(&s.dropped_not_authorized)),
                ("inbound_rate", get(&s.dropped_inbound_rate)),
            ],
        )?;
        counters(
            e,
            "petrel_refused",
            "PUBLISH packets and subscriptions refused, by reason",
            "reason",
            [
                ("publish_acl", get(&s.denied_publish)),
                ("subscribe_acl", get(&s.denied_subscribe)),
                ("topic_limits", get(&s.refused_topic_limits)),
                ("subscription_quota", get(&s.refused_subscription_quota)),
                ("retained_quota", get(&s.refused_retained_quota)),
            ],
        )?;
        counter(
            e,
            "petrel_flow_control_pauses",
            "Times a publisher was paused by a subscriber's full queue",
            get(&s.flow_control_pauses),
        )?;
        counter(
            e,
            "petrel_stalled_subscribers",
            "Times a subscriber was found stalled",
            get(&s.stalled_subscribers),
        )?;
        counter(
            e,
            "petrel_slow_consumers",
            "Times a subscriber that kept reading held its publishers for flow_control_timeout within flow_control_window",
            get(&s.slow_consumers),
        )?;
        counter(
            e,
            "petrel_inbound_throttles",
            "Times a client was slowed to its inbound rate limit",
            get(&s.inbound_throttles),
        )?;
        counter(
            e,
            "petrel_wills_published",
            "Will messages published",
            get(&s.wills_published),
        )?;

        // Sessions, subscriptions, retained, queues.
        let (live, offline) = b.session_counts();
        gauges(
            e,
            "petrel_sessions",
            "Sessions, by state",
            "state",
            [("live", signed(live)), ("offline", signed(offline))],
        )?;
        counter(
            e,
            "petrel_sessions_expired",
            "Offline sessions ended by their expiry interval",
            get(&s.sessions_expired),
        )?;
        gauge(
            e,
            "petrel_subscriptions",
            "Subscriptions held (shared memberships included)",
            signed(b.subscription_count()),
        )?;
        gauge(
            e,
            "petrel_retained_messages",
            "Retained messages held",
            signed(b.retained_count()),
        )?;
        gauge(
            e,
            "petrel_retained_bytes",
            "Topic and payload bytes of the retained messages held",
            signed(b.retained_bytes()),
        )?;
        let (queued, queued_bytes) = b.queued_totals();
        gauge(
            e,
            "petrel_queued_messages",
            "QoS 1/2 messages queued in all sessions",
            signed(queued),
        )?;
        gauge(
            e,
            "petrel_queued_bytes",
            "Payload bytes of the queued QoS 1/2 messages",
            signed(queued_bytes),
        )?;

        // The store.
        if let Some(m) = b.store().metrics() {
            gauge(
                e,
                "petrel_store_disk_bytes",
                "Bytes the durable store takes on disk",
                m.disk_bytes as i64,
            )?;
            counter(
                e,
                "petrel_store_enqueued",
                "Deliveries queued for persistent sessions",
                m.enqueued,
            )?;
            counter(
                e,
                "petrel_store_queue_writes",
                "Queued deliveries written to disk (the rest were acknowledged first)",
                m.queue_writes,
            )?;
            let hist = e.encode_descriptor(
                "petrel_store_write_seconds",
                "Duration of store write rounds (one batch and its sync)",
                None,
                MetricType::Histogram,
            )?;
            let mut hist = hist;
            hist.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                m.round_seconds_sum,
                m.rounds,
                &m.round_seconds_buckets,
                None,
            )?;
        }

        // The process.
        if let Some(p) = process() {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident as i64,
            )?;
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as i64,
            )?;
            gauge(
                e,
                "process_open_fds",
                "Open file descriptors",
                p.open_fds as i64,
            )?;
            gauge(
                e,
                "process_max_fds",
                "Limit of open file descriptors",
                p.max_fds as i64,
            )?;
            let cpu = e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(p.cpu_seconds).encode(cpu)?;
            gauge_f(
                e,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                p.start_time,
            )?;
        }
        Ok(())
    }
}

/// The process's figures, from /proc (Linux). `None` elsewhere.
struct Process {
    resident: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    cpu_seconds: f64,
    start_time: f64,
}

fn process() -> Option<Process> {
    // Clock ticks per second: 100 on every Linux configuration in use.
    const TICKS: f64 = 100.0;
    let page = 4096u64;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0));
    let virtual_pages = fields.next()?;
    let resident_pages = fields.next()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime are fields 14, 15; starttime 22 (1-based) → 11, 12, 19 here.
    let cpu_seconds = (ticks(11) + ticks(12)) / TICKS;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    Some(Process {
        resident: resident_pages * page,
        virtual_bytes: virtual_pages * page,
        open_fds,
        max_fds,
        cpu_seconds,
        start_time: boot + ticks(19) / TICKS,
    })
}

/// A registry with the broker's collector; encoded on every scrape.
pub(crate) fn registry(
    broker: Arc<Broker>,
    listeners: Vec<Arc<ListenerStats>>,
    bridges: Vec<Arc<BridgeStatus>>,
    cluster: Option<Arc<petrel_cluster::Cluster>>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BrokerCollector {
        broker,
        listeners,
        bridges,
        cluster,
    }));
    registry
}

impl BrokerCollector {
    /// Cluster mode: this node's traffic with the others, and membership.
    fn encode_cluster(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let s = cluster.stats();
        let status = cluster.status();
        gauge(
            e,
            "petrel_cluster_nats_connected",
            "Whether this node's NATS connection is up (1) or not (0)",
            i64::from(status.nats_connected),
        )?;
        gauge(
            e,
            "petrel_cluster_nodes",
            "Nodes whose heartbeat is current, this one included",
            signed(status.members.iter().filter(|m| m.alive).count()),
        )?;
        type MemberGauge = (
            &'static str,
            &'static str,
            fn(&petrel_cluster::Member) -> f64,
        );
        let members: [MemberGauge; 4] = [
            (
                "petrel_cluster_member_alive",
                "Each member as this node sees it: heartbeat current (1) or not (0)",
                |m| f64::from(u8::from(m.alive)),
            ),
            (
                "petrel_cluster_member_connections",
                "Client connections on each member, from its last heartbeat",
                |m| m.heartbeat.connections as f64,
            ),
            (
                "petrel_cluster_member_cross_out_rate",
                "Messages per second each member sent to other nodes, over its last heartbeat",
                |m| m.heartbeat.cross_out_per_second,
            ),
            (
                "petrel_cluster_member_cross_in_rate",
                "Messages per second each member received from other nodes, over its last heartbeat",
                |m| m.heartbeat.cross_in_per_second,
            ),
        ];
        for (name, help, value) in members {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for m in &status.members {
                let labels = [("node", m.heartbeat.node.as_str())];
                ConstGauge::new(value(m)).encode(family.encode_family(&labels)?)?;
            }
        }
        counters(
            e,
            "petrel_cluster_messages_sent",
            "Messages sent to other nodes: QoS 0 on NATS (path=core), QoS 1/2 copies stored in JetStream (path=durable)",
            "path",
            [("core", get(&s.sent_core)), ("durable", get(&s.sent_durable))],
        )?;
        counters(
            e,
            "petrel_cluster_messages_received",
            "Messages received from other nodes, by path",
            "path",
            [
                ("core", get(&s.received_core)),
                ("durable", get(&s.received_durable)),
            ],
        )?;
        counter(
            e,
            "petrel_cluster_messages_dropped",
            "QoS 0 messages not sent to other nodes because NATS was not keeping up",
            get(&s.dropped_core),
        )?;
        counter(
            e,
            "petrel_cluster_messages_too_large",
            "QoS 1/2 copies not sent to other nodes because they are larger than a NATS message may be",
            get(&s.dropped_too_large),
        )?;
        counter(
            e,
            "petrel_cluster_slow_consumer_events",
            "Times the NATS client dropped QoS 0 messages from other nodes because this node did not take them fast enough",
            get(&s.slow_consumer),
        )?;
        counter(
            e,
            "petrel_cluster_retries",
            "Writes to NATS that failed and were tried again",
            get(&s.retries),
        )?;
        counters(
            e,
            "petrel_cluster_retained_changes",
            "Retained messages set or cleared, sent to the cluster bucket and received from it",
            "direction",
            [
                ("out", get(&s.retained_sent)),
                ("in", get(&s.retained_received)),
            ],
        )?;
        Ok(())
    }

    /// One series per bridge of each family.
    fn encode_bridges(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.bridges.is_empty() {
            return Ok(());
        }
        type Family = (
            &'static str,
            &'static str,
            MetricType,
            fn(&BridgeStatus) -> u64,
        );
        let families: [Family; 4] = [
            (
                "petrel_bridge_up",
                "Whether a bridge's link to its remote broker is up (1) or not (0)",
                MetricType::Gauge,
                |b| u64::from(b.state() == LinkState::Up),
            ),
            (
                "petrel_bridge_connects",
                "Links a bridge established (CONNACK accepted)",
                MetricType::Counter,
                |b| get(&b.connects),
            ),
            (
                "petrel_bridge_failures",
                "Connection attempts of a bridge that failed and links that broke",
                MetricType::Counter,
                |b| get(&b.failures),
            ),
            (
                "petrel_bridge_dropped",
                "Messages a bridge dropped (QoS 0 past its buffer, no matching rule, too large)",
                MetricType::Counter,
                |b| get(&b.dropped),
            ),
        ];
        for (name, help, kind, value) in families {
            let mut family = e.encode_descriptor(name, help, None, kind)?;
            for b in &self.bridges {
                let labels = [("bridge", b.name.as_str())];
                let v = value(b);
                if kind == MetricType::Counter {
                    ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
                } else {
                    ConstGauge::new(signed(v as usize)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = e.encode_descriptor(
            "petrel_bridge_messages",
            "Messages a bridge carried, by direction (out: to the remote)",
            None,
            MetricType::Counter,
        )?;
        for b in &self.bridges {
            for (direction, v) in [("out", &b.forwarded_out), ("in", &b.forwarded_in)] {
                let labels = [("bridge", b.name.as_str()), ("direction", direction)];
                ConstCounter::new(get(v)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "petrel_bridge_queued_messages",
            "Messages waiting in a bridge's local session to go to the remote",
            None,
            MetricType::Gauge,
        )?;
        let now = std::time::Instant::now();
        for b in &self.bridges {
            let queued = self
                .broker
                .session(&b.local_client_id())
                .map_or(0, |s| self.broker.summarize(&s, now).queued);
            let labels = [("bridge", b.name.as_str())];
            ConstGauge::new(signed(queued)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The text exposition of `registry`.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}
