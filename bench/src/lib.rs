//! # petrel-bench: the MQTT load generator
//!
//! Drives any MQTT broker over TCP with petrel's own codec and reports one [`Report`] per run.
//!
//! ```text
//! main.rs ── CLI flags → Options + Scenario, builds the tokio runtime, prints the Report
//!    └─ run() ── picks the scenario module, bounds it by Options::timeout
//!         ├─ scenario/pubsub.rs ──── fan-in, fan-out, pairs, latency: plans for flow.rs
//!         ├─ scenario/wildcards.rs ─ many filters over few connections, exact expected count
//!         ├─ scenario/retained.rs ── store N retained messages, time their replay to one `#`
//!         └─ scenario/connections.rs  N idle clients: connect rate, broker RSS, PINGREQ sweep
//!              flow.rs ── connect every client, start them together, collect their stats
//!                 ├─ publisher.rs ── one task per publisher: batched writes from templates,
//!                 │                  in-flight window, QoS 1/2 acks, optional pacing
//!                 └─ subscriber.rs ─ one task per subscriber: decode, ack, loss and latency
//!              conn.rs ── CONNECT/CONNACK and batched SUBSCRIBE over one TcpStream
//!              placement.rs ── which broker each client connects to (`--ports`: cluster nodes)
//!              template.rs ── a PUBLISH encoded once, patched per message; the payload stamp
//! report.rs ── the JSON shape (documented in README.md) and the human-readable table
//! progress.rs ── the stderr progress bar     sys.rs ── RLIMIT_NOFILE, source binds, /proc RSS
//! ```
//!
//! Every message carries a 16-byte stamp at the start of its payload (publisher id, sequence
//! number, send time since the run's start), so each subscriber can tell loss, duplicates and
//! end-to-end latency without any shared state. Tasks count in plain integers and hand their
//! totals back when they finish; the only shared counter is the progress bar's, bumped once per
//! socket read.

mod conn;
mod error;
mod flow;
pub mod placement;
mod progress;
mod publisher;
pub mod report;
mod scenario;
mod subscriber;
mod sys;
mod template;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_codec::{ProtocolVersion, QoS};

pub use error::BenchError;
use placement::Role;
pub use report::{Latency, Report};

/// Settings shared by every scenario.
#[derive(Clone, Debug)]
pub struct Options {
    pub host: String,
    /// The brokers' ports on `host`, at least one. With several (the nodes of a cluster) the
    /// clients are spread over them by [`placement::broker_index`].
    pub ports: Vec<u16>,
    pub qos: QoS,
    /// Payload bytes per message; at least [`template::STAMP_LEN`] so the stamp fits.
    pub payload: usize,
    pub version: ProtocolVersion,
    /// Copied into the report to tell brokers apart in comparisons.
    pub label: String,
    /// Worker threads of the runtime the caller built; only reported.
    pub threads: usize,
    /// Unacknowledged QoS 1/2 messages per publisher.
    pub inflight: u16,
    /// The whole run, connecting included, ends by then; what arrived is reported.
    pub timeout: Duration,
    /// Draw a progress bar on stderr (the caller decides: not with --json, not off a TTY).
    pub progress: bool,
    /// Persistent sessions (3.x Clean Session 0, v5 Session Expiry Interval 3600): what a
    /// broker with durable sessions stores and acknowledges only once stored.
    pub persistent: bool,
    /// A shell command run once every subscriber is subscribed and before any publisher
    /// connects, outside the measured time; the run fails if it exits non-zero. For brokers
    /// whose subscriptions take effect asynchronously (a cluster's interest reaching the
    /// other nodes): the command waits until they have.
    pub before_publish: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: "127.0.0.1".into(),
            ports: vec![1883],
            qos: QoS::AtMostOnce,
            payload: 64,
            version: ProtocolVersion::V3_1_1,
            label: String::new(),
            threads: 1,
            inflight: 64,
            timeout: Duration::from_secs(120),
            progress: false,
            persistent: false,
            before_publish: None,
        }
    }
}

/// What to measure; the defaults are the CLI's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// N publishers → 1 subscriber, one topic; M messages per publisher.
    FanIn { publishers: u32, messages: u32 },
    /// 1 publisher → N subscribers, one topic; M messages, N × M deliveries.
    FanOut { subscribers: u32, messages: u32 },
    /// N publisher/subscriber pairs, one topic each; M messages per pair.
    Pairs { pairs: u32, messages: u32 },
    /// N publishers at a fixed total rate for a duration, one subscriber.
    Latency {
        rate: u32,
        duration: Duration,
        publishers: u32,
    },
    /// N idle clients opened with at most C connecting at once.
    Connections {
        connections: u32,
        concurrency: u32,
        broker_pid: Option<u32>,
    },
    /// K subscriber connections sharing N filters; 1 publisher, M messages.
    Wildcards {
        subscriptions: u32,
        subscribers: u32,
        messages: u32,
    },
    /// N retained messages stored, then replayed to one `#` subscriber.
    Retained { retained: u32 },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::FanIn { .. } => "fan-in",
            Scenario::FanOut { .. } => "fan-out",
            Scenario::Pairs { .. } => "pairs",
            Scenario::Latency { .. } => "latency",
            Scenario::Connections { .. } => "connections",
            Scenario::Wildcards { .. } => "wildcards",
            Scenario::Retained { .. } => "retained",
        }
    }
}

/// What every task of one run shares: where the brokers are, the clock and the deadline.
pub(crate) struct RunCtx {
    /// One per `--ports` entry, in order; clients pick theirs with [`RunCtx::broker`].
    pub brokers: Vec<SocketAddr>,
    pub version: ProtocolVersion,
    pub qos: QoS,
    pub payload: usize,
    pub inflight: u16,
    pub persistent: bool,
    /// `Options::before_publish`.
    pub before_publish: Option<String>,
    /// Zero of every timestamp in a payload stamp.
    pub start: Instant,
    pub deadline: tokio::time::Instant,
    /// Keeps this run's topics and client ids apart from other runs on the same broker
    /// (retained messages in particular outlive a run).
    pub prefix: String,
    pub progress: progress::Progress,
    /// Connections opened so far; picks each one's loopback source address.
    pub connects: std::sync::atomic::AtomicU32,
}

impl RunCtx {
    /// Nanoseconds since the run's start: the unit of payload stamps.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn at_ns(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + Duration::from_nanos(ns))
    }

    /// The broker client `i` of `role` connects to.
    pub fn broker(&self, role: Role, i: u32) -> SocketAddr {
        self.brokers[placement::broker_index(role, i, self.brokers.len())]
    }

    pub fn client_id(&self, role: &str, n: u32) -> String {
        format!("{}-{role}{n}", self.prefix.replace('/', "-"))
    }

    pub fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }
}

/// Runs one scenario to completion (or to `opts.timeout`) and reports it. Never fails: a
/// broker that cannot be reached or misbehaves gives a report with `ok: false` and `error`.
pub async fn run(opts: &Options, scenario: &Scenario) -> Report {
    let mut report = Report::new(scenario.name(), opts, scenario);
    if let Err(e) = check(opts) {
        report.fail(e);
        return report;
    }
    let mut brokers = Vec::with_capacity(opts.ports.len());
    for &port in &opts.ports {
        match resolve(&opts.host, port).await {
            Ok(a) => brokers.push(a),
            Err(e) => {
                report.fail(e);
                return report;
            }
        }
    }
    let start = Instant::now();
    let ctx = Arc::new(RunCtx {
        brokers,
        version: opts.version,
        qos: opts.qos,
        payload: opts.payload,
        inflight: opts.inflight,
        persistent: opts.persistent,
        before_publish: opts.before_publish.clone(),
        start,
        deadline: tokio::time::Instant::from_std(start + opts.timeout),
        prefix: format!("pb/{}", run_id()),
        progress: progress::Progress::new(opts.progress),
        connects: std::sync::atomic::AtomicU32::new(0),
    });
    match scenario {
        Scenario::FanIn {
            publishers,
            messages,
        } => scenario::pubsub::fan_in(&ctx, *publishers, *messages, &mut report).await,
        Scenario::FanOut {
            subscribers,
            messages,
        } => scenario::pubsub::fan_out(&ctx, *subscribers, *messages, &mut report).await,
        Scenario::Pairs { pairs, messages } => {
            scenario::pubsub::pairs(&ctx, *pairs, *messages, &mut report).await
        }
        Scenario::Latency {
            rate,
            duration,
            publishers,
        } => scenario::pubsub::latency(&ctx, *rate, *duration, *publishers, &mut report).await,
        Scenario::Connections {
            connections,
            concurrency,
            broker_pid,
        } => {
            scenario::connections::run(&ctx, *connections, *concurrency, *broker_pid, &mut report)
                .await
        }
        Scenario::Wildcards {
            subscriptions,
            subscribers,
            messages,
        } => {
            scenario::wildcards::run(&ctx, *subscriptions, *subscribers, *messages, &mut report)
                .await
        }
        Scenario::Retained { retained } => {
            scenario::retained::run(&ctx, *retained, &mut report).await
        }
    }
    ctx.progress.finish();
    report.finalize();
    report
}

fn check(opts: &Options) -> Result<(), BenchError> {
    if opts.ports.is_empty() {
        return Err(BenchError::Usage("no broker port given".into()));
    }
    if opts.payload < template::STAMP_LEN {
        return Err(BenchError::Usage(format!(
            "--payload must be at least {} bytes (the sequence number and send time)",
            template::STAMP_LEN
        )));
    }
    if opts.inflight == 0 {
        return Err(BenchError::Usage("--inflight must be at least 1".into()));
    }
    Ok(())
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, BenchError> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| BenchError::io(format!("resolving {host}:{port}"), e))?;
    addrs
        .next()
        .ok_or_else(|| BenchError::Usage(format!("{host}:{port} resolves to no address")))
}

/// Short and unique enough per run: process id and clock, mixed.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = (nanos ^ (u64::from(std::process::id()) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:08x}", mixed >> 32)
}
