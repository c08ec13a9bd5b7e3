//! The attacker's view (issue 20): each attack on the broker is a test here, against the real
//! `petrel` binary over real sockets, with the bound it must stay within (memory, time,
//! descriptors, what it may reveal). SECURITY.md lists the threat model and the limits these
//! tests hold the broker to.
//!
//! One file per surface; each test names the attack and its bound.

#[path = "../support/mod.rs"]
mod support;

mod login;
mod retained;
mod sessions;
mod slow_subscriber;
mod store;
mod transport;
