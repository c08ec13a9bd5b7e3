//! File descriptors: how many the process may hold, and how they are shared out between the
//! listeners, so that no listener can take the last ones from the others (issue 20, item 7).
//!
//! ```text
//! RLIMIT_NOFILE (soft, raised to the hard limit at start)
//!   − reserved_descriptors        store files, logs, config reloads, hook, bridges, NATS
//!   − one per listening socket, and one per listener for the connection its accept loop
//!     holds while it waits for a slot
//!   − admin.max_connections       the admin listener's own slots
//!   = descriptors for MQTT clients; the server-wide total is max_connections lowered to this
//!        ├─ each listener's reserved_connections: its alone
//!        └─ the rest: shared, first come first served
//! ```
//!
//! Each listener takes a slot before it accepts (its own `max_connections`), then one of its
//! reserved ones, else a shared one; the admin listener takes one of its own before it
//! accepts. Every descriptor a connection holds is counted before the kernel hands it over,
//! so a flood on one port leaves the others' descriptors (and the process's own) alone.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Fewer descriptors for clients than this is a limit set by mistake: the start stops.
const MIN_CONNECTIONS: usize = 16;

/// How the descriptors were shared out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The soft RLIMIT_NOFILE in force (`None`: unknown, nothing lowered).
    pub limit: Option<u64>,
    /// Client connections across all MQTT listeners: `max_connections`, lowered to fit.
    pub connections: usize,
    /// Per listener, the connections it alone may use.
    pub reserved: Vec<usize>,
}

impl Plan {
    /// The shared slots and each listener's reserved ones.
    pub fn semaphores(&self) -> (Arc<Semaphore>, Vec<Arc<Semaphore>>) {
        let reserved: usize = self.reserved.iter().sum();
        let shared = Arc::new(Semaphore::new(self.connections.saturating_sub(reserved)));
        let own = self
            .reserved
            .iter()
            .map(|n| Arc::new(Semaphore::new(*n)))
            .collect();
        (shared, own)
    }
}

/// What the plan is made from.
pub struct Needs {
    /// The top-level `max_connections`.
    pub max_connections: usize,
    pub reserved_descriptors: usize,
    /// The admin listener's `max_connections` (0 when it does not run).
    pub admin_connections: usize,
    /// Per MQTT listener, `min(reserved_connections, max_connections)`.
    pub listener_reserves: Vec<usize>,
}

/// Shares `limit` descriptors out; an error says why they do not suffice. The reserves are
/// carved out of the total, never added to it: each is held to an equal part of the total
/// when together they would not fit.
pub fn plan(limit: Option<u64>, needs: &Needs) -> Result<Plan, String> {
    let reserves = |total: usize| {
        let part = total / needs.listener_reserves.len().max(1);
        let reserved: usize = needs.listener_reserves.iter().sum();
        needs
            .listener_reserves
            .iter()
            .map(|r| if reserved > total { (*r).min(part) } else { *r })
            .collect()
    };
    let Some(limit) = limit else {
        return Ok(Plan {
            limit,
            connections: needs.max_connections,
            reserved: reserves(needs.max_connections),
        });
    };
    let fixed = needs.reserved_descriptors
        + 2 * needs.listener_reserves.len()
        + needs.admin_connections
        // The admin listener's socket.
        + 1;
    let left = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(fixed);
    let wanted = needs.listener_reserves.len().max(MIN_CONNECTIONS);
    if left < wanted {
        return Err(format!(
            "the open file limit (RLIMIT_NOFILE {limit}) leaves {left} descriptors for client \
             connections after reserved_descriptors ({}), admin.max_connections ({}) and the \
             listener sockets; at least {wanted} are needed: raise the limit (ulimit -n, \
             systemd LimitNOFILE) or lower those settings",
            needs.reserved_descriptors, needs.admin_connections
        ));
    }
    let connections = needs.max_connections.min(left);
    Ok(Plan {
        limit: Some(limit),
        connections,
        reserved: reserves(connections),
    })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (a server wants all it may have) and
/// returns the soft limit now in force; `None` if it cannot be read.
pub fn raise_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(max: usize, reserves: Vec<usize>) -> Needs {
        Needs {
            max_connections: max,
            reserved_descriptors: 64,
            admin_connections: 64,
            listener_reserves: reserves,
        }
    }

    #[test]
    fn connections_get_what_the_limit_leaves() {
        // 1024 − 64 − 64 − 1 − 2 × 2 = 891
        let plan = plan(Some(1024), &needs(100_000, vec![32, 32])).unwrap();
        assert_eq!(plan.connections, 891);
        let (shared, own) = plan.semaphores();
        assert_eq!(shared.available_permits(), 891 - 64);
        assert_eq!(own[0].available_permits(), 32);
        // A configured total below what the limit allows stands.
        assert_eq!(plan_of(Some(1024), 500), 500);
        // No known limit: as configured.
        assert_eq!(plan_of(None, 100_000), 100_000);
    }

    #[test]
    fn reserves_are_carved_out_of_a_small_total() {
        let plan = plan(Some(1024), &needs(1, vec![32, 32])).unwrap();
        assert_eq!(plan.connections, 1, "max_connections is a hard cap");
        assert_eq!(plan.reserved, vec![0, 0]);
        assert_eq!(plan.semaphores().0.available_permits(), 1);
        let plan = super::plan(Some(1024), &needs(40, vec![32, 4])).unwrap();
        assert_eq!(plan.reserved, vec![32, 4], "they fit");
        let plan = super::plan(Some(1024), &needs(30, vec![32, 4])).unwrap();
        assert_eq!(plan.reserved, vec![15, 4], "each held to half of 30");
        assert_eq!(plan.semaphores().0.available_permits(), 11);
    }

    fn plan_of(limit: Option<u64>, max: usize) -> usize {
        plan(limit, &needs(max, vec![32])).unwrap().connections
    }

    #[test]
    fn a_limit_below_the_reserves_is_an_error() {
        let error = plan(Some(140), &needs(100_000, vec![32, 32])).unwrap_err();
        assert!(error.contains("RLIMIT_NOFILE 140"), "{error}");
    }
}
