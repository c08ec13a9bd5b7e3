//! Idle connections: how fast a broker accepts N clients, what they cost it in resident memory,
//! and whether every one of them still answers.
//!
//! ```text
//! connect  C workers take the next index until N: TCP connect, CONNECT (keepalive 600),
//!          CONNACK; keep only the socket              → connections_per_s, latency_us
//! memory   broker VmRSS before the first connect and after the last one has settled
//!                                                      → rss_per_connection_bytes
//! ping     each worker writes PINGREQ on all its sockets, then reads every PINGRESP
//!                                                      → pingresp_ok
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use petrel_codec::{decode, Disconnect, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{await_close, bounded, Conn, MAX_INBOUND};
use crate::error::BenchError;
use crate::flow::KEEP_ALIVE;
use crate::placement::Role;
use crate::report::{per_second, Latency, Report};
use crate::subscriber::new_histogram;
use crate::template::encode_once;
use crate::{sys, RunCtx};

use super::at_least_one;

/// Pause between the last CONNACK and the second RSS reading, so allocator work the connect
/// burst left behind (petrel's jemalloc returns idle pages after about a second) is done.
const SETTLE: Duration = Duration::from_secs(2);

/// Each RSS reading waits until two readings this far apart agree to within 1 % (at most
/// [`STABLE_TRIES`] times): a broker still releasing the previous run's connections would
/// otherwise inflate the "before" figure of back-to-back runs.
const STABLE_GAP: Duration = Duration::from_millis(500);
const STABLE_TRIES: u32 = 10;

pub async fn run(
    ctx: &Arc<RunCtx>,
    connections: u32,
    concurrency: u32,
    broker_pid: Option<u32>,
    report: &mut Report,
) {
    // Every client must connect and answer, whatever the QoS.
    report.loss_allowed = false;
    if let Err(e) = measure(ctx, connections, concurrency, broker_pid, report).await {
        report.fail(e);
    }
}

struct Worker {
    streams: Vec<TcpStream>,
    connect_ns: Histogram<u64>,
    failures: u32,
    first_error: Option<BenchError>,
    last_ns: u64,
}

async fn measure(
    ctx: &Arc<RunCtx>,
    n: u32,
    c: u32,
    broker_pid: Option<u32>,
    report: &mut Report,
) -> Result<(), BenchError> {
    at_least_one("--connections", n)?;
    at_least_one("--concurrency", c)?;
    sys::ensure_fds(u64::from(n))?;
    report.expected = u64::from(n);
    report.sent = u64::from(n);
    let rss_before = match broker_pid {
        Some(pid) => Some(stable_rss(pid).await?),
        None => None,
    };
    report.rss_before_kib = rss_before;

    ctx.progress.phase("connected", u64::from(n));
    let next = Arc::new(AtomicU32::new(0));
    let started_ns = ctx.now_ns();
    let tasks: Vec<_> = (0..c.min(n))
        .map(|_| tokio::spawn(connect_worker(ctx.clone(), next.clone(), n)))
        .collect();
    let mut workers = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(w) => workers.push(w),
            Err(e) => report.fail(BenchError::Usage(format!("connect worker failed: {e}"))),
        }
    }
    let ended_ns = workers
        .iter()
        .map(|w| w.last_ns)
        .max()
        .unwrap_or(started_ns);
    let connected: u64 = workers.iter().map(|w| w.streams.len() as u64).sum();
    let failures: u32 = workers.iter().map(|w| w.failures).sum();
    let connect_ns = ended_ns.saturating_sub(started_ns);
    report.received = connected;
    report.duration_s = connect_ns as f64 / 1e9;
    report.sent_per_s = per_second(u64::from(n), connect_ns);
    report.delivered_per_s = per_second(connected, connect_ns);
    report.connections_per_s = Some(report.delivered_per_s);
    let mut hist = new_histogram();
    let mut first_error = None;
    for w in &mut workers {
        let _ = hist.add(&w.connect_ns);
        if first_error.is_none() {
            first_error = w.first_error.take();
        }
    }
    match first_error {
        Some(e @ BenchError::Timeout { .. }) => report.fail(e),
        Some(e) => report.fail(BenchError::Usage(format!(
            "{failures} of {n} connections failed; first: {e}"
        ))),
        None => {}
    }
    report.latency_us = Latency::from_ns(&hist);

    if let (Some(pid), Some(before)) = (broker_pid, rss_before) {
        tokio::time::sleep(SETTLE).await;
        let after = stable_rss(pid).await?;
        report.rss_after_kib = Some(after);
        if connected > 0 {
            report.rss_per_connection_bytes =
                Some(after.saturating_sub(before) as f64 * 1024.0 / connected as f64);
        }
    }

    ctx.progress.phase("PINGRESP", connected);
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(ping_all(ctx.clone(), w.streams)))
        .collect();
    let mut answered = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(k)) => answered += k,
            Ok(Err(e)) => report.fail(e),
            Err(e) => report.fail(BenchError::Usage(format!("ping worker failed: {e}"))),
        }
    }
    report.pingresp_ok = Some(answered == connected && connected == u64::from(n));
    Ok(())
}

/// The broker's VmRSS once it has stopped moving (see [`STABLE_GAP`]).
async fn stable_rss(pid: u32) -> Result<u64, BenchError> {
    let mut last = sys::vm_rss_kib(pid)?;
    for _ in 0..STABLE_TRIES {
        tokio::time::sleep(STABLE_GAP).await;
        let now = sys::vm_rss_kib(pid)?;
        if now.abs_diff(last) <= last / 100 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

async fn connect_worker(ctx: Arc<RunCtx>, next: Arc<AtomicU32>, n: u32) -> Worker {
    let mut w = Worker {
        streams: Vec::new(),
        connect_ns: new_histogram(),
        failures: 0,
        first_error: None,
        last_ns: ctx.now_ns(),
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let begun = ctx.now_ns();
        let addr = ctx.broker(Role::Subscriber, i);
        match Conn::open(&ctx, addr, &ctx.client_id("c", i), KEEP_ALIVE).await {
            Ok(conn) => {
                w.last_ns = ctx.now_ns();
                let _ = w
                    .connect_ns
                    .record(w.last_ns.saturating_sub(begun).max(1_000));
                // Only the socket stays: an idle client should cost the broker, not us.
                w.streams.push(conn.into_parts().0);
                ctx.progress.add(1);
            }
            Err(e) => {
                w.failures += 1;
                let timed_out = matches!(e, BenchError::Timeout { .. });
                w.first_error.get_or_insert(e);
                if timed_out {
                    // Count the rest as failed too; the deadline has passed for all of them.
                    let rest = n.saturating_sub(next.swap(n, Ordering::Relaxed));
                    w.failures += rest;
                    break;
                }
            }
        }
    }
    w
}

/// PINGREQ on every socket first, then one PINGRESP from each; returns how many answered.
/// Each socket then gets a DISCONNECT and is closed once the broker has closed it.
async fn ping_all(ctx: Arc<RunCtx>, mut streams: Vec<TcpStream>) -> Result<u64, BenchError> {
    let ping = encode_once(&Packet::PingReq, ctx.version)?;
    let bye = encode_once(&Packet::Disconnect(Disconnect::default()), ctx.version)?;
    for s in &mut streams {
        bounded(&ctx, "PINGREQ", s.write_all(&ping))
            .await?
            .map_err(|e| BenchError::io("writing PINGREQ", e))?;
    }
    let mut answered = 0;
    let mut buf = BytesMut::with_capacity(64);
    for s in &mut streams {
        buf.clear();
        let ok = loop {
            match decode(&mut buf, ctx.version, MAX_INBOUND) {
                Ok(Some(Packet::PingResp)) => break true,
                Ok(Some(_)) | Err(_) => break false,
                Ok(None) => {}
            }
            match bounded(&ctx, "PINGRESP", s.read_buf(&mut buf)).await? {
                Ok(0) | Err(_) => break false,
                Ok(_) => {}
            }
        };
        if ok {
            answered += 1;
            ctx.progress.add(1);
        }
    }
    // Every DISCONNECT first, then wait for the broker to close each connection (see
    // conn::await_close for why the broker should close first).
    for s in &mut streams {
        let _ = s.try_write(&bye);
    }
    for s in &mut streams {
        await_close(s).await;
    }
    Ok(answered)
}
