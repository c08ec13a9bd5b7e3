//! # petrel-fuzzing: the checks behind the fuzz targets
//!
//! Each function takes arbitrary bytes and panics if petrel misbehaves on them. The cargo-fuzz
//! targets in `fuzz/` (nightly, libFuzzer) call them with generated inputs; the tests of this
//! crate replay the checked-in corpus (`fuzz/corpus/<target>/`) and the conformance corpus's
//! packets with stable Rust, so CI runs every input the fuzzers ever kept.
//!
//! * [`decode`]: the decoder, for every protocol version, with a round-trip oracle.
//! * [`topics`]: the topic-filter parser and the two tries (subscriptions, retained), checked
//!   against the obvious reference matcher.
//! * [`session`]: packet sequences driven into the session engine, the first bytes choosing
//!   the protocol version and the state the connection starts from.

mod decode;
mod session;
mod topics;

pub use decode::decode;
pub use session::session;
pub use topics::topics;

/// A check: panics if petrel misbehaves on the input.
pub type Check = fn(&[u8]);

/// The targets by name, for replaying a corpus directory named after each.
pub const TARGETS: &[(&str, Check)] =
    &[("decode", decode), ("topics", topics), ("session", session)];
