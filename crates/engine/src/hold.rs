//! How long one subscriber may hold its publishers back.
//!
//! Flow control pauses a publisher whose message took a connected subscriber's queue past its
//! bounds, so that nothing acknowledged is lost to a subscriber that is merely behind. A
//! subscriber that reads nothing is easy to spot; one that reads a message now and then (a
//! trickle) always shows progress, and without a limit would pause its publishers, and with
//! them every other subscriber of their topics, for as long as it likes. So each subscriber
//! has a budget of hold time: while at least one publisher waits on it, the budget is spent
//! one second per second; while none does, it comes back at `flow_control_timeout` per
//! `flow_control_window`, up to `flow_control_timeout`. A subscriber whose budget runs out is
//! treated as a slow consumer: its publishers stop waiting for it and its own queue's overflow
//! policy applies to it. Over any window its publishers wait for it at most about
//! `flow_control_timeout` plus what came back meanwhile, so the others keep most of their rate.

use std::time::{Duration, Instant};

/// A subscriber's hold time: what it has used and whether it is holding now.
#[derive(Debug, Default)]
pub struct HoldBudget {
    /// Hold time spent and not yet come back.
    used: Duration,
    /// When `used` was last brought up to date.
    at: Option<Instant>,
    /// Since when publishers have been waiting on this subscriber, while they are.
    since: Option<Instant>,
    /// When its running out was last logged: a subscriber that keeps running out is logged
    /// once per window, not once per episode.
    logged_at: Option<Instant>,
}

impl HoldBudget {
    /// Brings `used` up to `now`: spent while holding, coming back while not.
    fn update(&mut self, now: Instant, budget: Duration, window: Duration) {
        let elapsed = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.at = Some(now);
        if self.since.is_some() {
            self.used += elapsed;
        } else if !window.is_zero() {
            let back = elapsed.mul_f64(budget.as_secs_f64() / window.as_secs_f64());
            self.used = self.used.saturating_sub(back);
        } else {
            self.used = Duration::ZERO;
        }
    }

    /// Hold time left at `now` of a budget of `budget` per `window`.
    pub fn left(&mut self, now: Instant, budget: Duration, window: Duration) -> Duration {
        self.update(now, budget, window);
        budget.saturating_sub(self.used)
    }

    /// A publisher starts waiting on this subscriber: returns the hold time left (zero: the
    /// subscriber is out of budget, and the publisher should not wait).
    pub fn start(&mut self, now: Instant, budget: Duration, window: Duration) -> Duration {
        let left = self.left(now, budget, window);
        if self.since.is_none() && !left.is_zero() {
            self.since = Some(now);
        }
        left
    }

    /// No publisher waits on this subscriber any more (its queue drained to half, it was
    /// found slow, it went away).
    pub fn end(&mut self, now: Instant, budget: Duration, window: Duration) {
        self.update(now, budget, window);
        self.since = None;
    }

    /// Publishers stopped waiting without a time to count to (the session went offline or
    /// ended): the hold since the last update is not counted.
    pub fn cancel(&mut self) {
        self.since = None;
    }

    /// Whether running out at `now` should be logged: at most once per `window`.
    pub fn should_log(&mut self, now: Instant, window: Duration) -> bool {
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= window);
        if due {
            self.logged_at = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_secs(5);
    const W: Duration = Duration::from_secs(60);

    #[test]
    fn holding_spends_the_budget_and_it_comes_back_over_the_window() {
        let t0 = Instant::now();
        let mut h = HoldBudget::default();
        assert_eq!(h.start(t0, B, W), B);
        // A second publisher waiting does not restart the clock.
        assert_eq!(
            h.start(t0 + Duration::from_secs(2), B, W),
            Duration::from_secs(3)
        );
        assert_eq!(h.left(t0 + Duration::from_secs(5), B, W), Duration::ZERO);
        assert_eq!(h.start(t0 + Duration::from_secs(5), B, W), Duration::ZERO);
        h.end(t0 + Duration::from_secs(5), B, W);
        // 12 s later one second has come back (5 s per 60 s).
        let left = h.left(t0 + Duration::from_secs(17), B, W);
        assert_eq!(left, Duration::from_secs(1));
        // A full window later, the whole budget, and no more.
        assert_eq!(h.left(t0 + Duration::from_secs(200), B, W), B);
    }

    #[test]
    fn short_holds_add_up() {
        let t0 = Instant::now();
        let mut h = HoldBudget::default();
        let mut t = t0;
        // Held 1 s of every 1.2 s: the budget runs out within the first few episodes.
        let mut episodes = 0;
        while !h.start(t, B, W).is_zero() {
            h.end(t + Duration::from_secs(1), B, W);
            t += Duration::from_millis(1200);
            episodes += 1;
            assert!(episodes < 10, "a trickle of short holds is never stopped");
        }
        assert!(episodes >= 5, "{episodes}");
    }

    #[test]
    fn running_out_is_logged_once_per_window() {
        let t0 = Instant::now();
        let mut h = HoldBudget::default();
        assert!(h.should_log(t0, W));
        assert!(!h.should_log(t0 + Duration::from_secs(30), W));
        assert!(h.should_log(t0 + Duration::from_secs(61), W));
    }
}
