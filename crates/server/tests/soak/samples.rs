//! What the soak samples every interval (resident memory and the broker's gauges), the CSV it
//! writes, and the memory check over the samples.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::support::{metric, Broker};

/// One row of soak.csv.
pub struct Sample {
    pub elapsed_s: f64,
    pub rss_kib: u64,
    pub connections: f64,
    pub sessions: f64,
    pub queued: f64,
    pub retained: f64,
    /// What the store takes on disk (not part of the check: it shows when it compacts).
    pub store_disk_kib: f64,
}

pub async fn sample(broker: &Broker, admin: u16, start: Instant) -> Sample {
    Sample {
        elapsed_s: start.elapsed().as_secs_f64(),
        rss_kib: broker.rss_kib(),
        connections: metric(admin, "petrel_connections ").await,
        sessions: metric(admin, "petrel_sessions{state=\"live\"} ").await
            + metric(admin, "petrel_sessions{state=\"offline\"} ").await,
        queued: metric(admin, "petrel_queued_messages ").await,
        retained: metric(admin, "petrel_retained_messages ").await,
        store_disk_kib: metric(admin, "petrel_store_disk_bytes ").await / 1024.0,
    }
}

/// `target/test-artifacts/` of this workspace (or of `CARGO_TARGET_DIR`).
fn artifacts_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // an absolute path replaces the base
        None => workspace.join("target"),
    };
    target.join("test-artifacts")
}

pub fn write_csv(samples: &[Sample]) -> PathBuf {
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    let path = dir.canonicalize().unwrap_or(dir).join("soak.csv");
    let mut text = String::from(
        "elapsed_s,rss_kib,connections,sessions,queued_messages,retained,store_disk_kib\n",
    );
    for s in samples {
        text.push_str(&format!(
            "{:.1},{},{},{},{},{},{:.0}\n",
            s.elapsed_s,
            s.rss_kib,
            s.connections,
            s.sessions,
            s.queued,
            s.retained,
            s.store_disk_kib
        ));
    }
    std::fs::write(&path, text).expect("write soak.csv");
    path
}

/// Noise in resident memory under this load: with the store in memory the broker held within
/// ±0.4 MiB of its trend over 150 s (1 s samples, residual sd 0.2 MiB, debug build).
const RSS_NOISE_KIB: u64 = 2 * 1024;
/// What the disk store may add per minute while its memtables fill: each write (a persistent
/// session's queue entry, in-flight record and message, the retained rotation, session records)
/// and its later deletion stay in fjall's memtables until a memtable reaches 16 MiB and is
/// flushed (64 MiB for all partitions together), so memory rises with the writes for many
/// minutes at this load and then falls back in a sawtooth. Measured: 1.2 MiB/min over 4
/// minutes (debug build, 1 s samples); the same load with the store in memory: flat.
const STORE_FILL_KIB_PER_MIN: f64 = 1.5 * 1024.0;

/// The memory check over the samples after warm-up.
pub struct Trend {
    pub warm_up_end: u64,
    /// Medians of the middle and last third of the samples after warm-up.
    pub middle: u64,
    pub last: u64,
    pub min: u64,
    pub max: u64,
    /// Least-squares slope after warm-up, KiB per minute (reported, not checked: one burst
    /// near either end moves it).
    pub slope: f64,
    pub minutes_apart: f64,
    pub tolerance_kib: u64,
    /// The broker's own counts (sessions, queued messages, retained messages) that rose from
    /// the middle third to the last past `count_rose`.
    pub counts_rising: Vec<String>,
}

/// A gauge in the samples: its name, how to read it, the slack of `count_rose`.
type Gauge = (&'static str, fn(&Sample) -> f64, f64);

/// Whether a gauge the load holds level rose from `middle` to `last` (medians): by a quarter
/// and by more than `slack`, the jitter of the churn (a few sessions come and go, what the
/// persistent sessions queue in a few seconds: about 30 messages a second).
fn count_rose(middle: f64, last: f64, slack: f64) -> bool {
    last > middle * 1.25 && last > middle + slack
}

impl Trend {
    /// The first fifth of the run is warm-up: the allocator's arenas, the session, topic and
    /// connection tables reaching their working size. After it, the median of the last third
    /// must stay within the tolerance of the median of the middle third. Medians, because
    /// connections come and go in bursts and the allocator keeps freed pages for a moment.
    /// The tolerance is the noise plus the store's fill over the time between the two thirds:
    /// at the default 60 s that is 2.4 MiB over 16 s (a leak past ~9 MiB/min trips it), at
    /// 30 minutes 14 MiB over 8 minutes (a leak past ~2 MiB/min).
    pub fn of(samples: &[Sample]) -> Trend {
        let warm = samples.len() / 5;
        let rest = &samples[warm..];
        let third = rest.len() / 3;
        let (middle, last) = (&rest[third..2 * third], &rest[2 * third..]);
        let rss = |xs: &[Sample]| xs.iter().map(|s| s.rss_kib).collect::<Vec<_>>();
        let centre = |xs: &[Sample]| xs[xs.len() / 2].elapsed_s;
        let minutes_apart = (centre(last) - centre(middle)) / 60.0;
        let all = rss(rest);
        let gauge = |xs: &[Sample], get: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = xs.iter().map(get).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let gauges: [Gauge; 3] = [
            ("sessions", |s| s.sessions, 10.0),
            ("queued messages", |s| s.queued, 200.0),
            ("retained messages", |s| s.retained, 4.0),
        ];
        let counts_rising = gauges
            .iter()
            .filter_map(|(name, get, slack)| {
                let (m, l) = (gauge(middle, *get), gauge(last, *get));
                count_rose(m, l, *slack).then(|| format!("{name}: median {m} then {l}"))
            })
            .collect();
        Trend {
            warm_up_end: samples[warm].rss_kib,
            middle: median(&rss(middle)),
            last: median(&rss(last)),
            min: *all.iter().min().unwrap(),
            max: *all.iter().max().unwrap(),
            slope: slope_kib_per_min(rest),
            minutes_apart,
            tolerance_kib: RSS_NOISE_KIB + (STORE_FILL_KIB_PER_MIN * minutes_apart) as u64,
            counts_rising,
        }
    }
}

fn median(xs: &[u64]) -> u64 {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Least-squares slope of RSS over time, in KiB per minute.
fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.elapsed_s).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.elapsed_s - mx) * (s.rss_kib as f64 - my);
        den += (s.elapsed_s - mx).powi(2);
    }
    num / den * 60.0
}
