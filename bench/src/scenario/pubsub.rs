//! The four plain publish/subscribe shapes. Each is a plan for flow.rs: who subscribes to
//! what, who publishes how much, and therefore how many deliveries each subscriber expects.
//!
//! ```text
//! fan-in    P publishers ──▶ topic ──▶ 1 subscriber          expected P × M
//! fan-out   1 publisher  ──▶ topic ──▶ S subscribers         expected S × M
//! pairs     publisher i  ──▶ topic i ──▶ subscriber i        expected N × M
//! latency   P publishers, paced to R msg/s in total ──▶ 1 subscriber, expected R × seconds
//! ```
//!
//! Over several brokers, subscriber i and publisher i are placed by placement.rs.

use std::sync::Arc;
use std::time::Duration;

use crate::error::BenchError;
use crate::flow::{self, PublisherSpec, SubscriberSpec};
use crate::placement::Role;
use crate::publisher::{Pace, PublisherPlan};
use crate::report::Report;
use crate::template::PublishTemplate;
use crate::RunCtx;

use super::{at_least_one, sub_plan};

pub async fn fan_in(ctx: &Arc<RunCtx>, publishers: u32, messages: u32, report: &mut Report) {
    let plan = || -> Result<_, BenchError> {
        at_least_one("--publishers", publishers)?;
        at_least_one("--messages", messages)?;
        let topic = ctx.topic("fan-in");
        let templates = templates(ctx, &topic)?;
        let expected = u64::from(publishers) * u64::from(messages);
        let subs = vec![SubscriberSpec {
            name: ctx.client_id("sub", 0),
            addr: ctx.broker(Role::Subscriber, 0),
            filters: vec![topic],
            plan: sub_plan(0, publishers, messages, expected),
        }];
        let pubs = (0..publishers)
            .map(|i| publisher(ctx, i, &templates, messages, None))
            .collect();
        Ok((subs, pubs))
    };
    run(ctx, plan(), report).await;
}

pub async fn fan_out(ctx: &Arc<RunCtx>, subscribers: u32, messages: u32, report: &mut Report) {
    let plan = || -> Result<_, BenchError> {
        at_least_one("--subscribers", subscribers)?;
        at_least_one("--messages", messages)?;
        let topic = ctx.topic("fan-out");
        let templates = templates(ctx, &topic)?;
        let subs = (0..subscribers)
            .map(|i| SubscriberSpec {
                name: ctx.client_id("sub", i),
                addr: ctx.broker(Role::Subscriber, i),
                filters: vec![topic.clone()],
                plan: sub_plan(0, 1, messages, u64::from(messages)),
            })
            .collect();
        let pubs = vec![publisher(ctx, 0, &templates, messages, None)];
        Ok((subs, pubs))
    };
    run(ctx, plan(), report).await;
}

pub async fn pairs(ctx: &Arc<RunCtx>, pairs: u32, messages: u32, report: &mut Report) {
    let plan = || -> Result<_, BenchError> {
        at_least_one("--pairs", pairs)?;
        at_least_one("--messages", messages)?;
        let mut subs = Vec::with_capacity(pairs as usize);
        let mut pubs = Vec::with_capacity(pairs as usize);
        for i in 0..pairs {
            let topic = ctx.topic(&format!("pair/{i}"));
            let templates = templates(ctx, &topic)?;
            subs.push(SubscriberSpec {
                name: ctx.client_id("sub", i),
                addr: ctx.broker(Role::Subscriber, i),
                filters: vec![topic],
                plan: sub_plan(i, 1, messages, u64::from(messages)),
            });
            pubs.push(publisher(ctx, i, &templates, messages, None));
        }
        Ok((subs, pubs))
    };
    run(ctx, plan(), report).await;
}

pub async fn latency(
    ctx: &Arc<RunCtx>,
    rate: u32,
    duration: Duration,
    publishers: u32,
    report: &mut Report,
) {
    let plan = || -> Result<_, BenchError> {
        at_least_one("--rate", rate)?;
        at_least_one("--publishers", publishers)?;
        let total = u128::from(rate) * duration.as_nanos() / 1_000_000_000;
        let total = u32::try_from(total)
            .map_err(|_| BenchError::Usage("--rate × --duration exceeds 2^32 messages".into()))?;
        if total == 0 {
            return Err(BenchError::Usage(
                "--rate × --duration is less than one message".into(),
            ));
        }
        let topic = ctx.topic("latency");
        let templates = templates(ctx, &topic)?;
        // The run's j-th message goes to publisher j % P, so publisher p sends every P-th one.
        let count = |p: u32| (total.saturating_sub(p)).div_ceil(publishers);
        let subs = vec![SubscriberSpec {
            name: ctx.client_id("sub", 0),
            addr: ctx.broker(Role::Subscriber, 0),
            filters: vec![topic],
            plan: sub_plan(0, publishers, count(0), u64::from(total)),
        }];
        let pubs = (0..publishers)
            .map(|p| {
                let pace = Pace {
                    t0_ns: 0,
                    rate: u64::from(rate),
                    stride: publishers,
                    offset: p,
                };
                publisher(ctx, p, &templates, count(p), Some(pace))
            })
            .collect();
        Ok((subs, pubs))
    };
    run(ctx, plan(), report).await;
}

fn templates(ctx: &RunCtx, topic: &str) -> Result<Arc<[PublishTemplate]>, BenchError> {
    let t = PublishTemplate::new(topic, ctx.qos, false, ctx.payload, ctx.version)?;
    Ok(Arc::from(vec![t]))
}

fn publisher(
    ctx: &RunCtx,
    id: u32,
    templates: &Arc<[PublishTemplate]>,
    count: u32,
    pace: Option<Pace>,
) -> PublisherSpec {
    PublisherSpec {
        name: ctx.client_id("pub", id),
        addr: ctx.broker(Role::Publisher, id),
        plan: PublisherPlan {
            id,
            templates: templates.clone(),
            count,
            qos: ctx.qos,
            inflight: ctx.inflight,
            pace,
            progress: false,
        },
    }
}

pub(crate) type Plans = (Vec<SubscriberSpec>, Vec<PublisherSpec>);

pub(crate) async fn run(ctx: &Arc<RunCtx>, plan: Result<Plans, BenchError>, report: &mut Report) {
    let (subs, pubs) = match plan {
        Ok(p) => p,
        Err(e) => return report.fail(e),
    };
    if let Some(outcome) = flow::run(ctx, subs, pubs, report).await {
        outcome.fill(report);
    }
}
