//! A measured publish/subscribe flow, whatever its shape: connect and subscribe every
//! subscriber, connect every publisher, start them all together, wait for the publishers, tell
//! the subscribers, wait for them, and fold their counters into the report.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::conn::Conn;
use crate::error::BenchError;
use crate::publisher::{self, PubStats, PublisherPlan};
use crate::report::{per_second, Latency, Report};
use crate::subscriber::{self, new_histogram, SubStats, SubscriberPlan};
use crate::RunCtx;

pub struct SubscriberSpec {
    pub name: String,
    /// The broker it connects to (`RunCtx::broker`).
    pub addr: SocketAddr,
    /// Subscribed (in batches) before the clock starts.
    pub filters: Vec<String>,
    pub plan: SubscriberPlan,
}

pub struct PublisherSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub plan: PublisherPlan,
}

/// Keep-alive of the measured clients: long enough never to matter during a run, and short
/// enough that a broker must still keep a timer for each of them.
pub const KEEP_ALIVE: u16 = 600;

pub struct FlowOutcome {
    pub pubs: Vec<PubStats>,
    pub subs: Vec<SubStats>,
    pub expected: u64,
}

/// Runs the flow. Setup failures (a refused CONNECT or SUBSCRIBE) go into the report and give
/// `None`; failures while measuring are in the stats.
pub async fn run(
    ctx: &Arc<RunCtx>,
    subs: Vec<SubscriberSpec>,
    pubs: Vec<PublisherSpec>,
    report: &mut Report,
) -> Option<FlowOutcome> {
    let done = Arc::new(AtomicBool::new(false));
    let expected: u64 = subs.iter().map(|s| s.plan.expected).sum();

    ctx.progress
        .phase("connecting", (subs.len() + pubs.len()) as u64);
    let setup_start = ctx.now_ns();
    let sub_conns = collect(subs.iter().map(|s| {
        let ctx = ctx.clone();
        let (name, addr) = (s.name.clone(), s.addr);
        let filters = s.filters.clone();
        tokio::spawn(async move {
            let mut conn = Conn::open(&ctx, addr, &name, KEEP_ALIVE).await?;
            conn.subscribe(&ctx, &filters, ctx.qos).await?;
            ctx.progress.add(1);
            Ok(conn)
        })
    }))
    .await;
    report.subscribe_seconds = Some(ctx.now_ns().saturating_sub(setup_start) as f64 / 1e9);
    let sub_conns = match (sub_conns, &ctx.before_publish) {
        (Ok(conns), Some(command)) => before_publish(ctx, command).await.map(|()| conns),
        (other, _) => other,
    };
    let pub_conns = collect(pubs.iter().map(|p| {
        let ctx = ctx.clone();
        let (name, addr) = (p.name.clone(), p.addr);
        tokio::spawn(async move {
            let conn = Conn::open(&ctx, addr, &name, KEEP_ALIVE).await?;
            ctx.progress.add(1);
            Ok(conn)
        })
    }))
    .await;
    let (sub_conns, pub_conns) = match (sub_conns, pub_conns) {
        (Ok(s), Ok(p)) => (s, p),
        (Err(e), _) | (_, Err(e)) => {
            report.fail(e);
            return None;
        }
    };

    ctx.progress.phase("delivered", expected);
    // Paced publishers share one schedule that starts now.
    let t0_ns = ctx.now_ns();
    let mut sub_tasks = Vec::with_capacity(sub_conns.len());
    for (spec, conn) in subs.into_iter().zip(sub_conns) {
        let mut plan = spec.plan;
        plan.publishers_done = done.clone();
        sub_tasks.push(tokio::spawn(subscriber::run(ctx.clone(), conn, plan)));
    }
    let mut pub_tasks = Vec::with_capacity(pub_conns.len());
    for (spec, conn) in pubs.into_iter().zip(pub_conns) {
        let mut plan = spec.plan;
        if let Some(pace) = &mut plan.pace {
            pace.t0_ns = t0_ns;
        }
        pub_tasks.push(tokio::spawn(publisher::run(ctx.clone(), conn, plan)));
    }
    let mut outcome = FlowOutcome {
        pubs: Vec::with_capacity(pub_tasks.len()),
        subs: Vec::with_capacity(sub_tasks.len()),
        expected,
    };
    for t in pub_tasks {
        match t.await {
            Ok(stats) => outcome.pubs.push(stats),
            Err(e) => report.fail(BenchError::Usage(format!("publisher task failed: {e}"))),
        }
    }
    done.store(true, Ordering::Release);
    for t in sub_tasks {
        match t.await {
            Ok(stats) => outcome.subs.push(stats),
            Err(e) => report.fail(BenchError::Usage(format!("subscriber task failed: {e}"))),
        }
    }
    Some(outcome)
}

/// Runs the `--before-publish` command through `sh -c` and waits for it, no later than the
/// run's deadline (then it is killed). The subscribers' connections sit idle meanwhile.
async fn before_publish(ctx: &RunCtx, command: &str) -> Result<(), BenchError> {
    /// How often the command's exit is checked: a blocking wait would stall a current-thread
    /// runtime, and the command's own polling is far coarser than this.
    const POLL: std::time::Duration = std::time::Duration::from_millis(20);
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        // Standard output is the report's (--json).
        .stdout(std::io::stderr())
        .spawn()
        .map_err(|e| BenchError::Hook(format!("starting sh: {e}")))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(BenchError::Hook(format!("exited with {status}"))),
            Ok(None) if tokio::time::Instant::now() >= ctx.deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Timeout {
                    what: "--before-publish".into(),
                });
            }
            Ok(None) => tokio::time::sleep(POLL).await,
            Err(e) => return Err(BenchError::Hook(format!("waiting for it: {e}"))),
        }
    }
}

/// Awaits every task; the first failure wins, the rest are dropped with their connections.
async fn collect<T>(
    tasks: impl Iterator<Item = JoinHandle<Result<T, BenchError>>>,
) -> Result<Vec<T>, BenchError> {
    let tasks: Vec<_> = tasks.collect();
    let mut out = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(BenchError::Usage(format!("setup task failed: {e}")));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

impl FlowOutcome {
    /// Folds every task's counters into the report.
    pub fn fill(&self, report: &mut Report) {
        report.expected = self.expected;
        report.sent = self.pubs.iter().map(|p| p.sent).sum();
        report.rejected = self.pubs.iter().map(|p| p.rejected).sum();
        report.received = self.subs.iter().map(|s| s.received).sum();
        report.duplicates = self.subs.iter().map(|s| s.duplicates).sum();
        report.unexpected = self.subs.iter().map(|s| s.unexpected).sum();
        report.timed_out |= self.pubs.iter().any(|p| p.timed_out);
        report.timed_out |= self.subs.iter().any(|s| s.timed_out);
        let errors = self.pubs.iter().map(|p| &p.error);
        let errors = errors.chain(self.subs.iter().map(|s| &s.error));
        if let Some(e) = errors.flatten().next() {
            report.error.get_or_insert_with(|| e.clone());
        }

        let first_send = self.pubs.iter().filter_map(|p| p.first_send_ns).min();
        let last_rx = self.subs.iter().filter_map(|s| s.last_rx_ns).max();
        let pub_end = self.pubs.iter().map(|p| p.end_ns).max().unwrap_or(0);
        if let Some(first) = first_send {
            let publish_ns = pub_end.saturating_sub(first);
            report.sent_per_s = per_second(report.sent, publish_ns);
            if let Some(last) = last_rx {
                let ns = last.saturating_sub(first);
                report.duration_s = ns as f64 / 1e9;
                report.delivered_per_s = per_second(report.received, ns);
            }
        }
        let mut all = new_histogram();
        for s in &self.subs {
            let _ = all.add(&s.latency);
        }
        report.latency_us = Latency::from_ns(&all);
    }
}
