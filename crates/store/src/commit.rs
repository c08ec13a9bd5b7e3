//! The commit thread: takes every change recorded since its last round as one group, writes
//! the group as one fjall batch (one journal append), makes it durable under the fsync policy,
//! and then advances the durable token, waking the connections whose acknowledgements wait
//! for it. Under load many publishers share one write and one sync; a change cancelled in the
//! buffer before its round costs no write at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use fjall::{Keyspace, PersistMode};

use crate::changes::{Buffer, Change, Changes, Part};
use crate::record::seal;
use crate::{lock, Fsync, Parts};

/// What hooks and the commit thread share; hooks hold `state` only to record a change.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Held shared while a group of changes that must land together is recorded
    /// ([`petrel_engine::store::Store::together`]), and exclusively by the commit thread
    /// while it rotates the buffer, so such a group never straddles two generations. Lock
    /// order: `groups`, then `state`. (std's RwLock on Linux prefers a waiting writer, so a
    /// stream of groups cannot starve the rotation.)
    pub groups: RwLock<()>,
    /// Wakes the commit thread when it is idle.
    pub kick: Condvar,
    /// The highest token whose change is durable under the policy.
    pub durable: AtomicU64,
    /// The highest token whose change is synced to disk whatever the policy.
    pub synced: AtomicU64,
    pub waiters: Mutex<Vec<(u64, Waker)>>,
    /// Signalled, under `waiters`, when `durable` or `synced` advance.
    pub landed: Condvar,
    pub counts: Counts,
}

/// What the store did, for the log at shutdown (and metrics later).
#[derive(Default)]
pub(crate) struct Counts {
    /// Deliveries queued for persistent sessions.
    pub enqueued: AtomicU64,
    /// Of those, how many reached the disk: the rest were acknowledged (or dropped) first.
    pub queue_writes: AtomicU64,
    /// Groups written.
    pub rounds: AtomicU64,
    /// How long each round with something to write took (write and sync).
    pub latency: Latency,
}

/// Upper bounds, in seconds, of the round-duration buckets.
pub(crate) const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of round durations in relaxed atomics: the commit thread records, a scrape
/// reads. Counts are per bucket (not cumulative); the last slot is "above every bound".
#[derive(Default)]
pub(crate) struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, counts per bucket: one per bound, then the rest).
    pub(crate) fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        (
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            self.count.load(Ordering::Relaxed),
            buckets,
        )
    }
}

pub(crate) struct State {
    /// Changes not yet taken by the commit thread.
    pub pending: Buffer,
    /// The last token recorded before the buffer's last rotation: what its older generation
    /// covers.
    pub aged_token: u64,
    /// The group the commit thread is writing: still visible to reads until it has landed.
    pub writing: Option<Arc<Changes>>,
    /// How many queue entries refer to each stored message; the last one gone deletes it.
    pub refs: HashMap<u64, u32>,
    /// The last token handed out (one per change).
    pub written: u64,
    /// The commit thread waits for a kick.
    pub idle: bool,
    /// `flush` asks for everything to be synced.
    pub sync_requested: bool,
    pub stop: bool,
}

impl Shared {
    pub(crate) fn new(refs: HashMap<u64, u32>) -> Shared {
        Shared {
            state: Mutex::new(State {
                pending: Buffer::default(),
                aged_token: 0,
                writing: None,
                refs,
                written: 0,
                idle: false,
                sync_requested: false,
                stop: false,
            }),
            groups: RwLock::new(()),
            kick: Condvar::new(),
            durable: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            landed: Condvar::new(),
            counts: Counts::default(),
        }
    }

    /// Wakes the commit thread if it sleeps. The caller holds `state`.
    pub(crate) fn nudge(&self, st: &mut State) {
        if st.idle {
            st.idle = false;
            self.kick.notify_one();
        }
    }
}

/// A failed write or sync is retried after this long; acknowledgements wait meanwhile.
const RETRY: Duration = Duration::from_millis(100);

pub(crate) fn run(shared: &Shared, keyspace: &Keyspace, parts: &Parts, fsync: Fsync) {
    let mut last_sync = Instant::now();
    // Written to the journal since the last sync.
    let mut unsynced = false;
    loop {
        let (group, target, sync_requested, stop) = {
            let mut st = lock(&shared.state);
            loop {
                let behind = st.written > shared.durable.load(Ordering::Acquire);
                let interval = match fsync {
                    Fsync::Every(interval) if unsynced => Some(interval),
                    _ => None,
                };
                let sync_due = interval.is_some_and(|i| last_sync.elapsed() >= i);
                if behind || sync_due || st.stop || st.sync_requested {
                    break;
                }
                let wait = interval.map_or(Duration::from_secs(1), |i| {
                    i.saturating_sub(last_sync.elapsed())
                });
                st.idle = true;
                st = shared
                    .kick
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.idle = false;
            }
            // Rotate only between groups: wait for those being recorded, hold new ones off.
            drop(st);
            let _groups = shared
                .groups
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut st = lock(&shared.state);
            let sync_requested = std::mem::take(&mut st.sync_requested);
            let (group, target) = if sync_requested || st.stop {
                (st.pending.take_all(), st.written)
            } else {
                (st.pending.rotate(), st.aged_token)
            };
            st.aged_token = st.written;
            let group = Arc::new(group);
            st.writing = Some(group.clone());
            (group, target, sync_requested, st.stop)
        };
        let round_started = Instant::now();
        if !group.is_empty() {
            write(shared, keyspace, parts, &group, stop);
            unsynced = true;
        }
        let sync = unsynced
            && (sync_requested
                || stop
                || match fsync {
                    Fsync::Always => true,
                    Fsync::Every(interval) => last_sync.elapsed() >= interval,
                    Fsync::Never => false,
                });
        let mode = if sync_requested || stop {
            Some(PersistMode::SyncAll)
        } else if sync {
            Some(PersistMode::SyncData)
        } else if !group.is_empty() {
            // Handed to the OS: it survives a crash of petrel.
            Some(PersistMode::Buffer)
        } else {
            None
        };
        if let Some(mode) = mode {
            let mut attempts = 0;
            while let Err(e) = keyspace.persist(mode) {
                tracing::error!(error = %e, "store: journal sync failed; acknowledgements wait");
                attempts += 1;
                if stop && attempts >= 10 {
                    break;
                }
                std::thread::sleep(RETRY);
            }
        }
        if sync {
            unsynced = false;
            last_sync = Instant::now();
        }
        if !group.is_empty() || sync {
            shared.counts.latency.record(round_started.elapsed());
        }
        lock(&shared.state).writing = None;
        shared.durable.fetch_max(target, Ordering::AcqRel);
        if !unsynced {
            shared.synced.fetch_max(target, Ordering::AcqRel);
        }
        let ready: Vec<Waker> = {
            let mut waiters = lock(&shared.waiters);
            let (done, waiting): (Vec<_>, Vec<_>) =
                waiters.drain(..).partition(|(t, _)| *t <= target);
            *waiters = waiting;
            shared.landed.notify_all();
            done.into_iter().map(|(_, w)| w).collect()
        };
        ready.into_iter().for_each(Waker::wake);
        if stop {
            return;
        }
    }
}

/// Writes a group as one batch; retries until it succeeds (or, when stopping, gives up
/// after a few attempts, logging what is lost).
fn write(shared: &Shared, keyspace: &Keyspace, parts: &Parts, group: &Changes, stop: bool) {
    let puts = group
        .iter()
        .filter(|((part, _), change)| *part == Part::Queue && matches!(change, Change::Put { .. }))
        .count();
    shared.counts.rounds.fetch_add(1, Ordering::Relaxed);
    shared
        .counts
        .queue_writes
        .fetch_add(puts as u64, Ordering::Relaxed);
    let mut attempts = 0;
    loop {
        let mut batch = keyspace.batch();
        for ((part, key), change) in group.iter() {
            let partition = parts.get(*part);
            match change {
                Change::Put { value, .. } => batch.insert(
                    partition,
                    key.clone(),
                    seal(part.name(), key, &value.encode()),
                ),
                Change::Delete => batch.remove(partition, key.clone()),
            }
        }
        match batch.commit() {
            Ok(()) => return,
            Err(e) => {
                attempts += 1;
                tracing::error!(error = %e, changes = group.len(), "store: write failed; acknowledgements wait");
                if stop && attempts >= 10 {
                    tracing::error!(
                        changes = group.len(),
                        "store: giving up at shutdown; these changes are not stored"
                    );
                    return;
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}
