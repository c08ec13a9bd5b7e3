//! Soak (issue 9): minutes of mixed load against the real `petrel` binary with the disk store,
//! the broker's resident memory and gauges sampled all along. What a user counts on from a
//! broker left running under load:
//!
//! - it keeps serving and never panics, and stops cleanly at the end;
//! - every QoS 1/2 message it acknowledged reaches each subscriber that stayed connected: QoS 2
//!   exactly once, QoS 1 at least once, no gaps; QoS 0 at most once;
//! - the will of every client that vanished is published, none of a client that said goodbye;
//! - offline sessions expire on time, resumed ones come back with their session, and the
//!   retained store ends as its publisher left it;
//! - it does not grow without bound: resident memory shows no upward trend after warm-up, and
//!   its gauges, sessions and sockets come back to what is really there once the churn stops.
//!
//! The load, all on loopback and paced (not flat out, so a 2-core machine shared with a
//! compiler keeps up): three steady publishers (QoS 0, 1, 2, 50 msg/s each) to three steady
//! subscribers (3.1.1 and 5.0, clean and persistent); a retainer that sets and clears retained
//! messages on a rotating set of topics; a will watcher; and churners that connect, subscribe,
//! publish a little and leave, cleanly or by dropping the socket, with wills, with sessions
//! that expire after a few seconds, and with 3.1.1 persistent sessions that come back.
//!
//! `PETREL_SOAK_SECS` sets the duration (default 60 s, the CI run); `bench/soak.sh` runs it for
//! 30 minutes in release. The samples go to `target/test-artifacts/soak.csv`.

#[path = "soak/client.rs"]
mod client;
#[path = "soak/load.rs"]
mod load;
#[path = "soak/samples.rs"]
mod samples;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::{Client, Ev, Spec};
use load::*;
use samples::{sample, write_csv, Trend};
use support::*;
use tokio_util::sync::CancellationToken;

/// The run's length when `PETREL_SOAK_SECS` is not set: long enough for sessions to expire many
/// times over and for 60 memory samples, short enough for CI.
const DEFAULT_SECS: u64 = 60;
/// A reply that should come at once, with room for a loaded 2-core machine.
const PROMPT: Duration = Duration::from_secs(10);
/// How long the end of the run may take to settle (acknowledgements, deliveries, wills,
/// expiries): bounded waits that normally end within a second.
const SETTLE: Duration = Duration::from_secs(30);
/// Concurrent churning clients.
const CHURNERS: usize = 6;
/// The steady clients: three publishers, three subscribers, the will watcher, the retainer.
const STEADY_CLIENTS: f64 = 8.0;

fn duration() -> Duration {
    let secs = match std::env::var("PETREL_SOAK_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("PETREL_SOAK_SECS={s:?} is not a number of seconds")),
        Err(_) => DEFAULT_SECS,
    };
    assert!(
        secs >= 20,
        "PETREL_SOAK_SECS={secs}: a soak needs 20 s at least"
    );
    Duration::from_secs(secs)
}

/// Every 10 s for a long run; every second below 5 minutes, so the CI run has enough points.
fn sample_interval(run: Duration) -> Duration {
    if run >= Duration::from_secs(300) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    }
}

/// Disk store (so the durable path is soaked too), the admin listener for the gauges, and the
/// default queue bounds: an offline session holds at most 1000 messages.
fn tables(data: &Path, admin: u16) -> String {
    format!(
        "[storage]\ndir = \"{}\"\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"t\"\n",
        data.display()
    )
}

/// Sockets the broker holds (its listeners and connections), without the store's files, whose
/// number changes as the store compacts.
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd of petrel")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Waits (bounded) until `cond` holds of the value `get` reads; returns the last reading.
async fn settles<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut get: impl FnMut() -> F,
    cond: impl Fn(&T) -> bool,
) -> T {
    let started = Instant::now();
    loop {
        let got = get().await;
        if cond(&got) {
            return got;
        }
        assert!(
            started.elapsed() < SETTLE,
            "{what}: still {got:?} after {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_for_minutes_loses_nothing_and_does_not_grow() {
    let _guard = heavy().await;
    let run = duration();
    let every = sample_interval(run);
    let data = std::env::temp_dir().join(format!("petrel-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let admin = free_port();
    let mut broker = Broker::start_with("", &tables(&data, admin));
    let addr = broker.addr;
    let baseline_sockets = open_sockets(broker.pid());
    println!(
        "soak: {run:?}, samples every {every:?}, broker pid {}",
        broker.pid()
    );

    // The steady clients, connected before any load so they see all of it.
    let mut subs = Vec::new();
    let persistent = Spec {
        clean: false,
        expiry: 3600,
        ..Spec::new("soak-sub-v5-persistent", true)
    };
    let steady_subs = [
        (Spec::new("soak-sub-311", false), 2),
        (persistent, 2),
        (Spec::new("soak-sub-v5-q1", true), 1),
    ];
    let stop_subs = CancellationToken::new();
    for (spec, granted) in &steady_subs {
        let mut c = Client::connect(addr, spec)
            .await
            .expect("steady subscriber");
        let slice0 = !spec.clean;
        let filter = if slice0 {
            "soak/steady/+/0"
        } else {
            "soak/steady/#"
        };
        c.subscribe(filter, *granted)
            .await
            .expect("steady SUBSCRIBE");
        let tally = Arc::new(Mutex::new(Tally {
            slice0,
            ..Tally::default()
        }));
        let task = tokio::spawn(steady_subscriber(
            c,
            *granted,
            tally.clone(),
            None,
            stop_subs.clone(),
        ));
        subs.push((spec.id.clone(), *granted, tally, task));
    }
    let wills = Arc::new(Mutex::new(HashMap::new()));
    let watcher = {
        let mut c = Client::connect(addr, &Spec::new("soak-will-watcher", false))
            .await
            .expect("will watcher");
        c.subscribe("soak/will/#", 1).await.expect("will SUBSCRIBE");
        tokio::spawn(steady_subscriber(
            c,
            1,
            Default::default(),
            Some(wills.clone()),
            stop_subs.clone(),
        ))
    };

    let start = Instant::now();
    let stop_load = CancellationToken::new();
    let mut publishers = Vec::new();
    for (qos, v5) in [(0u8, true), (1, true), (2, false)] {
        let c = Client::connect(addr, &Spec::new(format!("soak-pub-q{qos}"), v5))
            .await
            .expect("steady publisher");
        let sent = Arc::new(Sent::default());
        publishers.push((
            qos,
            sent.clone(),
            tokio::spawn(steady_publisher(c, qos, sent, stop_load.clone())),
        ));
    }
    let retainer = {
        let c = Client::connect(addr, &Spec::new("soak-retainer", true))
            .await
            .expect("retainer");
        tokio::spawn(retainer(c, stop_load.clone()))
    };
    let churn = Arc::new(Churn::default());
    let churners: Vec<_> = (0..CHURNERS)
        .map(|w| tokio::spawn(churner(addr, w, churn.clone(), stop_load.clone())))
        .collect();

    // Sample until the load stops.
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while start.elapsed() < run {
        tick.tick().await;
        let s = sample(&broker, admin, start).await;
        if samples.len() % 10 == 0 {
            println!(
                "t={:>6.1}s rss={} KiB connections={} sessions={} queued={} retained={} store={:.0} KiB",
                s.elapsed_s, s.rss_kib, s.connections, s.sessions, s.queued, s.retained, s.store_disk_kib
            );
        }
        samples.push(s);
    }
    stop_load.cancel();
    let csv = write_csv(&samples);
    println!(
        "soak: {} samples written to {}",
        samples.len(),
        csv.display()
    );

    // The load winds down: churners finish their round, publishers their flows.
    for c in churners {
        tokio::time::timeout(SETTLE, c)
            .await
            .expect("a churner still busy 30 s after the load stopped")
            .expect("churner task");
    }
    // Every churner round went through: connected, subscribed, resumed its session in time.
    let failures = churn.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} churn rounds failed, the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let mut steady = Vec::new();
    let mut published = [0u64; 3];
    for (qos, sent, task) in publishers {
        let c = task
            .await
            .expect("publisher task")
            .unwrap_or_else(|e| panic!("{e}"));
        steady.push(c);
        published[usize::from(qos)] = sent.published.load(Ordering::Relaxed);
        assert_eq!(
            sent.refused.load(Ordering::Relaxed),
            0,
            "QoS {qos} messages refused by the broker"
        );
    }
    let (retainer_client, retained_state) = retainer
        .await
        .expect("retainer task")
        .unwrap_or_else(|e| panic!("{e}"));
    steady.push(retainer_client);

    // Every acknowledged message reaches every steady subscriber. The publishers are done, so
    // what is missing now is on its way or lost: wait for it, bounded.
    let complete = |tally: &Tally, granted: u8| {
        (1..=2).all(|q| q.min(granted) == 0 || tally.gaps(q, published[usize::from(q)]).0 == 0)
    };
    let waited = Instant::now();
    while waited.elapsed() < SETTLE
        && !subs
            .iter()
            .all(|(_, g, t, _)| complete(&t.lock().unwrap(), *g))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every will of a vanished client arrives.
    let expected_wills = churn.vanished_with_will.lock().unwrap().clone();
    let waited = Instant::now();
    while waited.elapsed() < SETTLE
        && !expected_wills
            .iter()
            .all(|id| wills.lock().unwrap().contains_key(id))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The gauges come back to the steady clients, still connected; the churners' MQTT 5
    // sessions expire; their 3.1.1 persistent sessions (one per churner) stay.
    settles(
        "petrel_connections",
        || metric(admin, "petrel_connections "),
        |n| *n == STEADY_CLIENTS,
    )
    .await;
    settles(
        "live sessions",
        || metric(admin, "petrel_sessions{state=\"live\"} "),
        |n| *n == STEADY_CLIENTS,
    )
    .await;
    let expiring = churn.expiring.load(Ordering::Relaxed) as f64;
    let expired = settles(
        "petrel_sessions_expired_total",
        || metric(admin, "petrel_sessions_expired_total "),
        |n| *n >= expiring,
    )
    .await;
    let pool = churn.pool.lock().unwrap().len() as f64;
    settles(
        "offline sessions",
        || metric(admin, "petrel_sessions{state=\"offline\"} "),
        |n| *n == pool,
    )
    .await;

    // The retained store holds what the retainer left, and a fresh client is served.
    let mut fresh = Client::connect(addr, &Spec::new("soak-fresh", true))
        .await
        .expect("a fresh client after the soak");
    fresh
        .subscribe("soak/retained/#", 1)
        .await
        .expect("fresh SUBSCRIBE");
    let mut retained_seen = BTreeMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, fresh.events.recv()).await {
        if let Ev::Publish { topic, payload, .. } = ev {
            retained_seen.insert(topic, payload.to_vec());
        }
    }
    fresh
        .subscribe("soak/probe", 0)
        .await
        .expect("probe SUBSCRIBE");
    fresh
        .publish("soak/probe", 0, false, b"alive".to_vec())
        .await
        .expect("probe PUBLISH");
    let probe = fresh
        .wait_for("its own message", |e| match e {
            Ev::Publish { topic, .. } if topic == "soak/probe" => Some(()),
            _ => None,
        })
        .await;

    // Everyone leaves; the broker's sockets and connections come back to their baseline.
    stop_subs.cancel();
    for (_, _, _, task) in subs.iter_mut() {
        steady.push(
            task.await
                .expect("subscriber task")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    steady.push(
        watcher
            .await
            .expect("watcher task")
            .unwrap_or_else(|e| panic!("{e}")),
    );
    steady.push(fresh);
    for c in steady {
        c.disconnect().await.unwrap_or_else(|e| panic!("{e}"));
    }
    settles(
        "petrel_connections after all left",
        || metric(admin, "petrel_connections "),
        |n| *n == 0.0,
    )
    .await;
    let pid = broker.pid();
    let sockets = settles(
        "the broker's open sockets",
        || async { open_sockets(pid) },
        |n| *n <= baseline_sockets,
    )
    .await;

    // Figures for the record.
    let received = |q: u8| async move {
        metric(
            admin,
            &format!("petrel_messages_received_total{{qos=\"{q}\"}} "),
        )
        .await
    };
    let sent_q = |q: u8| async move {
        metric(
            admin,
            &format!("petrel_messages_sent_total{{qos=\"{q}\"}} "),
        )
        .await
    };
    let mut dropped = Vec::new();
    for reason in [
        "outbox_full",
        "queue_full",
        "broker_queue_full",
        "offline_qos0",
        "expired",
        "too_large",
    ] {
        let n = metric(
            admin,
            &format!("petrel_messages_dropped_total{{reason=\"{reason}\"}} "),
        )
        .await;
        if n > 0.0 {
            dropped.push(format!("{reason}={n}"));
        }
    }
    let wills_published = metric(admin, "petrel_wills_published_total ").await;
    let connects = metric(admin, "petrel_connects_total ").await;
    println!("SOAK duration_s {}", run.as_secs());
    println!(
        "SOAK published q0={} q1={} q2={}",
        published[0], published[1], published[2]
    );
    println!(
        "SOAK broker_received q0={} q1={} q2={}  broker_sent q0={} q1={} q2={}",
        received(0).await,
        received(1).await,
        received(2).await,
        sent_q(0).await,
        sent_q(1).await,
        sent_q(2).await
    );
    println!(
        "SOAK churn connections={} broker_connects={connects} churn_received={}",
        churn.connections.load(Ordering::Relaxed),
        churn.received.load(Ordering::Relaxed)
    );
    println!(
        "SOAK wills expected={} received={} not_expected={} broker_wills_published={wills_published}",
        expected_wills.len(),
        wills.lock().unwrap().len(),
        churn.left_with_will.lock().unwrap().len()
    );
    println!(
        "SOAK expiring={expiring} broker_sessions_expired={expired} offline_311_sessions={pool}"
    );
    println!(
        "SOAK dropped {}",
        if dropped.is_empty() {
            "none".to_string()
        } else {
            dropped.join(" ")
        }
    );
    println!("SOAK sockets baseline={baseline_sockets} end={sockets}");

    let trend = Trend::of(&samples);
    println!(
        "SOAK rss_kib warm_up_end={} middle_median={} last_median={} min={} max={} \
         slope_kib_per_min={:.0} tolerance_kib={}",
        trend.warm_up_end,
        trend.middle,
        trend.last,
        trend.min,
        trend.max,
        trend.slope,
        trend.tolerance_kib
    );

    // The broker stops cleanly, having never panicked.
    let log = broker.log();
    let status = broker.terminate();
    let _ = std::fs::remove_dir_all(&data);
    assert!(!log.contains("panicked"), "the broker panicked:\n{log}");
    assert!(
        status.success(),
        "petrel exited with {status} after the soak"
    );
    probe.expect("the broker answers a fresh client after the soak");

    // Delivery: exactly once at QoS 2, at least once at QoS 1, no gaps, at most once at QoS 0.
    for (id, granted, tally, _) in &subs {
        let tally = tally.lock().unwrap();
        assert!(
            tally.wrong.is_empty(),
            "{id}: {:?}",
            &tally.wrong[..tally.wrong.len().min(10)]
        );
        for q in 0..=2u8 {
            let (missing, duplicated) = tally.gaps(q, published[usize::from(q)]);
            let expected = tally.expected(published[usize::from(q)]).count() as u64;
            println!(
                "SOAK delivery {id} granted={granted} from_q{q}: {} of {expected} ({missing} missing, {duplicated} duplicated)",
                expected - missing
            );
            match q.min(*granted) {
                2 => assert!(
                    missing == 0 && duplicated == 0,
                    "{id}: QoS 2 from q{q}: {missing} missing, {duplicated} twice"
                ),
                1 => assert_eq!(
                    missing, 0,
                    "{id}: QoS 1 from q{q}: {missing} acknowledged messages missing"
                ),
                _ => assert_eq!(
                    duplicated, 0,
                    "{id}: QoS 0 from q{q}: {duplicated} delivered twice"
                ),
            }
        }
    }

    // Wills: each vanished client's once, none of those that said goodbye.
    let wills = wills.lock().unwrap();
    let missing: Vec<_> = expected_wills
        .iter()
        .filter(|id| !wills.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} wills never came: {:?}",
        missing.len(),
        expected_wills.len(),
        &missing[..missing.len().min(10)]
    );
    let unexpected: Vec<_> = wills
        .keys()
        .filter(|id| !expected_wills.contains(*id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "wills of clients that disconnected cleanly: {unexpected:?}"
    );
    let twice: Vec<_> = wills.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "wills delivered more than once: {twice:?}"
    );
    assert!(
        !expected_wills.is_empty() && expiring > 0.0,
        "the churn never got to wills or expiries"
    );

    // Expiry: every churner session left to expire did, and only those.
    assert_eq!(
        expired, expiring,
        "sessions expired vs sessions left to expire"
    );

    // Retained: what the retainer left, nothing else.
    assert_eq!(
        retained_seen, retained_state,
        "the retained store after the soak"
    );

    // Sockets: none left behind by the churn.
    assert!(sockets <= baseline_sockets);

    // Memory: no upward trend after warm-up (figures above), in the broker's own counts nor in
    // its resident memory.
    assert!(
        trend.counts_rising.is_empty(),
        "the broker holds more and more: {:?}; samples in {}",
        trend.counts_rising,
        csv.display()
    );
    assert!(
        trend.last <= trend.middle + trend.tolerance_kib,
        "broker memory still rising after warm-up: median {} KiB in the middle third, {} KiB in \
         the last ({:.1} min later; tolerance {} KiB); slope {:.0} KiB/min; samples in {}",
        trend.middle,
        trend.last,
        trend.minutes_apart,
        trend.tolerance_kib,
        trend.slope,
        csv.display()
    );
}
