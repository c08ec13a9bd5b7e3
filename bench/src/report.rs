//! The result of one run: the JSON object `--json` prints (its shape is documented in
//! bench/README.md, and the comparison scripts read these names, so they do not change) and the
//! table printed otherwise. Fields that do not apply to a scenario are `null`, never absent.

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::BenchError;
use crate::{Options, Scenario};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub label: String,
    /// Every setting the run used, common and scenario-specific.
    pub params: Value,
    /// Messages published (connections attempted, for `connections`).
    pub sent: u64,
    /// Distinct deliveries the scenario should produce, by construction.
    pub expected: u64,
    /// Distinct expected deliveries that arrived.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Deliveries of a message the same subscriber had already received.
    pub duplicates: u64,
    /// Deliveries that were not part of the plan (no stamp, unknown publisher or sequence).
    pub unexpected: u64,
    /// v5 acks with a failure reason code.
    pub rejected: u64,
    /// From the first send to the last expected delivery.
    pub duration_s: f64,
    /// `sent` over the publishing window: first send to the last publisher's completion (last
    /// write at QoS 0, last ack at QoS 1/2).
    pub sent_per_s: f64,
    /// `received / duration_s`.
    pub delivered_per_s: f64,
    pub latency_us: Option<Latency>,
    /// Finished before the timeout, no error, and nothing lost where loss is not allowed
    /// (QoS 1/2 messages, connections, PINGRESPs).
    pub ok: bool,
    pub timed_out: bool,
    pub error: Option<String>,
    pub connections_per_s: Option<f64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub pingresp_ok: Option<bool>,
    pub retained_seconds: Option<f64>,
    /// Publish/subscribe scenarios: connecting and subscribing every subscriber (every SUBACK
    /// received), before the clock starts.
    pub subscribe_seconds: Option<f64>,
    /// QoS 0 may lose messages without failing the run; everything else may not.
    #[serde(skip)]
    pub(crate) loss_allowed: bool,
}

/// End-to-end latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    pub samples: u64,
}

impl Latency {
    /// From a histogram of nanoseconds; `None` when it is empty.
    pub fn from_ns(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| round(ns as f64 / 1_000.0, 1);
        Some(Latency {
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: round(h.mean() / 1_000.0, 1),
            samples: h.len(),
        })
    }
}

impl Report {
    pub fn new(name: &str, opts: &Options, scenario: &Scenario) -> Report {
        let mut params = json!({
            "host": opts.host,
            // The first broker's, as before `ports` existed; `ports` lists them all.
            "port": opts.ports.first(),
            "ports": opts.ports,
            "qos": opts.qos as u8,
            "persistent": opts.persistent,
            "payload": opts.payload,
            "version": opts.version.to_string(),
            "inflight": opts.inflight,
            "threads": opts.threads,
            "timeout_s": opts.timeout.as_secs_f64(),
        });
        let specific = match scenario {
            Scenario::FanIn {
                publishers,
                messages,
            } => json!({"publishers": publishers, "messages": messages}),
            Scenario::FanOut {
                subscribers,
                messages,
            } => json!({"subscribers": subscribers, "messages": messages}),
            Scenario::Pairs { pairs, messages } => json!({"pairs": pairs, "messages": messages}),
            Scenario::Latency {
                rate,
                duration,
                publishers,
            } => json!({
                "rate": rate,
                "duration_s": duration.as_secs_f64(),
                "publishers": publishers,
            }),
            Scenario::Connections {
                connections,
                concurrency,
                broker_pid,
            } => json!({
                "connections": connections,
                "concurrency": concurrency,
                "broker_pid": broker_pid,
            }),
            Scenario::Wildcards {
                subscriptions,
                subscribers,
                messages,
            } => json!({
                "subscriptions": subscriptions,
                "subscribers": subscribers,
                "messages": messages,
            }),
            Scenario::Retained { retained } => json!({"retained": retained}),
        };
        if let (Some(all), Value::Object(extra)) = (params.as_object_mut(), specific) {
            all.extend(extra);
        }
        Report {
            scenario: name.to_string(),
            label: opts.label.clone(),
            params,
            sent: 0,
            expected: 0,
            received: 0,
            lost: 0,
            duplicates: 0,
            unexpected: 0,
            rejected: 0,
            duration_s: 0.0,
            sent_per_s: 0.0,
            delivered_per_s: 0.0,
            latency_us: None,
            ok: false,
            timed_out: false,
            error: None,
            connections_per_s: None,
            rss_before_kib: None,
            rss_after_kib: None,
            rss_per_connection_bytes: None,
            pingresp_ok: None,
            retained_seconds: None,
            subscribe_seconds: None,
            loss_allowed: opts.qos as u8 == 0,
        }
    }

    /// Records why the run failed; the first reason wins. A timeout is not an error: it is
    /// `timed_out`, and the report keeps what arrived.
    pub fn fail(&mut self, e: BenchError) {
        if matches!(e, BenchError::Timeout { .. }) {
            self.timed_out = true;
        } else if self.error.is_none() {
            self.error = Some(e.to_string());
        }
    }

    /// Adds a parameter the scenario derived (e.g. the wildcard scenario's topic counts).
    pub(crate) fn param(&mut self, key: &str, value: Value) {
        if let Some(all) = self.params.as_object_mut() {
            all.insert(key.to_string(), value);
        }
    }

    pub(crate) fn finalize(&mut self) {
        self.lost = self.expected.saturating_sub(self.received);
        self.duration_s = round(self.duration_s, 6);
        self.sent_per_s = round(self.sent_per_s, 1);
        self.delivered_per_s = round(self.delivered_per_s, 1);
        self.connections_per_s = self.connections_per_s.map(|v| round(v, 1));
        self.rss_per_connection_bytes = self.rss_per_connection_bytes.map(|v| round(v, 1));
        self.retained_seconds = self.retained_seconds.map(|v| round(v, 6));
        self.subscribe_seconds = self.subscribe_seconds.map(|v| round(v, 6));
        self.ok = self.error.is_none()
            && !self.timed_out
            && (self.loss_allowed || self.lost == 0)
            && self.pingresp_ok.unwrap_or(true);
    }

    /// A human-readable summary, one `key  value` line each.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), self.scenario.clone()),
            ("label".into(), self.label.clone()),
        ];
        if let Some(params) = self.params.as_object() {
            let text: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push(("params".into(), text.join(" ")));
        }
        rows.push(("sent".into(), self.sent.to_string()));
        rows.push(("expected".into(), self.expected.to_string()));
        rows.push(("received".into(), self.received.to_string()));
        rows.push(("lost".into(), self.lost.to_string()));
        if self.duplicates > 0 {
            rows.push(("duplicates".into(), self.duplicates.to_string()));
        }
        if self.unexpected > 0 {
            rows.push(("unexpected".into(), self.unexpected.to_string()));
        }
        if self.rejected > 0 {
            rows.push(("rejected".into(), self.rejected.to_string()));
        }
        rows.push(("duration".into(), format!("{:.3} s", self.duration_s)));
        rows.push(("sent/s".into(), format!("{:.0}", self.sent_per_s)));
        rows.push(("delivered/s".into(), format!("{:.0}", self.delivered_per_s)));
        if let Some(l) = &self.latency_us {
            rows.push((
                "latency µs".into(),
                format!(
                    "p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples)",
                    l.p50, l.p99, l.p999, l.max, l.samples
                ),
            ));
        }
        if let Some(v) = self.connections_per_s {
            rows.push(("connections/s".into(), format!("{v:.0}")));
        }
        if let (Some(b), Some(a)) = (self.rss_before_kib, self.rss_after_kib) {
            rows.push(("broker RSS".into(), format!("{b} KiB → {a} KiB")));
        }
        if let Some(v) = self.rss_per_connection_bytes {
            rows.push(("RSS/connection".into(), format!("{v:.0} bytes")));
        }
        if let Some(v) = self.pingresp_ok {
            rows.push(("PINGRESP all".into(), v.to_string()));
        }
        if let Some(v) = self.retained_seconds {
            rows.push(("retained replay".into(), format!("{v:.3} s")));
        }
        if let Some(v) = self.subscribe_seconds {
            rows.push(("subscribe".into(), format!("{v:.3} s")));
        }
        if self.timed_out {
            rows.push(("timed out".into(), "yes".into()));
        }
        if let Some(e) = &self.error {
            rows.push(("error".into(), e.clone()));
        }
        rows.push(("ok".into(), self.ok.to_string()));
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Rounds for output: the measurements are not more precise than this, and short numbers make
/// the JSON readable.
fn round(v: f64, decimals: i32) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// `count` per second over `ns` nanoseconds; 0 for an empty window.
pub(crate) fn per_second(count: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        count as f64 * 1e9 / ns as f64
    }
}
