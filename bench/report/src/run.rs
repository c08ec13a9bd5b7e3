//! One benchmark run as `petrel-bench --json` prints it, and the set of runs a report covers.
//!
//! Every figure is optional: a scenario only reports what it measures (connections/s only for
//! `connections`), and `bench/compare` writes a line with just `scenario`, `label`, `ok: false`
//! and `error` for a broker that failed to start or a run that timed out.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The scenarios in the order the report presents them; others follow alphabetically.
pub const SCENARIO_ORDER: &[&str] = &[
    "fan-in",
    "fan-out",
    "pairs",
    "latency",
    "connections",
    "wildcards",
    "retained",
    "durable-always",
    "durable-every-ms",
];

/// The broker that ratios are taken for, then its peers, in the order the report shows them.
pub const SUBJECT: &str = "petrel";
pub const BROKER_ORDER: &[&str] = &[SUBJECT, "mosquitto", "rumqttd"];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Run {
    pub scenario: String,
    /// The broker under test: `bench/compare` passes the broker's name as `--label`.
    pub label: String,
    pub params: Map<String, Value>,
    pub sent: Option<u64>,
    pub expected: Option<u64>,
    pub received: Option<u64>,
    pub lost: Option<u64>,
    /// Deliveries of a message the same subscriber had already received.
    pub duplicates: Option<u64>,
    pub duration_s: Option<f64>,
    pub sent_per_s: Option<f64>,
    pub delivered_per_s: Option<f64>,
    pub latency_us: Option<Latency>,
    pub ok: bool,
    pub connections_per_s: Option<f64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub retained_seconds: Option<f64>,
    /// The generator stopped the run at its `--timeout`; the figures cover what arrived.
    pub timed_out: Option<bool>,
    /// Whether every idle connection answered a PINGREQ (`connections` only).
    pub pingresp_ok: Option<bool>,
    /// Why the run failed, when it did.
    #[serde(alias = "reason")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Run {
    pub fn p50_us(&self) -> Option<f64> {
        self.latency_us.and_then(|l| l.p50)
    }

    pub fn p99_us(&self) -> Option<f64> {
        self.latency_us.and_then(|l| l.p99)
    }

    /// Why a run with `ok: false` failed, in a few words.
    pub fn failure(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        if self.timed_out == Some(true) {
            return match self.params.get("timeout_s").and_then(Value::as_f64) {
                Some(t) => format!("timed out after {t} s"),
                None => "timed out".to_owned(),
            };
        }
        if let Some(lost) = self.lost.filter(|&n| n > 0) {
            return format!("lost {lost}");
        }
        if self.pingresp_ok == Some(false) {
            return "some idle connection did not answer PINGREQ".to_owned();
        }
        "the run reported ok = false".to_owned()
    }

    /// Lost messages as a fraction of those expected.
    pub fn loss_fraction(&self) -> Option<f64> {
        match (self.lost, self.expected) {
            (Some(lost), Some(expected)) if expected > 0 => Some(lost as f64 / expected as f64),
            (Some(0), _) => Some(0.0),
            _ => None,
        }
    }
}

/// A line of a JSONL file that is not a run. Reported, not fatal: one stray line must not cost
/// a comparison that took many minutes to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedLine {
    pub line: usize,
    pub problem: String,
}

/// Parses JSON lines; blank lines are ignored, other non-runs are returned as skipped.
pub fn parse_jsonl(text: &str) -> (Vec<Run>, Vec<SkippedLine>) {
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Run>(line) {
            Ok(run) if run.scenario.is_empty() || run.label.is_empty() => {
                skipped.push(SkippedLine {
                    line: i + 1,
                    problem: "no scenario or label".to_owned(),
                })
            }
            Ok(run) => runs.push(run),
            Err(e) => skipped.push(SkippedLine {
                line: i + 1,
                problem: e.to_string(),
            }),
        }
    }
    (runs, skipped)
}

/// The runs a report covers: the last one seen for each (scenario, broker), so that re-running
/// one scenario with `--only` and appending supersedes the earlier figure.
#[derive(Debug, Clone, Default)]
pub struct Results {
    runs: BTreeMap<(String, String), Run>,
}

impl Results {
    pub fn new(runs: impl IntoIterator<Item = Run>) -> Self {
        let mut map = BTreeMap::new();
        for run in runs {
            map.insert((run.scenario.clone(), run.label.clone()), run);
        }
        Results { runs: map }
    }

    pub fn get(&self, scenario: &str, broker: &str) -> Option<&Run> {
        self.runs.get(&(scenario.to_owned(), broker.to_owned()))
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Scenarios present, known ones in [`SCENARIO_ORDER`], then the rest alphabetically.
    pub fn scenarios(&self) -> Vec<String> {
        ordered(self.runs.keys().map(|(s, _)| s.as_str()), SCENARIO_ORDER)
    }

    /// Brokers present, in [`BROKER_ORDER`], then the rest alphabetically.
    pub fn brokers(&self) -> Vec<String> {
        ordered(self.runs.keys().map(|(_, b)| b.as_str()), BROKER_ORDER)
    }

    /// The runs of one scenario in broker order.
    pub fn scenario_runs(&self, scenario: &str) -> Vec<&Run> {
        self.brokers()
            .iter()
            .filter_map(|b| self.get(scenario, b))
            .collect()
    }
}

fn ordered<'a>(names: impl Iterator<Item = &'a str>, order: &[&str]) -> Vec<String> {
    let mut names: Vec<&str> = names.collect();
    names.sort_by_key(|n| (order.iter().position(|o| o == n).unwrap_or(order.len()), *n));
    names.dedup();
    names.into_iter().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runs_and_skips_what_is_not_one() {
        let text = r#"{"scenario":"fan-in","label":"petrel","params":{"qos":0},"sent":10,"expected":10,"received":10,"lost":0,"duration_s":1.0,"sent_per_s":10.0,"delivered_per_s":10.0,"latency_us":{"p50":5,"p99":9,"p999":9,"max":10},"ok":true}

not json
{"scenario":"pairs","label":"rumqttd","ok":false,"error":"timed out after 60 s"}
{"label":"x"}
"#;
        let (runs, skipped) = parse_jsonl(text);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].p99_us(), Some(9.0));
        assert_eq!(runs[1].error.as_deref(), Some("timed out after 60 s"));
        assert_eq!(
            skipped.iter().map(|s| s.line).collect::<Vec<_>>(),
            vec![3, 5]
        );
    }

    #[test]
    fn later_runs_supersede_earlier_ones_and_order_is_fixed() {
        let run = |scenario: &str, label: &str, rate: f64| Run {
            scenario: scenario.into(),
            label: label.into(),
            delivered_per_s: Some(rate),
            ok: true,
            ..Run::default()
        };
        let results = Results::new([
            run("wildcards", "rumqttd", 1.0),
            run("fan-in", "mosquitto", 1.0),
            run("fan-in", "petrel", 1.0),
            run("fan-in", "petrel", 2.0),
        ]);
        assert_eq!(results.scenarios(), ["fan-in", "wildcards"]);
        assert_eq!(results.brokers(), ["petrel", "mosquitto", "rumqttd"]);
        assert_eq!(
            results.get("fan-in", "petrel").unwrap().delivered_per_s,
            Some(2.0)
        );
    }
}
