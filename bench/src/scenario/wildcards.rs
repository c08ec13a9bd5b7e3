//! Many subscriptions of three kinds over few connections, and one publisher whose topics each
//! match a known set of them, so the expected delivery count is exact.
//!
//! Subscription i (of N) belongs to connection i % K and is, by i % 3:
//!
//! ```text
//! 0  exact     P/w/{i}/x
//! 1  one-level P/w/+/y{i}
//! 2  multi     P/w/{i}/#
//! ```
//!
//! With G = N / 3 groups (3g, 3g+1, 3g+2), the publisher cycles over 2G topics (fewer if M is
//! smaller): topic 2g is `P/w/{3g}/x`, matched only by the exact filter 3g; topic 2g+1 is
//! `P/w/{3g+2}/y{3g+1}`, matched by the `+` filter 3g+1 and the `#` filter 3g+2 and nothing
//! else. A connection gets one copy of a message however many of its filters match (what
//! petrel does, and what 3.1.1 and 5.0 allow); a broker that sends one copy per matching filter
//! instead shows up as `duplicates` when K < 2.

use std::sync::Arc;

use serde_json::json;

use crate::error::BenchError;
use crate::flow::{PublisherSpec, SubscriberSpec};
use crate::placement::Role;
use crate::publisher::PublisherPlan;
use crate::report::Report;
use crate::template::PublishTemplate;
use crate::RunCtx;

use super::{at_least_one, sub_plan};

pub async fn run(
    ctx: &Arc<RunCtx>,
    subscriptions: u32,
    subscribers: u32,
    messages: u32,
    report: &mut Report,
) {
    let plan = match plan(ctx, subscriptions, subscribers, messages, report) {
        Ok(p) => p,
        Err(e) => return report.fail(e),
    };
    super::pubsub::run(ctx, Ok(plan), report).await;
}

fn plan(
    ctx: &RunCtx,
    subscriptions: u32,
    subscribers: u32,
    messages: u32,
    report: &mut Report,
) -> Result<(Vec<SubscriberSpec>, Vec<PublisherSpec>), BenchError> {
    if subscriptions < 3 {
        return Err(BenchError::Usage(
            "--subscriptions must be at least 3 (one of each kind)".into(),
        ));
    }
    at_least_one("--subscribers", subscribers)?;
    at_least_one("--messages", messages)?;
    let groups = subscriptions / 3;
    let topics = (2 * groups).min(messages);

    let mut filters = vec![Vec::new(); subscribers as usize];
    for i in 0..subscriptions {
        filters[(i % subscribers) as usize].push(ctx.topic(&filter(i)));
    }

    // Message m goes to topic m % topics; count how often each topic is used, then credit each
    // connection holding one of its matching filters once.
    let mut expected = vec![0u64; subscribers as usize];
    let mut matches = 0u64;
    let mut templates = Vec::with_capacity(topics as usize);
    for t in 0..topics {
        let uses = u64::from(messages / topics + u32::from(t < messages % topics));
        let (name, matched) = topic(t);
        matches += uses * matched.len() as u64;
        let mut conns: Vec<u32> = matched.iter().map(|i| i % subscribers).collect();
        conns.sort_unstable();
        conns.dedup();
        for c in conns {
            expected[c as usize] += uses;
        }
        templates.push(PublishTemplate::new(
            &ctx.topic(&name),
            ctx.qos,
            false,
            ctx.payload,
            ctx.version,
        )?);
    }
    report.param("topics", json!(topics));
    report.param("matching_subscriptions", json!(matches));

    let subs = filters
        .into_iter()
        .zip(expected)
        .enumerate()
        .map(|(k, (filters, expected))| SubscriberSpec {
            name: ctx.client_id("sub", k as u32),
            addr: ctx.broker(Role::Subscriber, k as u32),
            filters,
            plan: sub_plan(0, 1, messages, expected),
        })
        .collect();
    let pubs = vec![PublisherSpec {
        name: ctx.client_id("pub", 0),
        addr: ctx.broker(Role::Publisher, 0),
        plan: PublisherPlan {
            id: 0,
            templates: Arc::from(templates),
            count: messages,
            qos: ctx.qos,
            inflight: ctx.inflight,
            pace: None,
            progress: false,
        },
    }];
    Ok((subs, pubs))
}

/// Subscription i's filter, below the run's prefix.
fn filter(i: u32) -> String {
    match i % 3 {
        0 => format!("w/{i}/x"),
        1 => format!("w/+/y{i}"),
        _ => format!("w/{i}/#"),
    }
}

/// Topic t, below the run's prefix, and the subscriptions that match it (ascending).
fn topic(t: u32) -> (String, Vec<u32>) {
    let g = t / 2;
    if t.is_multiple_of(2) {
        (format!("w/{}/x", 3 * g), vec![3 * g])
    } else {
        (
            format!("w/{}/y{}", 3 * g + 2, 3 * g + 1),
            vec![3 * g + 1, 3 * g + 2],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MQTT matching (§4.7) for the shapes used here, written plainly.
    fn matches(filter: &str, topic: &str) -> bool {
        let (mut f, mut t) = (filter.split('/'), topic.split('/'));
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn each_topic_matches_exactly_the_subscriptions_it_names() {
        let n = 300;
        for t in 0..2 * (n / 3) {
            let (name, want) = topic(t);
            let got: Vec<u32> = (0..n).filter(|&i| matches(&filter(i), &name)).collect();
            assert_eq!(got, want, "topic {name}");
        }
    }
}
