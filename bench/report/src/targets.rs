//! Each scenario's headline metric and the targets petrel is held to against its peers.
//!
//! A ratio is always petrel's figure over the peer's, whichever way the metric points; whether
//! a ratio meets its target is decided by the condition, which knows the direction.

use crate::run::{Results, Run, SUBJECT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    MessagesPerSecond,
    Microseconds,
    ConnectionsPerSecond,
    Bytes,
    Seconds,
}

/// One figure of a run, by name, with the direction in which it improves.
#[derive(Clone, Copy)]
pub struct Metric {
    /// Short, for table headers and chart titles.
    pub name: &'static str,
    pub unit: Unit,
    pub better: Better,
    pub get: fn(&Run) -> Option<f64>,
    /// The figure means nothing unless every expected message arrived: a replay time measured
    /// to the last of 200 messages is not a replay time for 10,000.
    pub needs_all: bool,
}

impl std::fmt::Debug for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub const DELIVERED: Metric = Metric {
    name: "delivered msg/s",
    unit: Unit::MessagesPerSecond,
    better: Better::Higher,
    get: |r| r.delivered_per_s,
    needs_all: false,
};
pub const P99: Metric = Metric {
    name: "p99 latency",
    unit: Unit::Microseconds,
    better: Better::Lower,
    get: |r| r.p99_us(),
    needs_all: false,
};
pub const CONNECTION_RATE: Metric = Metric {
    name: "connections/s",
    unit: Unit::ConnectionsPerSecond,
    better: Better::Higher,
    get: |r| r.connections_per_s,
    needs_all: false,
};
pub const BYTES_PER_CONNECTION: Metric = Metric {
    name: "broker RSS per idle connection",
    unit: Unit::Bytes,
    better: Better::Lower,
    get: |r| r.rss_per_connection_bytes,
    needs_all: false,
};
pub const RETAINED_SECONDS: Metric = Metric {
    name: "retained replay time",
    unit: Unit::Seconds,
    better: Better::Lower,
    get: |r| r.retained_seconds,
    needs_all: true,
};

/// The figure a scenario is judged and charted by.
pub fn headline(scenario: &str) -> Metric {
    match scenario {
        "latency" => P99,
        "connections" => CONNECTION_RATE,
        "retained" => RETAINED_SECONDS,
        _ => DELIVERED,
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Condition {
    /// petrel's figure is at least `factor` × the peer's.
    AtLeast { peer: &'static str, factor: f64 },
    /// petrel's figure is at most `factor` × the peer's.
    AtMost { peer: &'static str, factor: f64 },
    /// petrel is strictly better than the peer, in the metric's direction.
    Ahead { peer: &'static str },
    /// petrel's run lost no message.
    NoLoss,
    /// petrel's figure is at most `limit`, whatever the peers do.
    AtMostAbsolute { limit: f64 },
}

/// One row of the ratio table.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The row's name: the scenario, or the scenario and the aspect when it has two rows.
    pub row: &'static str,
    pub scenario: &'static str,
    pub metric: Metric,
    pub conditions: &'static [Condition],
    /// The target as the issue states it.
    pub text: &'static str,
}

/// Both durable scenarios are held to the same target.
const DURABLE: &[Condition] = &[
    Condition::AtLeast {
        peer: "mosquitto",
        factor: 3.0,
    },
    Condition::NoLoss,
];
const DURABLE_TEXT: &str = "≥ 3× Mosquitto (persistence on), no loss";

/// The targets petrel is held to.
pub const TARGETS: &[Target] = &[
    Target {
        row: "fan-in",
        scenario: "fan-in",
        metric: DELIVERED,
        conditions: &[
            Condition::AtLeast {
                peer: "rumqttd",
                factor: 1.5,
            },
            Condition::AtLeast {
                peer: "mosquitto",
                factor: 5.0,
            },
        ],
        text: "≥ 1.5× rumqttd and ≥ 5× Mosquitto",
    },
    Target {
        row: "fan-out",
        scenario: "fan-out",
        metric: DELIVERED,
        conditions: &[Condition::AtLeast {
            peer: "rumqttd",
            factor: 1.0,
        }],
        text: "≥ 1.0× rumqttd",
    },
    Target {
        row: "pairs",
        scenario: "pairs",
        metric: DELIVERED,
        conditions: &[
            Condition::AtLeast {
                peer: "rumqttd",
                factor: 1.5,
            },
            Condition::NoLoss,
        ],
        text: "≥ 1.5× rumqttd, no loss",
    },
    Target {
        row: "latency",
        scenario: "latency",
        metric: P99,
        conditions: &[Condition::AtMost {
            peer: "mosquitto",
            factor: 1.0,
        }],
        text: "p99 ≤ Mosquitto's",
    },
    Target {
        row: "connections (rate)",
        scenario: "connections",
        metric: CONNECTION_RATE,
        conditions: &[Condition::AtLeast {
            peer: "mosquitto",
            factor: 1.0,
        }],
        text: "≥ Mosquitto's",
    },
    Target {
        row: "connections (memory)",
        scenario: "connections",
        metric: BYTES_PER_CONNECTION,
        conditions: &[Condition::AtMostAbsolute { limit: 2048.0 }],
        text: "≤ 2 KiB per idle connection",
    },
    Target {
        row: "wildcards",
        scenario: "wildcards",
        metric: DELIVERED,
        conditions: &[
            Condition::Ahead { peer: "mosquitto" },
            Condition::Ahead { peer: "rumqttd" },
        ],
        text: "ahead of both",
    },
    Target {
        row: "retained",
        scenario: "retained",
        metric: RETAINED_SECONDS,
        conditions: &[
            Condition::Ahead { peer: "mosquitto" },
            Condition::Ahead { peer: "rumqttd" },
        ],
        text: "ahead of both",
    },
    Target {
        row: "durable-always",
        scenario: "durable-always",
        metric: DELIVERED,
        conditions: DURABLE,
        text: DURABLE_TEXT,
    },
    Target {
        row: "durable-every-ms",
        scenario: "durable-every-ms",
        metric: DELIVERED,
        conditions: DURABLE,
        text: DURABLE_TEXT,
    },
];

/// What a broker contributed to one metric of one scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Figure {
    Value(f64),
    /// The run failed; the reason, as the generator or `bench/compare` gave it.
    Failed(String),
    /// No run, or the run did not report this metric.
    Missing,
}

impl Figure {
    pub fn of(results: &Results, scenario: &str, broker: &str, metric: Metric) -> Figure {
        match results.get(scenario, broker) {
            None => Figure::Missing,
            Some(run) if !run.ok => Figure::Failed(run.failure()),
            // QoS 0 runs may lose messages and still be ok, but a broker that delivered
            // nothing has no rate to compare.
            Some(run) if run.received == Some(0) && run.expected.unwrap_or(0) > 0 => {
                Figure::Failed(format!(
                    "nothing delivered (0 of {})",
                    crate::format::grouped(run.expected.unwrap_or(0) as f64)
                ))
            }
            Some(run) if metric.needs_all && run.received < run.expected => {
                Figure::Failed(format!(
                    "incomplete: {} of {} delivered",
                    crate::format::grouped(run.received.unwrap_or(0) as f64),
                    crate::format::grouped(run.expected.unwrap_or(0) as f64)
                ))
            }
            Some(run) => (metric.get)(run).map_or(Figure::Missing, Figure::Value),
        }
    }

    pub fn value(&self) -> Option<f64> {
        match self {
            Figure::Value(v) => Some(*v),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Met,
    /// Why not, one reason per condition missed.
    NotMet(Vec<String>),
    /// Some condition could not be judged (a peer failed or was not run), none was missed.
    Unknown(Vec<String>),
}

/// One evaluated row of the ratio table.
#[derive(Debug, Clone)]
pub struct Row {
    pub target: Target,
    pub subject: Figure,
    /// petrel / peer for each peer present in the results, in broker order.
    pub ratios: Vec<(String, Option<f64>)>,
    pub verdict: Verdict,
}

/// Evaluates the targets whose scenario is in the results.
pub fn evaluate(results: &Results) -> Vec<Row> {
    let scenarios = results.scenarios();
    TARGETS
        .iter()
        .filter(|t| scenarios.iter().any(|s| s == t.scenario))
        .map(|t| evaluate_one(results, t))
        .collect()
}

fn evaluate_one(results: &Results, target: &Target) -> Row {
    let subject = Figure::of(results, target.scenario, SUBJECT, target.metric);
    let ratio_to = |peer: &str| {
        let mine = subject.value()?;
        let theirs = Figure::of(results, target.scenario, peer, target.metric).value()?;
        (theirs > 0.0).then(|| mine / theirs)
    };
    let ratios = results
        .brokers()
        .into_iter()
        .filter(|b| b != SUBJECT)
        .map(|peer| {
            let r = ratio_to(&peer);
            (peer, r)
        })
        .collect();

    let verdict = match &subject {
        Figure::Failed(why) => Verdict::NotMet(vec![format!("{SUBJECT} failed: {why}")]),
        Figure::Missing => Verdict::Unknown(vec![format!("no {SUBJECT} figure")]),
        Figure::Value(mine) => {
            let mut missed = Vec::new();
            let mut unknown = Vec::new();
            for condition in target.conditions {
                match judge(results, target, *mine, condition, &ratio_to) {
                    Judgement::Met => {}
                    Judgement::Missed(why) => missed.push(why),
                    Judgement::Unknown(why) => unknown.push(why),
                }
            }
            if !missed.is_empty() {
                Verdict::NotMet(missed)
            } else if !unknown.is_empty() {
                Verdict::Unknown(unknown)
            } else {
                Verdict::Met
            }
        }
    };
    Row {
        target: *target,
        subject,
        ratios,
        verdict,
    }
}

enum Judgement {
    Met,
    Missed(String),
    Unknown(String),
}

fn judge(
    results: &Results,
    target: &Target,
    mine: f64,
    condition: &Condition,
    ratio_to: &dyn Fn(&str) -> Option<f64>,
) -> Judgement {
    let peer_unknown = |peer: &str| {
        let why = match Figure::of(results, target.scenario, peer, target.metric) {
            Figure::Failed(why) => format!("{peer} failed: {why}"),
            _ => format!("no {peer} figure"),
        };
        Judgement::Unknown(why)
    };
    let check = |ok: bool, why: String| {
        if ok {
            Judgement::Met
        } else {
            Judgement::Missed(why)
        }
    };
    match *condition {
        Condition::AtLeast { peer, factor } => match ratio_to(peer) {
            Some(r) => check(r >= factor, format!("{r:.3}× {peer}, target ≥ {factor}×")),
            None => peer_unknown(peer),
        },
        Condition::AtMost { peer, factor } => match ratio_to(peer) {
            Some(r) => check(r <= factor, format!("{r:.3}× {peer}, target ≤ {factor}×")),
            None => peer_unknown(peer),
        },
        Condition::Ahead { peer } => match ratio_to(peer) {
            Some(r) => {
                let ahead = match target.metric.better {
                    Better::Higher => r > 1.0,
                    Better::Lower => r < 1.0,
                };
                check(ahead, format!("{r:.3}× {peer}, not ahead"))
            }
            // Completing the scenario is ahead of failing it.
            None if matches!(
                Figure::of(results, target.scenario, peer, target.metric),
                Figure::Failed(_)
            ) =>
            {
                Judgement::Met
            }
            None => peer_unknown(peer),
        },
        Condition::NoLoss => match results.get(target.scenario, SUBJECT).and_then(|r| r.lost) {
            Some(0) => Judgement::Met,
            Some(n) => Judgement::Missed(format!("{SUBJECT} lost {n}")),
            None => Judgement::Unknown(format!("{SUBJECT} reported no loss count")),
        },
        Condition::AtMostAbsolute { limit } => check(
            mine <= limit,
            format!(
                "{}, target ≤ {}",
                crate::format::value(mine, target.metric.unit),
                crate::format::value(limit, target.metric.unit)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, label: &str, f: impl FnOnce(&mut Run)) -> Run {
        let mut r = Run {
            scenario: scenario.into(),
            label: label.into(),
            ok: true,
            lost: Some(0),
            ..Run::default()
        };
        f(&mut r);
        r
    }

    fn row<'a>(rows: &'a [Row], name: &str) -> &'a Row {
        rows.iter().find(|r| r.target.row == name).unwrap()
    }

    #[test]
    fn ratios_are_judged_in_the_metrics_direction() {
        let results = Results::new([
            run("fan-in", "petrel", |r| r.delivered_per_s = Some(600.0)),
            run("fan-in", "mosquitto", |r| r.delivered_per_s = Some(100.0)),
            run("fan-in", "rumqttd", |r| r.delivered_per_s = Some(500.0)),
            run("latency", "petrel", |r| {
                r.latency_us = Some(crate::run::Latency {
                    p99: Some(90.0),
                    ..Default::default()
                })
            }),
            run("latency", "mosquitto", |r| {
                r.latency_us = Some(crate::run::Latency {
                    p99: Some(100.0),
                    ..Default::default()
                })
            }),
        ]);
        let rows = evaluate(&results);
        let fan_in = row(&rows, "fan-in");
        assert_eq!(
            fan_in.verdict,
            Verdict::NotMet(vec!["1.200× rumqttd, target ≥ 1.5×".into()])
        );
        assert_eq!(fan_in.ratios[0], ("mosquitto".to_owned(), Some(6.0)));
        assert_eq!(row(&rows, "latency").verdict, Verdict::Met);
        assert!(rows.iter().all(|r| r.target.scenario != "pairs"));
    }

    #[test]
    fn failures_decide_the_verdict_without_a_ratio() {
        let results = Results::new([
            run("pairs", "petrel", |r| {
                r.delivered_per_s = Some(300.0);
                r.lost = Some(3);
            }),
            run("pairs", "rumqttd", |r| r.delivered_per_s = Some(100.0)),
            run("wildcards", "petrel", |r| r.delivered_per_s = Some(300.0)),
            run("wildcards", "mosquitto", |r| {
                r.delivered_per_s = Some(100.0)
            }),
            run("wildcards", "rumqttd", |r| {
                r.ok = false;
                r.error = Some("broker exited".into());
            }),
            run("connections", "petrel", |r| {
                r.ok = false;
                r.error = Some("timed out".into());
            }),
            run("retained", "petrel", |r| r.retained_seconds = Some(0.5)),
            run("retained", "mosquitto", |r| r.retained_seconds = Some(0.8)),
            // QoS 0 loss does not fail a run, but a replay cut short is no replay time.
            run("retained", "rumqttd", |r| {
                r.retained_seconds = Some(0.04);
                r.expected = Some(10_000);
                r.received = Some(200);
                r.lost = Some(9_800);
            }),
            run("fan-in", "petrel", |r| r.delivered_per_s = Some(300.0)),
            run("fan-in", "rumqttd", |r| {
                r.delivered_per_s = Some(0.0);
                r.expected = Some(7_500);
                r.received = Some(0);
            }),
            run("fan-out", "petrel", |r| r.delivered_per_s = Some(300.0)),
            run("fan-out", "mosquitto", |r| r.delivered_per_s = Some(100.0)),
        ]);
        let rows = evaluate(&results);
        assert_eq!(
            row(&rows, "pairs").verdict,
            Verdict::NotMet(vec!["petrel lost 3".into()])
        );
        // Completing the scenario is ahead of a peer that failed it.
        assert_eq!(row(&rows, "wildcards").verdict, Verdict::Met);
        assert_eq!(
            row(&rows, "connections (memory)").verdict,
            Verdict::NotMet(vec!["petrel failed: timed out".into()])
        );
        let retained = row(&rows, "retained");
        assert_eq!(
            Figure::of(&results, "retained", "rumqttd", RETAINED_SECONDS),
            Figure::Failed("incomplete: 200 of 10,000 delivered".into())
        );
        assert_eq!(retained.verdict, Verdict::Met);
        assert_eq!(retained.ratios[0], ("mosquitto".to_owned(), Some(0.625)));
        assert_eq!(
            Figure::of(&results, "fan-in", "rumqttd", DELIVERED),
            Figure::Failed("nothing delivered (0 of 7,500)".into())
        );
        assert_eq!(
            row(&rows, "fan-in").verdict,
            Verdict::Unknown(vec![
                "rumqttd failed: nothing delivered (0 of 7,500)".into(),
                "no mosquitto figure".into()
            ])
        );
        // A peer that was not run leaves the target open.
        assert_eq!(
            row(&rows, "fan-out").verdict,
            Verdict::Unknown(vec!["no rumqttd figure".into()])
        );
    }
}
