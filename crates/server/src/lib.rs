//! # petrel-server: the broker process
//!
//! ```text
//! main.rs ── CLI, logging, signals
//!    └─ server.rs ── config → engine limits; binds listeners; waits for shutdown
//!          └─ listener.rs ── accept loop per listener (connection limit, rate limit, EMFILE
//!                │              back-off); PROXY header, TLS, WebSocket upgrade per transport
//!                │   proxy.rs (PROXY v1/v2) · tls.rs (rustls, reload) · ws.rs (upgrade, frames)
//!                └─ driver.rs ── one task per connection: stream ⇄ petrel_engine::Connection
//!                      input.rs ── the broker-wide budget for incomplete packets
//! descriptors.rs ── RLIMIT_NOFILE shared out: client connections, admin, a reserve
//! config.rs ── the TOML file: shape, defaults, validation with file:line: key: problem
//! acl_file.rs ── topic authorization rules, read at start
//! auth_hook.rs ── the HTTP authentication hook
//! passwords.rs ── password files (PHC hashes), verified off the connection tasks
//! login_guard.rs ── failed logins per address, bounds on concurrent hash checks and memory
//! auth_secret.rs ── the secret SCRAM's fake salts are derived from, kept across restarts
//! admin/ ── the operations HTTP listener: /metrics, /healthz, /readyz, the JSON API, dashboard
//! sys_topics.rs ── the $SYS/broker/... figures, published every sys_interval
//! store_tool.rs ── `petrel store check` / `petrel store salvage`
//! ```
//!
//! The engine decides everything about MQTT; this crate only moves bytes, time and signals.

pub mod acl_file;
pub mod admin;
mod auth_hook;
pub mod auth_secret;
pub mod bridge;
pub mod config;
pub mod descriptors;
mod driver;
mod input;
pub mod listener;
pub mod login_guard;
pub mod passwords;
mod proxy;
pub mod server;
pub mod store_tool;
pub mod sys_topics;
pub mod tls;
mod ws;

pub use config::Config;
pub use server::{Server, ServerError};
