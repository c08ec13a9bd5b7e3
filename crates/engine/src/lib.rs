//! # petrel-engine: the broker without I/O
//!
//! Everything petrel decides about MQTT lives here; nothing here touches a socket or a clock
//! (callers pass `now`), and nothing depends on tokio. The server crate feeds bytes in and
//! writes bytes out.
//!
//! ```text
//!  server driver ──decoded Packet──▶ Connection::handle_packet(now, packet)
//!        ▲                              │  CONNECT → Broker::attach (registry, takeover)
//!        │                              │  PUBLISH → Broker::route ─▶ topic_index (read lock)
//!        │                              │                 └─▶ Session::offer (bounded queue,
//!        │                              │                        wakes that session's driver)
//!        │                              │  SUBSCRIBE → index insert + retained replay
//!        └── Connection::output() ◀─────┴─ Connection::poll_deliver drains the session queue
//!                                          through the in-flight window into the write buffer
//! ```
//!
//! * [`connection`]: one state machine per network connection (CONNECT, keepalive, QoS flows,
//!   will), for every protocol version.
//! * [`session`]: state that outlives a connection; its bounded queue is the subscriber's
//!   outbox.
//! * [`broker`]: the shared registry, subscription index and retained store; the lock order.
//! * [`topic_index`], [`retained`]: the tries that match topics against filters.
//! * [`auth`], [`store`], [`fabric`]: the traits that authentication, durability and other
//!   cluster nodes plug into.
//! * [`acl`]: topic authorization rules, compiled per client at CONNECT.
//! * [`stats`], [`activity`]: lock-free counters, and per-topic counts while operators watch.

pub mod acl;
pub mod activity;
pub mod auth;
pub mod broker;
pub mod connection;
pub mod fabric;
pub mod hold;
pub mod limits;
pub mod message;
pub mod record;
pub mod retained;
pub mod retained_quota;
pub mod scram;
pub mod session;
pub mod shared;
pub mod stats;
pub mod store;
pub mod topic_index;

pub use broker::Broker;
pub use connection::{CloseReason, Connection, Violation};
pub use limits::Limits;
pub use message::Message;
