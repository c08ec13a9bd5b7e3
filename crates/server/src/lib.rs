//! # petrel-server: the broker process
//!
//! ```text
//! main.rs ── CLI, logging, signals
//!    └─ server.rs ── config → engine limits; binds listeners; waits for shutdown
//!          └─ listener.rs ── accept loop per listener (connection limit, EMFILE back-off)
//!                └─ driver.rs ── one task per connection: socket ⇄ petrel_engine::Connection
//! config.rs ── the TOML file: shape, defaults, validation with file:line: key: problem
//! ```
//!
//! The engine decides everything about MQTT; this crate only moves bytes, time and signals.

pub mod config;
mod driver;
mod listener;
pub mod server;

pub use config::Config;
pub use server::{Server, ServerError};
