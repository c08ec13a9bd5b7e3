//! The `$SYS/broker/...` topics: the broker's figures published as retained QoS 0 messages
//! every `sys_interval` (and once at start), with the topic names and plain-text payloads
//! Mosquitto uses, so existing dashboards and `mosquitto_sub -t '$SYS/#'` scripts work.
//!
//! The task ([`run`]) only reads the clock and the broker's counters into a [`Snapshot`];
//! [`SysState::update`] turns (previous state, snapshot, elapsed time) into the messages to
//! publish, so the arithmetic is tested without a clock. As in Mosquitto a topic is published
//! again only when its text changed (`version` once), so an idle broker sends little more than
//! its uptime. The messages are kept in memory only and reach only explicit `$SYS/...`
//! subscriptions: `#` and `+` do not match `$` topics, and clients cannot publish there.
//!
//! Where petrel's figures differ from Mosquitto's:
//! - `messages/received` and `messages/sent` count PUBLISH packets, as `publish/messages/*`
//!   do (Mosquitto counts every packet, CONNECT and PINGREQ included); `load/messages/*`
//!   follow them.
//! - `publish/messages/dropped` is the sum of every reason a message was not delivered: a
//!   full outbox or queue (session or broker-wide), QoS 0 for an offline session, expiry,
//!   too large for the subscriber, refused by the ACL when delivered, or past the inbound rate.
//! - `messages/stored` and `store/messages/count` are the QoS 1/2 messages queued in all
//!   sessions (a message queued for three sessions counts three times) plus the retained
//!   messages; `store/messages/bytes` is the queued payload bytes only, without retained
//!   payloads.
//! - `retained messages/count` counts the messages clients retained, not the `$SYS` figures
//!   themselves; `subscriptions/count` includes subscriptions to `$SYS` topics.
//! - `clients/maximum` is the highest `clients/connected` seen at a publish, so a peak that
//!   came and went between two intervals is missed. `clients/expired` counts persistent
//!   sessions removed when their expiry interval passed.
//! - `load/connections/*` counts accepted CONNECTs (Mosquitto: new sockets); there is no
//!   `load/sockets/*`, `heap/*` or `timestamp` (petrel records no build time).
//! - `version` reads "petrel X.Y.Z" (Mosquitto: "mosquitto version X.Y.Z").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_engine::stats::Stats;
use petrel_engine::Broker;
use tokio_util::sync::CancellationToken;

/// The broker's counters at one moment: everything [`SysState::update`] reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub uptime_secs: u64,
    pub clients_connected: u64,
    /// Persistent sessions without a connected client.
    pub clients_disconnected: u64,
    pub clients_expired: u64,
    /// Connections accepted since start (CONNACK sent).
    pub connections_total: u64,
    pub publish_received: u64,
    pub publish_sent: u64,
    pub publish_dropped: u64,
    /// Payload bytes of the PUBLISH packets received and sent.
    pub publish_bytes_received: u64,
    pub publish_bytes_sent: u64,
    /// MQTT bytes read from and written to client sockets.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// QoS 1/2 messages queued in all sessions, and their payload bytes.
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub retained: u64,
    pub subscriptions: u64,
}

impl Snapshot {
    /// Reads the broker's counters (one pass over the session registry for the client counts).
    pub fn take(broker: &Broker) -> Snapshot {
        let s = &broker.stats;
        let sum = |counters: &[std::sync::atomic::AtomicU64]| -> u64 {
            counters.iter().map(Stats::get).sum()
        };
        let dropped = [
            &s.dropped_outbox_full,
            &s.dropped_queue_full,
            &s.dropped_broker_queue_full,
            &s.dropped_offline_qos0,
            &s.messages_expired,
            &s.dropped_too_large,
            &s.dropped_not_authorized,
            &s.dropped_inbound_rate,
        ];
        let (live, offline) = broker.session_counts();
        let (queued_messages, queued_bytes) = broker.queued_totals();
        Snapshot {
            uptime_secs: broker.uptime_ms() / 1000,
            clients_connected: live as u64,
            clients_disconnected: offline as u64,
            clients_expired: Stats::get(&s.sessions_expired),
            connections_total: Stats::get(&s.connections_total),
            publish_received: sum(&s.publish_received),
            publish_sent: sum(&s.publish_sent),
            publish_dropped: dropped.into_iter().map(Stats::get).sum(),
            publish_bytes_received: sum(&s.payload_bytes_received),
            publish_bytes_sent: sum(&s.payload_bytes_sent),
            bytes_received: Stats::get(&s.bytes_received),
            bytes_sent: Stats::get(&s.bytes_sent),
            queued_messages: queued_messages as u64,
            queued_bytes: queued_bytes as u64,
            retained: broker.retained_count() as u64,
            subscriptions: broker.subscription_count() as u64,
        }
    }
}

/// The averaging windows of the load figures, in minutes, with their topic suffixes.
const WINDOWS: [(f64, &str); 3] = [(1.0, "1min"), (5.0, "5min"), (15.0, "15min")];

/// Reads one counter out of a snapshot.
type Counter = fn(&Snapshot) -> u64;

/// The counters with a `load/<name>/{1min,5min,15min}` rate, and how to read each.
const LOADS: [(&str, Counter); 8] = [
    ("messages/received", |s| s.publish_received),
    ("messages/sent", |s| s.publish_sent),
    ("publish/received", |s| s.publish_received),
    ("publish/sent", |s| s.publish_sent),
    ("publish/dropped", |s| s.publish_dropped),
    ("bytes/received", |s| s.bytes_received),
    ("bytes/sent", |s| s.bytes_sent),
    ("connections", |s| s.connections_total),
];

/// The full topic names of the load figures, built once: `LOADS` × `WINDOWS`.
fn load_topics() -> &'static [[String; 3]; LOADS.len()] {
    static TOPICS: std::sync::OnceLock<[[String; 3]; LOADS.len()]> = std::sync::OnceLock::new();
    TOPICS.get_or_init(|| {
        LOADS.map(|(name, _)| WINDOWS.map(|(_, w)| format!("$SYS/broker/load/{name}/{w}")))
    })
}

/// What the `$SYS` publisher remembers between intervals.
#[derive(Debug, Default)]
pub struct SysState {
    /// The previous snapshot, to turn counters into rates; `None` before the first update.
    previous: Option<Snapshot>,
    /// Per-minute rates, exponentially averaged over each window: `[load][window]`.
    loads: [[f64; 3]; LOADS.len()],
    /// Highest `clients_connected` seen.
    clients_maximum: u64,
    /// The text last published on each topic: a topic is published again only when it differs.
    published: HashMap<String, String>,
}

impl SysState {
    pub fn new() -> SysState {
        SysState::default()
    }

    /// Folds in a snapshot taken `elapsed` after the previous one and returns the topics whose
    /// text changed since they were last published (all of them the first time), with the text.
    ///
    /// Each load figure moves toward the rate of the last interval (per minute) by the share
    /// `1 - exp(-elapsed / window)`, so a steady rate is approached with the window as time
    /// constant. An `elapsed` of zero (the first update) leaves the averages as they are.
    pub fn update(&mut self, now: &Snapshot, elapsed: Duration) -> Vec<(String, String)> {
        let first = self.previous.is_none();
        let secs = elapsed.as_secs_f64();
        if let Some(previous) = &self.previous {
            if secs > 0.0 {
                for ((_, read), averages) in LOADS.iter().zip(&mut self.loads) {
                    let delta = read(now).saturating_sub(read(previous)) as f64;
                    let rate = delta * 60.0 / secs;
                    for ((minutes, _), average) in WINDOWS.iter().zip(averages) {
                        let keep = (-secs / (minutes * 60.0)).exp();
                        *average = rate + keep * (*average - rate);
                    }
                }
            }
        }
        self.clients_maximum = self.clients_maximum.max(now.clients_connected);
        self.previous = Some(now.clone());

        let mut figures: Vec<(String, String)> = Vec::with_capacity(64);
        if first {
            figures.push((
                "$SYS/broker/version".into(),
                concat!("petrel ", env!("CARGO_PKG_VERSION")).into(),
            ));
        }
        let mut put = |topic: &str, value: String| {
            figures.push((format!("$SYS/broker/{topic}"), value));
        };
        put("uptime", format!("{} seconds", now.uptime_secs));
        let counts = [
            ("clients/connected", now.clients_connected),
            ("clients/active", now.clients_connected),
            ("clients/disconnected", now.clients_disconnected),
            ("clients/inactive", now.clients_disconnected),
            (
                "clients/total",
                now.clients_connected + now.clients_disconnected,
            ),
            ("clients/maximum", self.clients_maximum),
            ("clients/expired", now.clients_expired),
            ("messages/received", now.publish_received),
            ("messages/sent", now.publish_sent),
            ("messages/stored", now.queued_messages + now.retained),
            ("store/messages/count", now.queued_messages + now.retained),
            ("store/messages/bytes", now.queued_bytes),
            ("publish/messages/received", now.publish_received),
            ("publish/messages/sent", now.publish_sent),
            ("publish/messages/dropped", now.publish_dropped),
            ("publish/bytes/received", now.publish_bytes_received),
            ("publish/bytes/sent", now.publish_bytes_sent),
            ("bytes/received", now.bytes_received),
            ("bytes/sent", now.bytes_sent),
            ("retained messages/count", now.retained),
            ("subscriptions/count", now.subscriptions),
        ];
        for (topic, value) in counts {
            put(topic, value.to_string());
        }
        for (topics, averages) in load_topics().iter().zip(&self.loads) {
            for (topic, average) in topics.iter().zip(averages) {
                figures.push((topic.clone(), format!("{average:.2}")));
            }
        }

        figures.retain(|(topic, text)| match self.published.get(topic) {
            Some(last) if last == text => false,
            _ => {
                self.published.insert(topic.clone(), text.clone());
                true
            }
        });
        figures
    }
}

/// Publishes the `$SYS` topics now and every `interval` until `shutdown`; an `interval` of
/// zero publishes nothing.
pub async fn run(broker: Arc<Broker>, interval: Duration, shutdown: CancellationToken) {
    if interval.is_zero() {
        return;
    }
    let mut state = SysState::new();
    let mut ticks = tokio::time::interval(interval);
    // A late tick (a busy runtime) moves the schedule instead of bursting to catch up; the
    // rates use the time that really passed.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = Instant::now();
        let elapsed = last.map_or(Duration::ZERO, |t| now.duration_since(t));
        last = Some(now);
        for (topic, text) in state.update(&Snapshot::take(&broker), elapsed) {
            broker.publish_sys(&topic, text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<'a>(updates: &'a [(String, String)], topic: &str) -> Option<&'a str> {
        updates
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_first_update_publishes_every_topic_with_mosquittos_names() {
        let mut state = SysState::new();
        let snapshot = Snapshot {
            uptime_secs: 7,
            clients_connected: 3,
            clients_disconnected: 2,
            queued_messages: 4,
            queued_bytes: 400,
            retained: 5,
            ..Snapshot::default()
        };
        let updates = state.update(&snapshot, Duration::ZERO);
        let expect = [
            (
                "$SYS/broker/version",
                concat!("petrel ", env!("CARGO_PKG_VERSION")),
            ),
            ("$SYS/broker/uptime", "7 seconds"),
            ("$SYS/broker/clients/connected", "3"),
            ("$SYS/broker/clients/active", "3"),
            ("$SYS/broker/clients/disconnected", "2"),
            ("$SYS/broker/clients/inactive", "2"),
            ("$SYS/broker/clients/total", "5"),
            ("$SYS/broker/clients/maximum", "3"),
            ("$SYS/broker/messages/stored", "9"),
            ("$SYS/broker/store/messages/count", "9"),
            ("$SYS/broker/store/messages/bytes", "400"),
            ("$SYS/broker/retained messages/count", "5"),
            ("$SYS/broker/load/connections/15min", "0.00"),
            ("$SYS/broker/load/messages/received/1min", "0.00"),
        ];
        for (topic, text) in expect {
            assert_eq!(value(&updates, topic), Some(text), "{topic}");
        }
        // 22 counters and the version, 8 loads × 3 windows.
        assert_eq!(updates.len(), 23 + 24);
    }

    #[test]
    fn unchanged_values_are_not_published_again() {
        let mut state = SysState::new();
        let mut snapshot = Snapshot {
            uptime_secs: 10,
            clients_connected: 1,
            ..Snapshot::default()
        };
        assert!(!state.update(&snapshot, Duration::ZERO).is_empty());
        // Nothing moved: not even the version is repeated.
        assert_eq!(state.update(&snapshot, Duration::from_secs(10)), []);

        snapshot.uptime_secs = 20;
        snapshot.clients_connected = 2;
        let updates = state.update(&snapshot, Duration::from_secs(10));
        let topics: Vec<&str> = updates.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "$SYS/broker/uptime",
                "$SYS/broker/clients/connected",
                "$SYS/broker/clients/active",
                "$SYS/broker/clients/total",
                "$SYS/broker/clients/maximum",
            ]
        );

        // Back to one client: the maximum stays at two and is not repeated.
        snapshot.uptime_secs = 30;
        snapshot.clients_connected = 1;
        let updates = state.update(&snapshot, Duration::from_secs(10));
        assert_eq!(value(&updates, "$SYS/broker/clients/connected"), Some("1"));
        assert_eq!(value(&updates, "$SYS/broker/clients/maximum"), None);
    }

    #[test]
    fn load_averages_converge_to_a_steady_rate() {
        let mut state = SysState::new();
        let mut snapshot = Snapshot::default();
        state.update(&snapshot, Duration::ZERO);
        // 50 messages every 10 s: 300 a minute, for four hours.
        let mut last = Vec::new();
        let mut after_one_minute = None;
        for step in 1..=1440u64 {
            snapshot.uptime_secs = step * 10;
            snapshot.publish_received = step * 50;
            last = state.update(&snapshot, Duration::from_secs(10));
            if step == 6 {
                after_one_minute = Some(state.loads[0]);
            }
        }
        // After one minute (one time constant) the 1-minute figure is at 1 - 1/e of the rate,
        // the longer windows well below it.
        let [one, five, fifteen] = after_one_minute.unwrap();
        assert!((one - 300.0 * (1.0 - (-1f64).exp())).abs() < 0.01, "{one}");
        assert!(five < one && fifteen < five);
        // After four hours every window has settled on 300.00, and the figures that hold still
        // are no longer published.
        for (_, w) in WINDOWS {
            let topic = format!("$SYS/broker/load/messages/received/{w}");
            let text = state.published.get(&topic).unwrap();
            assert_eq!(text, "300.00", "{topic}");
        }
        assert_eq!(
            value(&last, "$SYS/broker/load/publish/received/1min"),
            None,
            "a settled figure is not republished"
        );
        assert_eq!(
            value(&last, "$SYS/broker/load/messages/sent/1min"),
            None,
            "nothing was sent"
        );
    }

    #[test]
    fn a_burst_decays_and_an_uneven_interval_is_weighed_by_its_length() {
        let mut state = SysState::new();
        let mut snapshot = Snapshot::default();
        state.update(&snapshot, Duration::ZERO);
        // 60 connections within 1 s: a rate of 3600 a minute for that second.
        snapshot.connections_total = 60;
        state.update(&snapshot, Duration::from_secs(1));
        let share = 1.0 - (-1.0f64 / 60.0).exp();
        let one = state.loads[7][0];
        assert!((one - 3600.0 * share).abs() < 1e-6, "{one}");
        // Then nothing for 60 s, reported as one late interval: decays by e.
        let updates = state.update(&snapshot, Duration::from_secs(60));
        let decayed = state.loads[7][0];
        assert!((decayed - one / std::f64::consts::E).abs() < 1e-6);
        assert_eq!(
            value(&updates, "$SYS/broker/load/connections/1min"),
            Some(format!("{decayed:.2}").as_str())
        );
    }

    #[test]
    fn counters_that_go_back_do_not_make_negative_rates() {
        let mut state = SysState::new();
        let snapshot = Snapshot {
            bytes_sent: 1000,
            ..Snapshot::default()
        };
        state.update(&snapshot, Duration::ZERO);
        state.update(&Snapshot::default(), Duration::from_secs(10));
        assert!(state.loads.iter().flatten().all(|l| *l == 0.0));
    }
}
