//! Retained messages: store N on distinct topics, then time their replay to one new `#`
//! subscriber.
//!
//! ```text
//! store    publisher ── N × PUBLISH QoS 1 retain, P/r/{i} ──▶ broker   (every PUBACK awaited)
//! replay   subscriber ── SUBSCRIBE P/r/# ──▶ broker ── N retained PUBLISH ──▶ subscriber
//!          retained_seconds = SUBSCRIBE written → last of the N received
//! clean    publisher ── N × empty retained PUBLISH QoS 1 ──▶ broker   (not timed)
//! ```
//!
//! Storing uses QoS 1 whatever `--qos` says, so every message is known to be stored before the
//! replay starts; `--qos` is the subscription's. The clean-up keeps repeated runs from piling
//! retained messages up in the broker under test.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use petrel_codec::{Packet, QoS};

use crate::conn::Conn;
use crate::error::BenchError;
use crate::flow::KEEP_ALIVE;
use crate::placement::Role;
use crate::publisher::{self, PubStats, PublisherPlan};
use crate::report::{per_second, Report};
use crate::subscriber;
use crate::template::{encode_once, PublishTemplate};
use crate::RunCtx;

use super::{at_least_one, sub_plan};

pub async fn run(ctx: &Arc<RunCtx>, retained: u32, report: &mut Report) {
    if let Err(e) = measure(ctx, retained, report).await {
        report.fail(e);
    }
}

async fn measure(ctx: &Arc<RunCtx>, n: u32, report: &mut Report) -> Result<(), BenchError> {
    at_least_one("--retained", n)?;
    report.expected = u64::from(n);
    let topics: Vec<String> = (0..n).map(|i| ctx.topic(&format!("r/{i}"))).collect();

    ctx.progress.phase("storing", u64::from(n));
    let stored = publish_retained(ctx, &topics, ctx.payload, "store").await?;
    report.sent = stored.sent;
    report.rejected = stored.rejected;
    let first_send = stored.first_send_ns.unwrap_or(stored.end_ns);
    report.sent_per_s = per_second(stored.sent, stored.end_ns.saturating_sub(first_send));
    check(&stored)?;

    ctx.progress.phase("replayed", u64::from(n));
    let conn = Conn::open(
        ctx,
        ctx.broker(Role::Subscriber, 0),
        &ctx.client_id("sub", 0),
        KEEP_ALIVE,
    )
    .await?;
    let mut subscribe =
        crate::conn::subscribe_packets(&[ctx.topic("r/#")], ctx.qos, conn.max_packet)?;
    let Some(subscribe) = subscribe.pop() else {
        return Err(BenchError::Usage("no filter to subscribe to".into()));
    };
    let mut plan = sub_plan(0, 1, n, u64::from(n));
    plan.retained_only = true;
    plan.initial = encode_once(&Packet::Subscribe(subscribe), ctx.version)?;
    // Nothing more will be published: the drain rule applies from the start.
    plan.publishers_done = Arc::new(AtomicBool::new(true));
    let subscribed_ns = ctx.now_ns();
    let replay = subscriber::run(ctx.clone(), conn, plan).await;
    report.received = replay.received;
    report.duplicates = replay.duplicates;
    report.unexpected = replay.unexpected;
    report.timed_out |= replay.timed_out;
    if let Some(e) = &replay.error {
        report.error.get_or_insert_with(|| e.clone());
    }
    if let Some(last) = replay.last_rx_ns {
        let ns = last.saturating_sub(subscribed_ns);
        report.retained_seconds = Some(ns as f64 / 1e9);
        report.duration_s = ns as f64 / 1e9;
        report.delivered_per_s = per_second(replay.received, ns);
    }

    if !report.timed_out {
        ctx.progress.phase("cleaning", u64::from(n));
        let cleaned = publish_retained(ctx, &topics, 0, "clean").await?;
        check(&cleaned)?;
    }
    Ok(())
}

/// Publishes one retained QoS 1 message per topic and waits for every PUBACK.
async fn publish_retained(
    ctx: &Arc<RunCtx>,
    topics: &[String],
    payload: usize,
    role: &str,
) -> Result<PubStats, BenchError> {
    let templates = topics
        .iter()
        .map(|t| PublishTemplate::new(t, QoS::AtLeastOnce, true, payload, ctx.version))
        .collect::<Result<Vec<_>, _>>()?;
    let conn = Conn::open(
        ctx,
        ctx.broker(Role::Publisher, 0),
        &ctx.client_id(role, 0),
        KEEP_ALIVE,
    )
    .await?;
    let plan = PublisherPlan {
        id: 0,
        templates: Arc::from(templates),
        count: topics.len() as u32,
        qos: QoS::AtLeastOnce,
        inflight: ctx.inflight,
        pace: None,
        progress: true,
    };
    Ok(publisher::run(ctx.clone(), conn, plan).await)
}

fn check(stats: &PubStats) -> Result<(), BenchError> {
    if stats.timed_out {
        return Err(BenchError::Timeout {
            what: "storing retained messages".into(),
        });
    }
    if let Some(e) = &stats.error {
        return Err(BenchError::Usage(e.clone()));
    }
    if stats.rejected > 0 {
        return Err(BenchError::Usage(format!(
            "broker refused {} retained messages",
            stats.rejected
        )));
    }
    Ok(())
}
