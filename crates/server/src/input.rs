//! The broker-wide budget for partial input: bytes of packets (and WebSocket messages) that
//! have begun to arrive and are not complete yet, over all connections together.
//!
//! A complete packet is decoded and leaves the read buffer at once, so what a connection
//! holds between reads is the start of one packet, at most `max_packet_size` (before CONNECT,
//! at most `max_connect_size`). Many connections each holding that much add up; the budget
//! (`mqtt.max_partial_input_total`) bounds the sum. Each holder grows only while the total
//! stays under its cap, which depends on what the connection has proved:
//!
//! - not authenticated yet: the budget (so these are the first shed);
//! - authenticated with keep alive 0: twice the budget. Nothing bounds how long such a
//!   connection may hold an incomplete packet (anonymous clients may open them), so past
//!   twice the budget they are closed too;
//! - authenticated with a keep alive: counted, never refused. Its keepalive deadline (only
//!   complete packets move it) bounds how long it can hold one, and refusing it would close
//!   clients that merely publish large messages under load.
//!
//! Holders: the driver's read buffer, the WebSocket layer before CONNECT (`ws.rs`) and the
//! PROXY header being read (`proxy.rs`). Each keeps its own share and gives it back when it
//! completes its packet (message, header) or ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// The bytes all shares hold together.
#[derive(Default)]
pub struct InputBudget {
    held: AtomicUsize,
}

impl InputBudget {
    pub fn new() -> Arc<InputBudget> {
        Arc::new(InputBudget::default())
    }

    /// Bytes held now, over all connections.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }
}

/// Growth past the budget refused for a connection that is not authenticated.
#[derive(Debug)]
pub struct OverBudget;

/// One holder's part of the budget: a connection's read buffer, or a WebSocket message being
/// assembled. Released when dropped.
pub struct InputShare {
    /// `None`: not metered (a bridge's own connection to a broker it chose).
    budget: Option<Arc<InputBudget>>,
    held: usize,
    /// Set once the connection is authenticated; shared with the WebSocket layer beneath the
    /// driver, which buffers a message before the driver sees its bytes.
    authenticated: Option<Arc<AtomicBool>>,
}

impl InputShare {
    pub fn new(budget: Arc<InputBudget>) -> InputShare {
        InputShare {
            budget: Some(budget),
            held: 0,
            authenticated: None,
        }
    }

    pub fn unmetered() -> InputShare {
        InputShare {
            budget: None,
            held: 0,
            authenticated: None,
        }
    }

    /// A second share of the same budget for the layer beneath this one (WebSocket), which
    /// learns from this share when the connection is authenticated.
    pub fn beneath(&mut self) -> InputShare {
        let flag = self
            .authenticated
            .get_or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone();
        InputShare {
            budget: self.budget.clone(),
            held: 0,
            authenticated: Some(flag),
        }
    }

    /// The connection is authenticated: its shares are no longer refused growth.
    pub fn set_authenticated(&self) {
        if let Some(flag) = &self.authenticated {
            flag.store(true, Relaxed);
        }
    }

    /// Whether the connection is authenticated, as told by the share above (WebSocket layer).
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
            .as_ref()
            .is_some_and(|flag| flag.load(Relaxed))
    }

    /// What this holder holds now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// This holder now holds `bytes`. Growth that takes the total past `cap` is refused (and
    /// not recorded).
    pub fn hold(&mut self, bytes: usize, cap: usize) -> Result<(), OverBudget> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        // The common case, a packet read whole: no shared counter touched.
        if bytes == self.held {
            return Ok(());
        }
        if bytes <= self.held {
            budget.held.fetch_sub(self.held - bytes, Relaxed);
            self.held = bytes;
            return Ok(());
        }
        let grow = bytes - self.held;
        let total = budget.held.fetch_add(grow, Relaxed) + grow;
        if total > cap {
            budget.held.fetch_sub(grow, Relaxed);
            return Err(OverBudget);
        }
        self.held = bytes;
        Ok(())
    }
}

impl Drop for InputShare {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.held.fetch_sub(self.held, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_growth_past_the_budget_is_refused() {
        let budget = InputBudget::new();
        let mut a = InputShare::new(budget.clone());
        let mut b = InputShare::new(budget.clone());
        a.hold(60, 100).unwrap();
        assert!(b.hold(50, 100).is_err(), "60 + 50 > 100");
        assert_eq!(budget.held(), 60, "the refused growth is not recorded");
        b.hold(50, 200).unwrap();
        assert_eq!(
            budget.held(),
            110,
            "a holder with a higher cap grows past the budget"
        );
        let mut c = InputShare::new(budget.clone());
        assert!(c.hold(91, 200).is_err(), "but not past its cap");
        drop(c);
        a.hold(10, 100).unwrap();
        assert_eq!(budget.held(), 60);
        drop(b);
        drop(a);
        assert_eq!(budget.held(), 0, "shares are given back");
    }

    #[test]
    fn the_layer_beneath_learns_of_authentication() {
        let mut driver = InputShare::new(InputBudget::new());
        let ws = driver.beneath();
        assert!(!ws.is_authenticated());
        driver.set_authenticated();
        assert!(ws.is_authenticated());
        assert!(InputShare::unmetered().hold(usize::MAX, 0).is_ok());
    }
}
