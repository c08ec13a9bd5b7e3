//! # petrel-cluster: one logical broker over several petrel nodes
//!
//! Nodes share a NATS cluster (JetStream for durable paths and shared state) as their routing
//! fabric; petrel has no cluster protocol of its own. Each node is a whole broker; this crate
//! plugs a [`NatsFabric`] into its engine (`petrel_engine::fabric`) and runs the tasks that
//! move messages, interest and retained messages between the nodes ([`Cluster`]).
//!
//! * [`subject`]: MQTT topics and filters as NATS subjects, reversibly.
//! * [`names`]: every name petrel uses in NATS (subjects, stream, consumers, buckets, keys).
//! * `interest`: the other nodes' subscriptions, from the interest bucket.
//! * `fabric`: the engine's side (no waiting), `node`: the NATS side (tasks).
//! * `wire`: what a message looks like between nodes.

mod fabric;
mod handover;
mod interest;
pub mod names;
mod node;
pub mod subject;
mod wire;

pub use fabric::{FabricStats, NatsFabric};
pub use node::{Cluster, ClusterConfig, ClusterStatus, Heartbeat, Member, SharedGroupStatus};
