//! One module per scenario family. Each builds its clients' plans by construction (so the
//! expected delivery count is exact), runs them, and fills the report.

pub mod connections;
pub mod pubsub;
pub mod retained;
pub mod wildcards;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::BytesMut;

use crate::error::BenchError;
use crate::subscriber::SubscriberPlan;

/// A subscriber plan hearing publishers `pub_base .. pub_base + pubs`, each sending sequence
/// numbers below `per_pub`.
pub(crate) fn sub_plan(pub_base: u32, pubs: u32, per_pub: u32, expected: u64) -> SubscriberPlan {
    SubscriberPlan {
        pub_base,
        pubs,
        per_pub,
        expected,
        retained_only: false,
        initial: BytesMut::new(),
        // Replaced by the flow's shared flag.
        publishers_done: Arc::new(AtomicBool::new(false)),
    }
}

pub(crate) fn at_least_one(flag: &str, value: u32) -> Result<(), BenchError> {
    if value == 0 {
        return Err(BenchError::Usage(format!("{flag} must be at least 1")));
    }
    Ok(())
}
