//! Which broker each client connects to when a run spreads its clients over several brokers
//! (`--ports`: the nodes of a cluster). One rule serves every scenario:
//!
//! ```text
//! subscriber i ──▶ broker i mod n          publisher i ──▶ broker (i + 1) mod n
//!
//! pairs, n = 3     sub 0 @0  pub 0 @1      sub 1 @1  pub 1 @2      sub 2 @2  pub 2 @0  …
//! fan-in           sub 0 @0                pubs 0, 1, 2, … @1, @2, @0, @1, …
//! fan-out          pub 0 @1                subs 0, 1, 2, … @0, @1, @2, @0, …
//! ```
//!
//! So with two or more brokers publisher i and subscriber i are never on the same broker (every
//! message of `pairs` crosses), fan-in's publishers sit on every broker with the subscriber on
//! the first, and fan-out's subscribers sit on every broker with the publisher on the second.
//! With one broker every client is on it, which is the plain `--port` run.

/// The two kinds of client a scenario places. Clients that only connect (the `connections`
/// scenario) are placed as subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Subscriber,
    Publisher,
}

/// The index, among `brokers` brokers (at least one), of the broker client `i` of `role`
/// connects to.
pub fn broker_index(role: Role, i: u32, brokers: usize) -> usize {
    let n = brokers.max(1);
    let i = i as usize;
    match role {
        Role::Subscriber => i % n,
        // One broker further than the subscriber of the same index.
        Role::Publisher => (i % n + 1) % n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(role: Role, count: u32, brokers: usize) -> Vec<usize> {
        (0..count).map(|i| broker_index(role, i, brokers)).collect()
    }

    #[test]
    fn one_broker_takes_every_client() {
        assert_eq!(place(Role::Subscriber, 4, 1), [0, 0, 0, 0]);
        assert_eq!(place(Role::Publisher, 4, 1), [0, 0, 0, 0]);
    }

    #[test]
    fn pairs_always_cross_brokers() {
        for brokers in 2..=5 {
            for i in 0..50 {
                assert_ne!(
                    broker_index(Role::Subscriber, i, brokers),
                    broker_index(Role::Publisher, i, brokers),
                    "pair {i} over {brokers} brokers"
                );
            }
        }
    }

    #[test]
    fn fan_in_publishers_cover_every_broker_and_the_subscriber_is_on_the_first() {
        assert_eq!(broker_index(Role::Subscriber, 0, 3), 0);
        assert_eq!(place(Role::Publisher, 8, 3), [1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn fan_out_subscribers_cover_every_broker_and_the_publisher_is_on_the_second() {
        assert_eq!(broker_index(Role::Publisher, 0, 3), 1);
        assert_eq!(place(Role::Subscriber, 5, 3), [0, 1, 2, 0, 1]);
    }

    #[test]
    fn zero_brokers_is_treated_as_one() {
        assert_eq!(broker_index(Role::Publisher, 7, 0), 0);
    }
}
