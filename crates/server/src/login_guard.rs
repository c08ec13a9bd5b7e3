//! What an unauthenticated client may cost the broker while its credentials are checked:
//!
//! ```text
//! CONNECT ─► FailedLogins::begin ──(locked out)──► refused 0x87 / 5, nothing verified
//!               │ the attempt is counted *now*, refunded only if it succeeds
//!               ▼
//!            HashGate::admit ──(address or broker queue full)──► refused 0x89 / 3, refunded
//!               │ a ticket: one of the address's and the broker's bounded places
//!               ▼
//!            Ticket::verify ── waits for its hash's memory out of the budget, then hashes on
//!                              the blocking pool; the memory is given back when the hash ends
//! ```
//!
//! Counting before verifying is what makes `max_failed_logins` a bound on the hashes one
//! address can cause, however many CONNECTs it sends at once. The gate bounds the rest: the
//! memory all slow hashes use at once (argon2id at petrel's parameters takes 19 MiB each), the
//! logins waiting for that memory, and the share of both one address may take, so a flood
//! from one address leaves room for everyone else.
//!
//! Addresses are counted per IPv4 address and per IPv6 /64 (one host usually holds a whole
//! /64). Failed-login log lines are rate-limited here too, so a brute force writes a summary,
//! not a line per guess.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use petrel_engine::auth::AuthDecision;
use tokio::sync::Semaphore;

/// Where a login comes from, as rate limits count it: an IPv4 address, or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    /// The key of a peer written as `ip:port` or `ip`; `None` for peers without an IP address
    /// (Unix sockets), which are not rate-limited by address.
    pub fn of(peer: &str) -> Option<AddressKey> {
        let ip = peer
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| peer.parse::<IpAddr>())
            .ok()?;
        Some(AddressKey(match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
            v4 => v4,
        }))
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// Addresses whose failed logins are tracked at most. Past it, expired windows are dropped,
/// then addresses that are not locked out (oldest window first); locked-out addresses are
/// never forgotten before their window ends. If every tracked address is locked out, new
/// addresses share one overflow count with the same limit.
const MAX_TRACKED: usize = 100_000;

/// Failed-login lines logged per address in a window; further failures are summed up.
const LOGGED_PER_ADDRESS: u32 = 3;

/// Failed-login lines logged broker-wide in a window (a spray from many addresses).
const LOGGED_PER_WINDOW: u32 = 100;

struct Window {
    start: Instant,
    /// Attempts counted in this window: failures, and checks still running.
    attempts: u32,
    /// Refusals not logged in this window, reported when it ends.
    unlogged: u32,
    /// Failures logged in this window.
    logged: u32,
    /// Whether a lockout refusal was logged in this window.
    lock_logged: bool,
}

struct Table {
    by_address: HashMap<AddressKey, Window>,
    /// Shared by new addresses while every tracked address is locked out.
    overflow: Window,
    /// When a full table may next be scanned for addresses to forget.
    next_sweep: Instant,
    /// Broker-wide log budget: lines logged and lines left out in the current window.
    log_window: Instant,
    logged: u32,
    unlogged: u32,
}

/// Login attempts per client address in one-minute windows: an attempt counts when it
/// starts (before any password is verified) and is refunded if it succeeds; an address
/// with `limit` attempts in its window is refused without verifying anything.
pub struct FailedLogins {
    /// Changed in place by a reload, which keeps the table (see [`LoginState`]).
    limit: std::sync::atomic::AtomicU32,
    window: Duration,
    max_tracked: usize,
    table: Mutex<Table>,
}

/// One counted login attempt. [`Attempt::finish`] with the decision refunds it on success;
/// an attempt dropped without a decision (the client left) stays counted.
pub struct Attempt {
    logins: Arc<FailedLogins>,
    key: Option<AddressKey>,
    peer: String,
    at: Instant,
}

impl FailedLogins {
    pub fn new(limit: u32) -> FailedLogins {
        FailedLogins::with_capacity(limit, MAX_TRACKED)
    }

    fn with_capacity(limit: u32, max_tracked: usize) -> FailedLogins {
        let now = Instant::now();
        FailedLogins {
            limit: std::sync::atomic::AtomicU32::new(limit),
            window: Duration::from_secs(60),
            max_tracked,
            table: Mutex::new(Table {
                by_address: HashMap::new(),
                overflow: Window::new(now),
                next_sweep: now,
                log_window: now,
                logged: 0,
                unlogged: 0,
            }),
        }
    }

    /// Counts an attempt from `peer` at `now`, or refuses it (`None`) if the address is
    /// already at its limit for the window.
    pub fn begin(self: &Arc<Self>, peer: &str, now: Instant) -> Option<Attempt> {
        let key = AddressKey::of(peer);
        if let Some(key) = key {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let window = self.window;
            let limit = self.limit();
            let w = self.window_of(&mut table, key, now);
            if now.duration_since(w.start) >= window {
                let unlogged = std::mem::replace(w, Window::new(now)).unlogged;
                if unlogged > 0 {
                    tracing::info!(address = %key, unlogged, "refused logins from this address in its last minute, not logged one by one");
                }
            }
            if w.attempts >= limit {
                return None;
            }
            w.attempts += 1;
        }
        Some(Attempt {
            logins: self.clone(),
            key,
            peer: peer.to_owned(),
            at: now,
        })
    }

    /// The window of `key`, tracking it if there is room (see [`MAX_TRACKED`]).
    fn window_of<'t>(&self, table: &'t mut Table, key: AddressKey, now: Instant) -> &'t mut Window {
        let map = &mut table.by_address;
        if !map.contains_key(&key) && map.len() >= self.max_tracked {
            let (window, limit) = (self.window, self.limit());
            if now >= table.next_sweep {
                map.retain(|_, w| now.duration_since(w.start) < window);
            }
            if now >= table.next_sweep && map.len() >= self.max_tracked {
                // Forget the addresses that are not locked out, oldest first, down to three
                // quarters of the table (so this scan is not repeated on every new address).
                let mut open: Vec<(Instant, AddressKey)> = map
                    .iter()
                    .filter(|(_, w)| w.attempts < limit)
                    .map(|(k, w)| (w.start, *k))
                    .collect();
                open.sort_unstable_by_key(|(start, _)| *start);
                let excess = map.len().saturating_sub(self.max_tracked * 3 / 4);
                for (_, k) in open.into_iter().take(excess) {
                    map.remove(&k);
                }
            }
            if map.len() >= self.max_tracked {
                // Every tracked address is locked out: scan again in a second at the
                // earliest, not for every new address of a spray.
                table.next_sweep = now + Duration::from_secs(1);
                if now.duration_since(table.overflow.start) >= window {
                    table.overflow = Window::new(now);
                }
                return &mut table.overflow;
            }
        }
        map.entry(key).or_insert_with(|| Window::new(now))
    }

    /// Whether `peer` is at its limit for the window (nothing is counted).
    pub fn blocked(&self, peer: &str, now: Instant) -> bool {
        let Some(key) = AddressKey::of(peer) else {
            return false;
        };
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let w = table
            .by_address
            .get(&key)
            .or_else(|| (table.by_address.len() >= self.max_tracked).then_some(&table.overflow));
        w.is_some_and(|w| now.duration_since(w.start) < self.window && w.attempts >= self.limit())
    }

    fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Gives back an attempt that succeeded.
    fn refund(&self, key: AddressKey, at: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.window;
        // An address forgotten meanwhile (or counted in the overflow) gets nothing back: the
        // safe side.
        let Some(w) = table.by_address.get_mut(&key) else {
            return;
        };
        // An attempt counted in an earlier window is not taken from this one.
        if w.start <= at && at.duration_since(w.start) < window {
            w.attempts = w.attempts.saturating_sub(1);
        }
    }

    /// Logs a refused login at info, within the budgets: per address, the first
    /// [`LOGGED_PER_ADDRESS`] failures and the first lockout refusal of its window; broker-wide,
    /// [`LOGGED_PER_WINDOW`] lines a window. What is left out is summed up: per address when
    /// its window ends (reported with its next attempt, or by the sweep below), broker-wide
    /// when the log window ends (reported with the next refusal).
    fn log_refusal(
        &self,
        key: Option<AddressKey>,
        peer: &str,
        decision: AuthDecision,
        locked_out: bool,
        now: Instant,
    ) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(table.log_window) >= self.window {
            self.sweep_summaries(&mut table, now);
            if table.unlogged > 0 {
                tracing::info!(
                    unlogged = table.unlogged,
                    "refused logins in the last minute not logged one by one (too many)"
                );
            }
            table.log_window = now;
            table.logged = 0;
            table.unlogged = 0;
        }
        let address_ok = match key.and_then(|k| table.by_address.get_mut(&k)) {
            Some(w) if locked_out && w.lock_logged => {
                w.unlogged += 1;
                false
            }
            Some(w) if locked_out => {
                w.lock_logged = true;
                true
            }
            Some(w) if w.logged >= LOGGED_PER_ADDRESS => {
                w.unlogged += 1;
                false
            }
            Some(w) => {
                w.logged += 1;
                true
            }
            None => true,
        };
        if !address_ok {
            tracing::debug!(peer, ?decision, "login refused");
            return;
        }
        if table.logged >= LOGGED_PER_WINDOW {
            table.unlogged += 1;
            tracing::debug!(peer, ?decision, "login refused");
            return;
        }
        table.logged += 1;
        let last = key
            .and_then(|k| table.by_address.get(&k))
            .is_some_and(|w| w.logged == LOGGED_PER_ADDRESS);
        if locked_out {
            tracing::info!(
                peer,
                "login refused: too many failed logins from this address; refused unchecked \
                 for the rest of its minute (summed up at its end)"
            );
        } else if last {
            tracing::info!(
                peer,
                ?decision,
                "login refused (further failures from this address in this minute are summed up)"
            );
        } else {
            tracing::info!(peer, ?decision, "login refused");
        }
    }

    /// One summary line for each address whose window ended with refusals left out of the
    /// log (at most [`LOGGED_PER_WINDOW`] lines, then one line for the rest).
    fn sweep_summaries(&self, table: &mut Table, now: Instant) {
        let mut lines = 0u32;
        let (mut more_addresses, mut more_refusals) = (0u32, 0u64);
        for (key, w) in table.by_address.iter_mut() {
            if w.unlogged == 0 || now.duration_since(w.start) < self.window {
                continue;
            }
            let unlogged = std::mem::take(&mut w.unlogged);
            if lines < LOGGED_PER_WINDOW {
                lines += 1;
                tracing::info!(address = %key, unlogged, "refused logins from this address in its last minute, not logged one by one");
            } else {
                more_addresses += 1;
                more_refusals += u64::from(unlogged);
            }
        }
        if more_addresses > 0 {
            tracing::info!(
                addresses = more_addresses,
                unlogged = more_refusals,
                "refused logins from further addresses in their last minute, not logged"
            );
        }
    }

    /// Logs a refusal because the address is locked out (within the same budgets).
    pub fn log_locked_out(&self, peer: &str, now: Instant) {
        self.log_refusal(
            AddressKey::of(peer),
            peer,
            AuthDecision::NotAuthorized,
            true,
            now,
        );
    }
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            attempts: 0,
            unlogged: 0,
            logged: 0,
            lock_logged: false,
        }
    }
}

impl Attempt {
    /// The attempt's outcome: a success is refunded, a failure stays counted and is logged.
    pub fn finish(self, decision: AuthDecision) {
        match decision {
            AuthDecision::Allow => {
                if let Some(key) = self.key {
                    self.logins.refund(key, self.at);
                }
            }
            AuthDecision::Busy => {
                // Refused before anything was verified: not the client's failure.
                if let Some(key) = self.key {
                    self.logins.refund(key, self.at);
                }
            }
            _ => self
                .logins
                .log_refusal(self.key, &self.peer, decision, false, Instant::now()),
        }
    }
}

/// The failed-login table and the hash gate, kept across configuration reloads: a reload
/// must not give every locked-out address a fresh start, nor run a second budget of hash
/// checks beside the first.
#[derive(Default)]
pub struct LoginState {
    failed: Mutex<Option<Arc<FailedLogins>>>,
    gate: Mutex<Option<(GateBounds, Arc<HashGate>)>>,
}

/// A gate's bounds: memory budget in bytes, checks admitted broker-wide, per address.
type GateBounds = (u64, usize, u32);

impl LoginState {
    /// The table, with `limit` from now on.
    pub fn failed(&self, limit: u32) -> Arc<FailedLogins> {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let table = failed.get_or_insert_with(|| Arc::new(FailedLogins::new(limit)));
        table.limit.store(limit, Ordering::Relaxed);
        table.clone()
    }

    /// The gate, new only if its bounds changed (checks admitted by the old one finish
    /// under it).
    pub fn gate(
        &self,
        budget_bytes: u64,
        max_pending: usize,
        max_per_address: u32,
    ) -> Arc<HashGate> {
        let bounds = (budget_bytes, max_pending, max_per_address);
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        match &*gate {
            Some((b, g)) if *b == bounds => g.clone(),
            _ => {
                let g = HashGate::new(budget_bytes, max_pending, max_per_address);
                *gate = Some((bounds, g.clone()));
                g
            }
        }
    }
}

/// Bounds on password hash checks: memory in use at once, logins waiting, and one address's
/// share of both.
pub struct HashGate {
    /// The memory budget in KiB, as permits: a check holds its hash's memory cost.
    memory: Arc<Semaphore>,
    budget_kib: u32,
    /// Checks admitted (waiting or running), broker-wide.
    admitted: AtomicUsize,
    max_admitted: usize,
    per_address: Mutex<HashMap<AddressKey, u32>>,
    max_per_address: u32,
    /// When a refusal for lack of room was last logged at warn (at most every 10 s).
    busy_logged: Mutex<Option<Instant>>,
}

/// A place among the admitted checks, held until the check ends (or is dropped).
pub struct Ticket {
    gate: Arc<HashGate>,
    key: Option<AddressKey>,
}

/// Why a check was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The address already has its share of checks waiting or running.
    Address,
    /// The broker's queue of checks is full.
    Broker,
}

impl HashGate {
    /// A gate with `budget_bytes` of hash memory, `max_pending` checks admitted broker-wide and
    /// `max_per_address` per address.
    pub fn new(budget_bytes: u64, max_pending: usize, max_per_address: u32) -> Arc<HashGate> {
        let budget_kib = u32::try_from((budget_bytes / 1024).max(1)).unwrap_or(u32::MAX);
        Arc::new(HashGate {
            memory: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            admitted: AtomicUsize::new(0),
            max_admitted: max_pending.max(1),
            per_address: Mutex::new(HashMap::new()),
            max_per_address: max_per_address.max(1),
            busy_logged: Mutex::new(None),
        })
    }

    /// A place for one check from `peer`, or why there is none.
    pub fn admit(self: &Arc<Self>, peer: &str) -> Result<Ticket, Full> {
        let key = AddressKey::of(peer);
        if let Some(key) = key {
            let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(key).or_insert(0);
            if *n >= self.max_per_address {
                return Err(Full::Address);
            }
            *n += 1;
        }
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.max_admitted {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            self.release_address(key);
            return Err(Full::Broker);
        }
        Ok(Ticket {
            gate: self.clone(),
            key,
        })
    }

    fn release_address(&self, key: Option<AddressKey>) {
        if let Some(key) = key {
            let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    /// Logs a login refused as busy: at warn once every 10 s (an operator should know the
    /// bounds are reached), at debug otherwise.
    pub fn log_busy(&self, peer: &str, full: Full) {
        let now = Instant::now();
        let mut last = self.busy_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            tracing::debug!(peer, ?full, "login refused: server busy checking passwords");
            return;
        }
        *last = Some(now);
        tracing::warn!(
            peer,
            ?full,
            "login refused: server busy checking passwords (auth.hash_memory, \
             auth.max_pending_logins, auth.max_pending_logins_per_address); \
             further refusals in the next 10 s are not logged"
        );
    }

    /// Checks admitted now (waiting or running), for tests and figures.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}

impl Ticket {
    /// Runs `check` on the blocking pool once `cost_kib` of the memory budget is free (a check
    /// costlier than the whole budget runs alone). The memory and the ticket are held by the
    /// blocking task itself, so a client that leaves mid-check does not free them early.
    /// `None` if the check could not run (the runtime is shutting down, or it panicked).
    pub async fn verify<F, T>(self, cost_kib: u32, check: F) -> Option<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let cost = cost_kib.clamp(1, self.gate.budget_kib);
        let permit = self
            .gate
            .memory
            .clone()
            .acquire_many_owned(cost)
            .await
            .ok()?;
        tokio::task::spawn_blocking(move || {
            let result = check();
            drop(permit);
            drop(self);
            result
        })
        .await
        .ok()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.release_address(self.key.take());
        self.gate.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins(limit: u32) -> Arc<FailedLogins> {
        Arc::new(FailedLogins::new(limit))
    }

    #[test]
    fn attempts_count_before_they_are_verified() {
        let limits = logins(3);
        let t0 = Instant::now();
        // Three at once, none finished yet: the fourth is refused.
        let running: Vec<_> = (0..3)
            .map(|_| limits.begin("10.0.0.1:5000", t0).expect("under the limit"))
            .collect();
        assert!(limits.begin("10.0.0.1:5001", t0).is_none());
        assert!(
            limits.blocked("10.0.0.1:6000", t0),
            "any port of that address"
        );
        assert!(!limits.blocked("10.0.0.2:5000", t0));
        // One succeeds: refunded, so one more may try.
        let mut running = running.into_iter();
        running.next().unwrap().finish(AuthDecision::Allow);
        assert!(limits.begin("10.0.0.1:5002", t0).is_some());
        assert!(limits.begin("10.0.0.1:5003", t0).is_none());
        assert!(!limits.blocked("10.0.0.1:5000", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let limits = logins(2);
        let t0 = Instant::now();
        let _a = limits.begin("[2001:db8:1:2::1]:1000", t0).unwrap();
        let _b = limits.begin("[2001:db8:1:2:ffff::9]:1000", t0).unwrap();
        assert!(limits.blocked("[2001:db8:1:2:abcd::1]:1", t0), "same /64");
        assert!(!limits.blocked("[2001:db8:1:3::1]:1", t0), "another /64");
        let _c = limits.begin("[::ffff:10.0.0.7]:1", t0).unwrap();
        let _d = limits.begin("10.0.0.7:2", t0).unwrap();
        assert!(limits.blocked("10.0.0.7:3", t0));
    }

    #[test]
    fn a_full_table_forgets_open_addresses_not_lockouts() {
        let limits = Arc::new(FailedLogins::with_capacity(2, 100));
        let t0 = Instant::now();
        for _ in 0..2 {
            limits
                .begin("192.0.2.1:1", t0)
                .unwrap()
                .finish(AuthDecision::BadCredentials);
        }
        assert!(limits.blocked("192.0.2.1:1", t0));
        // A spray from many addresses, one failure each: far more than the table holds.
        for i in 0..10_000u32 {
            let peer = format!("10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255);
            if let Some(a) = limits.begin(&peer, t0) {
                a.finish(AuthDecision::BadCredentials);
            }
        }
        assert!(
            limits.blocked("192.0.2.1:1", t0),
            "the lockout survives the spray"
        );
        let tracked = limits.table.lock().unwrap().by_address.len();
        assert!(tracked <= 100, "{tracked}");
    }

    #[test]
    fn when_every_tracked_address_is_locked_new_ones_share_one_limit() {
        let limits = Arc::new(FailedLogins::with_capacity(1, 4));
        let t0 = Instant::now();
        for i in 0..4 {
            limits
                .begin(&format!("10.0.0.{i}:1"), t0)
                .unwrap()
                .finish(AuthDecision::BadCredentials);
        }
        let first = limits
            .begin("10.0.1.1:1", t0)
            .expect("the overflow's first");
        first.finish(AuthDecision::BadCredentials);
        assert!(
            limits.begin("10.0.1.2:1", t0).is_none(),
            "overflow at its limit"
        );
        assert!(limits.blocked("10.0.0.0:1", t0), "old lockouts kept");
    }

    #[test]
    fn a_reload_keeps_lockouts_and_the_gate() {
        let state = LoginState::default();
        let t0 = Instant::now();
        let first = state.failed(1);
        first
            .begin("10.0.0.1:1", t0)
            .unwrap()
            .finish(AuthDecision::BadCredentials);
        let again = state.failed(1);
        assert!(
            again.blocked("10.0.0.1:1", t0),
            "still locked out after a reload"
        );
        assert!(
            !state.failed(5).blocked("10.0.0.1:1", t0),
            "a new limit applies"
        );
        let gate = state.gate(1 << 20, 4, 1);
        assert!(Arc::ptr_eq(&gate, &state.gate(1 << 20, 4, 1)));
        assert!(!Arc::ptr_eq(&gate, &state.gate(2 << 20, 4, 1)));
    }

    #[tokio::test]
    async fn the_gate_bounds_each_address_and_the_broker() {
        let gate = HashGate::new(4 << 20, 3, 2);
        let a1 = gate.admit("10.0.0.1:1").unwrap();
        let _a2 = gate.admit("10.0.0.1:2").unwrap();
        assert_eq!(gate.admit("10.0.0.1:3").err(), Some(Full::Address));
        let _b1 = gate.admit("10.0.0.2:1").unwrap();
        assert_eq!(gate.admit("10.0.0.3:1").err(), Some(Full::Broker));
        assert_eq!(gate.admitted(), 3);
        assert_eq!(
            a1.verify(19 * 1024, || true).await,
            Some(true),
            "costlier than the budget: runs alone"
        );
        assert_eq!(gate.admitted(), 2);
        assert!(gate.admit("10.0.0.3:1").is_ok());
    }

    #[tokio::test]
    async fn memory_in_use_stays_within_the_budget() {
        let gate = HashGate::new(3 << 20, 100, 100);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut checks = Vec::new();
        for i in 0..12 {
            let ticket = gate.admit(&format!("10.0.0.{i}:1")).unwrap();
            let (running, peak) = (running.clone(), peak.clone());
            checks.push(tokio::spawn(ticket.verify(1024, move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                true
            })));
        }
        for c in checks {
            assert_eq!(c.await.unwrap(), Some(true));
        }
        assert!(peak.load(Ordering::SeqCst) <= 3, "{peak:?}");
        assert_eq!(gate.admitted(), 0);
    }
}
